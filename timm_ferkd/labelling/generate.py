"""Teacher -> bank: label R regions of every image once (distributed, resumable).

Under ``torchrun`` rank r labels the shards s with ``s % world == r``, each batched identically
whatever the number of processes, so a bank made by N processes is byte-identical to one made by
one. A killed job rerun with the same command skips the recorded shards and redoes the rest.
"""
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils.distributed import init_distributed_device_so
from torch.utils.data import DataLoader, Dataset

from timm_ferkd.bank.format import BankManifest, ShardRecord, TeacherInfo
from timm_ferkd.bank.codes import label_storage, label_tensors
from timm_ferkd.bank.labels import LABEL_TYPES, stored_k, top_values
from timm_ferkd.bank.regions import (
    SAMPLER_NAME, SAMPLER_VERSION, RegionSampler, check_region_params, pil_interpolation, replay_region)
from timm_ferkd.bank.validate import shard_metadata
from timm_ferkd.bank.writer import (
    atomic_write_bytes, check_resumable, discard_unfinished, finished_shards, sha256_file, write_manifest, write_shard)
from timm_ferkd.data.source import ImageSource, create_image_source, image_mode_for_chans, stats_for_chans
from timm_ferkd.errors import ConfigError
from timm_ferkd.losses import feature_normalized_logits

__all__ = ['GenerateConfig', 'generate_bank', 'resume_settings', 'BYTE_NEUTRAL_OPTIONS']

_logger = logging.getLogger(__name__)
_SETTINGS_NAME = 'generation.json'
# GenerateConfig fields that change no byte of the shards (the dataset options only choose the images,
# which the manifest's dataset identity records). Every other field is in ``resume_settings``.
BYTE_NEUTRAL_OPTIONS = ('output', 'data_dir', 'download', 'extra_dataset_kwargs', 'workers', 'progress')

