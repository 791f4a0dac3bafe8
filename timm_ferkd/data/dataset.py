"""Region-replay dataset: decode an image once, replay ``num_crops`` of its stored regions.

Crops are cut by :func:`timm_ferkd.bank.regions.replay_region`, the function the teacher's crops were
made with, so the student sees exactly the region its label describes; normalisation happens later, on
the device. Region choice is a pure function of (seed, epoch, image index), so every rank, worker and
resumed run makes the same choice; :class:`EpochKey` carries the epoch to persistent workers.
"""
import logging
import os
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from timm_ferkd.bank.identity import check_bank_matches
from timm_ferkd.bank.hub import open_bank
from timm_ferkd.bank.reader import SoftLabelBank
from timm_ferkd.bank.regions import pil_interpolation, replay_region
from timm_ferkd.data.calibration import (
    CATEGORY_DISCARD, CATEGORY_HARD, CATEGORY_SOFT, CalibrationConfig, create_label_transform)
from timm_ferkd.data.source import ImageSource, create_image_source, image_mode_for_chans
from timm_ferkd.data.transforms import RegionPostTransform
from timm_ferkd.errors import BankMismatchError, ConfigError

__all__ = ['RegionDataset', 'EpochKey', 'create_region_dataset', 'collate_regions', 'resolve_input_size']

_logger = logging.getLogger(__name__)

# Keys of region choice and jitter streams: (seed, epoch, image, stream). Distinct streams keep the
# region choice unchanged when jitter is switched on or off.
_STREAM_REGIONS = 0
_STREAM_JITTER = 1


class EpochKey(NamedTuple):
    """A dataset key carrying its epoch, so that workers need no shared epoch state."""
    index: int
    epoch: int


def resolve_input_size(
        input_size: Union[int, Sequence[int], None],
        in_chans: Optional[int],
        default_chans: int = 3,
) -> Tuple[int, int, int]:
    """(C, H, W) from an int, (H, W) or (C, H, W) and an optional channel count.

    Args:
        input_size: Student input size; None means 224.
        in_chans: Channels; overrides the C of a 3-tuple when both are given and agree.
        default_chans: Channels when neither gives them.

    Returns:
        (C, H, W).
    """
    if input_size is None:
        input_size = 224
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) not in (2, 3):
        raise ConfigError(f'input_size {input_size} must be an int, (H, W) or (C, H, W)')
    if len(input_size) == 3:
        if in_chans is not None and in_chans != input_size[0]:
            raise ConfigError(f'input_size {input_size} has {input_size[0]} channels but in_chans is {in_chans}')
        in_chans = input_size[0]
    height, width = input_size[-2:]
    if min(height, width) < 1:
        raise ConfigError(f'input_size {(height, width)} must be positive')
    return default_chans if in_chans is None else int(in_chans), height, width


def _image_name(source: ImageSource, index: int) -> Optional[str]:
    """File name of an image for error messages, when the dataset knows it."""
    dataset = source.dataset
    try:
        if hasattr(dataset, 'filename'):
            return str(dataset.filename(index))
        if hasattr(dataset, 'samples'):
            return str(dataset.samples[index][0])
    except Exception:  # names are a courtesy in error messages, never a new failure
        pass
    return None


