"""Bank format: the manifest schema, shard schema, version checks and safetensors headers.

A bank is a directory holding ``manifest.json`` (the settings and one record per shard) and
``shard-00000.safetensors, ...``, each with the ``image_sizes``, ``targets``, ``topk_values`` and (but
for label type 'full') ``topk_indices`` of a contiguous range of images, plus ``boxes`` and ``flips``
for sampler 'explicit'. ``docs/bank-format.md`` describes every field and tensor.
"""
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from timm_ferkd.errors import BankError
from timm_ferkd.version import __version__

__all__ = [
    'FORMAT_NAME', 'FORMAT_VERSION', 'MANIFEST_NAME', 'EXPLICIT_SAMPLER', 'ShardRecord', 'TeacherInfo', 'DatasetIdentity',
    'BankManifest', 'shard_file_name', 'read_safetensors_header', 'SAFETENSORS_DTYPES',
]

FORMAT_NAME = 'timm-ferkd-bank'
# the newest version this release reads; a bank records the lowest version its storage needs
# (``timm_ferkd.bank.codes.label_storage``): 1 for fp16 values, 2 for 8-bit values
FORMAT_VERSION = 2
MANIFEST_NAME = 'manifest.json'
# sampler name of banks whose shards store each region's box (imported FKD labels)
EXPLICIT_SAMPLER = 'explicit'

SAFETENSORS_DTYPES = {
    'U8': np.uint8, 'I8': np.int8, 'U16': np.uint16, 'I16': np.int16, 'U32': np.uint32, 'I32': np.int32,
    'I64': np.int64, 'F16': np.float16, 'F32': np.float32, 'F64': np.float64, 'BOOL': np.bool_,
}


def shard_file_name(shard_index: int) -> str:
    """File name of shard ``shard_index`` inside a bank directory."""
    return f'shard-{shard_index:05d}.safetensors'


@dataclass
class ShardRecord:
    """One shard: its file, image range, byte size and sha256 (hex)."""
    file: str
    first_image: int
    num_images: int
    bytes: int
    sha256: str


@dataclass
class TeacherInfo:
    """The teacher that labelled the regions and how its inputs were prepared."""
    model: str
    checkpoint_sha256: Optional[str] = None
    pretrained: bool = False
    input_size: Tuple[int, int, int] = (3, 224, 224)
    interpolation: str = 'bicubic'
    mean: Tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: Tuple[float, ...] = IMAGENET_DEFAULT_STD


@dataclass
class DatasetIdentity:
    """Which dataset a bank belongs to.

    ``fingerprint`` is the sha256 of the ordered sample list of the whole split: relative paths and
    targets for folders, targets for torchvision datasets, generation parameters and targets for
    generated ones such as cluttered Fashion-MNIST (``fingerprint_kind`` says which).
    """
    name: str
    split: str
    num_images: int
    fingerprint: str
    fingerprint_kind: str


