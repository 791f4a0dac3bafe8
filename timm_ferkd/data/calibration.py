"""Label transforms for stored region labels: FerKD calibration, probability shift, re-tempering.

FerKD (ICCV 2023) categorises each region by the teacher's stored confidence ``m = max_c y_s(c)``
(before any re-tempering or shift); the dataset samples only non-discarded regions::

    CATEGORY_DISCARD (-1)  m < T_L or m > T_T   uninformative region: never sampled
    CATEGORY_HARD    (1)   T_L <= m < T_M       hard region: softened ground-truth label
    CATEGORY_SOFT    (0)   T_M <= m <= T_T      informative region: the teacher's label

Calibration is the last transform (see :func:`create_label_transform`) because it replaces whole rows:
a softened hard label must keep exactly ``1 - eps`` on the ground truth, which re-tempering would change.
"""
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from timm_ferkd.errors import ConfigError
from timm_ferkd.losses import probability_shift, retemper

__all__ = [
    'CATEGORY_SOFT', 'CATEGORY_HARD', 'CATEGORY_DISCARD', 'CATEGORY_NAMES',
    'CalibrationConfig', 'CalibrationThresholds', 'LabelTransform', 'Retemper', 'ProbabilityShift',
    'FerKDCalibration', 'ComposeLabelTransforms', 'create_label_transform', 'smoothed_one_hot', 'tie_broken',
]

CATEGORY_SOFT = 0
CATEGORY_HARD = 1
CATEGORY_DISCARD = -1
CATEGORY_NAMES = {CATEGORY_SOFT: 'soft', CATEGORY_HARD: 'hard', CATEGORY_DISCARD: 'discard'}


@dataclass(frozen=True)
class CalibrationThresholds:
    """Absolute FerKD thresholds on the region confidence ``m`` (see the module docstring).

    Attributes:
        low: T_L, regions with ``m < low`` are discarded.
        mid: T_M, regions with ``low <= m < mid`` get the softened hard label.
        top: T_T, regions with ``m > top`` are discarded.
        eps: Smoothing of the hard label: ``1 - eps`` on the ground truth.
        tie_break: Compare :func:`tie_broken` confidences (quantile thresholds), so that a quantile
            discards that fraction of regions even where many share one stored value (fp16 rounds every
            confidence above 0.9995 to 1.0).
    """
    low: float
    mid: float
    top: float
    eps: float
    tie_break: bool = False


# far below the spacing of stored confidences (fp16 >= 2**-20 at the smallest possible max, 1/C)
_TIE_JITTER = 2.0 ** -24


