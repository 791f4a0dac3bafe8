"""SelfMix (FerKD): Mixup/CutMix of each crop with another crop of the same image, on the device.

The batch is image-major (``num_crops`` consecutive rows per image) and each group is rotated by a
random non-zero shift, so every crop is mixed with another crop of its own image and the mixed input
stays close to its mixed label. Pixels and dense soft targets share ``lam``; CutMix uses timm's box
sampler with ``lam`` set to the exact unpasted area. Draws come from a numpy generator keyed by
(seed, epoch, rank), so a resumed run mixes the same way.
"""
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from timm_ferkd.errors import ConfigError

__all__ = ['MIX_METHODS', 'LAM_MODES', 'SelfMix', 'create_selfmix']

MIX_METHODS = ('mixup', 'cutmix', 'switch')
LAM_MODES = ('batch', 'pair', 'elem')


class SelfMix:
    """FerKD's SelfMix: Mixup/CutMix between crops of the same image.

    Args:
        num_crops: Crops per image; the batch holds ``B / num_crops`` images, image-major. >= 2.
        mixup_alpha: Beta alpha of Mixup (0 disables Mixup).
        cutmix_alpha: Beta alpha of CutMix (0 disables CutMix).
        prob: Probability of mixing a batch (``'batch'``) or a crop (``'pair'``/``'elem'``).
        switch_prob: Probability of CutMix instead of Mixup when both are on.
        mode: ``lam`` granularity: ``'batch'`` or per crop (``'pair'``/``'elem'``).
        method: Force ``'mixup'``, ``'cutmix'`` or ``'switch'``; None derives it from the alphas.
        seed: Seed of the random draws.
        rank: Distributed rank, so that ranks draw differently.
    """

    def __init__(
            self,
            num_crops: int,
            mixup_alpha: float = 1.0,
            cutmix_alpha: float = 0.0,
            prob: float = 1.0,
            switch_prob: float = 0.5,
            mode: str = 'batch',
            method: Optional[str] = None,
            seed: int = 0,
            rank: int = 0,
    ):
        if not isinstance(num_crops, int) or num_crops < 2:
            raise ConfigError(f'SelfMix mixes crops of the same image and needs num_crops >= 2, got {num_crops!r}')
        if mode not in LAM_MODES:
            raise ConfigError(
                f'mixing mode {mode!r} is the lam granularity, one of {", ".join(LAM_MODES)}; choose Mixup or '
                f'CutMix with method= ({", ".join(MIX_METHODS)}) or the alphas')
        if not (mixup_alpha >= 0 and cutmix_alpha >= 0):
            raise ConfigError(f'mixup_alpha={mixup_alpha} and cutmix_alpha={cutmix_alpha} must be >= 0')
        if not 0.0 <= prob <= 1.0 or not 0.0 <= switch_prob <= 1.0:
            raise ConfigError(f'prob={prob} and switch_prob={switch_prob} must lie in [0, 1]')
        if method is None:
            if mixup_alpha > 0 and cutmix_alpha > 0:
                method = 'switch'
            elif mixup_alpha > 0:
                method = 'mixup'
            elif cutmix_alpha > 0:
                method = 'cutmix'
            else:
                raise ConfigError('mixing needs mixup_alpha > 0 or cutmix_alpha > 0')
        if method not in MIX_METHODS:
            raise ConfigError(f'mixing method {method!r} must be one of {", ".join(MIX_METHODS)}')
        needed = {'mixup': (mixup_alpha,), 'cutmix': (cutmix_alpha,), 'switch': (mixup_alpha, cutmix_alpha)}[method]
        if not all(a > 0 for a in needed):
            raise ConfigError(f'mixing method {method!r} needs its alpha(s) > 0 (mixup_alpha={mixup_alpha}, '
                              f'cutmix_alpha={cutmix_alpha})')
        self.num_crops = num_crops
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.mode = mode
        self.method = method
        self.seed = int(seed)
        self.rank = int(rank)
        self.mix_enabled = True
        # rows r and r' share the 'batch' draw when r % lam_groups == r' % lam_groups; the loader sets it to
        # num_crops for spread windows, whose step j holds rows j, j + num_crops, ...
        self.lam_groups = 1
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Reset the random stream to the one of ``epoch``."""
        self.epoch = int(epoch)
        self.rng = np.random.default_rng((self.seed, self.epoch, self.rank))

    def _partner(self, batch_size: int) -> np.ndarray:
        k = self.num_crops
        if batch_size % k:
            raise ConfigError(f'SelfMix got {batch_size} crops, not a multiple of num_crops={k}')
        groups = batch_size // k
        # a non-zero rotation of each group is a derangement: every crop gets another crop of its image
        shift = self.rng.integers(1, k, size=groups)
        j = np.arange(k)
        return ((j[None, :] + shift[:, None]) % k + (np.arange(groups) * k)[:, None]).reshape(-1)

    def _draw(self, n: int, height: int, width: int) -> Tuple[np.ndarray, ...]:
        """Per-row (applied, use_cutmix, lam, box top, bottom, left, right), one draw per batch or per row."""
        rng = self.rng
        draws = self.lam_groups if self.mode == 'batch' else n
        if n % draws:
            raise ConfigError(f'SelfMix got {n} crops, not a multiple of lam_groups={draws}')
        applied = rng.random(draws) < self.prob
        if self.method == 'switch':
            use_cutmix = rng.random(draws) < self.switch_prob
        else:
            use_cutmix = np.full(draws, self.method == 'cutmix')
        alpha = np.where(use_cutmix, self.cutmix_alpha, self.mixup_alpha)
        lam = rng.beta(np.maximum(alpha, 1e-12), np.maximum(alpha, 1e-12))
        # timm's rand_bbox: a box of side fraction sqrt(1 - lam) centred uniformly, clipped to the image
        cut = np.sqrt(1.0 - lam)
        cut_h, cut_w = (height * cut).astype(np.int64), (width * cut).astype(np.int64)
        cy, cx = rng.integers(0, height, size=draws), rng.integers(0, width, size=draws)
        top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + (cut_h + 1) // 2, 0, height)
        left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + (cut_w + 1) // 2, 0, width)
        paste = use_cutmix & applied
        top, bottom, left, right = (np.where(paste, v, 0) for v in (top, bottom, left, right))
        area = (bottom - top) * (right - left)
        lam = np.where(use_cutmix, 1.0 - area / float(height * width), lam)
        lam = np.where(applied, lam, 1.0)
        out = (applied, use_cutmix & applied, lam, top, bottom, left, right)
        if draws != n:
            # 'batch' mode: row r belongs to step r % draws (one step, or crop j of a spread window)
            step = np.arange(n) % draws
            out = tuple(v[step] for v in out)
        return out

    @torch.no_grad()
    def __call__(
            self,
            x: torch.Tensor,
            target: Dict[str, torch.Tensor],
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Mix a batch.

        Args:
            x: float [B, C, H, W] inputs (normalised or not: mixing commutes with normalisation).
            target: Target dict with ``'soft'`` float [B, C].

        Returns:
            (mixed inputs, a new target dict with ``'soft'`` mixed, plus ``'lam'`` (float [B], the weight of
            the crop's own label) and ``'partner'`` (long [B], the row it was mixed with, itself if unmixed)).
        """
        n, _, height, width = x.shape
        device = x.device
        partner = self._partner(n)
        target = dict(target)
        if self.mix_enabled:
            applied, use_cutmix, lam, *boxes = self._draw(n, height, width)
        else:  # nothing is mixed, so neither use_cutmix nor boxes is read
            applied, lam = np.zeros(n, dtype=bool), np.ones(n)
        partner = np.where(applied, partner, np.arange(n))
        lam_t = torch.from_numpy(lam.astype(np.float32)).to(device, non_blocking=True)
        target['lam'] = lam_t
        target['partner'] = torch.from_numpy(partner.astype(np.int64)).to(device, non_blocking=True)
        if not applied.any():
            return x, target
        index = target['partner']
        # one pass over the pixels: the partners' copy is lerped towards x in place; CutMix rows keep
        # lam_pix = 1 there, which lerp returns exactly as x, and get the partner's box pasted back
        lam_pix = torch.from_numpy(np.where(use_cutmix, 1.0, lam).astype(np.float32)).to(device, non_blocking=True)
        mixed = x[index].lerp_(x, lam_pix.to(x.dtype).view(n, 1, 1, 1))
        rows = np.flatnonzero(use_cutmix)
        row_boxes = np.stack([v[rows] for v in boxes], axis=1)
        for top, bottom, left, right in np.unique(row_boxes, axis=0):  # 'batch' mode: one box per step
            same = rows[(row_boxes == (top, bottom, left, right)).all(axis=1)]
            dst, src = (torch.from_numpy(i).to(device) for i in (same, partner[same]))
            mixed[dst, :, top:bottom, left:right] = x[src, :, top:bottom, left:right]
        soft = target['soft']
        lam_s = lam_t.to(soft.dtype).view(n, 1)
        target['soft'] = soft * lam_s + soft[index] * (1 - lam_s)
        return mixed, target

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(method={self.method!r}, mixup_alpha={self.mixup_alpha}, '
                f'cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, switch_prob={self.switch_prob}, '
                f'mode={self.mode!r})')


def create_selfmix(
        mixup_alpha: float = 1.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = 'batch',
        num_crops: int = 4,
        method: Optional[str] = None,
        seed: int = 0,
        rank: int = 0,
) -> Optional[SelfMix]:
    """Create SelfMix from timm-style Mixup arguments; None when mixing is off.

    Args:
        mixup_alpha: Beta alpha of Mixup (0 disables it).
        cutmix_alpha: Beta alpha of CutMix (0 disables it).
        prob: Probability of mixing a batch (``mode='batch'``) or each crop.
        switch_prob: Probability of CutMix instead of Mixup when both alphas are > 0.
        mode: ``lam`` granularity: ``'batch'``, ``'pair'`` or ``'elem'`` (per crop).
        num_crops: Crops per image in the batch.
        method: Force ``'mixup'``, ``'cutmix'`` or ``'switch'``.
        seed: Seed of the random draws.
        rank: Distributed rank.

    Returns:
        The SelfMix, or None if both alphas are 0 or ``prob`` is 0.
    """
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or prob <= 0:
        return None
    return SelfMix(num_crops, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
                   switch_prob=switch_prob, mode=mode, method=method, seed=seed, rank=rank)

