"""Shard round trips, manifest checks and corruption detection."""
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from timm_ferkd.bank.format import BankManifest, DatasetIdentity, TeacherInfo, read_safetensors_header
from timm_ferkd.bank.reader import SoftLabelBank
from timm_ferkd.bank.writer import atomic_write_bytes, write_shard
from timm_ferkd.errors import BankError


def make_bank(root: Path, num_images=6, regions=4, k=2, classes=5, per_shard=4, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    manifest = BankManifest(
        num_classes=classes, regions_per_image=regions, topk=k, label_type='marginal_smoothing', temperature=1.0,
        num_images=num_images, images_per_shard=per_shard, seed=seed, scale=(0.08, 1.0), ratio=(0.75, 4 / 3),
        teacher=TeacherInfo(model='test'), index_dtype='uint8',
        dataset=DatasetIdentity(name='x', split='train', num_images=num_images, fingerprint='sha256:0',
                                fingerprint_kind='targets'))
    root.mkdir(parents=True, exist_ok=True)
    for s in range(manifest.num_shards):
        first, n = manifest.shard_range(s)
        values = np.sort(rng.random((n, regions, k)), axis=2)[:, :, ::-1] / k
        record = write_shard(root, s, first, {
            'image_sizes': np.tile(np.array([[28, 30]], dtype=np.int32), (n, 1)),
            'targets': np.arange(first, first + n, dtype=np.int32) % classes,
            'topk_values': values.astype(np.float16),
            'topk_indices': np.argsort(rng.random((n, regions, classes)), axis=2)[..., :k].astype(np.uint8),
        })
        manifest.shards.append(record)
    atomic_write_bytes(root / 'manifest.json', manifest.to_json().encode())
    return root


def test_round_trip(tmp_path):
    root = make_bank(tmp_path / 'bank')
    bank = SoftLabelBank(root, validate=True)
    assert len(bank) == 6 and bank.manifest.num_shards == 2
    raw = load_file(str(root / 'shard-00001.safetensors'))
    idx, val = bank.labels(5, [3, 1])
    np.testing.assert_array_equal(idx, raw['topk_indices'][1, [3, 1]])
    np.testing.assert_array_equal(val, raw['topk_values'][1, [3, 1]])
    assert bank.target(5) == raw['targets'][1] and bank.image_size(5) == (28, 30)
    np.testing.assert_array_equal(bank.max_probs(4), raw['topk_values'][0, :, 0].astype(np.float32))
    dense = bank.dense_targets(5, [0, 1, 2, 3])
    assert dense.shape == (4, 5)
    np.testing.assert_allclose(dense.sum(1).numpy(), 1, atol=1e-5)
    assert bank.all_max_probs().shape == (6, 4)
    bank.verify_checksums()


def test_bank_pickles_without_mappings(tmp_path):
    import pickle
    bank = SoftLabelBank(make_bank(tmp_path / 'bank'))
    bank.labels(0)
    clone = pickle.loads(pickle.dumps(bank))
    assert clone._shards == {}
    np.testing.assert_array_equal(clone.labels(0)[1], bank.labels(0)[1])


def test_truncated_shard_is_detected(tmp_path):
    root = make_bank(tmp_path / 'bank')
    shard = root / 'shard-00000.safetensors'
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(BankError, match='truncated or corrupt'):
        SoftLabelBank(root, validate=True)


def test_corrupt_shard_fails_checksum(tmp_path):
    root = make_bank(tmp_path / 'bank')
    shard = root / 'shard-00001.safetensors'
    header, start = read_safetensors_header(shard)
    data = bytearray(shard.read_bytes())
    data[start + header['image_sizes']['data_offsets'][0]] ^= 0x01  # height 28 -> 29: still a valid value
    shard.write_bytes(bytes(data))
    bank = SoftLabelBank(root, validate=True)  # same size, valid values: only the checksum can tell
    with pytest.raises(BankError, match='sha256'):
        bank.verify_checksums()
    with pytest.raises(BankError, match='sha256'):
        bank.validate(full=True)


def test_garbage_header_is_detected(tmp_path):
    root = make_bank(tmp_path / 'bank')
    shard = root / 'shard-00000.safetensors'
    size = shard.stat().st_size
    shard.write_bytes(b'\xff' * size)
    with pytest.raises(BankError, match='corrupt'):
        SoftLabelBank(root, validate=True)


def test_newer_format_version_is_refused(tmp_path):
    root = make_bank(tmp_path / 'bank')
    data = json.loads((root / 'manifest.json').read_text())
    data['format_version'] = 99
    (root / 'manifest.json').write_text(json.dumps(data))
    with pytest.raises(BankError, match='newer than this timm-ferkd'):
        SoftLabelBank(root)


def test_missing_and_incomplete_banks(tmp_path):
    with pytest.raises(BankError, match='no bank manifest'):
        SoftLabelBank(tmp_path)
    root = make_bank(tmp_path / 'bank')
    data = json.loads((root / 'manifest.json').read_text())
    data['shards'] = data['shards'][:1]
    (root / 'manifest.json').write_text(json.dumps(data))
    with pytest.raises(BankError, match='incomplete'):
        SoftLabelBank(root)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / 'f.bin'
    target.write_bytes(b'old')

    def boom(fd):
        raise OSError('disk full')
    monkeypatch.setattr('os.fsync', boom)
    with pytest.raises(BankError, match='cannot write .*disk full'):
        atomic_write_bytes(target, b'new content')
    assert target.read_bytes() == b'old'
    assert [p.name for p in tmp_path.iterdir()] == ['f.bin']
