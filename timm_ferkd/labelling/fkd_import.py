"""Import official FKD / FerKD soft labels into a bank, without ever running pickled code.

The reference generator (``FKD_SLG/generate_soft_label.py``) writes one file per training image,
mirroring the ImageFolder layout with the image's extension replaced::

    SRC/train/n01440764/n01440764_10026.tar        (image train/n01440764/n01440764_10026.JPEG)

Each file is ``torch.save([coords, flip, quantized])`` of numpy arrays over the image's R regions:

    coords     float32 (fp16 with --use_fp16) [R, 4]  (i/H, j/W, h/H, w/W): the RandomResizedCrop box
               normalised by the image height H and width W
    flip       bool [R]                               horizontal flip after the crop
    quantized  per label type (float16 with --use_fp16):
               hard                       int64 [R]         argmax class
               smoothing                  float32 [R, 2]    (class, probability) of the argmax
               marginal_smoothing_k5/k10  float32 [R, 2, k] (classes; probabilities), descending
               marginal_renorm            float32 [R, 2, k] same as marginal_smoothing_k5 (generated as
                                                            ``marginal_renorm_k5``)

Since torch 2.6 ``torch.load`` refuses these files unless ``weights_only=False``, which would
execute whatever the pickle says. Here they are loaded with ``weights_only=True`` and an allowlist
of exactly the numpy globals such files need; anything else is refused before it can run.

The bank keeps the stored boxes (``sampler = 'explicit'``): the seeded sampler cannot reproduce FKD's
random boxes. ``hard`` labels keep no probability, so their stored value is 1.
"""
import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from timm_ferkd.bank.format import EXPLICIT_SAMPLER, BankManifest, TeacherInfo
from timm_ferkd.bank.codes import label_storage, label_tensors
from timm_ferkd.bank.validate import shard_metadata
from timm_ferkd.bank.writer import (
    atomic_write_bytes, check_resumable, discard_unfinished, finished_shards, write_manifest, write_shard)
from timm_ferkd.errors import BankError, ConfigError, FerKDError

__all__ = [
    'FKD_LABEL_TYPES', 'UnsafeLabelFileError', 'FKDImportConfig', 'FKDImportReport', 'fkd_safe_globals',
    'load_fkd_file', 'parse_fkd_label_type', 'convert_fkd_labels', 'fkd_label_keys', 'import_fkd',
]

_logger = logging.getLogger(__name__)

FKD_LABEL_TYPES = ('hard', 'smoothing', 'marginal_smoothing_k5', 'marginal_smoothing_k10', 'marginal_renorm')
SETTINGS_NAME = 'import.json'
REPORT_NAME = 'fkd-import-report.json'
FKD_SUFFIX = '.tar'
_EPS = 2e-3  # tolerance of fp16-stored coordinates and probabilities


class UnsafeLabelFileError(FerKDError):
    """A label file whose unpickling needs something other than plain numpy arrays (it could run code)."""


def fkd_safe_globals() -> List[Any]:
    """The globals FKD label files need, for ``torch.serialization.safe_globals``.

    numpy's array reconstructor (under its numpy 2 and numpy 1 module names), ``ndarray``,
    ``dtype`` and the dtype classes of the arrays FKD writes (float32, float16, int64, bool).
    """
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    allowed: List[Any] = [
        (_reconstruct, 'numpy._core.multiarray._reconstruct'),
        (_reconstruct, 'numpy.core.multiarray._reconstruct'),
        np.ndarray,
        np.dtype,
    ]
    dtypes = getattr(np, 'dtypes', None)  # numpy >= 1.25: each dtype has its own class
    return allowed + [getattr(dtypes, name) for name in ('Float32DType', 'Float16DType', 'Int64DType', 'BoolDType')
                      if hasattr(dtypes, name)]


def _allowed_names() -> set:
    return {e[1] if isinstance(e, tuple) else f'{e.__module__}.{e.__qualname__}' for e in fkd_safe_globals()}


def _refuse(path: os.PathLike, needed: Sequence[str]) -> UnsafeLabelFileError:
    return UnsafeLabelFileError(
        f'refusing to load {path}: it needs {", ".join(sorted(needed))}, not one of the numpy types FKD label files '
        f'use (loading it could run code); it is not an FKD label file or it was tampered with, remove it')