@dataclass
class GenerateConfig:
    """Options of ``timm-ferkd generate`` (the flag of each field is ``--field-name``).

    ``input_size``, ``interpolation``, ``mean`` and ``std`` default to the teacher's ``pretrained_cfg``.
    ``batch_size`` counts crops per teacher forward; ``images_per_shard`` sets the unit of work and resume.
    ``fnkd_tau`` stores FNKD's feature-normalised teacher distribution ``softmax(tau * z / ||f||)`` (f the
    teacher's pooled pre-logit feature) instead of ``softmax(z / temperature)``.
    ``value_dtype`` 'uint8' stores 8-bit values and bit-packed indices (format 2, ``timm_ferkd.bank.codes``).
    """
    model: str
    output: str
    dataset: str = ''
    data_dir: Optional[str] = None
    split: str = 'train'
    checkpoint: Optional[str] = None
    pretrained: bool = False
    num_classes: Optional[int] = None
    in_chans: int = 3
    num_images: Optional[int] = None
    regions: int = 500
    topk: int = 5
    label_type: str = 'marginal_smoothing'
    temperature: float = 1.0
    fnkd_tau: Optional[float] = None
    value_dtype: str = 'float16'
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    input_size: Optional[Tuple[int, int, int]] = None
    interpolation: Optional[str] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    batch_size: int = 256
    workers: int = 4
    device: str = 'cuda' if torch.cuda.is_available() else 'cpu'
    amp: bool = False
    amp_dtype: str = 'bfloat16'
    channels_last: bool = False
    seed: int = 0
    images_per_shard: int = 1000
    download: bool = False
    progress: bool = True
    extra_dataset_kwargs: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise ``ConfigError`` for option values that cannot work, before anything is written."""
        for name in ('scale', 'ratio'):
            if not all(math.isfinite(v) for v in getattr(self, name)):
                raise ConfigError(f'--{name} {tuple(getattr(self, name))} must be finite')
        check_region_params(self.scale, self.ratio, self.regions)
        if self.label_type not in LABEL_TYPES:
            raise ConfigError(f'unknown --label-type {self.label_type!r}; choose one of {", ".join(LABEL_TYPES)}')
        label_storage(2, self.label_type, self.value_dtype)  # refuses unknown dtypes and uint8 'full' labels
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f'--temperature {self.temperature} must be a finite number > 0')
        if self.fnkd_tau is not None and not (math.isfinite(self.fnkd_tau) and self.fnkd_tau > 0):
            raise ConfigError(f'--fnkd-tau {self.fnkd_tau} must be a finite number > 0')
        if self.mean is not None and not all(math.isfinite(v) for v in self.mean):
            raise ConfigError(f'--mean {tuple(self.mean)} must be finite')
        if self.std is not None and not all(math.isfinite(v) and v > 0 for v in self.std):
            raise ConfigError(f'--std {tuple(self.std)} must be finite and > 0 (the teacher input is divided by it)')
        if self.input_size is not None and (len(self.input_size) != 3 or min(self.input_size) < 1):
            raise ConfigError(f'--input-size {tuple(self.input_size)} must be three positive integers C H W')
        if self.topk < 1:
            raise ConfigError(f'--topk {self.topk} must be >= 1')
        if self.batch_size < 1 or self.workers < 0 or self.images_per_shard < 1:
            raise ConfigError('--batch-size and --images-per-shard must be >= 1, --workers >= 0')
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f'--num-classes {self.num_classes} must be >= 1')
        if self.num_images is not None and self.num_images < 1:
            raise ConfigError(f'--num-images {self.num_images} must be >= 1')
        if not 0 <= self.seed < 1 << 64:
            raise ConfigError(f'--seed {self.seed} must lie in [0, 2**64)')
        if self.checkpoint is not None and not os.path.isfile(self.checkpoint):
            raise ConfigError(f'--checkpoint {self.checkpoint} does not exist')
        if self.amp_dtype not in ('bfloat16', 'float16'):
            raise ConfigError(f'--amp-dtype {self.amp_dtype!r} must be bfloat16 or float16')
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError(f'unknown --device {self.device!r}; use cpu, cuda or cuda:N') from None
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise ConfigError(f'--device {self.device}: CUDA is not available here; use --device cpu')


class _CropDataset(Dataset):
    """Item i: all R regions of image i, cropped and resized for the teacher, uint8 [R, C, H, W]."""

    def __init__(self, source: ImageSource, sampler: RegionSampler, regions: int,
                 size: Tuple[int, int], interpolation: int):
        self.source = source
        self.sampler = sampler
        self.regions = regions
        self.size = size
        self.interpolation = interpolation

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, target = self.source.load(index)
        height, width = image.height, image.width
        regions = self.sampler.sample(index, (height, width), range(self.regions))
        crops = np.stack([
            np.asarray(replay_region(image, box, flip, self.size, self.interpolation))
            for box, flip in zip(regions.boxes, regions.flips)])
        if crops.ndim == 3:
            crops = crops[..., None]
        return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous(), index, target, height, width


def _collate(items):
    return (torch.cat([i[0] for i in items]), [i[1] for i in items], [i[2] for i in items],
            [(i[3], i[4]) for i in items])


def _create_teacher(cfg: GenerateConfig, device: torch.device):
    import timm
    # without --checkpoint or --pretrained every rank must still build the same (random) teacher
    torch.manual_seed(cfg.seed)
    if ':' not in cfg.model and not timm.is_model(cfg.model):  # 'hf-hub:...' and 'local-dir:...' go to timm
        raise ConfigError(f'unknown --model {cfg.model!r}; list names with timm.list_models()')
    try:
        model = timm.create_model(
            cfg.model, pretrained=cfg.pretrained, num_classes=cfg.num_classes, in_chans=cfg.in_chans,
            checkpoint_path=cfg.checkpoint or '')
    except RuntimeError as e:
        raise ConfigError(f'cannot load teacher {cfg.model} from {cfg.checkpoint}: {str(e).splitlines()[0]}') from None
    model.eval().to(device)
    if cfg.channels_last and device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    return model


def _teacher_info(cfg: GenerateConfig, model) -> TeacherInfo:
    from timm.data import resolve_data_config
    data_cfg = resolve_data_config(model=model)
    input_size = tuple(cfg.input_size or data_cfg['input_size'])
    if input_size[0] != cfg.in_chans:
        input_size = (cfg.in_chans,) + tuple(input_size[1:])
    mean = tuple(cfg.mean or data_cfg['mean'])
    std = tuple(cfg.std or data_cfg['std'])
    mean, std = stats_for_chans(mean, cfg.in_chans), stats_for_chans(std, cfg.in_chans)
    interpolation = cfg.interpolation or data_cfg.get('interpolation', 'bicubic')
    pil_interpolation(interpolation)
    return TeacherInfo(
        model=cfg.model,
        checkpoint_sha256=sha256_file(cfg.checkpoint) if cfg.checkpoint else None,
        pretrained=cfg.pretrained,
        input_size=input_size,
        interpolation=interpolation,
        mean=mean,
        std=std,
    )


def resume_settings(cfg: GenerateConfig, manifest: BankManifest) -> dict:
    """What a rerun must share with the run that started a bank (``generation.json``).

    The manifest's settings plus every execution option but ``BYTE_NEUTRAL_OPTIONS`` (device type, mixed
    precision, crops per forward, ...), so a resume never mixes labels of another precision.

    Args:
        cfg: Generation options.
        manifest: The bank's manifest (its settings).

    Returns:
        JSON-normalised settings.
    """
    device = torch.device(cfg.device).type
    execution = {
        'device': device, 'amp': cfg.amp, 'amp_dtype': cfg.amp_dtype if cfg.amp else None,
        'batch_size': cfg.batch_size, 'channels_last': cfg.channels_last and device == 'cuda',
    }
    return json.loads(json.dumps(dict(manifest.settings(), execution=execution)))


def generate_bank(cfg: GenerateConfig) -> Path:
    """Label ``cfg.regions`` regions of every image with the teacher and write a bank to ``cfg.output``.

    Args:
        cfg: Generation options.

    Returns:
        The bank directory.
    """
    cfg.check()
    if dist.is_initialized():  # the caller's process group: timm would refuse to start a second one
        rank, world, device = dist.get_rank(), dist.get_world_size(), torch.device(cfg.device)
    else:  # joins torchrun's (or SLURM's) group: gloo on CPU, nccl on CUDA, cuda:LOCAL_RANK per process
        env = init_distributed_device_so(device=cfg.device)
        rank, world, device = env['global_rank'], env['world_size'], torch.device(env['device'])
    source = create_image_source(cfg.dataset, cfg.data_dir, cfg.split, image_mode=image_mode_for_chans(cfg.in_chans),
                                 download=cfg.download, **cfg.extra_dataset_kwargs)
    model = _create_teacher(cfg, device)
    num_classes = model.num_classes
    if cfg.num_classes is not None and num_classes != cfg.num_classes:
        raise ConfigError(f'teacher has {num_classes} classes but --num-classes is {cfg.num_classes}')
    k = stored_k(cfg.label_type, cfg.topk, num_classes)
    storage = label_storage(num_classes, cfg.label_type, cfg.value_dtype)
    teacher = _teacher_info(cfg, model)
    identity = source.identity
    num_images = min(cfg.num_images or identity.num_images, identity.num_images)
    manifest = BankManifest(
        num_classes=num_classes, regions_per_image=cfg.regions, topk=k, label_type=cfg.label_type,
        temperature=cfg.temperature, fnkd_tau=cfg.fnkd_tau, num_images=num_images,
        images_per_shard=cfg.images_per_shard,
        seed=cfg.seed, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), teacher=teacher, dataset=identity,
        sampler=SAMPLER_NAME, sampler_version=SAMPLER_VERSION,
        index_dtype=storage.index_dtype, value_dtype=storage.value_dtype, format_version=storage.format_version,
    )
    out = Path(cfg.output)
    settings = resume_settings(cfg, manifest)
    check_resumable(out, _SETTINGS_NAME, settings, 'a bank generation')
    if world > 1:
        dist.barrier()
    created = not out.exists()
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f'cannot create --output {out}: {e.strerror}') from None
    if world > 1:
        dist.barrier()
    try:
        _generate(cfg, manifest, settings, source, model, teacher, device, out, rank, world)
    except BaseException:
        if world == 1:
            discard_unfinished(out, manifest, _SETTINGS_NAME, created)
        raise
    return out


def _generate(cfg, manifest, settings, source, model, teacher, device, out: Path, rank: int, world: int) -> None:
    done = finished_shards(out, manifest)
    todo = [s for s in range(manifest.num_shards) if s % world == rank and s not in done]
    if rank == 0 and done:
        _logger.info(f'resuming: {len(done)} of {manifest.num_shards} shards already done')
    _label_shards(cfg, manifest, settings, source, model, teacher, device, out, todo, rank, world)

    if world > 1:
        dist.barrier()
    if rank == 0:
        write_manifest(out, manifest)
    if world > 1:
        dist.barrier()


def _label_shards(cfg, manifest, settings, source, model, teacher: TeacherInfo, device, out, todo, rank, world) -> None:
    size = tuple(teacher.input_size[1:])
    sampler = RegionSampler(seed=cfg.seed, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio))
    crops = _CropDataset(source, sampler, cfg.regions, size, pil_interpolation(teacher.interpolation))
    ranges = [manifest.shard_range(s) for s in todo]
    step = max(1, cfg.batch_size // cfg.regions)  # images per loader batch; no batch crosses a shard boundary
    batches = [list(range(start, min(start + step, first + count)))
               for first, count in ranges for start in range(first, first + count, step)]
    loader = DataLoader(
        crops, batch_sampler=batches, num_workers=cfg.workers,
        collate_fn=_collate, pin_memory=device.type == 'cuda',
        persistent_workers=False, prefetch_factor=4 if cfg.workers > 0 else None)
    mean = torch.tensor(teacher.mean, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(teacher.std, device=device).view(1, -1, 1, 1) * 255
    amp_dtype = torch.bfloat16 if cfg.amp_dtype == 'bfloat16' else torch.float16
    total_images = sum(count for _, count in ranges) * world
    from tqdm import tqdm
    progress = tqdm(total=total_images, unit='img', desc='generate', dynamic_ncols=True,
                    disable=not (rank == 0 and cfg.progress and todo))
    start = time.perf_counter()
    labelled = 0

    shard_iter = iter(zip(todo, ranges))
    current = next(shard_iter, None)
    pending: List[torch.Tensor] = []
    pending_count = 0
    probs_out: List[torch.Tensor] = []
    meta: List[Tuple[int, int, int, int]] = []

    def forward(batch: torch.Tensor) -> None:
        x = batch.to(device, non_blocking=True)
        if cfg.channels_last and device.type == 'cuda':
            x = x.contiguous(memory_format=torch.channels_last)
        x = (x.float() - mean) / std
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
            if cfg.fnkd_tau is None:
                logits = model(x).float() / cfg.temperature
            else:
                feature_map = model.forward_features(x)
                logits = feature_normalized_logits(model.forward_head(feature_map).float(),
                                                   model.forward_head(feature_map, pre_logits=True), cfg.fnkd_tau)
        probs_out.append(F.softmax(logits, dim=1).cpu())

    def flush(final: bool) -> None:
        nonlocal pending, pending_count
        if not pending:
            return
        stacked = torch.cat(pending)
        usable = stacked.shape[0] if final else (stacked.shape[0] // cfg.batch_size) * cfg.batch_size
        for start_ in range(0, usable, cfg.batch_size):
            forward(stacked[start_:start_ + cfg.batch_size])
        pending = [stacked[usable:]] if usable < stacked.shape[0] else []
        pending_count = stacked.shape[0] - usable

    for batch, indices, targets, sizes in loader:
        pending.append(batch)
        pending_count += batch.shape[0]
        meta.extend(zip(indices, targets, (s[0] for s in sizes), (s[1] for s in sizes)))
        if pending_count >= cfg.batch_size:
            flush(final=False)
        shard_index, (first, count) = current
        if meta and meta[-1][0] == first + count - 1:
            flush(final=True)
            probs = torch.cat(probs_out)
            _check_finite(probs, meta, cfg)
            if not (out / _SETTINGS_NAME).is_file():  # written with the first shard: a failure before leaves nothing
                atomic_write_bytes(out / _SETTINGS_NAME, json.dumps(settings, indent=2).encode())
            _write(out, manifest, shard_index, first, meta, probs, cfg.label_type)
            labelled += count
            probs_out.clear()
            meta = []
            current = next(shard_iter, None)
            progress.update(count * world)
            elapsed = time.perf_counter() - start
            progress.set_postfix(img_s=f'{labelled / elapsed:.1f}', regions_s=f'{labelled * cfg.regions / elapsed:.0f}')
    progress.close()
    elapsed = time.perf_counter() - start
    if rank == 0 and labelled:
        _logger.info(f'labelled {labelled} images ({labelled * cfg.regions} regions) on rank 0 in {elapsed:.1f}s: '
                     f'{labelled / elapsed:.1f} img/s, {labelled * cfg.regions / elapsed:.0f} regions/s')


def _check_finite(probs: torch.Tensor, meta, cfg: GenerateConfig) -> None:
    """Refuse NaN or inf teacher outputs: they would make a bank that trains on nothing."""
    bad = ~torch.isfinite(probs).all(dim=1)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        image, region = meta[row // cfg.regions][0], row % cfg.regions
        hint = ', or drop --amp (float16 overflows)' if cfg.amp else ''
        raise ConfigError(
            f'the teacher gave non-finite outputs (NaN or inf) for image {image} (region {region}); check the '
            f'--checkpoint weights, --mean/--std and --temperature{hint}')


def _write(out: Path, manifest: BankManifest, shard_index: int, first: int, meta, probs: torch.Tensor,
           label_type: str) -> ShardRecord:
    n, r, k = len(meta), manifest.regions_per_image, manifest.topk
    indices, values = top_values(probs, label_type, k)
    tensors = {
        'image_sizes': np.asarray([[m[2], m[3]] for m in meta], dtype=np.int32),
        'targets': np.asarray([m[1] for m in meta], dtype=np.int32),
    }
    storage = label_storage(manifest.num_classes, label_type, manifest.value_dtype)
    tensors.update(label_tensors(None if indices is None else indices.reshape(n, r, k), values.reshape(n, r, k),
                                 storage))
    return write_shard(out, shard_index, first, tensors, metadata=shard_metadata(manifest, shard_index))
