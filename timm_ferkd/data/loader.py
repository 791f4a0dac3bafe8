"""Multi-crop region loader: workers decode and replay, the device normalises, mixes and regroups.

Each worker decodes an image once and cuts ``num_crops`` (K) crops of it; the *crop layout* makes steps
of them. ``'spread'`` (default) loads a window of B images, mixes within images, and regroups it into K
steps, step j holding crop j of every image: B distinct images per step (the gradient and BatchNorm
statistics of plain training) with decoding still amortised over K crops. ``'image'`` makes FKD's
image-major steps of B / K images x K crops. Workers send uint8 crops (4x less to pin and copy than
float32), normalised on the device like timm's ``PrefetchLoader``.

One pass is one *image* epoch (every image decoded once; FKD's code counts it as K epochs), with K times
the steps of a plain epoch. ``set_epoch(e)`` replays epoch ``e`` exactly, for any number of workers and
after a resume: order, regions, jitter and mixing are keyed by the seed and the epoch.
"""
from contextlib import suppress
from functools import partial
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.distributed
import torch.utils.data
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from timm_ferkd.data.dataset import EpochKey, RegionDataset, collate_regions
from timm_ferkd.data.source import stats_for_chans
from timm_ferkd.errors import ConfigError

__all__ = ['CROP_LAYOUTS', 'RegionLoader', 'EpochKeySampler', 'create_region_loader']

CROP_LAYOUTS = ('spread', 'image')


