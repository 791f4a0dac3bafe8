"""Memory-mapped bank reader: one image's regions in O(1), safe in DataLoader workers."""
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from timm_ferkd.bank.format import (
    EXPLICIT_SAMPLER, MANIFEST_NAME, SAFETENSORS_DTYPES, BankManifest, ShardRecord, read_safetensors_header)
from timm_ferkd.bank.codes import decode_values, packed_row_bytes, storage_of, unpack_indices
from timm_ferkd.bank.labels import dense_targets, index_dtype
from timm_ferkd.bank.regions import SAMPLER_NAME, SAMPLER_VERSION, RegionSampler, Regions, explicit_regions
from timm_ferkd.bank.validate import (
    INDEX_DTYPES, VALUE_DTYPES, check_safetensors_header, check_shard_metadata, check_shard_values, sample_rows,
    validate_manifest)
from timm_ferkd.bank.writer import sha256_file
from timm_ferkd.errors import BankError

__all__ = ['SoftLabelBank', 'RegionBatch']


def _expected_shapes(manifest: BankManifest, num_images: int) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    k, r = manifest.topk, manifest.regions_per_image
    storage = storage_of(manifest)
    shapes = {
        'image_sizes': ((num_images, 2), 'I32'),
        'targets': ((num_images,), 'I32'),
        'topk_values': ((num_images, r, k), VALUE_DTYPES[storage.value_dtype].safetensors),
    }
    if storage.bits is not None:
        shapes['topk_indices'] = ((num_images, packed_row_bytes(r, k, storage.bits)), 'U8')
    elif manifest.label_type != 'full':
        shapes['topk_indices'] = ((num_images, r, k), INDEX_DTYPES[manifest.index_dtype][0])
    if manifest.sampler == EXPLICIT_SAMPLER:
        shapes['boxes'] = ((num_images, r, 4), 'F32')
        shapes['flips'] = ((num_images, r), 'U8')
    return shapes


class _Shard:
    """Lazily memory-mapped arrays of one shard file."""

    def __init__(self, path: Path, manifest: BankManifest, record: ShardRecord, settings: Dict):
        self.path = path
        num_images, expected_bytes = record.num_images, record.bytes
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BankError(f'shard {path} is missing; re-download the bank or rerun the generate command') from None
        if size != expected_bytes:
            raise BankError(
                f'shard {path} has {size} bytes, the manifest says {expected_bytes}: it is truncated or '
                f'corrupt; re-download the bank or regenerate it')
        header, data_start = read_safetensors_header(path)
        check_safetensors_header(header, size - data_start, path)
        check_shard_metadata(header, settings, record, path)
        with open(path, 'rb') as f:
            # plain ndarrays over one read-only mapping: indexing them is cheaper than np.memmap's
            self._mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.arrays: Dict[str, np.ndarray] = {}
        for name, (shape, dtype) in _expected_shapes(manifest, num_images).items():
            info = header.get(name)
            if info is None or tuple(info['shape']) != shape or info['dtype'] != dtype:
                found = None if info is None else (tuple(info['shape']), info['dtype'])
                raise BankError(
                    f'shard {path}: tensor {name!r} should be {shape} {dtype}, found {found}; '
                    f'the shard does not belong to this manifest, regenerate or re-download the bank')
            begin = info['data_offsets'][0]  # offsets and sizes checked with the header
            np_dtype = np.dtype(SAFETENSORS_DTYPES[dtype])
            self.arrays[name] = np.frombuffer(
                self._mapping, dtype=np_dtype, count=int(np.prod(shape)), offset=data_start + begin).reshape(shape)


@dataclass(frozen=True)
class RegionBatch:
    """What ``SoftLabelBank.read_batch`` reads for m images and c regions each.

    Attributes:
        boxes: int64 [m, c, 4] pixel (top, left, height, width).
        flips: bool [m, c].
        image_sizes: int64 [m, 2] (height, width) recorded at generation.
        targets: int64 [m] ground-truth classes recorded at generation.
        soft: float32 [m, c, C] dense soft labels.
    """
    boxes: np.ndarray
    flips: np.ndarray
    image_sizes: np.ndarray
    targets: np.ndarray
    soft: torch.Tensor


