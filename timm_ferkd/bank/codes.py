"""How a bank stores its labels: fp16 values (format 1) or 8-bit values and bit-packed indices (format 2).

``label_storage`` is the one place that decides the shard dtypes; writers call ``label_tensors`` and
readers ``decode_values`` / ``unpack_indices``. 8-bit values code the top value linearly,
``q_0 = round(255 p_0)``, and the others relative to the decoded top ``v_0 = q_0 / 255``:
``q_i = round(255 min(p_i / v_0, 1))``, decoded ``v_i = v_0 q_i / 255``, so decoded values stay
descending and within 1/510 of their probabilities. Packed indices take ``ceil(log2 C)`` bits each, one
little-endian bit stream per image. ``docs/bank-format.md`` has the details and the error bounds.
"""
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from timm_ferkd.bank.labels import index_dtype as plain_index_dtype
from timm_ferkd.errors import BankError, ConfigError

__all__ = [
    'VALUE_DTYPES', 'LabelStorage', 'label_storage', 'storage_of', 'index_bits', 'packed_row_bytes',
    'encode_values', 'decode_values', 'pack_indices', 'unpack_indices', 'label_tensors',
]

VALUE_DTYPES = ('float16', 'uint8')
_PACKED = 'packed'
_INDEX_TYPES = {'uint8': np.uint8, 'uint16': np.uint16, 'int32': np.int32}


@dataclass(frozen=True)
class LabelStorage:
    """Shard dtypes of a bank's labels.

    Attributes:
        value_dtype: 'float16' (probabilities as fp16) or 'uint8' (the codes above).
        index_dtype: 'uint8' / 'uint16' / 'int32' arrays [n, R, k], 'packedB' bit-packed rows, None for 'full'.
        format_version: The lowest bank format version that has these dtypes.
    """
    value_dtype: str
    index_dtype: Optional[str]
    format_version: int

    @property
    def bits(self) -> Optional[int]:
        """Bits per packed class index (None when indices are plain arrays or absent)."""
        if self.index_dtype is None or not self.index_dtype.startswith(_PACKED):
            return None
        return int(self.index_dtype[len(_PACKED):])


def index_bits(num_classes: int) -> int:
    """Bits a class index of ``num_classes`` classes needs (10 for 1000)."""
    return max(1, (int(num_classes) - 1).bit_length())


def label_storage(num_classes: int, label_type: str, value_dtype: str = 'float16') -> LabelStorage:
    """Shard dtypes of a new bank.

    Args:
        num_classes: Number of classes C.
        label_type: The bank's label type ('full' stores no indices).
        value_dtype: 'float16' (format 1) or 'uint8' (8-bit values and packed indices, format 2).

    Returns:
        The storage, with the format version the bank must record.
    """
    if value_dtype not in VALUE_DTYPES:
        raise ConfigError(f'unknown --value-dtype {value_dtype!r}; choose one of {", ".join(VALUE_DTYPES)}')
    if value_dtype == 'float16':
        return LabelStorage('float16', None if label_type == 'full' else plain_index_dtype(num_classes).name, 1)
    if label_type == 'full':
        raise ConfigError('--value-dtype uint8 codes sorted top-k values; use --value-dtype float16 with '
                          '--label-type full')
    return LabelStorage('uint8', f'{_PACKED}{index_bits(num_classes)}', 2)


def storage_of(manifest) -> LabelStorage:
    """The storage a manifest records, checked against its label type, class count and format version."""
    value, index = manifest.value_dtype, manifest.index_dtype
    full = manifest.label_type == 'full'
    if value == 'float16' and (index is None if full else index in _INDEX_TYPES):
        # format 1 readers accepted any plain index dtype: keep reading whatever they read
        return LabelStorage('float16', index, 1)
    try:
        expected = label_storage(manifest.num_classes, manifest.label_type, value)
    except ConfigError:
        expected = None
    if expected is None or index != expected.index_dtype or manifest.format_version < expected.format_version:
        raise BankError(
            f'manifest records value_dtype {value!r}, index_dtype {index!r} and format version '
            f'{manifest.format_version}, which do not fit {manifest.num_classes} classes of label type '
            f'{manifest.label_type!r}; the manifest is corrupt, regenerate or re-download the bank')
    return expected


