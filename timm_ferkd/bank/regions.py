"""Version-stable region sampler: RandomResizedCrop boxes and flips re-derived from one seed.

A bank stores no boxes. Each region's box and flip bit are a pure function of
``(seed, image_index, region_index, image_height, image_width, scale, ratio)``, computed with
the counter-based generator below, so a bank costs no bytes for its geometry, replay is exact,
and banks made from several teachers with the same seed share their regions (and can be
ensembled). The algorithm (torchvision's RandomResizedCrop with SplitMix64 random numbers) is part of
the bank format, written out in ``docs/bank-format.md``: changing anything here needs a new ``SAMPLER_VERSION``.
"""
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from timm.data.transforms import str_to_pil_interp

from timm_ferkd.errors import ConfigError

__all__ = [
    'SAMPLER_NAME', 'SAMPLER_VERSION', 'RegionSampler', 'Regions', 'uniform', 'replay_region', 'pil_interpolation',
    'explicit_regions', 'splitmix64',
]

SAMPLER_NAME = 'splitmix64-random-resized-crop'
SAMPLER_VERSION = 1

_ATTEMPTS = 10
_FLIP_DRAW = 4 * _ATTEMPTS
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S11, _S27, _S30, _S31 = (np.uint64(v) for v in (11, 27, 30, 31))
_MAX_REGIONS = 1 << 16
_MAX_IMAGES = 1 << 40
# attempt 0's draws and the flip: almost every region fits at its first attempt, so the other
# attempts' draws are made only for the regions that need them
_FIRST_DRAWS = np.array([0, 1, 2, 3, _FLIP_DRAW], dtype=np.uint64)
_RETRY_DRAWS = np.arange(4, _FLIP_DRAW, dtype=np.uint64)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser of a uint64 array, in place (uint64 arithmetic wraps modulo 2**64, as it needs).

    In-place updates: a label read hashes about 20 numbers, where numpy's per-call cost, not the
    arithmetic, is the price (one temporary per line instead of three).
    """
    x += _GOLDEN
    x ^= x >> _S30
    x *= _MIX1
    x ^= x >> _S27
    x *= _MIX2
    x ^= x >> _S31
    return x


@lru_cache(maxsize=64)
def _seed_key(seed: int) -> np.uint64:
    return splitmix64(np.asarray([seed], dtype=np.uint64))[0]


def _uniform_from_counters(seed: int, counter: np.ndarray) -> np.ndarray:
    """Uniform doubles of uint64 counters ``image << 24 | region << 8 | draw`` (``counter`` is consumed)."""
    bits = splitmix64(counter)
    bits ^= _seed_key(seed)
    splitmix64(bits)
    bits >>= _S11
    out = bits.astype(np.float64)
    out *= 1.0 / (1 << 53)
    return out


def uniform(seed: int, image_index: int, region_index: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """Uniform doubles in [0, 1) from the counter (image, region, draw), keyed by the bank seed.

    Args:
        seed: Bank seed (any non-negative integer below 2**64).
        image_index: Index of the image in the dataset (below 2**40).
        region_index: Region indices (below 2**16), any shape.
        draw: Which draws of the region (below 256), broadcast against ``region_index``.

    Returns:
        float64 array of the broadcast shape.
    """
    counter = (np.uint64(image_index) << np.uint64(24)) \
        | (np.asarray(region_index, dtype=np.uint64) << np.uint64(8)) | np.asarray(draw, dtype=np.uint64)
    return _uniform_from_counters(seed, np.array(counter, dtype=np.uint64))


@dataclass(frozen=True)
class Regions:
    """Pixel boxes and flips of some regions of one image.

    Attributes:
        boxes: int64 [n, 4] as (top, left, height, width) in pixels.
        flips: bool [n], horizontal flip after cropping.
        image_size: (height, width) of the image the boxes belong to.
    """
    boxes: np.ndarray
    flips: np.ndarray
    image_size: Tuple[int, int]

    def normalized(self) -> np.ndarray:
        """Boxes as float64 (top, left, height, width) divided by the image height and width."""
        h, w = self.image_size
        return self.boxes / np.array([h, w, h, w], dtype=np.float64)


@dataclass(frozen=True)
class RegionSampler:
    """Deterministic RandomResizedCrop regions for every image of a bank.

    Args:
        seed: Bank seed; the same seed gives the same regions in every bank.
        scale: Range of the crop area as a fraction of the image area, within (0, 1].
        ratio: Range of the crop aspect ratio (width / height).
        flip_prob: Probability of a horizontal flip.
    """
    seed: int = 0
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5

    def sample(
            self,
            image_index: int,
            image_size: Tuple[int, int],
            region_ids: Sequence[int],
    ) -> Regions:
        """Regions ``region_ids`` of image ``image_index``.

        Args:
            image_index: Index of the image in the dataset.
            image_size: (height, width) of the decoded image in pixels.
            region_ids: Which regions (each below 2**16).

        Returns:
            The regions' pixel boxes and flips.
        """
        height, width = int(image_size[0]), int(image_size[1])
        if not 0 <= image_index < _MAX_IMAGES:
            raise ValueError(f'image index {image_index} outside [0, 2**40)')
        ids = np.asarray(region_ids, dtype=np.int64).reshape(-1)
        boxes, flips = self._sample(np.uint64(image_index << 24), np.int64(height), np.int64(width), ids)
        return Regions(boxes=boxes, flips=flips, image_size=(height, width))

    def sample_batch(
            self,
            image_indices: Sequence[int],
            image_sizes: np.ndarray,
            region_ids: np.ndarray,
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Regions of several images in one vectorised pass (the same boxes as ``sample`` image by image).

        Args:
            image_indices: [m] image indices.
            image_sizes: [m, 2] (height, width) of each image.
            region_ids: [m, c] regions of each image.

        Returns:
            (int64 boxes [m, c, 4] as (top, left, height, width), bool flips [m, c]).
        """
        images = np.asarray(image_indices, dtype=np.int64).reshape(-1)
        ids = np.asarray(region_ids, dtype=np.int64).reshape(images.size, -1)
        sizes = np.asarray(image_sizes, dtype=np.int64).reshape(images.size, 2)
        if images.size and (images.min() < 0 or images.max() >= _MAX_IMAGES):
            raise ValueError('image indices must lie in [0, 2**40)')
        c = ids.shape[1]
        base = np.repeat(images.astype(np.uint64) << np.uint64(24), c)
        boxes, flips = self._sample(base, np.repeat(sizes[:, 0], c), np.repeat(sizes[:, 1], c), ids.reshape(-1))
        return boxes.reshape(images.size, c, 4), flips.reshape(images.size, c)

    def _sample(self, base, height, width, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Boxes and flips of regions ``ids``; ``base`` (image << 24), ``height``, ``width``: scalars or per region.

        The arithmetic, operation by operation, is the algorithm of ``docs/bank-format.md`` in float64:
        regions whose first attempt fits (nearly all) are done after one set of draws, the others
        retry attempts 1..9 together, and the first fitting attempt of each wins.
        """
        if ids.size and (ids.min() < 0 or ids.max() >= _MAX_REGIONS):
            raise ValueError('region ids must lie in [0, 65536)')
        counter = (ids.astype(np.uint64) << np.uint64(8)) | base
        u = _uniform_from_counters(self.seed, counter[:, None] | _FIRST_DRAWS)
        area = (height * width).astype(np.float64)
        h, w, fits = self._attempt(area, height, width, u[:, 0], u[:, 1])
        top = np.floor(u[:, 2] * (height - h + 1)).astype(np.int64)
        left = np.floor(u[:, 3] * (width - w + 1)).astype(np.int64)
        boxes = np.stack([top, left, h, w], axis=1)
        flips = u[:, 4] < self.flip_prob
        if not fits.all():
            self._retry(boxes, np.flatnonzero(~fits), counter, area, height, width)
        return boxes, flips

    def _attempt(self, area, height, width, u_area: np.ndarray, u_aspect: np.ndarray):
        target_area = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u_area)
        log_lo, log_hi = np.log(self.ratio[0]), np.log(self.ratio[1])
        aspect = np.exp(log_lo + (log_hi - log_lo) * u_aspect)
        w = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
        h = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
        return h, w, (w > 0) & (w <= width) & (h > 0) & (h <= height)

    def _retry(self, boxes: np.ndarray, rows: np.ndarray, counter: np.ndarray, area, height, width) -> None:
        """Overwrite ``boxes[rows]`` (whose first attempt failed) with their attempts 1..9 or the central crop."""
        pick = (lambda a: a[rows]) if np.ndim(area) else (lambda a: a)
        area, height, width = pick(area), pick(height), pick(width)
        u = _uniform_from_counters(self.seed, counter[rows, None] | _RETRY_DRAWS).reshape(rows.size, -1, 4)
        col = (lambda a: a[:, None]) if np.ndim(area) else (lambda a: a)
        h, w, fits = self._attempt(col(area), col(height), col(width), u[..., 0], u[..., 1])
        first = np.argmax(fits, axis=1)
        sel = np.arange(rows.size)
        found = fits[sel, first]
        h, w = h[sel, first], w[sel, first]
        top = np.floor(u[sel, first, 2] * (height - h + 1)).astype(np.int64)
        left = np.floor(u[sel, first, 3] * (width - w + 1)).astype(np.int64)
        boxes[rows] = np.stack([top, left, h, w], axis=1)
        for j in np.flatnonzero(~found):
            boxes[rows[j]] = self._central_box(int(np.broadcast_to(height, rows.shape)[j]),
                                               int(np.broadcast_to(width, rows.shape)[j]))

    def _central_box(self, height: int, width: int) -> np.ndarray:
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w = width
            h = int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h = height
            w = int(round(h * self.ratio[1]))
        else:
            w, h = width, height
        return np.array([(height - h) // 2, (width - w) // 2, h, w], dtype=np.int64)


def explicit_regions(normalized_boxes: np.ndarray, flips: np.ndarray, image_size: Tuple[int, int]) -> Regions:
    """Regions from stored normalised (top, left, height, width) boxes, as imported from FKD files.

    The FKD reference scales the normalised box by the image size and lets PIL's crop round the
    corners (``round(left)``, ``round(top)``, ``round(left + width)``, ``round(top + height)``); the
    same rounding here makes replay identical.

    Args:
        normalized_boxes: float [n, 4] boxes divided by the image height and width.
        flips: [n] flip flags.
        image_size: (height, width) of the decoded image.

    Returns:
        The regions in pixels.
    """
    height, width = image_size
    b = np.asarray(normalized_boxes, dtype=np.float64).reshape(-1, 4)
    top = np.rint(b[:, 0] * height)
    left = np.rint(b[:, 1] * width)
    bottom = np.rint((b[:, 0] + b[:, 2]) * height)
    right = np.rint((b[:, 1] + b[:, 3]) * width)
    boxes = np.stack([top, left, bottom - top, right - left], axis=1).astype(np.int64)
    return Regions(boxes=boxes, flips=np.asarray(flips).reshape(-1).astype(bool), image_size=(int(height), int(width)))


def pil_interpolation(name: str) -> Image.Resampling:
    """PIL filter for a timm interpolation name ('bilinear', 'bicubic', ...), as timm's transforms map it."""
    try:
        return str_to_pil_interp(name)
    except KeyError:
        raise ConfigError(f'unknown interpolation {name!r}; choose one of nearest, bilinear, bicubic, box, '
                          f'hamming, lanczos') from None


def replay_region(
        image: Image.Image,
        box: Sequence[int],
        flip: bool,
        size: Tuple[int, int],
        interpolation: Image.Resampling = Image.Resampling.BILINEAR,
) -> Image.Image:
    """Cut one stored region out of a decoded image: crop, resize, then flip.

    The teacher (at generation) and the student (at training) both call this, each with its
    own output size and interpolation, so the student sees the region the label describes.

    Args:
        image: Decoded image.
        box: (top, left, height, width) in pixels.
        flip: Flip horizontally after resizing.
        size: Output (height, width).
        interpolation: PIL resampling filter.

    Returns:
        The region as a new PIL image.
    """
    top, left, h, w = (int(v) for v in box)
    region = image.crop((left, top, left + w, top + h)).resize((size[1], size[0]), interpolation)
    if flip:
        region = region.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return region


def check_region_params(scale: Sequence[float], ratio: Sequence[float], num_regions: Optional[int] = None) -> None:
    """Raise ``ConfigError`` for a scale, ratio or region count that cannot be sampled."""
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f'--scale {tuple(scale)} must satisfy 0 < LO <= HI <= 1 (fractions of the image area)')
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ConfigError(f'--ratio {tuple(ratio)} must satisfy 0 < LO <= HI (crop width / height)')
    if num_regions is not None and not 1 <= num_regions <= _MAX_REGIONS:
        raise ConfigError(f'--regions {num_regions} must lie in [1, {_MAX_REGIONS}]')
