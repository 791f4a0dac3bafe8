"""Property-based tests: random damage to a bank's manifest or shard bytes is a correct read or one BankError line.

Never a traceback (any exception but ``BankError`` fails the test), never other labels than the bank's own
(what a trainer reads is compared with the undamaged bank), and the full check (sha256) always notices a
changed shard. Headers the reader accepts are ones the safetensors library accepts too.
"""
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from timm_ferkd.bank.format import MANIFEST_NAME, read_safetensors_header
from timm_ferkd.bank.reader import SoftLabelBank
from timm_ferkd.bank.validate import check_safetensors_header
from timm_ferkd.errors import BankError

from test_validation import make_bank

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope='module')
def banks(tmp_path_factory):
    root = tmp_path_factory.mktemp('property-banks')
    return {
        'seeded': make_bank(root / 'seeded'),
        'explicit': make_bank(root / 'explicit', explicit=True),
        'full': make_bank(root / 'full', label_type='full', num_images=5, per_shard=2),
    }


def read_everything(path: Path):
    """All a trainer reads from a bank, after the start-up check; or the BankError it raises."""
    try:
        bank = SoftLabelBank(path, validate=True)
        images = []
        for i in range(len(bank)):
            regions = bank.regions(i)
            indices, values = bank.labels(i)
            images.append((bank.image_size(i), bank.target(i), regions.boxes.tolist(), regions.flips.tolist(),
                           None if indices is None else indices.tolist(), values.tolist(),
                           bank.dense_targets(i).numpy().tolist()))
        return (len(bank), bank.num_classes, bank.regions_per_image, bank.manifest.label_type, images,
                bank.all_max_probs().tolist())
    except BankError as e:
        assert '\n' not in str(e), str(e)
        return e


def full_check(path: Path):
    try:
        SoftLabelBank(path).validate(full=True)
        return None
    except BankError as e:
        assert '\n' not in str(e), str(e)
        return e


@pytest.fixture(scope='module')
def reference(banks):
    return {name: read_everything(path) for name, path in banks.items()}


# ---------------------------------------------------------------------------------------------- manifests

