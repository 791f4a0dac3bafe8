"""One validation of a bank: manifest schema, safetensors headers, shard metadata and label values.

Every reader runs the same checks, at the depth it can afford (``docs/cli.md`` lists who runs which):
*open* (always) checks the manifest schema, each shard's size, header, tensors and recorded settings when
it is first mapped, and each image's values when it is first read in a process; *quick*
(``SoftLabelBank(validate=True)``) adds the values of a sample of each shard's images (:func:`sample_rows`);
*full* (``verify``, ``push``, ``train_ferkd.py --verify-bank``) every shard's sha256 and every image's values.

A new value encoding is one entry of :data:`VALUE_DTYPES`; a new manifest field needs an entry in
``_MANIFEST_FIELDS`` (a test checks that every field has one).
"""
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from timm_ferkd.bank.format import (
    SAFETENSORS_DTYPES, BankManifest, DatasetIdentity, ShardRecord, TeacherInfo, shard_file_name)
from timm_ferkd.bank.codes import decode_values, storage_of, unpack_indices
from timm_ferkd.bank.labels import LABEL_TYPES
from timm_ferkd.errors import BankError

__all__ = [
    'ValueDtype', 'VALUE_DTYPES', 'INDEX_DTYPES', 'MASS_TOLERANCE', 'validate_manifest', 'check_safetensors_header',
    'check_shard_metadata', 'check_shard_values', 'sample_rows', 'shard_metadata',
]

# fp16 rounds each value by at most 2^-11 of itself, so a stored distribution's sum moves by < 5e-4;
# FKD's fp16 files add as much again
MASS_TOLERANCE = 2e-3
_BOX_TOLERANCE = 2e-3
_HEX64 = re.compile(r'[0-9a-f]{64}')
_ROWS_PER_CHUNK = 64  # images per value check: [64, R, k] arrays stay in cache


@dataclass(frozen=True)
class ValueDtype:
    """How one ``value_dtype`` is stored: its safetensors dtype, its decoding to float32 probabilities and
    the most a decoded value may differ from its probability (which widens the mass check by k times it)."""
    safetensors: str
    decode: Callable[[np.ndarray], np.ndarray]
    rounding: float = 0.0


VALUE_DTYPES: Dict[str, ValueDtype] = {
    'float16': ValueDtype('F16', lambda stored: np.asarray(stored, dtype=np.float32)),
    'uint8': ValueDtype('U8', decode_values, rounding=1 / 510),
}

# index dtype -> (safetensors dtype, classes it can index)
INDEX_DTYPES: Dict[str, Tuple[str, int]] = {
    'uint8': ('U8', 1 << 8), 'uint16': ('U16', 1 << 16), 'int32': ('I32', 1 << 31)}
# bit-packed indices of format 2 (timm_ferkd.bank.codes): 'packedB', B bits each, rows of bytes
INDEX_DTYPES.update({f'packed{bits}': ('U8', 1 << bits) for bits in range(1, 32)})


def _corrupt(source: str, what: str) -> BankError:
    return BankError(f'{source}: {what}; the bank is corrupt or was edited: regenerate or re-download it')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(lo: int = None, hi: int = None) -> Callable[[Any], Optional[str]]:
    def check(value):
        if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            if lo is not None and hi is not None:
                return f'must be an integer in [{lo}, {hi}]'
            return f'must be an integer >= {lo}' if lo is not None else 'must be an integer'
        return None
    return check