@dataclass
class BankManifest:
    """Everything a bank records about itself (``manifest.json``).

    ``num_images`` is the number of labelled images: the first ``num_images`` of the dataset, which
    is all of it unless generation was limited with ``--num-images``.
    """
    num_classes: int
    regions_per_image: int
    topk: int
    label_type: str
    temperature: float
    num_images: int
    images_per_shard: int
    seed: int
    scale: Tuple[float, float]
    ratio: Tuple[float, float]
    teacher: TeacherInfo
    dataset: DatasetIdentity
    flip_prob: float = 0.5
    fnkd_tau: Optional[float] = None
    sampler: str = 'splitmix64-random-resized-crop'
    sampler_version: int = 1
    index_dtype: Optional[str] = 'uint8'
    value_dtype: str = 'float16'
    shards: List[ShardRecord] = field(default_factory=list)
    format: str = FORMAT_NAME
    format_version: int = 1
    package_version: str = __version__
    created: str = ''

    @property
    def num_shards(self) -> int:
        """Number of shards that ``num_images`` and ``images_per_shard`` call for."""
        return -(-self.num_images // self.images_per_shard)

    def shard_range(self, shard_index: int) -> Tuple[int, int]:
        """(first_image, num_images) of a shard."""
        first = shard_index * self.images_per_shard
        return first, min(self.images_per_shard, self.num_images - first)

    def settings(self) -> Dict[str, Any]:
        """The fields that decide the bank's content (all but shards, versions and the time)."""
        data = self.to_dict()
        for key in ('shards', 'package_version', 'created'):
            data.pop(key)
        return data

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + '\n'

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = 'manifest',
                  schema: Optional[Callable[[Dict[str, Any], str], None]] = None) -> 'BankManifest':
        """Parse a manifest dictionary.

        Args:
            data: Parsed JSON.
            source: Where it came from, for error messages.
            schema: Checks types and ranges first, raising ``BankError`` (``bank.validate.validate_manifest``;
                passed in by the reader so that the format does not import its validation).

        Returns:
            The manifest.
        """
        if not isinstance(data, dict) or data.get('format') != FORMAT_NAME:
            raise BankError(f'{source} is not a timm-ferkd bank manifest (no "format": "{FORMAT_NAME}")')
        version = data.get('format_version')
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise BankError(f'{source} has no valid format_version ({version!r}); regenerate or re-download the bank')
        if version > FORMAT_VERSION:
            raise BankError(
                f'{source} has bank format version {version}, newer than this timm-ferkd '
                f'({__version__}, format {FORMAT_VERSION}): upgrade with `pip install -U timm-ferkd`')
        if schema is not None:
            schema(data, source)
        try:
            data = dict(data)
            teacher = dict(data['teacher'])
            for key in ('input_size', 'mean', 'std'):
                if key in teacher:
                    teacher[key] = tuple(teacher[key])
            data['teacher'] = TeacherInfo(**teacher)
            data['dataset'] = DatasetIdentity(**data['dataset'])
            data['shards'] = [ShardRecord(**s) for s in data.get('shards', [])]
            data['scale'] = tuple(data['scale'])
            data['ratio'] = tuple(data['ratio'])
            manifest = cls(**data)
        except (KeyError, TypeError) as e:
            raise BankError(f'{source} is malformed ({e}); regenerate the bank or re-download it') from None
        return manifest

    @classmethod
    def load(cls, path: os.PathLike, schema: Optional[Callable[[Dict[str, Any], str], None]] = None,
             source: Optional[str] = None) -> 'BankManifest':
        """Read ``manifest.json`` from a bank directory (or the file itself).

        Args:
            path: The bank directory or its manifest file.
            schema: As in :meth:`from_dict`.
            source: What to call the manifest in error messages (default: its path).
        """
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise BankError(
                f'no bank manifest at {path}: pass a bank directory made by `timm-ferkd generate` '
                f'(or an unfinished one: rerun the same generate command to complete it)')
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise BankError(f'cannot read {path}: {e.strerror}') from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise BankError(f'{source or path} is not valid JSON ({e}); the bank is corrupt, regenerate or '
                            f're-download it') from None
        return cls.from_dict(data, source=source or str(path), schema=schema)


def read_safetensors_header(path: os.PathLike) -> Tuple[Dict[str, Any], int]:
    """Read a safetensors file's JSON header without touching its data.

    Args:
        path: The ``.safetensors`` file.

    Returns:
        (header dictionary, byte offset where the data section starts).
    """
    try:
        with open(path, 'rb') as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise BankError(f'shard {path} is truncated (no safetensors header); regenerate or re-download it')
            (length,) = struct.unpack('<Q', prefix)
            if length > 100_000_000:
                raise BankError(f'shard {path} has a corrupt safetensors header; regenerate or re-download it')
            raw = f.read(length)
    except OSError as e:
        raise BankError(f'cannot read shard {path}: {e.strerror}') from None
    if len(raw) < length:
        raise BankError(f'shard {path} is truncated (header cut short); regenerate or re-download it')
    try:
        # safetensors headers are UTF-8 (json.loads of bytes would also accept UTF-16 and UTF-32)
        header = json.loads(raw.decode('utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise BankError(f'shard {path} has a corrupt safetensors header; regenerate or re-download it') from None
    return header, 8 + length