class RegionDataset(Dataset):
    """Multi-crop region-replay dataset over any timm dataset and a soft-label bank.

    Each item is one image: ``(crops, target)`` with ``crops`` uint8 [num_crops, C, H, W] and
    ``target`` a dict of per-crop tensors:

    * ``'soft'``: float32 [num_crops, num_classes], the (transformed) stored label, rows sum to 1,
    * ``'label'``: long [num_crops], the image's ground-truth class,
    * ``'category'``: int8 [num_crops], ``CATEGORY_SOFT`` (0) or ``CATEGORY_HARD`` (1),
    * ``'image'``: long [num_crops], the image index,
    * ``'region'``: long [num_crops], the replayed region's index in the bank.

    The bank is checked against the dataset (size, fingerprint, classes) here, before training. If
    it labels only the first N images (``generate --num-images N``) the dataset has N items.

    Args:
        source: The image source (``create_image_source``), in the colour mode of the student.
        bank: The soft-label bank (``SoftLabelBank``, a bank directory or ``hf-hub:`` name).
        num_crops: Crops (replayed regions) per image and item, >= 1.
        input_size: Student input size: int, (H, W) or (C, H, W).
        interpolation: Student interpolation ('bilinear', 'bicubic', ...).
        calibration: FerKD calibration, or None to keep every region with its teacher label.
        prob_shift: Apply the probability shift to stored labels.
        label_temperature: Re-temper stored labels, ``softmax(log q / T)`` (1 disables it).
        color_jitter: Photometric jitter strength (timm's scalar ``color_jitter``; 0 disables it).
        seed: Seed of region choice and jitter.
        num_classes: The student's class count, checked against the bank when given.

    Attributes:
        categories: int8 [num_images, R] category of every region (``CATEGORY_*``); None without calibration.
        num_eligible: int64 [num_images], non-discarded regions per image.
        fallback_images: Images whose every region calibration would discard: they keep them all.
        label_transform: The composed per-crop label transform.

    Raises:
        BankMismatchError: The bank belongs to another dataset, split or class count.
        ConfigError: ``num_crops < 1`` or bad thresholds.
    """

    def __init__(
            self,
            source: ImageSource,
            bank: Union[SoftLabelBank, str, os.PathLike],
            num_crops: int = 4,
            input_size: Union[int, Sequence[int]] = 224,
            interpolation: str = 'bilinear',
            calibration: Optional[CalibrationConfig] = None,
            prob_shift: bool = False,
            label_temperature: float = 1.0,
            color_jitter: float = 0.0,
            seed: int = 0,
            num_classes: Optional[int] = None,
    ):
        if not isinstance(num_crops, int) or num_crops < 1:
            raise ConfigError(f'num_crops={num_crops!r} must be an integer >= 1')
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f'seed={seed!r} must be a non-negative integer')
        if not isinstance(bank, SoftLabelBank):
            bank = open_bank(bank)
        self.source = source
        self.bank = bank
        self.num_crops = num_crops
        chans = 1 if source.image_mode == 'L' else 3
        self.input_size = resolve_input_size(input_size, None, default_chans=chans)
        if self.input_size[0] != chans:
            raise ConfigError(
                f'input_size {self.input_size} has {self.input_size[0]} channels but the images are '
                f'{source.image_mode!r} ({chans} channel(s)): set in_chans to match')
        self.interpolation = interpolation
        self._pil_interpolation = pil_interpolation(interpolation)
        self.seed = seed
        self.epoch = 0
        self.post_transform = RegionPostTransform(color_jitter)

        manifest = bank.manifest
        check_bank_matches(manifest, source.identity, num_classes)
        self.num_classes = manifest.num_classes
        self.num_images = manifest.num_images
        if self.num_images < len(source):
            _logger.info(
                f'the bank labels the first {self.num_images} of {len(source)} images of {source.name} '
                f'(split {source.split}): training on those {self.num_images} only')

        # Confidences are read (all value arrays, once) only when calibration needs them; without it
        # every region is eligible and soft, and no [N, R] array is kept.
        max_probs = bank.all_max_probs() if calibration is not None else None
        self.label_transform = create_label_transform(
            self.num_classes, calibration, max_probs, prob_shift=prob_shift, temperature=label_temperature)
        ferkd = self.label_transform.calibration
        regions = manifest.regions_per_image
        self.fallback_images = 0
        if ferkd is None:
            self.categories: Optional[np.ndarray] = None
            self.num_eligible = np.full(self.num_images, regions, dtype=np.int64)
        else:
            self.categories = ferkd.categorize(max_probs)
            self.num_eligible = (self.categories != CATEGORY_DISCARD).sum(axis=1)
            self._keep_fully_discarded_images(max_probs)
        del max_probs

    def _keep_fully_discarded_images(self, max_probs: np.ndarray) -> None:
        """An image whose every region calibration discards keeps them instead of leaving the epoch.

        Such an image is easy everywhere (all regions above T_T: they keep the teacher's label) or hard
        everywhere (all below T_L: they get the softened ground truth), so it still counts once per epoch.
        """
        empty = np.flatnonzero(self.num_eligible == 0)
        if not empty.size:
            return
        low = self.label_transform.calibration.thresholds.low
        self.categories[empty] = np.where(max_probs[empty] < low, CATEGORY_HARD, CATEGORY_SOFT)
        self.num_eligible[empty] = self.categories.shape[1]
        self.fallback_images = int(empty.size)
        _logger.info(f'FerKD calibration discards every region of {empty.size} image(s) (e.g. image {empty[0]}): '
                     f'they keep their regions, those below T_L with the softened ground truth, those above T_T '
                     f'with the teacher label')

    def __len__(self) -> int:
        return self.num_images

    def set_epoch(self, epoch: int) -> None:
        """Epoch of region choice for integer keys (``EpochKey`` keys carry their own)."""
        self.epoch = int(epoch)

    def category_counts(self) -> Dict[str, int]:
        """Number of regions per category over the bank (soft, hard, discarded)."""
        if self.categories is None:
            return {'soft': self.num_images * self.bank.regions_per_image, 'hard': 0, 'discard': 0}
        names = (('soft', CATEGORY_SOFT), ('hard', CATEGORY_HARD), ('discard', CATEGORY_DISCARD))
        return {name: int((self.categories == value).sum()) for name, value in names}

    def _rng(self, index: int, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, epoch, index, stream))

    def region_ids(self, index: int, epoch: Optional[int] = None) -> np.ndarray:
        """int64 [num_crops]: the bank regions image ``index`` replays in ``epoch``.

        Args:
            index: Image index.
            epoch: Epoch (default: the current one).

        Returns:
            Distinct eligible regions when the image has at least ``num_crops``; otherwise all of them
            (shuffled) followed by repeats drawn with replacement.
        """
        epoch = self.epoch if epoch is None else int(epoch)
        if self.categories is None:
            eligible = np.arange(self.bank.regions_per_image)
        else:
            eligible = np.flatnonzero(self.categories[index] != CATEGORY_DISCARD)
        rng = self._rng(index, epoch, _STREAM_REGIONS)
        if eligible.size >= self.num_crops:
            return rng.choice(eligible, size=self.num_crops, replace=False)
        extra = rng.choice(eligible, size=self.num_crops - eligible.size, replace=True)
        return np.concatenate([rng.permutation(eligible), extra])

    def __getitem__(
            self,
            key: Union[int, EpochKey, Tuple[int, int]],
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Crops and per-crop targets of one image.

        Args:
            key: Image index (regions of the current epoch), or ``EpochKey(index, epoch)``.

        Returns:
            (uint8 [num_crops, C, H, W], target dict; see the class docstring).
        """
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[Union[int, EpochKey, Tuple[int, int]]]) -> list:
        """The items of a DataLoader batch (torch's fetcher calls this with the batch's keys).

        The boxes and soft labels of all the batch's images come from one ``bank.read_batch``: read
        image by image, numpy's per-call cost would be most of the label read.
        """
        keys = [(int(k[0]), int(k[1])) if isinstance(k, tuple) else (int(k), self.epoch) for k in keys]
        for index, _ in keys:
            if not 0 <= index < self.num_images:
                raise IndexError(f'image {index} outside the dataset (0..{self.num_images - 1})')
        ids = [self.region_ids(index, epoch) for index, epoch in keys]
        read = self.bank.read_batch([index for index, _ in keys], np.stack(ids))
        return [self._item(index, epoch, ids[j], read, j) for j, (index, epoch) in enumerate(keys)]

    def _item(self, index: int, epoch: int, ids: np.ndarray, read, j: int):
        image, target = self.source.load(index)
        recorded, recorded_target = tuple(int(v) for v in read.image_sizes[j]), int(read.targets[j])
        if recorded != (image.height, image.width) or target != recorded_target:
            name = _image_name(self.source, index)
            raise BankMismatchError(
                f'image {index}{f" ({name})" if name else ""} decodes to {image.height}x{image.width} with class '
                f'{target}, the bank recorded {recorded[0]}x{recorded[1]} with class '
                f'{recorded_target}: the dataset files changed since the bank was generated; '
                f'regenerate the bank')
        rng = self._rng(index, epoch, _STREAM_JITTER) if self.post_transform.color_jitter > 0 else None
        size = self.input_size[1:]
        crops = torch.empty((self.num_crops,) + self.input_size, dtype=torch.uint8)
        for c, (box, flip) in enumerate(zip(read.boxes[j], read.flips[j])):
            self.post_transform(replay_region(image, box, flip, size, self._pil_interpolation), rng, out=crops[c])

        n = self.num_crops
        label = torch.full((n,), target, dtype=torch.long)
        if self.categories is None:
            category = torch.full((n,), CATEGORY_SOFT, dtype=torch.int8)
        else:
            category = torch.from_numpy(self.categories[index, ids].astype(np.int8))
        soft = self.label_transform(read.soft[j], label, category)
        return crops, {
            'soft': soft,
            'label': label,
            'category': category,
            'image': torch.full((n,), index, dtype=torch.long),
            'region': torch.from_numpy(ids.astype(np.int64)),
        }

    def __repr__(self) -> str:
        return (f'RegionDataset({self.source.name!r}, split={self.source.split!r}, images={self.num_images}, '
                f'num_crops={self.num_crops}, input_size={self.input_size}, interpolation={self.interpolation!r}, '
                f'labels={self.label_transform!r}, bank={self.bank!r})')


def collate_regions(
        batch: Sequence[Tuple[torch.Tensor, Dict[str, torch.Tensor]]],
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Concatenate items image-major: the crops of one image are neighbouring rows.

    Args:
        batch: Items of :class:`RegionDataset`.

    Returns:
        (uint8 [B, C, H, W], target dict of [B] / [B, C] tensors plus ``'weight'`` float32 [B] of ones),
        with B = len(batch) * num_crops.
    """
    crops = torch.cat([item[0] for item in batch])
    target = {key: torch.cat([item[1][key] for item in batch]) for key in batch[0][1]}
    target['weight'] = torch.ones(crops.shape[0], dtype=torch.float32)
    return crops, target


def create_region_dataset(
        name: str,
        root: Optional[str] = None,
        split: str = 'train',
        soft_labels: Union[SoftLabelBank, str, os.PathLike, None] = None,
        num_crops: int = 4,
        input_size: Union[int, Sequence[int], None] = None,
        interpolation: str = 'bilinear',
        in_chans: Optional[int] = None,
        calibration: Optional[CalibrationConfig] = None,
        prob_shift: bool = False,
        label_temperature: float = 1.0,
        color_jitter: float = 0.0,
        seed: int = 0,
        num_classes: Optional[int] = None,
        download: bool = False,
        **kwargs: Any,
) -> RegionDataset:
    """Create a :class:`RegionDataset` from timm dataset arguments and a bank.

    Args:
        name: timm dataset name: '' (image folder), ``torch/NAME``, ``hfds/NAME``.
        root: Data directory (timm's ``root`` / ``--data-dir``).
        split: Split the bank was generated on.
        soft_labels: The bank: a ``SoftLabelBank``, a bank directory or an ``hf-hub:ORG/NAME[@REV]`` name.
        num_crops: Crops per image, >= 1.
        input_size: Student input size: int, (H, W) or (C, H, W); None means 224 at ``in_chans``.
        interpolation: Student interpolation.
        in_chans: Student input channels (1: grayscale, 3: RGB); default: those of the input size, else
            the teacher's.
        calibration: FerKD calibration (``CalibrationConfig``) or None.
        prob_shift: Apply the probability shift to stored labels.
        label_temperature: Re-temper stored labels (1 disables it).
        color_jitter: Photometric jitter strength (0 disables it).
        seed: Seed of region choice and jitter.
        num_classes: The student's class count, checked against the bank when given.
        download: Let torchvision datasets download when missing.
        **kwargs: Passed to ``timm.data.create_dataset`` (``class_map``, ``search_split``, ...).

    Returns:
        The dataset.
    """
    if soft_labels is None:
        raise ConfigError('soft_labels is required: a bank directory, a SoftLabelBank or an hf-hub:ORG/NAME name')
    bank = soft_labels if isinstance(soft_labels, SoftLabelBank) else open_bank(soft_labels)
    if in_chans is None and not (isinstance(input_size, (tuple, list)) and len(input_size) == 3):
        in_chans = bank.manifest.teacher.input_size[0]
    input_size = resolve_input_size(input_size, in_chans)
    source = create_image_source(
        name, root, split, image_mode=image_mode_for_chans(input_size[0]), download=download, **kwargs)
    return RegionDataset(
        source, bank, num_crops=num_crops, input_size=input_size, interpolation=interpolation,
        calibration=calibration, prob_shift=prob_shift, label_temperature=label_temperature,
        color_jitter=color_jitter, seed=seed, num_classes=num_classes)
