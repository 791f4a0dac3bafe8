"""The memory-mapped reader in DataLoader workers started by fork and by spawn."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from test_format import make_bank
from timm_ferkd.bank.reader import SoftLabelBank


class LabelsOfImage(Dataset):
    """Item i: the dense soft labels of every region of image i, read inside the worker."""

    def __init__(self, bank: SoftLabelBank):
        self.bank = bank

    def __len__(self) -> int:
        return len(self.bank)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.bank.dense_targets(index)


@pytest.mark.parametrize('context', ['fork', 'spawn'])
def test_reader_in_workers(tmp_path, context):
    bank = SoftLabelBank(make_bank(tmp_path / 'bank', num_images=10, per_shard=3))
    expected = torch.stack([bank.dense_targets(i) for i in range(len(bank))])
    assert bank._shards  # the parent has mapped shards: workers must map their own
    loader = DataLoader(LabelsOfImage(bank), batch_size=2, num_workers=2, multiprocessing_context=context)
    got = torch.cat(list(loader))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_one_image_read_touches_one_shard(tmp_path):
    bank = SoftLabelBank(make_bank(tmp_path / 'bank', num_images=10, per_shard=3))
    bank.labels(7)
    assert list(bank._shards) == [2]
    np.testing.assert_array_equal(bank.regions(7, [0, 1]).boxes, bank.regions(7).boxes[:2])
