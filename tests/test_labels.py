import numpy as np
import pytest
import torch

from timm_ferkd.bank.codes import label_storage, label_tensors
from timm_ferkd.bank.labels import dense_targets, index_dtype, stored_k, top_values
from timm_ferkd.errors import ConfigError

PROBS = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05]])  # C = 6


def quantize(probs, label_type, k):
    """What a format-1 (fp16) shard stores for ``probs``: the writer's own path."""
    indices, values = top_values(probs, label_type, k)
    tensors = label_tensors(indices, values, label_storage(probs.shape[1], label_type, 'float16'))
    return tensors.get('topk_indices'), tensors['topk_values']


def roundtrip(label_type, k):
    idx, val = quantize(PROBS, label_type, k)
    return dense_targets(None if idx is None else torch.from_numpy(idx.astype(np.int64)),
                         torch.from_numpy(val.astype(np.float32)), 6, label_type)


def test_marginal_smoothing_hand_computed():
    # top-2 = 0.5 (class 0), 0.2 (class 1); remaining 0.3 spread over 4 classes = 0.075
    out = roundtrip('marginal_smoothing', 2)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.2, 0.075, 0.075, 0.075, 0.075]]), atol=1e-3, rtol=0)


def test_marginal_renorm_hand_computed():
    out = roundtrip('marginal_renorm', 2)
    torch.testing.assert_close(out, torch.tensor([[0.5 / 0.7, 0.2 / 0.7, 0, 0, 0, 0]]), atol=1e-3, rtol=0)


def test_smoothing_hand_computed():
    out = roundtrip('smoothing', 1)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1]]), atol=1e-3, rtol=0)


def test_hard_hand_computed():
    assert roundtrip('hard', 1).tolist() == [[1, 0, 0, 0, 0, 0]]


def test_full_hand_computed():
    torch.testing.assert_close(roundtrip('full', 6), PROBS, atol=1e-3, rtol=0)


def test_values_sorted_descending_and_fp16():
    idx, val = quantize(torch.tensor([[0.1, 0.6, 0.3]]), 'marginal_smoothing', 3)
    assert idx.tolist() == [[1, 2, 0]] and idx.dtype == np.uint8
    assert val.dtype == np.float16 and val[0, 0] == np.float16(0.6)


def test_rows_sum_to_one_and_fp16_overflow_is_safe():
    # fp16 values summing above 1 must not produce negative mass
    val = torch.tensor([[0.7, 0.31]])
    out = dense_targets(torch.tensor([[0, 1]]), val, 4, 'marginal_smoothing')
    assert out.min() >= 0
    torch.testing.assert_close(out.sum(1), torch.ones(1))


def test_stored_k_and_index_dtype():
    assert stored_k('hard', 5, 10) == 1 and stored_k('full', 5, 10) == 10 and stored_k('marginal_renorm', 3, 10) == 3
    assert index_dtype(256) == np.uint8 and index_dtype(1000) == np.uint16 and index_dtype(70000) == np.int32
    with pytest.raises(ConfigError, match='topk'):
        stored_k('marginal_smoothing', 11, 10)
    with pytest.raises(ConfigError, match='label-type'):
        stored_k('bogus', 5, 10)