def _number(lo: float = None, hi: float = None, lo_open: bool = False) -> Callable[[Any], Optional[str]]:
    def check(value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and (lo is None or (value > lo if lo_open else value >= lo))
        if not ok or (hi is not None and value > hi):
            bounds = ' and '.join(filter(None, [
                f'{">" if lo_open else ">="} {lo}' if lo is not None else '', f'<= {hi}' if hi is not None else '']))
            return f'must be a finite number {bounds}'.rstrip()
        return None
    return check


def _string(choices: Sequence[str] = None, pattern: re.Pattern = None) -> Callable[[Any], Optional[str]]:
    def check(value):
        if not isinstance(value, str):
            return 'must be a string'
        if choices is not None and value not in choices:
            return f'must be one of {", ".join(map(repr, choices))}'
        if pattern is not None and not pattern.fullmatch(value):
            return f'must match {pattern.pattern}'
        return None
    return check


def _boolean(value: Any) -> Optional[str]:
    return None if isinstance(value, bool) else 'must be true or false'


def _optional(check: Callable[[Any], Optional[str]]) -> Callable[[Any], Optional[str]]:
    def optional(value):
        problem = None if value is None else check(value)
        return None if problem is None else f'{problem} (or null)'
    return optional


def _list(item: Callable[[Any], Optional[str]], length: int = None, min_length: int = 1):
    def check(value):
        if not isinstance(value, list) or (length is not None and len(value) != length) or len(value) < min_length:
            return f'must be a list of {length if length is not None else f"at least {min_length}"} values'
        for v in value:
            problem = item(v)
            if problem is not None:
                return f'values {problem.replace("must be", "must each be", 1)}'
        return None
    return check


def _range(upper: Optional[float]):
    """A (LO, HI) pair with 0 < LO <= HI (<= upper)."""
    pair = _list(_number(lo=0, lo_open=True, hi=upper), length=2)

    def check(value):
        if pair(value) is not None or value[0] > value[1]:
            return f'must be [LO, HI] with 0 < LO <= HI{f" <= {upper:g}" if upper is not None else ""}'
        return None
    return check


_TEACHER_FIELDS = {
    'model': _string(),
    'checkpoint_sha256': _optional(_string(pattern=_HEX64)),
    'pretrained': _boolean,
    'input_size': _list(_int(lo=1), length=3),
    'interpolation': _string(),
    'mean': _list(_number()),
    'std': _list(_number(lo=0, lo_open=True)),
}
_DATASET_FIELDS = {
    'name': _string(),
    'split': _string(),
    'num_images': _int(lo=1),
    'fingerprint': _string(),
    'fingerprint_kind': _string(),
}
_SHARD_FIELDS = {
    'file': _string(),
    'first_image': _int(lo=0),
    'num_images': _int(lo=1),
    'bytes': _int(lo=8),
    'sha256': _string(pattern=_HEX64),
}
_MANIFEST_FIELDS = {
    'num_classes': _int(lo=1, hi=(1 << 31) - 1),
    'regions_per_image': _int(lo=1, hi=1 << 16),
    'topk': _int(lo=1),
    'label_type': _string(LABEL_TYPES),
    'temperature': _number(lo=0, lo_open=True),
    'num_images': _int(lo=1, hi=(1 << 40) - 1),
    'images_per_shard': _int(lo=1),
    'seed': _int(lo=0, hi=(1 << 64) - 1),
    'scale': _range(1.0),
    'ratio': _range(None),
    'teacher': None,  # nested: _TEACHER_FIELDS
    'dataset': None,  # nested: _DATASET_FIELDS
    'flip_prob': _number(lo=0, hi=1),
    'fnkd_tau': _optional(_number(lo=0, lo_open=True)),
    'sampler': _string(),
    'sampler_version': _int(lo=1),
    'index_dtype': _optional(_string(tuple(INDEX_DTYPES))),
    'value_dtype': _string(tuple(VALUE_DTYPES)),
    'shards': None,  # list of _SHARD_FIELDS
    'format': _string(),
    'format_version': _int(lo=1),
    'package_version': _string(),
    'created': _string(),
}


def _check_object(data: Any, fields: Dict[str, Any], cls, where: str, source: str) -> None:
    """Types and ranges of one JSON object against a dataclass: no unknown keys, no missing required ones."""
    if not isinstance(data, dict):
        raise _corrupt(source, f'{where or "the manifest"} must be a JSON object, found {type(data).__name__}')
    prefix = f'{where}.' if where else ''
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise _corrupt(source, f'unknown field {prefix}{key}')
    for name, f in known.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _corrupt(source, f'field {prefix}{name} is missing')
            continue
        check = fields[name]
        if check is None:
            continue
        problem = check(data[name])
        if problem is not None:
            raise _corrupt(source, f'{prefix}{name} {problem}, found {json.dumps(data[name])[:80]}')


def validate_manifest(data: Any, source: str = 'manifest') -> None:
    """Check a parsed ``manifest.json``: every field's type and range, and the shard layout.

    Shard records must be the writer's files and image ranges, in order; fewer than ``num_images`` calls
    for pass (the reader reports the bank as incomplete).

    Args:
        data: The parsed JSON.
        source: Where it came from, for error messages.

    Raises:
        BankError: The first problem found, in one line.
    """
    _check_object(data, _MANIFEST_FIELDS, BankManifest, '', source)
    _check_object(data['teacher'], _TEACHER_FIELDS, TeacherInfo, 'teacher', source)
    _check_object(data['dataset'], _DATASET_FIELDS, DatasetIdentity, 'dataset', source)
    label_type, classes, k = data['label_type'], data['num_classes'], data['topk']
    expected_k = {'hard': 1, 'smoothing': 1, 'full': classes}.get(label_type)
    if (expected_k is not None and k != expected_k) or k > classes:
        need = f'{expected_k}' if expected_k is not None else f'between 1 and num_classes={classes}'
        raise _corrupt(source, f'topk {k} does not fit label_type {label_type!r} (needs {need})')
    index_dtype = data.get('index_dtype', 'uint8')
    if label_type == 'full' and index_dtype is not None:
        raise _corrupt(source, f'index_dtype {index_dtype!r} given for label_type full (stores no indices)')
    if label_type != 'full' and (index_dtype is None or INDEX_DTYPES[index_dtype][1] < classes):
        raise _corrupt(source, f'index_dtype {index_dtype!r} cannot hold the class indices of {classes} classes')
    if data['dataset']['num_images'] < data['num_images']:
        raise _corrupt(source, f'num_images {data["num_images"]} exceeds the dataset\'s '
                               f'{data["dataset"]["num_images"]} images')
    shards = data.get('shards', [])
    if not isinstance(shards, list):
        raise _corrupt(source, 'shards must be a list')
    per_shard, total = data['images_per_shard'], data['num_images']
    num_shards = -(-total // per_shard)
    if len(shards) > num_shards:
        raise _corrupt(source, f'lists {len(shards)} shards, but {total} images in shards of {per_shard} make '
                               f'{num_shards}')
    for s, record in enumerate(shards):
        _check_object(record, _SHARD_FIELDS, ShardRecord, f'shards[{s}]', source)
        first = s * per_shard
        expected = (shard_file_name(s), first, min(per_shard, total - first))
        found = (record['file'], record['first_image'], record['num_images'])
        if found != expected:
            raise _corrupt(source, f'shards[{s}] is {found[0]!r} with images [{found[1]}, {found[1] + found[2]}); '
                                   f'shard {s} must be {expected[0]!r} with images [{first}, {first + expected[2]})')


def check_safetensors_header(header: Any, data_size: int, source: str) -> None:
    """Check a safetensors header like the safetensors library does before it reads a tensor: known
    dtypes, and tensors that cover the data section exactly (no overlap, hole or trailing byte).

    Args:
        header: The parsed header (``read_safetensors_header``).
        data_size: Bytes after the header.
        source: The file, for error messages.

    Raises:
        BankError: The header is not one the safetensors library would read.
    """
    def bad(what):
        return BankError(f'shard {source} has a corrupt safetensors header ({what}); regenerate or re-download it')

    if not isinstance(header, dict):
        raise bad('not a JSON object')
    spans = []
    for name, info in header.items():
        if name == '__metadata__':
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise bad('__metadata__ is not a map of strings')
            continue
        if not isinstance(info, dict):
            raise bad(f'entry {name!r} is not an object')
        dtype, shape, offsets = info.get('dtype'), info.get('shape'), info.get('data_offsets')
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise bad(f'tensor {name!r} has unknown dtype {dtype!r}')
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f'tensor {name!r} has shape {shape!r}')
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise bad(f'tensor {name!r} has data_offsets {offsets!r}')
        if offsets[1] - offsets[0] != math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize:
            raise bad(f'tensor {name!r}: data_offsets {offsets} do not hold shape {shape} {dtype}')
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise bad(f'tensor {name!r} starts at byte {begin}, not {end} (overlap or hole)')
        end = stop
    if end != data_size:
        raise bad(f'the tensors cover {end} of the {data_size} data bytes')


def shard_metadata(manifest: BankManifest, shard_index: int) -> Dict[str, Any]:
    """What the writer stores in a shard's header: the bank settings and the shard's image range.

    Readers compare it with the manifest (:func:`check_shard_metadata`), so a shard copied from another
    bank, or a manifest edited after generation (another seed replays other regions), is refused.
    """
    first, count = manifest.shard_range(shard_index)
    return {'settings': manifest.settings(), 'first_image': first, 'num_images': count}


def check_shard_metadata(header: Dict[str, Any], settings: Dict[str, Any], record: ShardRecord, source: str) -> None:
    """Compare the settings and image range a shard records with those of its manifest.

    Shards without a record (written before it existed) pass. Only the settings both sides know are
    compared, so a bank keeps opening when a later version adds a setting.

    Args:
        header: The shard's parsed safetensors header.
        settings: ``manifest.settings()``, JSON-normalised.
        record: The manifest's record of the shard.
        source: The file, for error messages.
    """
    raw = (header.get('__metadata__') or {}).get('timm_ferkd')
    if raw is None:
        return
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise BankError(f'shard {source} has corrupt timm_ferkd metadata; regenerate or re-download it')
    for key, expected in (('first_image', record.first_image), ('num_images', record.num_images)):
        if key in meta and str(meta[key]) != str(expected):
            raise BankError(f'shard {source} holds {key} {meta[key]} but the manifest says {expected}: the shard '
                            f'belongs to another bank or the manifest was edited; regenerate or re-download the bank')
    recorded = meta.get('settings')
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise BankError(f'shard {source} has corrupt timm_ferkd metadata; regenerate or re-download it')
    differ = sorted(k for k in recorded.keys() & settings.keys() if recorded[k] != settings[k])
    if differ:
        raise BankError(f'shard {source} was written with other settings than its manifest ({", ".join(differ)} '
                        f'differ): the shard belongs to another bank or the manifest was edited; regenerate or '
                        f're-download the bank')


def _mass_tolerance(manifest: BankManifest, k: int) -> float:
    return MASS_TOLERANCE + k * VALUE_DTYPES[manifest.value_dtype].rounding


def _label_problem(
        indices: Optional[np.ndarray], values: np.ndarray, manifest: BankManifest) -> Optional[Tuple[int, str]]:
    """(flat row, problem) of the first bad region among rows [..., k], or None."""
    k = values.shape[-1]
    tolerance = _mass_tolerance(manifest, k)
    values = values.reshape(-1, k)
    bad = ~np.isfinite(values).all(axis=1)
    what = 'a non-finite probability'
    if not bad.any():
        bad = ((values < 0) | (values > 1)).any(axis=1)
        what = 'a probability outside [0, 1]'
    if not bad.any():
        mass = values.sum(axis=1, dtype=np.float64)
        if manifest.label_type == 'full':
            bad = np.abs(mass - 1) > tolerance
            what = f'probabilities that do not sum to 1 (+-{tolerance:.3g})'
        else:
            bad = mass > 1 + tolerance
            what = f'probabilities summing to more than 1 (+{tolerance:.3g})'
    if not bad.any() and manifest.label_type != 'full' and k > 1:
        bad = (np.diff(values, axis=1) > 0).any(axis=1)
        what = 'top-k probabilities not in descending order'
    if not bad.any() and indices is not None:
        flat = indices.reshape(-1, k).astype(np.int64)
        bad = ((flat < 0) | (flat >= manifest.num_classes)).any(axis=1)
        what = f'a class index outside [0, {manifest.num_classes})'
        if not bad.any() and k > 1:
            ordered = np.sort(flat, axis=1)
            bad = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
            what = 'a class index listed twice'
    if bad.any():
        return int(np.flatnonzero(bad)[0]), what
    return None


def _labels_ok(indices: Optional[np.ndarray], values: np.ndarray, manifest: BankManifest) -> bool:
    """All value rules at once, in as few passes as possible (``_label_problem`` says which one failed).

    Many rows are checked column by column (a reduction over a short last axis is several times slower);
    the few rows of one read in as few numpy calls as possible.
    """
    k = values.shape[-1]
    values = values.reshape(-1, k)
    if values.size == 0:
        return True
    if not (values.min() >= 0 and values.max() <= 1):  # NaN fails both comparisons
        return False
    by_column = values.shape[0] > 64 and k <= 32
    if by_column:
        mass = values[:, 0].astype(np.float64)
        for j in range(1, k):
            mass += values[:, j]
    else:
        mass = values.sum(axis=1, dtype=np.float64)
    tolerance = _mass_tolerance(manifest, k)
    if manifest.label_type == 'full':
        return bool(mass.min() >= 1 - tolerance and mass.max() <= 1 + tolerance)
    if mass.max() > 1 + tolerance:
        return False
    if by_column:
        if not all((values[:, j] >= values[:, j + 1]).all() for j in range(k - 1)):
            return False
    elif k > 1 and not (values[:, :-1] >= values[:, 1:]).all():
        return False
    if indices is None:
        return True
    indices = indices.reshape(-1, k)
    if indices.max() >= manifest.num_classes or (indices.dtype.kind == 'i' and indices.min() < 0):
        return False
    if by_column and k <= 16:
        return all((indices[:, a] != indices[:, b]).all() for a in range(k) for b in range(a + 1, k))
    if k > 1:
        ordered = np.sort(indices, axis=1)
        return bool((ordered[:, 1:] != ordered[:, :-1]).all())
    return True


def check_shard_values(
        arrays: Dict[str, np.ndarray],
        manifest: BankManifest,
        first_image: int,
        source: str,
        rows: Optional[Iterable[int]] = None,
) -> None:
    """Check the values of some (default: all) images of one shard.

    Args:
        arrays: The shard's arrays (names, shapes and dtypes already checked).
        manifest: The bank's manifest.
        first_image: The shard's first image, for messages.
        source: The shard file, for messages.
        rows: Images of the shard (0-based within it) to check.

    Raises:
        BankError: Naming the first bad image (and region).
    """
    n = arrays['targets'].shape[0]
    where = f'shard {source}'
    chunks: List[Any] = [slice(s, min(s + _ROWS_PER_CHUNK, n)) for s in range(0, n, _ROWS_PER_CHUNK)] \
        if rows is None else [np.asarray(sorted(set(rows)), dtype=np.int64)]
    regions = manifest.regions_per_image
    bits = storage_of(manifest).bits
    for chunk in chunks:
        offset = chunk.start if isinstance(chunk, slice) else None

        def image_of(i: int) -> int:
            return first_image + (offset + i if offset is not None else int(chunk[i]))

        sizes = np.asarray(arrays['image_sizes'][chunk])
        bad = np.flatnonzero((sizes < 1).any(axis=1))
        if bad.size:
            raise _corrupt(where, f'image {image_of(int(bad[0]))} has size {sizes[bad[0]].tolist()}')
        targets = np.asarray(arrays['targets'][chunk])
        bad = np.flatnonzero((targets < 0) | (targets >= manifest.num_classes))
        if bad.size:
            raise _corrupt(where, f'image {image_of(int(bad[0]))} has target {int(targets[bad[0]])}, '
                                   f'outside [0, {manifest.num_classes})')
        indices = arrays.get('topk_indices')
        if indices is not None:
            indices = indices[chunk]
            if bits is not None:  # packed rows -> [n, R, k] class indices
                positions = np.broadcast_to(np.arange(regions * manifest.topk), (indices.shape[0], regions * manifest.topk))
                indices = unpack_indices(indices, positions, bits).reshape(-1, regions, manifest.topk)
        values = VALUE_DTYPES[manifest.value_dtype].decode(arrays['topk_values'][chunk])
        problem = None if _labels_ok(indices, values, manifest) else _label_problem(indices, values, manifest)
        if problem is None and 'boxes' in arrays:
            problem = _box_problem(np.asarray(arrays['boxes'][chunk]), np.asarray(arrays['flips'][chunk]))
        if problem is not None:
            row, what = problem
            raise _corrupt(where, f'image {image_of(row // regions)} region {row % regions} has {what}')


def _box_problem(boxes: np.ndarray, flips: np.ndarray) -> Optional[Tuple[int, str]]:
    boxes = boxes.reshape(-1, 4).astype(np.float64)
    t, l, h, w = boxes.T
    with np.errstate(invalid='ignore'):
        inside = (np.isfinite(boxes).all(axis=1) & (t >= -_BOX_TOLERANCE) & (l >= -_BOX_TOLERANCE) & (h > 0) & (w > 0)
                  & (t + h <= 1 + _BOX_TOLERANCE) & (l + w <= 1 + _BOX_TOLERANCE))
    if not inside.all():
        return int(np.flatnonzero(~inside)[0]), 'a box outside the image'
    flat = flips.reshape(-1)
    if (flat > 1).any():
        return int(np.flatnonzero(flat > 1)[0]), f'flip {int(flat[flat > 1][0])} (must be 0 or 1)'
    return None


def sample_rows(num_images: int, count: int = 8) -> List[int]:
    """Images of a shard the quick check reads: the first, the last and evenly spaced ones between."""
    if num_images <= count:
        return list(range(num_images))
    return sorted({round(i * (num_images - 1) / (count - 1)) for i in range(count)})