class SoftLabelBank:
    """Read access to a soft-label bank directory.

    Shards are memory-mapped on first use in each process, so the object pickles cheaply into
    DataLoader workers (fork or spawn) and every worker maps the files itself.

    Args:
        path: Bank directory (containing ``manifest.json``).
        validate: Check every shard now (size, header, the values of a sample of its images) instead of
            on first use; :meth:`validate` with ``full=True`` checks everything (see ``timm_ferkd.bank.validate``).

    Example:
        >>> bank = SoftLabelBank('labels/fmnist-resnet')
        >>> regions = bank.regions(0, [3, 7])           # boxes and flips of two regions of image 0
        >>> targets = bank.dense_targets(0, [3, 7])     # their [2, C] soft labels
    """

    def __init__(self, path: Union[str, os.PathLike], validate: bool = False):
        self.path = Path(path)
        self.manifest = BankManifest.load(self.path, schema=validate_manifest)
        m = self.manifest
        if m.sampler not in (SAMPLER_NAME, EXPLICIT_SAMPLER) or m.sampler_version > SAMPLER_VERSION:
            raise BankError(
                f'bank {self.path} uses region sampler {m.sampler} v{m.sampler_version}, unknown to this '
                f'timm-ferkd: upgrade with `pip install -U timm-ferkd`')
        if len(m.shards) != m.num_shards:
            raise BankError(
                f'bank {self.path} lists {len(m.shards)} of its {m.num_shards} shards: it is incomplete; '
                f'rerun the generate command that made it to finish it')
        self.sampler = RegionSampler(seed=m.seed, scale=m.scale, ratio=m.ratio, flip_prob=m.flip_prob)
        self.storage = storage_of(m)
        self._codes = self.storage.value_dtype == 'uint8'
        self._settings = json.loads(json.dumps(m.settings()))
        self._checked = np.zeros(m.num_images, dtype=bool)  # images whose values passed the check
        self._shards: Dict[int, _Shard] = {}
        self._pid = os.getpid()
        if validate:
            self.validate(full=False)

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_shards'] = {}
        return state

    def __repr__(self) -> str:
        m = self.manifest
        return (f'SoftLabelBank({str(self.path)!r}, images={m.num_images}, regions={m.regions_per_image}, '
                f'k={m.topk}, label_type={m.label_type!r}, classes={m.num_classes})')

    def __len__(self) -> int:
        return self.manifest.num_images

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def regions_per_image(self) -> int:
        return self.manifest.regions_per_image

    def _shard(self, shard_index: int) -> _Shard:
        if self._pid != os.getpid():
            # a forked worker must not share the parent's file mappings bookkeeping
            self._shards, self._pid = {}, os.getpid()
        shard = self._shards.get(shard_index)
        if shard is None:
            record = self.manifest.shards[shard_index]
            shard = _Shard(self.path / record.file, self.manifest, record, self._settings)
            self._shards[shard_index] = shard
        return shard

    def _locate(self, image_index: int) -> Tuple[_Shard, int]:
        if not 0 <= image_index < self.manifest.num_images:
            raise IndexError(f'image {image_index} outside the bank (0..{self.manifest.num_images - 1})')
        shard_index, offset = divmod(image_index, self.manifest.images_per_shard)
        shard = self._shard(shard_index)
        if not self._checked[image_index]:
            # every read is of an image whose stored rows passed the value check, once per process
            check_shard_values(shard.arrays, self.manifest, image_index - offset, str(shard.path), rows=[offset])
            self._checked[image_index] = True
        return shard, offset

    def image_size(self, image_index: int) -> Tuple[int, int]:
        """Decoded (height, width) of an image when the bank was generated."""
        shard, i = self._locate(image_index)
        h, w = shard.arrays['image_sizes'][i]
        return int(h), int(w)

    def target(self, image_index: int) -> int:
        """Ground-truth class of an image as recorded at generation."""
        shard, i = self._locate(image_index)
        return int(shard.arrays['targets'][i])

    def max_probs(self, image_index: int) -> np.ndarray:
        """float32 [R]: each region's max teacher probability (FerKD's confidence m)."""
        shard, i = self._locate(image_index)
        return self._max_probs(shard.arrays['topk_values'][i])

    def _max_probs(self, values: np.ndarray) -> np.ndarray:
        # stored values are sorted descending except for 'full', which keeps class order
        if self.manifest.label_type == 'full':
            return values.max(axis=-1).astype(np.float32)
        return decode_values(values[..., :1])[..., 0] if self._codes else values[..., 0].astype(np.float32)

    def labels(
            self,
            image_index: int,
            region_ids: Optional[Sequence[int]] = None,
    ) -> Tuple[Optional[np.ndarray], np.ndarray]:
        """(indices [n, k] or None for 'full', values [n, k]) of some regions of an image.

        Format-1 banks return the stored arrays (float16 values, uint8/uint16/int32 indices);
        8-bit banks their decoded float32 values and unpacked indices in ``index_dtype(C)``.
        """
        shard, i = self._locate(image_index)
        ids = slice(None) if region_ids is None else np.asarray(region_ids, dtype=np.int64)
        values = np.array(shard.arrays['topk_values'][i, ids])
        indices = shard.arrays.get('topk_indices')
        if not self._codes:
            return (None if indices is None else np.array(indices[i, ids])), values
        k = self.manifest.topk
        rows = np.arange(self.manifest.regions_per_image)[ids]
        positions = rows.reshape(-1, 1) * k + np.arange(k)
        classes = unpack_indices(indices[i], positions, self.storage.bits).astype(index_dtype(self.num_classes))
        return classes, decode_values(values)

    def regions(self, image_index: int, region_ids: Optional[Sequence[int]] = None) -> Regions:
        """Pixel boxes and flips of some regions of an image.

        Boxes are re-derived from the bank seed, or, for imported banks (sampler 'explicit'), read
        from the stored normalised boxes and rounded like PIL's crop of the FKD reference code.
        """
        if region_ids is None:
            region_ids = range(self.manifest.regions_per_image)
        size = self.image_size(image_index)
        if self.manifest.sampler != EXPLICIT_SAMPLER:
            return self.sampler.sample(image_index, size, region_ids)
        shard, i = self._locate(image_index)
        ids = np.asarray(region_ids, dtype=np.int64)
        return explicit_regions(shard.arrays['boxes'][i, ids], shard.arrays['flips'][i, ids], size)

    def dense_targets(self, image_index: int, region_ids: Optional[Sequence[int]] = None) -> torch.Tensor:
        """float32 [n, C] soft labels of some regions of an image (see ``timm_ferkd.bank.labels``)."""
        indices, values = self.labels(image_index, region_ids)
        return dense_targets(indices, values, self.manifest.num_classes, self.manifest.label_type)

    def read_batch(self, image_indices: Sequence[int], region_ids: np.ndarray) -> 'RegionBatch':
        """Everything a loader needs of the regions ``region_ids`` [m, c] of images ``image_indices`` [m].

        The same as ``regions`` and ``dense_targets`` image by image, in one vectorised pass: for a few
        regions per image numpy's per-call cost, not the arithmetic, is most of a one-image read.

        Args:
            image_indices: [m] images.
            region_ids: [m, c] regions of each image.

        Returns:
            The batch's boxes, flips, image sizes, classes and dense soft labels.
        """
        m = self.manifest
        images = np.asarray(image_indices, dtype=np.int64).reshape(-1)
        ids = np.asarray(region_ids, dtype=np.int64).reshape(images.size, -1)
        c, k = ids.shape[1], m.topk
        # per image only views (no copies, no fancy indexing): numpy's per-call cost is the price here
        sizes, targets, values, indices = [], [], [], []
        has_indices = m.label_type != 'full'
        for image in images.tolist():
            shard, i = self._locate(image)
            arrays = shard.arrays
            sizes.append(arrays['image_sizes'][i])
            targets.append(arrays['targets'][i])
            values.append(arrays['topk_values'][i])
            if has_indices:
                indices.append(arrays['topk_indices'][i])
        sizes = np.array(sizes, dtype=np.int64).reshape(images.size, 2)
        targets = np.array(targets, dtype=np.int64).reshape(images.size)
        batch = np.arange(images.size)[:, None]
        values = np.stack(values)[batch, ids] if images.size else np.zeros((0, c, k), dtype=np.float32)
        if not has_indices or not images.size:
            indices = np.zeros((images.size, c, k), dtype=np.int64) if has_indices else None
        elif self._codes:
            positions = ids[:, :, None] * k + np.arange(k)
            indices = unpack_indices(np.stack(indices), positions.reshape(images.size, -1), self.storage.bits)
        else:
            indices = np.stack(indices)[batch, ids]
        if self._codes:
            values = decode_values(values)
        if m.sampler != EXPLICIT_SAMPLER:
            boxes, flips = self.sampler.sample_batch(images, sizes, ids)
        else:
            explicit = [self.regions(int(i), row) for i, row in zip(images, ids)]
            boxes = np.stack([r.boxes for r in explicit]).reshape(images.size, c, 4)
            flips = np.stack([r.flips for r in explicit]).reshape(images.size, c)
        soft = dense_targets(None if indices is None else indices.reshape(-1, k), values.reshape(-1, k),
                             m.num_classes, m.label_type)
        return RegionBatch(boxes=boxes, flips=flips, image_sizes=sizes, targets=targets,
                           soft=soft.reshape(images.size, c, m.num_classes))

    def all_max_probs(self) -> np.ndarray:
        """float32 [num_images, R]: max probability of every region (reads the value arrays once)."""
        max_probs = np.concatenate(
            [self._max_probs(self._shard(s).arrays['topk_values']) for s in range(self.manifest.num_shards)])
        bad = ~((max_probs >= 0) & (max_probs <= 1))  # NaN fails both comparisons
        if bad.any():
            image, region = (int(v[0]) for v in np.nonzero(bad))
            path = self._shard(image // self.manifest.images_per_shard).path
            raise BankError(f'shard {path}: image {image} region {region} has max probability '
                            f'{max_probs[image, region]}, outside [0, 1]; the bank is corrupt: regenerate or '
                            f're-download it')
        return max_probs

    def validate(self, full: bool = False) -> None:
        """Check the bank; raise ``BankError`` naming the first problem.

        Args:
            full: Recompute every shard's sha256 and check the values of every image; otherwise open
                every shard (size, header, settings) and check the values of a sample of its images.
        """
        for s, record in enumerate(self.manifest.shards):
            shard = self._shard(s)
            if full:
                self._verify_checksum(record)
            rows = list(range(record.num_images)) if full else sample_rows(record.num_images)
            check_shard_values(shard.arrays, self.manifest, record.first_image, str(shard.path),
                               rows=None if full else rows)
            self._checked[record.first_image + np.asarray(rows, dtype=np.int64)] = True

    def all_top_classes(self) -> np.ndarray:
        """int64 [num_images, R]: the teacher's argmax class of every region."""
        out = []
        k = self.manifest.topk
        for s in range(self.manifest.num_shards):
            arrays = self._shard(s).arrays
            if self.manifest.label_type == 'full':
                out.append(np.asarray(arrays['topk_values']).argmax(axis=2))
            elif self._codes:
                positions = np.arange(self.manifest.regions_per_image) * k
                rows = arrays['topk_indices']
                out.append(unpack_indices(rows, np.broadcast_to(positions, (rows.shape[0], positions.size)),
                                          self.storage.bits))
            else:
                out.append(np.asarray(arrays['topk_indices'][:, :, 0], dtype=np.int64))
        return np.concatenate(out).astype(np.int64)

    def verify_checksums(self) -> None:
        """Recompute every shard's sha256 and compare it with the manifest; raise ``BankError`` on mismatch."""
        for s, record in enumerate(self.manifest.shards):
            self._shard(s)
            self._verify_checksum(record)

    def _verify_checksum(self, record: ShardRecord) -> None:
        if sha256_file(self.path / record.file) != record.sha256:
            raise BankError(
                f'shard {self.path / record.file} fails its sha256 check (corrupt); '
                f're-download the bank or regenerate it')

    def bytes_on_disk(self) -> int:
        """Size of the manifest plus all shards."""
        return (self.path / MANIFEST_NAME).stat().st_size + sum(r.bytes for r in self.manifest.shards)