class EpochKeySampler(Sampler):
    """Wrap an index sampler so that it yields ``EpochKey(index, epoch)``.

    The epoch travels with each index to the workers, so persistent workers (which hold their own
    copy of the dataset) replay the regions of the epoch set in the main process.

    Args:
        sampler: The index sampler (its ``set_epoch`` is called too, when it has one).
    """

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[EpochKey]:
        epoch = self.epoch
        return (EpochKey(int(i), epoch) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def num_replicas(self) -> int:
        return getattr(self.sampler, 'num_replicas', 1)

    @property
    def rank(self) -> int:
        return getattr(self.sampler, 'rank', 0)


class RegionLoader:
    """Iterable over device-ready multi-crop steps ``(input, target)``.

    ``input`` is float [B, C, H, W] (``img_dtype``), normalised; ``target`` holds the dataset's per-crop
    tensors (see :class:`~timm_ferkd.data.dataset.RegionDataset`) plus ``'weight'`` (float32 [B], ones:
    discarded regions are never sampled) and, with mixing, ``'lam'`` (float32 [B]) and ``'partner_region'``
    (long [B], the bank region mixed in; the crop's own when it was not mixed).

    Args:
        loader: The DataLoader over a :class:`RegionDataset` with an :class:`EpochKeySampler`; one of its
            batches is one step (``'image'`` layout) or one window of ``num_crops`` steps (``'spread'``).
        device: Where inputs and targets go.
        mean: Normalisation mean per channel, in [0, 1] units.
        std: Normalisation std per channel, in [0, 1] units.
        img_dtype: dtype of the inputs.
        mixing: Optional SelfMix applied on the device, to whole windows, before regrouping.
        crop_layout: ``'spread'`` or ``'image'`` (see the module docstring).
    """

    def __init__(
            self,
            loader: DataLoader,
            device: torch.device,
            mean: Sequence[float],
            std: Sequence[float],
            img_dtype: torch.dtype = torch.float32,
            mixing: Optional[Any] = None,
            crop_layout: str = 'spread',
    ):
        if crop_layout not in CROP_LAYOUTS:
            raise ConfigError(f'crop_layout {crop_layout!r} must be one of {", ".join(CROP_LAYOUTS)}')
        self.loader = loader
        self.device = device
        self.img_dtype = img_dtype
        self.mixing = mixing
        self.crop_layout = crop_layout
        if mixing is not None and hasattr(mixing, 'lam_groups'):
            # 'batch' mixing draws once per step: in a window, step j is crop j of every image
            mixing.lam_groups = self.steps_per_batch
        chans = loader.dataset.input_size[0]
        shape = (1, chans, 1, 1)
        # uint8 in, so the stats scale by 255 instead of dividing the batch first
        self.mean = torch.tensor([m * 255 for m in stats_for_chans(mean, chans)], device=device,
                                 dtype=img_dtype).view(shape)
        self.std = torch.tensor([s * 255 for s in stats_for_chans(std, chans)], device=device,
                                dtype=img_dtype).view(shape)
        self.is_cuda = device.type == 'cuda' and torch.cuda.is_available()
        self.stream = None
        self.epoch = 0

    @property
    def dataset(self) -> RegionDataset:
        return self.loader.dataset

    @property
    def sampler(self) -> EpochKeySampler:
        """The epoch-keyed sampler: timm's ``loader.sampler.set_epoch(epoch)`` selects the whole epoch."""
        return self.loader.sampler

    @property
    def num_crops(self) -> int:
        return self.dataset.num_crops

    @property
    def steps_per_batch(self) -> int:
        """Steps made from one DataLoader batch: ``num_crops`` when spread, else 1."""
        return self.num_crops if self.crop_layout == 'spread' else 1

    @property
    def batch_size(self) -> int:
        """Crops per step."""
        if self.crop_layout == 'spread':
            return self.loader.batch_size
        return self.loader.batch_size * self.num_crops

    def __len__(self) -> int:
        """Steps per epoch."""
        return len(self.loader) * self.steps_per_batch

    @property
    def mixup_enabled(self) -> bool:
        """Whether mixing is on (timm's train script turns it off after ``--mixup-off-epoch``)."""
        return self.mixing is not None and self.mixing.mix_enabled

    @mixup_enabled.setter
    def mixup_enabled(self, value: bool) -> None:
        if self.mixing is not None:
            self.mixing.mix_enabled = bool(value)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch`` everywhere (image order, regions, jitter, mixing), as timm's
        ``loader.sampler.set_epoch(epoch)`` does: the dataset and the mixing follow the sampler's epoch."""
        self.sampler.set_epoch(epoch)

    def _follow_sampler_epoch(self) -> None:
        self.epoch = self.sampler.epoch
        self.dataset.set_epoch(self.epoch)
        if self.mixing is not None and hasattr(self.mixing, 'set_epoch'):
            self.mixing.set_epoch(self.epoch)

    def _to_device(self, crops: torch.Tensor, target: Dict[str, torch.Tensor]):
        crops = crops.to(self.device, non_blocking=True)
        target = {k: v.to(self.device, non_blocking=True) for k, v in target.items()}
        crops = crops.to(self.img_dtype).sub_(self.mean).div_(self.std)
        return crops, target

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
        self._follow_sampler_epoch()
        if self.is_cuda:
            if self.stream is None:
                self.stream = torch.cuda.Stream(device=self.device)
            stream_context = partial(torch.cuda.stream, stream=self.stream)
        else:
            stream_context = suppress
        batch = None
        for crops, target in self.loader:
            if self.is_cuda:
                # memory the consumer freed may be reused below: wait for its queued work first
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with stream_context():
                next_batch = self._to_device(crops, target)
            if batch is not None:
                # the previous batch is consumed (mixed, regrouped) while this one copies on the side stream
                yield from self._steps(*batch)
            if self.is_cuda:
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
            batch = next_batch
        if batch is not None:
            yield from self._steps(*batch)

    def _steps(self, x: torch.Tensor, target: Dict[str, torch.Tensor]):
        """Mix one image-major batch within images, then cut it into its steps."""
        if self.mixing is not None:
            x, target = self.mixing(x, target)
            partner = target.pop('partner')
            target['partner_region'] = target['region'][partner]
        k = self.steps_per_batch
        if k == 1:
            yield x, target
            return
        # rows are (image, crop) image-major: step j takes crop j of every image, made contiguous once
        images = x.shape[0] // k
        x = x.view(images, k, *x.shape[1:]).transpose(0, 1).contiguous()
        target = {key: v.view(images, k, *v.shape[1:]).transpose(0, 1).contiguous() for key, v in target.items()}
        for j in range(k):
            yield x[j], {key: v[j] for key, v in target.items()}


def create_region_loader(
        dataset: RegionDataset,
        batch_size: int,
        is_training: bool = True,
        num_workers: int = 1,
        distributed: bool = False,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        seed: Optional[int] = None,
        drop_last: Optional[bool] = None,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        prefetch_factor: Optional[int] = None,
        device: Union[str, torch.device] = torch.device('cuda'),
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        img_dtype: torch.dtype = torch.float32,
        selfmix: Optional[Any] = None,
        crop_layout: str = 'spread',
) -> RegionLoader:
    """Create a multi-crop loader over a :class:`RegionDataset`, in the style of ``timm.data.create_loader``.

    Args:
        dataset: The region dataset.
        batch_size: Crops per step (per rank); a multiple of ``num_crops`` with the ``'image'`` layout.
        is_training: Shuffle images (per epoch) and drop the last incomplete step (or window).
        num_workers: DataLoader worker processes.
        distributed: Split images over ranks with a ``DistributedSampler`` (each rank sees distinct images).
        num_replicas: World size override (default: from ``torch.distributed`` when distributed).
        rank: Rank override (default: from ``torch.distributed`` when distributed).
        seed: Seed of the image order (default: the dataset's seed).
        drop_last: Drop the last incomplete step or window (default: ``is_training``).
        pin_memory: Pin host memory for faster device copies.
        persistent_workers: Keep workers alive between epochs (when ``num_workers > 0``).
        prefetch_factor: DataLoader batches each worker prepares ahead (DataLoader default when None).
        device: Where inputs and targets go; normalisation and mixing run there.
        mean: Normalisation mean, in [0, 1] units (adapted to the dataset's channels).
        std: Normalisation std, in [0, 1] units.
        img_dtype: dtype of the yielded inputs.
        selfmix: Optional ``SelfMix`` applied on the device, within images, before regrouping.
        crop_layout: ``'spread'`` (every step B distinct images) or ``'image'`` (FKD's image-major steps).

    Returns:
        The loader; it yields ``(input [B, C, H, W], target dict)`` with B = ``batch_size``.
    """
    num_crops = dataset.num_crops
    if crop_layout not in CROP_LAYOUTS:
        raise ConfigError(f'crop_layout {crop_layout!r} must be one of {", ".join(CROP_LAYOUTS)}')
    if batch_size < 1:
        raise ConfigError(f'batch_size={batch_size} counts crops per step and must be >= 1')
    if crop_layout == 'image' and batch_size % num_crops:
        raise ConfigError(
            f'batch_size={batch_size} counts crops and must be a positive multiple of num_crops={num_crops} '
            f'with the image crop layout (each step holds batch_size // num_crops images x num_crops crops)')
    if num_workers < 0:
        raise ConfigError(f'num_workers={num_workers} must be >= 0')
    if selfmix is not None and getattr(selfmix, 'num_crops', num_crops) != num_crops:
        raise ConfigError(f'SelfMix was built for num_crops={selfmix.num_crops} but the dataset has {num_crops}')
    seed = dataset.seed if seed is None else int(seed)
    if distributed and (num_replicas is None or rank is None) and not torch.distributed.is_initialized():
        raise ConfigError('distributed=True needs an initialised process group (torchrun + init_process_group) '
                          'or explicit num_replicas and rank')
    if distributed:
        # training drops the uneven tail (a different one each epoch, after the shuffle) instead of
        # padding with repeats, so no image reaches two ranks in one epoch
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=is_training, seed=seed,
                                     drop_last=is_training)
    else:
        # one replica of the same sampler: a (seed, epoch)-keyed shuffle without a process group
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=is_training, seed=seed)
    if selfmix is not None and hasattr(selfmix, 'rank'):
        selfmix.rank = sampler.rank
        selfmix.set_epoch(0)
    images_per_batch = batch_size if crop_layout == 'spread' else batch_size // num_crops
    if is_training and len(sampler) < images_per_batch:
        unit = 'window' if crop_layout == 'spread' else 'step'
        raise ConfigError(f'this rank has {len(sampler)} images, fewer than one {unit} of {images_per_batch} images '
                          f'(batch_size={batch_size}, num_crops={num_crops}, crop layout {crop_layout}): '
                          f'lower batch_size')
    device = torch.device(device)
    loader_kwargs = dict(
        batch_size=images_per_batch,
        sampler=EpochKeySampler(sampler),
        num_workers=num_workers,
        collate_fn=collate_regions,
        pin_memory=pin_memory,
        drop_last=is_training if drop_last is None else drop_last,
        persistent_workers=persistent_workers and num_workers > 0,
    )
    if num_workers > 0 and prefetch_factor is not None:
        loader_kwargs['prefetch_factor'] = prefetch_factor
    loader = DataLoader(dataset, **loader_kwargs)
    return RegionLoader(loader, device=device, mean=mean, std=std, img_dtype=img_dtype, mixing=selfmix,
                        crop_layout=crop_layout)
