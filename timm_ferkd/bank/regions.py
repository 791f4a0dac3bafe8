"""Version-stable region sampler: RandomResizedCrop boxes and flips re-derived from one seed.

A bank stores no boxes. Each region's box and flip bit are a pure function of
``(seed, image_index, region_index, image_height, image_width, scale, ratio)``, computed with
the counter-based generator below, so a bank costs no bytes for its geometry, replay is exact,
and banks made from several teachers with the same seed share their regions (and can be
ensembled). The algorithm is part of the bank format (``docs/bank-format.md``): changing
anything here requires a new ``SAMPLER_VERSION``.

Algorithm (torchvision's RandomResizedCrop, with our own random numbers):
  For attempt a in 0..9: target_area = H * W * U(scale); aspect = exp(U(log ratio));
  w = round(sqrt(target_area * aspect)); h = round(sqrt(target_area / aspect));
  if 0 < w <= W and 0 < h <= H: top = floor(U * (H - h + 1)), left = floor(U * (W - w + 1)).
  If no attempt fits, the central crop clamped to the ratio range. flip = U < 0.5.
  Each U is ``uniform(seed, image, region, draw)`` with draw = 4 * attempt + {0: area, 1: aspect,
  2: top, 3: left} and draw 40 for the flip.
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = [
    'SAMPLER_NAME', 'SAMPLER_VERSION', 'RegionSampler', 'Regions', 'uniform', 'replay_region', 'explicit_regions',
]

SAMPLER_NAME = 'splitmix64-random-resized-crop'
SAMPLER_VERSION = 1

_ATTEMPTS = 10
_FLIP_DRAW = 4 * _ATTEMPTS
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MAX_REGIONS = 1 << 16
_MAX_IMAGES = 1 << 40


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # uint64 arithmetic wraps modulo 2**64, which is exactly what SplitMix64 needs
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


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
    with np.errstate(over='ignore'):
        key = _splitmix64(np.asarray([seed], dtype=np.uint64))
        counter = (np.uint64(image_index) << np.uint64(24)) \
            | (np.asarray(region_index, dtype=np.uint64) << np.uint64(8)) | np.asarray(draw, dtype=np.uint64)
        bits = _splitmix64(key ^ _splitmix64(counter))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


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
        ids = np.asarray(region_ids, dtype=np.int64).reshape(-1)
        if not 0 <= image_index < _MAX_IMAGES:
            raise ValueError(f'image index {image_index} outside [0, 2**40)')
        if ids.size and (ids.min() < 0 or ids.max() >= _MAX_REGIONS):
            raise ValueError('region ids must lie in [0, 65536)')
        area = float(height * width)
        log_lo, log_hi = np.log(self.ratio[0]), np.log(self.ratio[1])
        # all draws of all regions at once: [n, 4 * attempts + 1]
        u = uniform(self.seed, image_index, ids[:, None], np.arange(_FLIP_DRAW + 1)[None, :])
        u_attempts = u[:, :_FLIP_DRAW].reshape(-1, _ATTEMPTS, 4)
        target_area = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u_attempts[..., 0])
        aspect = np.exp(log_lo + (log_hi - log_lo) * u_attempts[..., 1])
        w = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
        h = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = np.argmax(fits, axis=1)
        found = fits[np.arange(ids.size), first]
        rows = np.arange(ids.size)
        h, w = h[rows, first], w[rows, first]
        top = np.floor(u_attempts[rows, first, 2] * (height - h + 1)).astype(np.int64)
        left = np.floor(u_attempts[rows, first, 3] * (width - w + 1)).astype(np.int64)
        boxes = np.stack([top, left, h, w], axis=1)
        if not found.all():
            boxes[~found] = self._central_box(height, width)
        flips = u[:, _FLIP_DRAW] < self.flip_prob
        return Regions(boxes=boxes, flips=flips, image_size=(height, width))

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
    from timm_ferkd.errors import ConfigError
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f'--scale {tuple(scale)} must satisfy 0 < LO <= HI <= 1 (fractions of the image area)')
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ConfigError(f'--ratio {tuple(ratio)} must satisfy 0 < LO <= HI (crop width / height)')
    if num_regions is not None and not 1 <= num_regions <= _MAX_REGIONS:
        raise ConfigError(f'--regions {num_regions} must lie in [1, {_MAX_REGIONS}]')