def _paths(value, prefix=()):
    """Every location in a JSON tree: the root, each key of an object, each item of a list."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.sampled_from([0, 1, -1, 2, 3, 4, 5, 6, 255, 256])
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, 1.0, 1e-9, 2.0])
    | st.text(max_size=12) | st.sampled_from(['../shard-00001.safetensors', '/etc/passwd', 'shard-00000.safetensors',
                                             'uint16', 'int64', 'full', 'explicit', 'hard', 'a' * 64, '']),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6)


@st.composite
def manifest_mutations(draw, data):
    """A copy of a manifest with one to three random edits."""
    data = json.loads(json.dumps(data))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(['replace', 'replace_with_other', 'delete', 'insert', 'duplicate', 'swap']))
        parent = _get(data, path[:-1]) if path else None
        if op == 'replace' and path:
            parent[path[-1]] = draw(json_values)
        elif op == 'replace_with_other' and path:
            other = _get(data, draw(st.sampled_from(paths)))
            parent[path[-1]] = json.loads(json.dumps(other))
        elif op == 'delete' and path and isinstance(parent, (dict, list)):
            del parent[path[-1]]
        elif op == 'insert':
            target = _get(data, path)
            if isinstance(target, dict):
                target[draw(st.text(max_size=8))] = draw(json_values)
            elif isinstance(target, list):
                target.insert(draw(st.integers(0, len(target))), draw(json_values))
        elif op in ('duplicate', 'swap'):
            target = _get(data, path)
            if isinstance(target, list) and target:
                i, j = draw(st.integers(0, len(target) - 1)), draw(st.integers(0, len(target) - 1))
                if op == 'duplicate':
                    target.insert(j, json.loads(json.dumps(target[i])))
                else:
                    target[i], target[j] = target[j], target[i]
        elif not path:
            data = draw(json_values)
    return data


@SETTINGS
@given(st.data())
def test_mutated_manifest_reads_correctly_or_fails_in_one_line(banks, reference, data):
    name = data.draw(st.sampled_from(sorted(banks)))
    original = json.loads((banks[name] / MANIFEST_NAME).read_text())
    mutated = data.draw(manifest_mutations(original))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'bank'
        shutil.copytree(banks[name], path)
        raw = data.draw(st.sampled_from(['json', 'text']))
        if raw == 'json':
            (path / MANIFEST_NAME).write_text(json.dumps(mutated))
        else:  # damaged text, not only other values
            text = json.dumps(mutated)
            cut = data.draw(st.integers(0, len(text)))
            (path / MANIFEST_NAME).write_text(text[:cut] + data.draw(st.text(max_size=4)) + text[cut:])
        outcome = read_everything(path)
        if not isinstance(outcome, BankError):
            assert outcome == reference[name], 'a damaged manifest gave other labels than the bank\'s'
            final = full_check(path)
            assert final is None or isinstance(final, BankError)


# ---------------------------------------------------------------------------------------------- shard bytes

@st.composite
def byte_damage(draw, size: int, header_end: int):
    """(operation, arguments) of a random damage to a shard of ``size`` bytes (header in [0, header_end))."""
    op = draw(st.sampled_from(['flip', 'flip', 'flip_header', 'overwrite', 'truncate', 'append']))
    if op in ('flip', 'flip_header'):
        high = header_end if op == 'flip_header' else size
        positions = draw(st.lists(st.integers(0, high - 1), min_size=1, max_size=3, unique=True))
        return 'flip', [(p, draw(st.integers(1, 255))) for p in positions]
    if op == 'overwrite':
        start = draw(st.integers(0, size - 1))
        return 'overwrite', (start, draw(st.binary(min_size=1, max_size=16)))
    if op == 'truncate':
        return 'truncate', draw(st.integers(0, size - 1))
    return 'append', draw(st.binary(min_size=1, max_size=16))


def _apply(data: bytes, op, args) -> bytes:
    data = bytearray(data)
    if op == 'flip':
        for position, mask in args:
            data[position] ^= mask
    elif op == 'overwrite':
        start, chunk = args
        data[start:start + len(chunk)] = chunk[:len(data) - start]
    elif op == 'truncate':
        del data[args:]
    else:
        data += args
    return bytes(data)


def _touched(op, args):
    """Byte positions the damage changed (None: the length changed)."""
    if op == 'flip':
        return [p for p, _ in args]
    if op == 'overwrite':
        return list(range(args[0], args[0] + len(args[1])))
    return None


def safetensors_reads(path: Path) -> bool:
    from safetensors import safe_open
    try:
        with safe_open(str(path), 'np') as f:
            for key in f.keys():
                f.get_tensor(key)
        return True
    except Exception:
        return False


@SETTINGS
@given(st.data())
def test_damaged_shard_reads_correctly_or_fails_in_one_line(banks, reference, data):
    name = data.draw(st.sampled_from(sorted(banks)))
    shards = sorted(p.name for p in banks[name].glob('shard-*.safetensors'))
    shard = data.draw(st.sampled_from(shards))
    original = (banks[name] / shard).read_bytes()
    header_end = read_safetensors_header(banks[name] / shard)[1]
    op, args = data.draw(byte_damage(len(original), header_end))
    damaged = _apply(original, op, args)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'bank'
        shutil.copytree(banks[name], path)
        (path / shard).write_bytes(damaged)
        outcome = read_everything(path)
        touched = _touched(op, args)
        if not isinstance(outcome, BankError) and touched is not None and max(touched) < header_end:
            # only the header changed and it still reads: the labels must be the bank's own
            assert outcome == reference[name], 'a damaged header gave other labels than the bank\'s'
        if damaged != original:
            assert isinstance(full_check(path), BankError), 'the full check missed a changed shard'
        # a header this reader accepts is one the safetensors library reads
        if len(damaged) == len(original):
            try:
                header, start = read_safetensors_header(path / shard)
                check_safetensors_header(header, len(damaged) - start, shard)
                accepted = True
            except BankError:
                accepted = False
            if accepted:
                assert safetensors_reads(path / shard), 'accepted a header the safetensors library refuses'


_ITEMSIZE = {'F16': 2, 'F32': 4, 'U8': 1, 'I32': 4}
_junk = (st.integers(-4, 30) | st.just(True) | st.floats(0, 3) | st.text(max_size=3) | st.none()
         | st.lists(st.integers(-4, 30) | st.just(True), max_size=3) | st.sampled_from(['F16', 'U8', 'X8', 'BF16']))


@st.composite
def headers(draw):
    """(header, data size): a valid layout, often with one field or the data size changed."""
    names = draw(st.lists(st.sampled_from(['a', 'b', 'c']), unique=True, max_size=3))
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(_ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 3), max_size=2))
        size = int(np.prod(shape)) * _ITEMSIZE[dtype]
        header[name] = {'dtype': dtype, 'shape': shape, 'data_offsets': [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header['__metadata__'] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3) | _junk, max_size=2))
    if names and draw(st.booleans()):
        name = draw(st.sampled_from(names))
        header[name][draw(st.sampled_from(['dtype', 'shape', 'data_offsets']))] = draw(_junk)
    if names and draw(st.booleans()):
        header[draw(st.sampled_from(names))] = draw(_junk)
    order = draw(st.permutations(list(header)))
    return {k: header[k] for k in order}, max(0, offset + draw(st.sampled_from([0, 0, 0, 1, -1, 4])))


@SETTINGS
@given(case=headers())
def test_header_rules_agree_with_safetensors(case):
    """Headers over a data section: accepted here only if the safetensors library reads them."""
    header, size = case
    raw = json.dumps(header).encode()
    blob = len(raw).to_bytes(8, 'little') + raw + bytes(range(size))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'x.safetensors'
        path.write_bytes(blob)
        try:
            parsed, start = read_safetensors_header(path)
            check_safetensors_header(parsed, len(blob) - start, str(path))
            accepted = True
        except BankError as e:
            assert '\n' not in str(e)
            accepted = False
        if accepted:
            assert safetensors_reads(path), (header, size)