def packed_row_bytes(regions: int, k: int, bits: int) -> int:
    """Bytes of one image's packed index row."""
    return -(-regions * k * bits // 8)


def encode_values(values: np.ndarray) -> np.ndarray:
    """uint8 codes of probabilities sorted descending along the last axis (see the module docstring)."""
    p = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    codes = np.empty(p.shape, dtype=np.uint8)
    top = np.rint(p[..., :1] * np.float32(255))
    codes[..., :1] = top
    decoded_top = top / np.float32(255)
    ratio = np.divide(p[..., 1:], decoded_top, out=np.zeros_like(p[..., 1:]), where=decoded_top > 0)
    codes[..., 1:] = np.rint(np.minimum(ratio, 1.0) * np.float32(255))
    return codes


def decode_values(codes: np.ndarray) -> np.ndarray:
    """float32 probabilities of uint8 codes (``encode_values``'s inverse, within 1/510)."""
    q = np.asarray(codes).astype(np.float32)
    q *= np.float32(1 / 255)
    q[..., 1:] *= q[..., :1]
    return q


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [n, packed_row_bytes] rows of class indices [n, R, k] (each below 2**bits)."""
    n = indices.shape[0]
    flat = np.asarray(indices).reshape(n, -1).astype(np.uint64)
    if flat.size and flat.max() >> np.uint64(bits):
        raise ValueError(f'class index {int(flat.max())} does not fit in {bits} bits')
    bit_planes = ((flat[..., None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bit_planes.reshape(n, -1), axis=1, bitorder='little')


def unpack_indices(rows: np.ndarray, positions: np.ndarray, bits: int) -> np.ndarray:
    """int64 class indices at code ``positions`` (region * k + j) of packed rows.

    Args:
        rows: uint8 [B] one image's row, or [m, B] rows (then ``positions`` is [m, ...]).
        positions: Code positions within each row.
        bits: Bits per index.

    Returns:
        int64 array of ``positions``' shape.
    """
    rows = np.asarray(rows)
    offsets = np.asarray(positions, dtype=np.int64) * bits
    width = 4 if bits <= 25 else 8  # bytes covering any code: its bits plus up to 7 bits of offset
    # bytes past a row's end would only land above a code's mask, so clipping them to the last byte is safe
    byte = np.minimum((offsets >> 3)[..., None] + np.arange(width), rows.shape[-1] - 1)
    if rows.ndim == 1:
        window = rows[byte]
    else:
        window = np.take_along_axis(rows, byte.reshape(rows.shape[0], -1), axis=1).reshape(byte.shape)
    word = np.ascontiguousarray(window).view('<u4' if width == 4 else '<u8')[..., 0]
    return ((word >> (offsets & 7).astype(word.dtype)) & ((1 << bits) - 1)).astype(np.int64)


def label_tensors(indices: Optional[np.ndarray], values: np.ndarray, storage: LabelStorage) -> Dict[str, np.ndarray]:
    """The ``topk_values`` (and ``topk_indices``) tensors of a shard.

    Args:
        indices: int [n, R, k] classes (None for 'full').
        values: float [n, R, k] probabilities, sorted descending along k (any order for 'full').
        storage: The bank's storage (``label_storage``).

    Returns:
        Shard tensors in the storage's dtypes.
    """
    if storage.value_dtype == 'uint8':
        tensors = {'topk_values': encode_values(values)}
    else:
        tensors = {'topk_values': np.asarray(values).astype(np.float16)}
    if indices is not None:
        if storage.bits is not None:
            tensors['topk_indices'] = pack_indices(indices, storage.bits)
        else:
            tensors['topk_indices'] = np.asarray(indices).astype(_INDEX_TYPES[storage.index_dtype])
    return tensors
