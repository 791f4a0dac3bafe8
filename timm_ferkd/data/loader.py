"""Multi-crop region loader: workers decode and replay, the device normalises and mixes.

A step holds ``batch_size`` crops: ``batch_size // num_crops`` images times ``num_crops`` crops
each, image-major (the crops of one image are neighbouring rows, as SelfMix needs). Workers send
uint8 crops (4x less to pin and copy than float32); the prefetcher moves them to the device on a
side stream (CUDA) and converts and normalises them there, like timm's ``PrefetchLoader``.

Each iteration yields ``(input, target)``:

* ``input``: float [B, C, H, W] (``img_dtype``), normalised with ``mean`` / ``std``,
* ``target``: dict of tensors on the device:

  - ``'soft'``: float32 [B, num_classes], rows sum to 1 (adapted and, with SelfMix, mixed labels),
  - ``'label'``: long [B], ground-truth class of the crop's image,
  - ``'weight'``: float32 [B], ones (discarded regions are never sampled, so no crop is masked),
  - ``'category'``: int8 [B], ``CATEGORY_SOFT`` (0) or ``CATEGORY_HARD`` (1),
  - ``'image'``: long [B], index of the crop's image in the dataset,
  - ``'region'``: long [B], the replayed region's index in the bank,
  - with mixing: ``'lam'`` float32 [B] and ``'partner'`` long [B] (see :mod:`timm_ferkd.data.mixing`).

Determinism: image order comes from the sampler (seed, epoch), regions and jitter from the
dataset (seed, epoch, image) and mixing from (seed, epoch, rank), so ``set_epoch(e)`` replays epoch
``e`` exactly, including after a resume. One pass over the data is one *image* epoch: every
image once, ``num_crops`` crops each (FKD's reference code counts it as ``num_crops`` epochs).
"""
import logging
from contextlib import suppress
from functools import partial
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.distributed
import torch.utils.data
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from timm_ferkd.data.dataset import EpochKey, RegionDataset, collate_regions
from timm_ferkd.errors import ConfigError

__all__ = ['RegionLoader', 'EpochKeySampler', 'create_region_loader']

_logger = logging.getLogger(__name__)

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


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


def _adapt_to_chans(values: Sequence[float], chans: int, name: str) -> Tuple[float, ...]:
    values = tuple(float(v) for v in (values if isinstance(values, (tuple, list)) else (values,)))
    if len(values) == chans:
        return values
    if len(values) == 1:
        return values * chans
    # timm's convention: a 3-channel mean for a 1-channel model becomes its average
    _logger.info(f'{name} has {len(values)} values for {chans} channel(s): using their mean')
    return (sum(values) / len(values),) * chans


