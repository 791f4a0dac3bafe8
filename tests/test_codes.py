"""Bank format 2 (8-bit values, packed indices), format-1 compatibility, and the batched label read."""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from bank_factory import folder_source, make_image_folder, write_bank
from conftest import cli_in_process
from timm_ferkd.bank.codes import (
    decode_values, encode_values, index_bits, label_storage, pack_indices, packed_row_bytes, unpack_indices)
from timm_ferkd.bank.labels import dense_targets
from timm_ferkd.bank.reader import SoftLabelBank
from timm_ferkd.bank.regions import RegionSampler, uniform
from timm_ferkd.errors import BankError, ConfigError

BOUND = 1 / 510 + 1e-6  # half a code step of the top value, plus float32 rounding
# a dense target adds the k values' errors to the spread mass, or renormalises when they sum above 1
DENSE_BOUND = 6 / 510 + 1e-6  # (k + 1) / 510 at k = 5


def teacher_like(n: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Softmax of Gaussian logits with a random scale: from nearly uniform to nearly one-hot."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, num_classes)) * rng.uniform(0.3, 8.0, size=(n, 1))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def top5(probs: np.ndarray):
    idx = np.argsort(-probs, axis=1, kind='stable')[:, :5]
    return idx, np.take_along_axis(probs, idx, axis=1)


def test_codes_by_hand():
    codes = encode_values(np.array([[1.0, 0.5, 0.0], [0.2, 0.2, 0.1], [0.001, 0.001, 0.0005]], dtype=np.float32))
    # 255 * 0.5 = 127.5 rounds half to even; 0.2 -> 51, relative codes 255 * 0.2 / (51/255) = 255 and 127.5 -> 128
    np.testing.assert_array_equal(codes, [[255, 128, 0], [51, 255, 128], [0, 0, 0]])
    np.testing.assert_allclose(decode_values(codes), [[1, 128 / 255, 0], [0.2, 0.2, 0.2 * 128 / 255], [0, 0, 0]],
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize('num_classes', [10, 1000])
def test_value_round_trip_error_bound_and_order(num_classes):
    idx, values = top5(teacher_like(4000, num_classes))
    decoded = decode_values(encode_values(values))
    assert np.abs(decoded - values).max() <= BOUND
    assert np.all(np.diff(decoded, axis=1) <= 0)  # still descending: the first value is the max
    exact = dense_targets(idx, values, num_classes, 'marginal_smoothing').numpy()
    coded = dense_targets(idx, decoded, num_classes, 'marginal_smoothing').numpy()
    assert np.abs(coded - exact).max() <= DENSE_BOUND
    np.testing.assert_allclose(coded.sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize('bits', [1, 3, 8, 10, 13, 17, 26, 31])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    indices = rng.integers(0, 1 << bits, size=(3, 7, 5))
    rows = pack_indices(indices, bits)
    assert rows.shape == (3, packed_row_bytes(7, 5, bits)) and rows.dtype == np.uint8
    positions = np.arange(35).reshape(7, 5)
    for i in range(3):
        np.testing.assert_array_equal(unpack_indices(rows[i], positions, bits), indices[i])
    np.testing.assert_array_equal(unpack_indices(rows, np.tile(positions.reshape(1, -1), (3, 1)), bits),
                                  indices.reshape(3, -1))
    with pytest.raises(ValueError):
        pack_indices(np.array([[[1 << bits]]]), bits)


def test_storage_decisions():
    assert index_bits(10) == 4 and index_bits(1000) == 10 and index_bits(1024) == 10 and index_bits(1025) == 11
    v1 = label_storage(1000, 'marginal_smoothing')
    assert (v1.value_dtype, v1.index_dtype, v1.format_version, v1.bits) == ('float16', 'uint16', 1, None)
    v2 = label_storage(1000, 'marginal_smoothing', 'uint8')
    assert (v2.value_dtype, v2.index_dtype, v2.format_version, v2.bits) == ('uint8', 'packed10', 2, 10)
    assert label_storage(10, 'full').index_dtype is None
    with pytest.raises(ConfigError, match='--label-type full'):
        label_storage(10, 'full', 'uint8')
    with pytest.raises(ConfigError, match='--value-dtype'):
        label_storage(10, 'hard', 'int4')


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    return folder_source(make_image_folder(tmp_path_factory.mktemp('codes'), num_images=6, num_classes=3))


@pytest.mark.parametrize('label_type', ['marginal_smoothing', 'marginal_renorm', 'smoothing', 'hard'])
def test_uint8_bank_round_trip(source, tmp_path, label_type):
    classes, regions = 1000, 500
    probs = teacher_like(len(source) * regions, classes, seed=1).reshape(len(source), regions, classes)
    v1 = write_bank(tmp_path / 'v1', source, probs, classes, regions, label_type=label_type, images_per_shard=4)
    v2 = write_bank(tmp_path / 'v2', source, probs, classes, regions, label_type=label_type, images_per_shard=4,
                    value_dtype='uint8')
    m = v2.manifest
    assert (m.format_version, m.value_dtype, m.index_dtype) == (2, 'uint8', 'packed10')
    assert v1.manifest.format_version == 1
    SoftLabelBank(v2.path, validate=True).verify_checksums()
    shard = load_file(str(v2.path / m.shards[0].file))
    k = m.topk
    if label_type == 'marginal_smoothing':
        # the label bytes of a region: k 8-bit values and k 10-bit indices, 11.25 B at top-5
        assert (shard['topk_values'].nbytes + shard['topk_indices'].nbytes) / (4 * regions) == 11.25
    for i in range(len(source)):
        idx1, val1 = v1.labels(i)
        idx2, val2 = v2.labels(i, np.arange(regions))
        np.testing.assert_array_equal(idx2, idx1)
        assert val2.dtype == np.float32 and np.abs(val2 - val1.astype(np.float32)).max() <= BOUND + 5e-4
        np.testing.assert_allclose(v2.max_probs(i), val2[:, 0], rtol=0, atol=0)
        assert (v2.dense_targets(i, [3, 0]) - v1.dense_targets(i, [3, 0])).abs().max() <= DENSE_BOUND
    np.testing.assert_array_equal(v2.all_top_classes(), v1.all_top_classes())
    assert np.abs(v2.all_max_probs() - v1.all_max_probs()).max() <= BOUND + 5e-4


def test_format1_bank_reads_unchanged_and_corrupt_manifests(source, tmp_path):
    probs = teacher_like(len(source) * 6, 10, seed=2).reshape(len(source), 6, 10)
    bank = write_bank(tmp_path / 'v1', source, probs, 10, 6, label_type='marginal_smoothing', topk=3)
    manifest = json.loads((bank.path / 'manifest.json').read_text())
    assert (manifest['format_version'], manifest['value_dtype'], manifest['index_dtype']) == (1, 'float16', 'uint8')
    raw = load_file(str(bank.path / bank.manifest.shards[0].file))
    idx, val = bank.labels(1, [4, 2])
    assert val.dtype == np.float16 and idx.dtype == np.uint8
    np.testing.assert_array_equal(val, raw['topk_values'][1, [4, 2]])
    np.testing.assert_array_equal(idx, raw['topk_indices'][1, [4, 2]])
    # 8-bit values claimed by a format-1 manifest, or a packed width that does not fit the classes: corrupt
    corrupt = [{'value_dtype': 'uint8', 'index_dtype': 'packed4'},
               {'value_dtype': 'uint8', 'index_dtype': 'packed9', 'format_version': 2}]
    for change in corrupt:
        (bank.path / 'manifest.json').write_text(json.dumps({**manifest, **change}))
        with pytest.raises(BankError, match='manifest is corrupt'):
            SoftLabelBank(bank.path)


def _reference_box(sampler: RegionSampler, image: int, size, region: int):
    """One region by the module docstring's algorithm, scalar by scalar (np.exp kept: libm's exp differs)."""
    height, width = size
    area = float(height * width)
    u = uniform(sampler.seed, image, np.array([region]), np.arange(41))
    log_lo, log_hi = np.log(sampler.ratio[0]), np.log(sampler.ratio[1])
    for a in range(10):
        target = area * (sampler.scale[0] + (sampler.scale[1] - sampler.scale[0]) * u[4 * a])
        aspect = np.exp(np.array([log_lo + (log_hi - log_lo) * u[4 * a + 1]]))[0]
        w, h = round(float(np.sqrt(target * aspect))), round(float(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return [int(np.floor(u[4 * a + 2] * (height - h + 1))), int(np.floor(u[4 * a + 3] * (width - w + 1))),
                    h, w], bool(u[40] < sampler.flip_prob)
    return list(sampler._central_box(height, width)), bool(u[40] < sampler.flip_prob)


@pytest.mark.parametrize('scale,ratio', [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 1.0), (0.2, 5.0))])
def test_vectorised_sampler_equals_scalar_reference(scale, ratio):
    # the wide ratio makes many regions retry and some fall back to the central crop
    sampler = RegionSampler(seed=9, scale=scale, ratio=ratio)
    rng = np.random.default_rng(0)
    for image, size in enumerate([(375, 500), (28, 28), (600, 40), (3, 200)]):
        ids = rng.choice(65536, size=60, replace=False)
        got = sampler.sample(image, size, ids)
        for j, region in enumerate(ids):
            box, flip = _reference_box(sampler, image, size, int(region))
            assert got.boxes[j].tolist() == box and got.flips[j] == flip


def test_read_batch_equals_one_image_reads(source, tmp_path):
    probs = teacher_like(len(source) * 16, 1000, seed=3).reshape(len(source), 16, 1000)
    for dtype in ('float16', 'uint8'):
        bank = write_bank(tmp_path / dtype, source, probs, 1000, 16, label_type='marginal_smoothing',
                          images_per_shard=4, value_dtype=dtype)
        images = np.array([5, 0, 3, 5])
        ids = np.array([[1, 15, 2], [0, 0, 7], [9, 4, 3], [14, 13, 12]])
        batch = bank.read_batch(images, ids)
        for j, i in enumerate(images):
            regions = bank.regions(int(i), ids[j])
            np.testing.assert_array_equal(batch.boxes[j], regions.boxes)
            np.testing.assert_array_equal(batch.flips[j], regions.flips)
            assert tuple(batch.image_sizes[j]) == bank.image_size(int(i)) and batch.targets[j] == bank.target(int(i))
            assert torch.equal(batch.soft[j], bank.dense_targets(int(i), ids[j]))


def test_generate_and_verify_uint8_cli(fmnist_root, teacher_checkpoint, tmp_path, capsys):
    from test_generate import gen_args
    out = tmp_path / 'bank'
    done = cli_in_process(capsys, *gen_args(fmnist_root, teacher_checkpoint, out, num_images=8, regions=4,
                                            extra=('--value-dtype', 'uint8')))
    assert done.returncode == 0, done.stderr
    bank = SoftLabelBank(out)
    assert (bank.manifest.format_version, bank.manifest.index_dtype) == (2, 'packed4')
    fp16 = tmp_path / 'fp16'
    fp16_args = gen_args(fmnist_root, teacher_checkpoint, fp16, num_images=8, regions=4)
    assert cli_in_process(capsys, *fp16_args).returncode == 0
    reference = SoftLabelBank(fp16)
    for i in range(8):
        np.testing.assert_array_equal(bank.labels(i)[0], reference.labels(i)[0])
        assert np.abs(bank.labels(i)[1] - reference.labels(i)[1]).max() <= BOUND + 5e-4
    checked = cli_in_process(capsys, 'verify', str(out))
    assert checked.returncode == 0 and 'format 2: uint8 values, packed4 indices' in checked.stdout
    refused = cli_in_process(capsys, *gen_args(fmnist_root, teacher_checkpoint, tmp_path / 'x', extra=(
        '--value-dtype', 'uint8', '--label-type', 'full')), check=False)
    assert refused.returncode == 2 and '--label-type full' in refused.stderr
