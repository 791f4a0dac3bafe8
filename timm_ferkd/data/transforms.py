"""Student-side post-crop transforms for replayed regions: mild photometric jitter, then uint8 tensor.

Geometry is fixed by the bank (box and flip are replayed), so only photometric changes are allowed
here: anything that moves pixels would detach the crop from its stored label. Randomness comes from
a ``numpy.random.Generator`` that the dataset derives from (seed, epoch, image), so a crop is the
same in every worker and in a resumed run. Normalisation is left to the loader (on the device).
"""
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageEnhance

from timm_ferkd.errors import ConfigError

__all__ = ['RegionPostTransform']


class RegionPostTransform:
    """Colour jitter (optional) and conversion of a replayed region to a uint8 tensor.

    Jitter follows timm's scalar ``color_jitter``: brightness, contrast and (for RGB) saturation
    factors are drawn uniformly from ``[max(0, 1 - s), 1 + s]`` and applied in a random order.

    Args:
        color_jitter: Jitter strength s >= 0 (0 disables it).
    """

    def __init__(self, color_jitter: float = 0.0):
        if not color_jitter >= 0:
            raise ConfigError(f'color_jitter {color_jitter!r} must be >= 0')
        self.color_jitter = float(color_jitter)

    def __call__(
            self,
            image: Image.Image,
            rng: Optional[np.random.Generator],
            out: torch.Tensor,
    ) -> torch.Tensor:
        """Transform one region into ``out``.

        Args:
            image: The replayed region.
            rng: Source of the jitter factors (required when jitter is on).
            out: uint8 [C, H, W] tensor to write into ('L' images have C = 1), e.g. a row of the item's crops.

        Returns:
            ``out``.
        """
        if self.color_jitter > 0:
            image = self._jitter(image, rng)
        array = np.asarray(image, dtype=np.uint8)
        # numpy does the strided HWC -> CHW copy straight into the tensor's memory
        np.copyto(out.numpy(), array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        return out

    def _jitter(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        s = self.color_jitter
        enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast]
        if image.mode == 'RGB':
            enhancers.append(ImageEnhance.Color)
        factors = rng.uniform(max(0.0, 1.0 - s), 1.0 + s, size=len(enhancers))
        for j in rng.permutation(len(enhancers)):
            image = enhancers[j](image).enhance(float(factors[j]))
        return image

    def __repr__(self) -> str:
        return f'RegionPostTransform(color_jitter={self.color_jitter})'
