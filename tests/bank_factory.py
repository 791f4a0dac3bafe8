"""Test helpers: tiny image folders and soft-label banks with controlled label values.

``write_bank`` writes a real bank (manifest + safetensors shards, through the package's own writer)
for the images of an ``ImageSource``, with region labels the test chooses, so calibration and
dataset behaviour can be checked against hand-computed values. Use values exactly representable in
float16 (0.125, 0.25, 0.5, 0.75, ...) where a test compares against thresholds.
"""
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from timm_ferkd.bank.format import MANIFEST_NAME, BankManifest, TeacherInfo
from timm_ferkd.bank.codes import label_storage, label_tensors
from timm_ferkd.bank.labels import stored_k, top_values
from timm_ferkd.bank.reader import SoftLabelBank
from timm_ferkd.bank.writer import atomic_write_bytes, write_shard
from timm_ferkd.data.source import ImageSource, create_image_source

__all__ = ['make_image_folder', 'folder_source', 'peaked_probs', 'write_bank']


def make_image_folder(
        root: Union[str, Path],
        num_images: int = 8,
        num_classes: int = 2,
        sizes: Optional[Sequence[Tuple[int, int]]] = None,
        mode: str = 'RGB',
        seed: int = 0,
        fmt: str = 'png',
) -> Path:
    """Write ``num_images`` small random images into ``root/class_<c>/img_<i>.<fmt>``.

    Args:
        root: Folder to create.
        num_images: Number of images (image i goes to class ``i % num_classes``).
        num_classes: Number of class folders.
        sizes: (height, width) per image; default varies between 18x22 and 25x29.
        mode: 'RGB' or 'L'.
        seed: Pixel seed.
        fmt: File extension ('png' is lossless, 'jpg' exercises JPEG decoding).

    Returns:
        ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        h, w = sizes[i] if sizes is not None else (18 + i % 8, 22 + (3 * i) % 8)
        shape = (h, w, 3) if mode == 'RGB' else (h, w)
        # smooth gradient plus noise: resizing differs visibly between interpolations
        base = np.linspace(0, 200, w)[None, :] + np.linspace(0, 55, h)[:, None]
        if mode == 'RGB':
            base = base[:, :, None]
        pixels = np.clip(base + rng.integers(0, 40, size=shape), 0, 255).astype(np.uint8)
        folder = root / f'class_{i % num_classes}'
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode=mode).save(folder / f'img_{i:03d}.{fmt}')
    return root


def folder_source(root: Union[str, Path], image_mode: str = 'RGB') -> ImageSource:
    """``ImageSource`` of an image folder (timm's folder reader, split 'train')."""
    return create_image_source('', str(root), 'train', image_mode=image_mode)


def peaked_probs(max_probs: np.ndarray, num_classes: int, peak_class: Union[int, np.ndarray] = 0) -> np.ndarray:
    """float32 [..., C] distributions with ``max_probs`` at ``peak_class`` and the rest spread evenly.

    Args:
        max_probs: Confidences m, each >= 1 / C so the peak stays the maximum.
        num_classes: C.
        peak_class: Class of the peak (broadcast against ``max_probs``).

    Returns:
        Distributions whose max is exactly ``max_probs``.
    """
    m = np.asarray(max_probs, dtype=np.float64)
    probs = np.repeat(((1.0 - m) / (num_classes - 1))[..., None], num_classes, axis=-1)
    peak = np.broadcast_to(np.asarray(peak_class), m.shape)
    np.put_along_axis(probs, peak[..., None].astype(np.int64), m[..., None], axis=-1)
    return probs.astype(np.float32)


def write_bank(
        path: Union[str, Path],
        source: ImageSource,
        probs: Union[np.ndarray, Callable[[int], np.ndarray]],
        num_classes: int,
        regions: int,
        label_type: str = 'full',
        topk: int = 5,
        num_images: Optional[int] = None,
        images_per_shard: int = 4,
        seed: int = 0,
        scale: Tuple[float, float] = (0.08, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        value_dtype: str = 'float16',
) -> SoftLabelBank:
    """Write a bank for the first ``num_images`` images of ``source`` with chosen region labels.

    Args:
        path: Bank directory to create.
        source: The images (their sizes and targets are read from it).
        probs: float [num_images, regions, C] teacher distributions, or a function image -> [regions, C].
        num_classes: C.
        regions: Regions per image.
        label_type: Stored label type ('full' stores ``probs`` as they are, in float16).
        topk: k of the top-k label types.
        num_images: Images labelled (default: all of ``source``).
        images_per_shard: Shard size (small, to exercise several shards).
        seed: Region sampler seed.
        scale: Region scale range.
        ratio: Region aspect ratio range.
        value_dtype: 'float16' (format 1) or 'uint8' (format 2: 8-bit values, packed indices).

    Returns:
        The opened bank.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n = len(source) if num_images is None else num_images
    k = stored_k(label_type, topk, num_classes)
    chans = 1 if source.image_mode == 'L' else 3
    storage = label_storage(num_classes, label_type, value_dtype)
    manifest = BankManifest(
        num_classes=num_classes, regions_per_image=regions, topk=k, label_type=label_type, temperature=1.0,
        num_images=n, images_per_shard=images_per_shard, seed=seed, scale=tuple(scale), ratio=tuple(ratio),
        teacher=TeacherInfo(model='synthetic', input_size=(chans, 16, 16), interpolation='bilinear',
                            mean=(0.5,) * chans, std=(0.5,) * chans),
        dataset=source.identity,
        index_dtype=storage.index_dtype, value_dtype=storage.value_dtype, format_version=storage.format_version,
    )
    records = []
    for s in range(manifest.num_shards):
        first, count = manifest.shard_range(s)
        sizes, targets, dists = [], [], []
        for i in range(first, first + count):
            image, target = source.load(i)
            sizes.append((image.height, image.width))
            targets.append(target)
            dists.append(probs(i) if callable(probs) else probs[i])
        dense = torch.from_numpy(np.asarray(dists, dtype=np.float32).reshape(count * regions, num_classes))
        indices, values = top_values(dense, label_type, k)
        tensors = {
            'image_sizes': np.asarray(sizes, dtype=np.int32),
            'targets': np.asarray(targets, dtype=np.int32),
        }
        tensors.update(label_tensors(None if indices is None else indices.reshape(count, regions, k),
                                     values.reshape(count, regions, k), storage))
        records.append(write_shard(path, s, first, tensors))
    manifest.shards = records
    atomic_write_bytes(path / MANIFEST_NAME, manifest.to_json().encode())
    return SoftLabelBank(path)