def load_fkd_file(path: os.PathLike) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load one FKD label file safely.

    Args:
        path: The ``.tar`` file.

    Returns:
        (coords, flip, quantized) numpy arrays as stored.
    """
    import torch
    allowed = _allowed_names()
    try:
        # list the globals without unpickling anything (zip files; legacy files go straight to the safe loader)
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed
    except Exception:
        needed = set()
    if needed:
        raise _refuse(path, needed)
    try:
        with torch.serialization.safe_globals(fkd_safe_globals()):
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r'GLOBAL ([\w.]+[\w])', str(e))
        if found:
            raise _refuse(path, set(found)) from None
        detail = [line.strip() for line in str(e).splitlines() if 'error' in line.lower() and line.strip()]
        raise UnsafeLabelFileError(
            f'refusing to load {path}: it is not a plain pickle of numpy arrays ({detail[-1] if detail else "unknown"} '
            f'); it is not an FKD label file, remove it') from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise BankError(f'cannot read FKD label file {path}: {str(e).splitlines()[0]}; it is truncated or '
                        f'corrupt, regenerate or re-download it') from None
    if not (isinstance(obj, (list, tuple)) and len(obj) == 3 and all(isinstance(a, np.ndarray) for a in obj)):
        raise BankError(f'{path} is not an FKD label file: expected [coords, flip, labels] numpy arrays, '
                        f'found {type(obj).__name__}')
    return obj[0], obj[1], obj[2]


def parse_fkd_label_type(label_type: str) -> Tuple[str, Optional[int]]:
    """(bank label type, k or None when read from the files) of an FKD ``--label_type``."""
    if label_type in ('hard', 'smoothing'):
        return label_type, 1
    match = re.fullmatch(r'marginal_(smoothing|renorm)(?:_k(\d+))?', label_type)
    if match and not (match.group(1) == 'smoothing' and match.group(2) is None):
        k = int(match.group(2)) if match.group(2) else None
        if k is None or k >= 1:
            return f'marginal_{match.group(1)}', k
    raise ConfigError(f'unknown FKD --label-type {label_type!r}; choose one of {", ".join(FKD_LABEL_TYPES)} '
                      f'(or marginal_smoothing_kN)')


def convert_fkd_labels(quantized: np.ndarray, label_type: str, source: str = 'labels') -> Tuple[np.ndarray, np.ndarray]:
    """Turn FKD's quantized labels into bank (indices, values), sorted by value, descending.

    Args:
        quantized: The file's third array.
        label_type: FKD label type (``FKD_LABEL_TYPES`` or ``marginal_smoothing_kN``).
        source: Name for error messages.

    Returns:
        (int64 indices [R, k], float32 values [R, k]).
    """
    kind, k = parse_fkd_label_type(label_type)
    q = np.asarray(quantized)
    if kind == 'hard' and q.ndim == 1:
        indices, values = q[:, None], np.ones((q.shape[0], 1), dtype=np.float32)
    elif kind == 'smoothing' and q.ndim == 2 and q.shape[1] == 2:
        indices, values = q[:, :1], q[:, 1:]
    elif kind.startswith('marginal') and q.ndim == 3 and q.shape[1] == 2 and (k is None or q.shape[2] == k):
        indices, values = q[:, 0, :], q[:, 1, :]
    else:
        expected = {'hard': '[R]', 'smoothing': '[R, 2]'}.get(kind, f'[R, 2, {k or "k"}]')
        raise BankError(f'{source}: labels of shape {tuple(q.shape)} do not fit --label-type {label_type} '
                        f'(expected {expected}); pass the label type the files were generated with')
    if not (np.all(np.isfinite(indices)) and np.all(indices == np.round(indices)) and np.all(indices >= 0)):
        raise BankError(f'{source}: class indices are not non-negative integers; the file is corrupt '
                        f'or --label-type {label_type} is wrong')
    values = values.astype(np.float32)
    if not (np.all(np.isfinite(values)) and values.min(initial=0) >= -_EPS and values.max(initial=0) <= 1 + _EPS):
        raise BankError(f'{source}: probabilities outside [0, 1]; the file is corrupt or --label-type '
                        f'{label_type} is wrong')
    if values.shape[1] > 1 and values.sum(axis=1).max(initial=0) > 1 + _EPS:
        raise BankError(f'{source}: the probabilities of a region sum to more than 1; the file is corrupt or '
                        f'--label-type {label_type} is wrong')
    values = values.clip(0, 1)  # fp16 rounding may step a hair outside; banks hold probabilities
    order = np.argsort(-values, axis=1, kind='stable')
    return np.take_along_axis(indices.astype(np.int64), order, axis=1), np.take_along_axis(values, order, axis=1)


def _check_regions(coords: np.ndarray, flip: np.ndarray, source: str) -> Tuple[np.ndarray, np.ndarray]:
    coords = np.asarray(coords)
    flip = np.asarray(flip).reshape(-1)
    if coords.ndim != 2 or coords.shape[1] != 4 or flip.shape[0] != coords.shape[0]:
        raise BankError(f'{source}: coords {tuple(coords.shape)} and flips {tuple(flip.shape)} are not [R, 4] and '
                        f'[R]; not an FKD label file')
    boxes = coords.astype(np.float32)
    t, l, h, w = boxes.T
    if not (np.all(np.isfinite(boxes)) and np.all(t >= -_EPS) and np.all(l >= -_EPS) and np.all(h > 0)
            and np.all(w > 0) and np.all(t + h <= 1 + _EPS) and np.all(l + w <= 1 + _EPS)):
        raise BankError(f'{source}: crop coordinates are not normalised (top, left, height, width) boxes inside '
                        f'the image; not an FKD label file')
    return boxes, (flip != 0).astype(np.uint8)


def fkd_label_keys(rel_path: str) -> List[str]:
    """Keys (label path relative to the split folder, without ``.tar``) an image's FKD file may have.

    FKD names the file after the image name up to its first dot (``path.split('.')[0]``); the
    key with only the last extension removed is tried too.
    """
    rel = rel_path.replace(os.sep, '/')
    folder, _, name = rel.rpartition('/')
    prefix = f'{folder}/' if folder else ''
    keys = [prefix + name.split('.')[0]]
    stem = prefix + name.rsplit('.', 1)[0] if '.' in name else prefix + name
    if stem not in keys:
        keys.append(stem)
    return keys


def _index_label_files(root: Path) -> Dict[str, str]:
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(FKD_SUFFIX):
                path = os.path.join(folder, name)
                files[os.path.relpath(path, root).replace(os.sep, '/')[:-len(FKD_SUFFIX)]] = path
    return files


@dataclass
class FKDImportConfig:
    """Options of ``timm-ferkd import-fkd``.

    ``src`` holds the FKD label folders; ``src/<split>`` is used when it exists, so both the folder
    that contains ``train/`` and the ``train/`` folder itself work.
    """
    src: str
    output: str
    dataset: str = ''
    data_dir: Optional[str] = None
    split: str = 'train'
    label_type: str = 'marginal_smoothing_k5'
    num_classes: Optional[int] = None
    regions: Optional[int] = None
    teacher: str = 'unknown (imported FKD labels)'
    temperature: float = 1.0
    scale: Tuple[float, float] = (0.08, 0.936)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    images_per_shard: int = 1000
    value_dtype: str = 'float16'
    workers: int = 4
    fill_missing: bool = False
    progress: bool = True
    extra_dataset_kwargs: dict = field(default_factory=dict)


@dataclass
class FKDImportReport:
    """What ``import_fkd`` found: the bank, and the images and label files that did not pair up."""
    bank: str
    label_root: str
    num_images: int
    matched: int
    missing: List[str]
    extra: List[str]
    filled: int

    def summary(self) -> str:
        """One line for the command line."""
        return (f'{self.matched} of {self.num_images} images matched an FKD label file; {len(self.missing)} missing'
                f'{" (filled with hard ground-truth labels)" if self.filled else ""}, {len(self.extra)} label files '
                f'without an image')


class _Items:
    """Item i: (i, (height, width), labels or None), computed in DataLoader workers.

    A ``FerKDError`` raised in a worker reaches the main process as the same class and one-line message.
    """

    def __init__(self, image_paths: List[str], label_files: List[Optional[str]], label_type: str, regions: int,
                 truncate: bool):
        self.image_paths = image_paths
        self.label_files = label_files
        self.label_type = label_type
        self.regions = regions
        self.truncate = truncate

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int):
        from PIL import Image
        try:
            with Image.open(self.image_paths[index]) as image:  # reads the header only
                width, height = image.size
        except OSError as e:
            raise BankError(f'cannot read image {self.image_paths[index]}: {e}') from None
        label_file = self.label_files[index]
        if label_file is None:
            return index, (height, width), None
        coords, flip, quantized = load_fkd_file(label_file)
        boxes, flips = _check_regions(coords, flip, label_file)
        indices, values = convert_fkd_labels(quantized, self.label_type, label_file)
        count = boxes.shape[0]
        if indices.shape[0] != count:
            raise BankError(f'{label_file}: {count} boxes but {indices.shape[0]} labels; not an FKD label file')
        if count < self.regions or (count > self.regions and not self.truncate):
            raise BankError(
                f'{label_file} has {count} regions, other files {self.regions}; pass --regions N to keep the '
                f'first N regions of every file')
        r = self.regions
        return index, (height, width), (boxes[:r], flips[:r], indices[:r], values[:r])


def _folder_paths(dataset: Any, name: str) -> Tuple[List[str], List[str]]:
    """(relative, absolute) image paths of a folder dataset, in dataset order."""
    reader = getattr(dataset, 'reader', None)
    if reader is not None and hasattr(reader, 'filename') and hasattr(reader, 'samples'):
        return ([str(reader.filename(i)) for i in range(len(dataset))],
                [str(reader.filename(i, absolute=True)) for i in range(len(dataset))])
    if hasattr(dataset, 'samples') and hasattr(dataset, 'root'):  # torchvision ImageFolder
        return [os.path.relpath(p, dataset.root) for p, _ in dataset.samples], [p for p, _ in dataset.samples]
    raise ConfigError(f'dataset {name!r} is not an image folder: FKD label files are matched to images by relative '
                      f'path, so import-fkd needs a folder dataset (--dataset "" or folder/...)')


def _fill_hard(target: int, regions: int, k: int, num_classes: int) -> Tuple[np.ndarray, ...]:
    others = [c for c in range(num_classes) if c != target][:k - 1]
    indices = np.tile(np.asarray([target] + others, dtype=np.int64), (regions, 1))
    values = np.zeros((regions, k), dtype=np.float32)
    values[:, 0] = 1.0
    boxes = np.tile(np.asarray([0, 0, 1, 1], dtype=np.float32), (regions, 1))
    return boxes, np.zeros(regions, dtype=np.uint8), indices, values


def import_fkd(cfg: FKDImportConfig) -> FKDImportReport:
    """Convert an FKD / FerKD label folder into a bank (``sampler = 'explicit'``).

    Args:
        cfg: Import options.

    Returns:
        The report (also written to ``<output>/fkd-import-report.json``).
    """
    from timm_ferkd.bank.identity import dataset_targets
    from timm_ferkd.data.source import create_image_source
    label_type, _ = parse_fkd_label_type(cfg.label_type)
    label_storage(2, label_type, cfg.value_dtype)  # refuses an unknown --value-dtype before any work
    if cfg.images_per_shard < 1 or cfg.workers < 0 or (cfg.regions is not None and cfg.regions < 1):
        raise ConfigError('--images-per-shard and --regions must be >= 1, --workers >= 0')
    src = Path(cfg.src)
    if not src.is_dir():
        raise ConfigError(f'FKD label folder {src} does not exist')
    root = src / cfg.split if (src / cfg.split).is_dir() else src
    source = create_image_source(cfg.dataset, cfg.data_dir, cfg.split, **cfg.extra_dataset_kwargs)
    dataset = source.dataset
    rel_paths, abs_paths = _folder_paths(dataset, cfg.dataset)
    targets = dataset_targets(dataset)
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None) or getattr(dataset, 'class_to_idx', None)
    num_classes = cfg.num_classes or (len(class_to_idx) if class_to_idx else int(targets.max()) + 1)

    available = _index_label_files(root)
    keys = [next((k for k in fkd_label_keys(rel) if k in available), None) for rel in rel_paths]
    label_files: List[Optional[str]] = [None if key is None else available[key] for key in keys]
    missing = [rel for rel, key in zip(rel_paths, keys) if key is None]
    extra = sorted(k + FKD_SUFFIX for k in set(available) - set(keys))
    report = FKDImportReport(bank=str(cfg.output), label_root=str(root), num_images=len(rel_paths),
                             matched=len(rel_paths) - len(missing), missing=missing, extra=extra, filled=0)
    if report.matched == 0:
        raise ConfigError(f'no FKD label file in {root} matches an image of the dataset ({len(available)} .tar files '
                          f'found); pass the folder that holds <{cfg.split}>/<class>/<image>.tar')
    if missing and not cfg.fill_missing:
        raise BankError(
            f'{len(missing)} of {len(rel_paths)} images have no FKD label file in {root} (e.g. '
            f'{", ".join(missing[:3])}); '
            f'complete the labels, or pass --fill-missing to give them hard ground-truth labels')

    first = next(f for f in label_files if f is not None)
    coords, _, quantized = load_fkd_file(first)
    regions = cfg.regions or coords.shape[0]
    k = convert_fkd_labels(quantized, cfg.label_type, first)[0].shape[1]
    if k > num_classes:
        raise ConfigError(f'the labels keep {k} classes but the dataset has {num_classes}; pass --num-classes')
    storage = label_storage(num_classes, label_type, cfg.value_dtype)
    manifest = BankManifest(
        num_classes=num_classes, regions_per_image=regions, topk=k, label_type=label_type,
        temperature=cfg.temperature, num_images=len(rel_paths), images_per_shard=cfg.images_per_shard, seed=0,
        scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), teacher=TeacherInfo(model=cfg.teacher),
        dataset=source.identity, sampler=EXPLICIT_SAMPLER, sampler_version=1,
        index_dtype=storage.index_dtype, value_dtype=storage.value_dtype, format_version=storage.format_version,
    )
    out = Path(cfg.output)
    settings = dict(manifest.settings(), fkd_source=str(root.resolve()), fkd_label_type=cfg.label_type,
                    fill_missing=cfg.fill_missing)
    settings = json.loads(json.dumps(settings))
    check_resumable(out, SETTINGS_NAME, settings, 'an FKD import')
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f'cannot create --output {out}: {e.strerror}') from None

    done = finished_shards(out, manifest)
    todo = [s for s in range(manifest.num_shards) if s not in done]
    items = _Items(abs_paths, label_files, cfg.label_type, regions, truncate=cfg.regions is not None)
    try:
        _write_shards(items, manifest, settings, todo, out, targets, cfg, report)
    except BaseException:
        discard_unfinished(out, manifest, SETTINGS_NAME, created)
        raise
    report.filled = len(missing)

    atomic_write_bytes(out / REPORT_NAME, (json.dumps(asdict(report), indent=2) + '\n').encode())
    write_manifest(out, manifest)
    return report


def _write_shards(items: _Items, manifest: BankManifest, settings: Dict[str, Any], todo: List[int], out: Path,
                  targets: np.ndarray, cfg: FKDImportConfig, report: FKDImportReport) -> None:
    from torch.utils.data import DataLoader
    if not todo:
        return
    order = []
    for s in todo:
        first, count = manifest.shard_range(s)
        order.extend(range(first, first + count))
    loader = DataLoader(items, batch_size=None, sampler=order, num_workers=cfg.workers,
                        collate_fn=_as_is, prefetch_factor=16 if cfg.workers > 0 else None)
    from tqdm import tqdm
    progress = tqdm(total=len(order), unit='img', desc='import-fkd', dynamic_ncols=True, disable=not cfg.progress)
    r, k = manifest.regions_per_image, manifest.topk
    shard_iter = iter(todo)
    shard = next(shard_iter)
    first, count = manifest.shard_range(shard)
    arrays = _empty_shard(count, r, k)
    for index, size, labels in loader:
        row = index - first
        if labels is None:
            labels = _fill_hard(int(targets[index]), r, k, manifest.num_classes)
        indices = labels[2]
        if indices.max(initial=0) >= manifest.num_classes:
            raise ConfigError(f'{items.label_files[index]} has class {int(indices.max())} but the bank has '
                              f'{manifest.num_classes} classes; pass --num-classes')
        arrays['image_sizes'][row], arrays['targets'][row] = size, targets[index]
        for name, value in zip(('boxes', 'flips', 'topk_indices', 'topk_values'), labels):
            arrays[name][row] = value
        progress.update(1)
        if row == count - 1:
            storage = label_storage(manifest.num_classes, manifest.label_type, manifest.value_dtype)
            arrays.update(label_tensors(arrays['topk_indices'], arrays['topk_values'], storage))
            if not (out / SETTINGS_NAME).is_file():  # written with the first shard: a failure before leaves nothing
                atomic_write_bytes(out / SETTINGS_NAME, json.dumps(settings, indent=2).encode())
            write_shard(out, shard, first, arrays, metadata=dict(
                shard_metadata(manifest, shard), format='timm-ferkd-bank-shard', source='fkd-import',
                fkd_label_type=cfg.label_type))
            shard = next(shard_iter, None)
            if shard is not None:
                first, count = manifest.shard_range(shard)
                arrays = _empty_shard(count, r, k)
    progress.close()


def _as_is(item):
    return item


def _empty_shard(n: int, r: int, k: int) -> Dict[str, np.ndarray]:
    return {
        'image_sizes': np.zeros((n, 2), dtype=np.int32),
        'targets': np.zeros((n,), dtype=np.int32),
        'topk_values': np.zeros((n, r, k), dtype=np.float32),
        'topk_indices': np.zeros((n, r, k), dtype=np.int64),
        'boxes': np.zeros((n, r, 4), dtype=np.float32),
        'flips': np.zeros((n, r), dtype=np.uint8),
    }