def tie_broken(max_probs: np.ndarray) -> np.ndarray:
    """float64 confidences with ties broken by a fixed hash of each region's position in ``max_probs``.

    Distinct stored values keep their order; equal ones are ordered by the hash, the same on every
    rank and run. Quantile thresholds on these discard exactly the asked fraction of regions.
    """
    m = np.asarray(max_probs, dtype=np.float64)
    index = np.arange(m.size, dtype=np.uint64)
    with np.errstate(over='ignore'):
        h = (index + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(29)
    unit = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return m + _TIE_JITTER * unit.reshape(m.shape)


@dataclass
class CalibrationConfig:
    """FerKD region calibration options.

    With ``quantile=True`` the thresholds are quantiles of the bank's confidences, resolved by
    :meth:`resolve` (``low=0.05`` discards the 5% least confident regions); taken on :func:`tie_broken`
    confidences, they hold where many regions share a stored value (a confident teacher's fp16 bank
    stores 1.0 for a quarter of its regions or more).

    The defaults (0, None, 1) keep every region with its teacher label, i.e. plain FKD.

    Args:
        low: T_L (absolute) or its quantile.
        mid: T_M (absolute) or its quantile; None means ``low`` (no calibrated band).
        top: T_T (absolute) or its quantile.
        quantile: Interpret ``low``, ``mid`` and ``top`` as quantiles of the bank's confidences.
        eps: Label smoothing of the calibrated hard label, in [0, 1).

    Raises:
        ConfigError: Thresholds outside [0, 1] or not ``low <= mid <= top``; ``eps`` outside [0, 1).
    """
    low: float = 0.0
    mid: Optional[float] = None
    top: float = 1.0
    quantile: bool = False
    eps: float = 0.1

    def __post_init__(self):
        if self.mid is None:
            self.mid = self.low
        kind = 'quantiles' if self.quantile else 'thresholds'
        values = (self.low, self.mid, self.top)
        for name, value in zip(('low', 'mid', 'top'), values):
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(
                    f'FerKD calibration {name}={value!r} must lie in [0, 1] ({kind} of the max probability)')
        if not self.low <= self.mid <= self.top:
            raise ConfigError(
                f'FerKD calibration {kind} out of order: need low <= mid <= top, got low={self.low}, '
                f'mid={self.mid}, top={self.top}')
        if not isinstance(self.eps, (int, float)) or not 0.0 <= self.eps < 1.0:
            raise ConfigError(f'FerKD calibration eps={self.eps!r} must lie in [0, 1)')

    def resolve(self, max_probs: Optional[np.ndarray] = None) -> CalibrationThresholds:
        """Absolute thresholds, computing quantiles from the bank's confidences when asked.

        Args:
            max_probs: The bank's region confidences, any shape (``bank.all_max_probs()``); needed only
                when ``quantile`` is set.

        Returns:
            The absolute thresholds.
        """
        if not self.quantile:
            return CalibrationThresholds(float(self.low), float(self.mid), float(self.top), float(self.eps))
        if max_probs is None or np.size(max_probs) == 0:
            raise ConfigError('quantile calibration thresholds need the bank\'s max probabilities')
        m = tie_broken(max_probs).reshape(-1)
        low, mid, top = np.quantile(m, [self.low, self.mid, self.top])
        # the extreme quantiles are the extreme values: nothing lies outside them
        low = -np.inf if self.low == 0 else low
        top = np.inf if self.top == 1 else top
        return CalibrationThresholds(float(low), float(mid), float(top), float(self.eps), tie_break=True)


def smoothed_one_hot(label: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """float32 [n, C]: ``1 - eps`` on ``label``, ``eps / (C - 1)`` on every other class.

    Args:
        label: long [n] class indices.
        num_classes: C.
        eps: Mass spread over the other classes.

    Returns:
        Rows summing to 1.
    """
    off = eps / max(num_classes - 1, 1)
    out = torch.full((label.shape[0], num_classes), off, dtype=torch.float32)
    return out.scatter_(1, label.long().view(-1, 1), 1.0 - eps)


class LabelTransform:
    """A per-crop label transform: ``(soft [n, C], label [n], category [n]) -> soft [n, C]``.

    ``soft`` is float32 with rows summing to 1, ``label`` the ground-truth classes (long) and
    ``category`` the region categories (``CATEGORY_*``). Transforms must return rows summing to 1.
    """

    def __call__(self, soft: torch.Tensor, label: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Retemper(LabelTransform):
    """Re-temper stored labels: :func:`timm_ferkd.losses.retemper`, ``softmax(log q / T)``.

    Args:
        temperature: T > 0; 1 is the identity, > 1 flattens, < 1 sharpens.
    """

    def __init__(self, temperature: float):
        if not temperature > 0:
            raise ConfigError(f'label temperature {temperature!r} must be > 0')
        self.temperature = float(temperature)

    def __call__(self, soft: torch.Tensor, label: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        return retemper(soft, self.temperature)

    def __repr__(self) -> str:
        return f'Retemper(temperature={self.temperature})'


class ProbabilityShift(LabelTransform):
    """Probability shift, :func:`timm_ferkd.losses.probability_shift`: where the argmax is not the
    ground truth, swap their two values (rows still sum to 1)."""

    def __call__(self, soft: torch.Tensor, label: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        return probability_shift(soft, label)

    def __repr__(self) -> str:
        return 'ProbabilityShift()'


class FerKDCalibration(LabelTransform):
    """FerKD region calibration with resolved thresholds.

    :meth:`categorize` assigns each region its category from the stored confidence (once per bank);
    calling the transform replaces the label of every ``CATEGORY_HARD`` crop by
    :func:`smoothed_one_hot` of its ground truth. Discarded regions never reach it.

    Args:
        thresholds: Absolute thresholds (``CalibrationConfig.resolve``).
        num_classes: C.
    """

    def __init__(self, thresholds: CalibrationThresholds, num_classes: int):
        self.thresholds = thresholds
        self.num_classes = int(num_classes)

    def categorize(self, max_probs: np.ndarray) -> np.ndarray:
        """int8 categories (``CATEGORY_*``) of regions with confidences ``max_probs`` (any shape)."""
        t = self.thresholds
        # compare in float64 so that m exactly equal to a threshold falls on the documented side
        m = tie_broken(max_probs) if t.tie_break else np.asarray(max_probs).astype(np.float64, copy=False)
        category = np.full(m.shape, CATEGORY_SOFT, dtype=np.int8)
        category[m < t.mid] = CATEGORY_HARD
        category[(m < t.low) | (m > t.top)] = CATEGORY_DISCARD
        return category

    def __call__(self, soft: torch.Tensor, label: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        hard = category == CATEGORY_HARD
        if not bool(hard.any()):
            return soft
        calibrated = smoothed_one_hot(label, self.num_classes, self.thresholds.eps).to(soft.dtype)
        return torch.where(hard.view(-1, 1), calibrated, soft)

    def __repr__(self) -> str:
        t = self.thresholds
        return f'FerKDCalibration(low={t.low:.6g}, mid={t.mid:.6g}, top={t.top:.6g}, eps={t.eps})'


class ComposeLabelTransforms(LabelTransform):
    """Apply label transforms in sequence.

    Args:
        transforms: The transforms, first applied first.
    """

    def __init__(self, transforms: Sequence[LabelTransform]):
        self.transforms = list(transforms)

    def __call__(self, soft: torch.Tensor, label: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            soft = t(soft, label, category)
        return soft

    def __repr__(self) -> str:
        return 'ComposeLabelTransforms([' + ', '.join(repr(t) for t in self.transforms) + '])'


def create_label_transform(
        num_classes: int,
        calibration: Optional[CalibrationConfig] = None,
        max_probs: Optional[np.ndarray] = None,
        prob_shift: bool = False,
        temperature: float = 1.0,
) -> ComposeLabelTransforms:
    """Build the label transform pipeline in its documented order (re-temper, shift, calibrate).

    Args:
        num_classes: C.
        calibration: FerKD calibration, or None to keep every region with its teacher label.
        max_probs: The bank's confidences, to resolve quantile thresholds.
        prob_shift: Apply the probability shift.
        temperature: Re-tempering temperature (1 disables it).

    Returns:
        The composed transform; its ``calibration`` attribute is the :class:`FerKDCalibration` or None.
    """
    transforms = []
    if temperature != 1.0:
        transforms.append(Retemper(temperature))
    if prob_shift:
        transforms.append(ProbabilityShift())
    ferkd = None
    if calibration is not None:
        ferkd = FerKDCalibration(calibration.resolve(max_probs), num_classes)
        transforms.append(ferkd)
    composed = ComposeLabelTransforms(transforms)
    composed.calibration = ferkd
    return composed
