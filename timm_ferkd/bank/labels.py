"""Label types: how a teacher's region distribution is stored, and how the dense target returns.

Stored values are always the teacher's probabilities ``softmax(z_T / T)`` sorted in descending
order, so the first stored value of a region is its max probability (FerKD's confidence ``m``)
for every label type.

===================== ========= ======================================================
label type            stored k  dense C-dim target
===================== ========= ======================================================
marginal_smoothing    k         top-k values kept; ``1 - sum(topk)`` spread evenly over
                                the other C - k classes (FKD's ``marginal_smoothing_k``)
marginal_renorm       k         top-k values kept, zero elsewhere, L1-renormalised
smoothing             1         top-1 value kept, ``1 - top1`` spread over the other C - 1
hard                  1         one-hot at the argmax (its probability is kept for ``m``)
full                  C         the whole distribution, indices implicit (0..C-1)
===================== ========= ======================================================
"""
from typing import Optional, Tuple, Union

import numpy as np
import torch

from timm_ferkd.errors import ConfigError

__all__ = ['LABEL_TYPES', 'stored_k', 'index_dtype', 'top_values', 'dense_targets']

LABEL_TYPES = ('marginal_smoothing', 'marginal_renorm', 'smoothing', 'hard', 'full')


def stored_k(label_type: str, topk: int, num_classes: int) -> int:
    """Number of values stored per region for a label type.

    Args:
        label_type: One of ``LABEL_TYPES``.
        topk: Requested k (used by the marginal types).
        num_classes: Number of classes C.

    Returns:
        The k stored per region.
    """
    if label_type not in LABEL_TYPES:
        raise ConfigError(f'unknown --label-type {label_type!r}; choose one of {", ".join(LABEL_TYPES)}')
    if label_type in ('hard', 'smoothing'):
        return 1
    if label_type == 'full':
        return num_classes
    if not 1 <= topk <= num_classes:
        raise ConfigError(f'--topk {topk} must lie in [1, num_classes={num_classes}]')
    return topk


def index_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned integer type that holds a class index (uint8 up to 256 classes)."""
    if num_classes <= 1 << 8:
        return np.dtype(np.uint8)
    if num_classes <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def top_values(probs: torch.Tensor, label_type: str, k: int) -> Tuple[Optional[np.ndarray], np.ndarray]:
    """The top-k classes and float32 probabilities of teacher distributions (what a bank stores, before its dtypes).

    Args:
        probs: [N, C] teacher probabilities.
        label_type: One of ``LABEL_TYPES``.
        k: Stored k (``stored_k``).

    Returns:
        (int64 indices [N, k] or None for 'full', float32 values [N, k] sorted descending; all C for 'full').
    """
    if label_type == 'full':
        return None, probs.float().cpu().numpy()
    values, indices = torch.topk(probs.float(), k, dim=1, largest=True, sorted=True)
    return indices.cpu().numpy(), values.cpu().numpy()


def dense_targets(
        indices: Optional[Union[np.ndarray, torch.Tensor]],
        values: Union[np.ndarray, torch.Tensor],
        num_classes: int,
        label_type: str,
) -> torch.Tensor:
    """Recover dense C-dim targets from stored top-k labels.

    Computed with numpy: a loader recovers a few regions per call, where torch's per-operation
    cost would be most of the read.

    Args:
        indices: [N, k] class indices (None for 'full').
        values: [N, k] stored probabilities, descending.
        num_classes: Number of classes C.
        label_type: One of ``LABEL_TYPES``.

    Returns:
        float32 [N, C] targets; each row sums to 1.
    """
    values = np.asarray(values, dtype=np.float32)
    if label_type == 'full':
        return torch.from_numpy(values / np.maximum(values.sum(axis=1, keepdims=True), np.float32(1e-12)))
    if label_type not in LABEL_TYPES:
        raise ConfigError(f'unknown label type {label_type!r}; choose one of {", ".join(LABEL_TYPES)}')
    n, k = values.shape
    indices = np.asarray(indices, dtype=np.int64)
    if label_type == 'hard':
        out = np.zeros((n, num_classes), dtype=np.float32)
        indices, kept = indices[:, :1], np.ones((n, 1), dtype=np.float32)
    elif label_type == 'marginal_renorm' or num_classes == k:
        out = np.zeros((n, num_classes), dtype=np.float32)
        kept = values / np.maximum(values.sum(axis=1, keepdims=True), np.float32(1e-12))
    else:
        # fp16 rounding can push sum(topk) a hair above 1: never spread negative mass
        kept = np.clip(values, 0, 1)
        kept /= np.maximum(kept.sum(axis=1, keepdims=True), np.float32(1))
        out = np.empty((n, num_classes), dtype=np.float32)
        out[...] = (1 - kept.sum(axis=1, keepdims=True)) / np.float32(num_classes - k)
    # flat positions: one fancy-index store instead of put_along_axis's per-call index building
    out.reshape(-1)[indices + np.arange(0, n * num_classes, num_classes)[:, None]] = kept
    return torch.from_numpy(out)