class RegionLoader:
    """Iterable over device-ready multi-crop batches (see the module docstring for the format).

    Args:
        loader: The DataLoader over a :class:`RegionDataset` with an :class:`EpochKeySampler`.
        device: Where inputs and targets go.
        mean: Normalisation mean per channel, in [0, 1] units.
        std: Normalisation std per channel, in [0, 1] units.
        img_dtype: dtype of the inputs.
        mixing: Optional batch mixing (``SelfMix``/``SoftMixup``) applied on the device.
    """

    def __init__(
            self,
            loader: DataLoader,
            device: torch.device,
            mean: Sequence[float],
            std: Sequence[float],
            img_dtype: torch.dtype = torch.float32,
            mixing: Optional[Any] = None,
    ):
        self.loader = loader
        self.device = device
        self.img_dtype = img_dtype
        self.mixing = mixing
        chans = loader.dataset.input_size[0]
        shape = (1, chans, 1, 1)
        # uint8 in, so the stats scale by 255 instead of dividing the batch first
        self.mean = torch.tensor([m * 255 for m in _adapt_to_chans(mean, chans, 'mean')], device=device,
                                 dtype=img_dtype).view(shape)
        self.std = torch.tensor([s * 255 for s in _adapt_to_chans(std, chans, 'std')], device=device,
                                dtype=img_dtype).view(shape)
        self.is_cuda = device.type == 'cuda' and torch.cuda.is_available()
        self.stream = None
        self.epoch = 0

    @property
    def dataset(self) -> RegionDataset:
        return self.loader.dataset

    @property
    def sampler(self) -> Sampler:
        """The index sampler (``DistributedSampler``); ``loader.sampler`` is its epoch-key wrapper."""
        return self.loader.sampler.sampler

    @property
    def num_crops(self) -> int:
        return self.dataset.num_crops

    @property
    def batch_size(self) -> int:
        """Crops per step."""
        return self.loader.batch_size * self.num_crops

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def mixup_enabled(self) -> bool:
        """Whether mixing is on (timm's train script turns it off after ``--mixup-off-epoch``)."""
        return self.mixing is not None and self.mixing.mix_enabled

    @mixup_enabled.setter
    def mixup_enabled(self, value: bool) -> None:
        if self.mixing is not None:
            self.mixing.mix_enabled = bool(value)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch`` everywhere: image order, region choice, jitter and mixing."""
        self.epoch = int(epoch)
        self.loader.sampler.set_epoch(self.epoch)
        self.dataset.set_epoch(self.epoch)
        if self.mixing is not None and hasattr(self.mixing, 'set_epoch'):
            self.mixing.set_epoch(self.epoch)

    def state_dict(self) -> Dict[str, int]:
        """Everything the data order depends on besides the construction arguments."""
        return {'epoch': self.epoch, 'seed': self.dataset.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state.get('seed', self.dataset.seed) != self.dataset.seed:
            _logger.warning(f'resuming a loader with seed {state["seed"]} on seed {self.dataset.seed}: '
                            f'regions will differ from the original run')
        self.set_epoch(state['epoch'])

    def _to_device(self, crops: torch.Tensor, target: Dict[str, torch.Tensor]):
        crops = crops.to(self.device, non_blocking=True)
        target = {k: v.to(self.device, non_blocking=True) for k, v in target.items()}
        crops = crops.to(self.img_dtype).sub_(self.mean).div_(self.std)
        return crops, target

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
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
                # the previous step is consumed (and mixed) while this one copies on the side stream
                yield self._mix(*batch)
            if self.is_cuda:
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
            batch = next_batch
        if batch is not None:
            yield self._mix(*batch)

    def _mix(self, x: torch.Tensor, target: Dict[str, torch.Tensor]):
        if self.mixing is None:
            return x, target
        return self.mixing(x, target)


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
) -> RegionLoader:
    """Create a multi-crop loader over a :class:`RegionDataset`, in the style of ``timm.data.create_loader``.

    ``batch_size`` counts crops: each step loads ``batch_size // num_crops`` images and yields all
    ``num_crops`` crops of each, so it must be a multiple of ``dataset.num_crops``.

    Args:
        dataset: The region dataset.
        batch_size: Crops per step (per rank), a multiple of ``dataset.num_crops``.
        is_training: Shuffle images (per epoch) and drop the last incomplete step.
        num_workers: DataLoader worker processes.
        distributed: Split images over ranks with a ``DistributedSampler`` (each rank sees distinct images).
        num_replicas: World size override (default: from ``torch.distributed`` when distributed).
        rank: Rank override (default: from ``torch.distributed`` when distributed).
        seed: Seed of the image order (default: the dataset's seed).
        drop_last: Drop the last incomplete step (default: ``is_training``).
        pin_memory: Pin host memory for faster device copies.
        persistent_workers: Keep workers alive between epochs (when ``num_workers > 0``).
        prefetch_factor: Steps each worker prepares ahead (DataLoader default when None).
        device: Where inputs and targets go; normalisation and mixing run there.
        mean: Normalisation mean, in [0, 1] units (adapted to the dataset's channels).
        std: Normalisation std, in [0, 1] units.
        img_dtype: dtype of the yielded inputs.
        selfmix: Optional ``SelfMix``/``SoftMixup`` applied to each step on the device.

    Returns:
        The loader; it yields ``(input [B, C, H, W], target dict)`` with B = ``batch_size``.
    """
    num_crops = dataset.num_crops
    if batch_size < num_crops or batch_size % num_crops:
        raise ConfigError(
            f'batch_size={batch_size} counts crops and must be a positive multiple of num_crops={num_crops} '
            f'(each step holds batch_size // num_crops images x num_crops crops)')
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
    images_per_step = batch_size // num_crops
    if is_training and len(sampler) < images_per_step:
        raise ConfigError(f'this rank has {len(sampler)} images, fewer than one step of {images_per_step} images '
                          f'(batch_size={batch_size} / num_crops={num_crops}): lower batch_size')
    device = torch.device(device)
    loader_kwargs = dict(
        batch_size=images_per_step,
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
    return RegionLoader(loader, device=device, mean=mean, std=std, img_dtype=img_dtype, mixing=selfmix)
