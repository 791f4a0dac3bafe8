"""Cluttered Fashion-MNIST: each garment at a random place on a larger canvas, among fragments of others.

FerKD's region calibration matters when random crops can miss the object, as on ImageNet; on plain
Fashion-MNIST the garment fills the image. Here each 28x28 image (randomly resized) sits at a random
place on a black canvas among square fragments of *other* images of the split, as in Jaderberg et al.'s
cluttered MNIST (Spatial Transformer Networks, 2015). With the defaults the object's box is a fifth of
the canvas: of the small crops RandomResizedCrop(0.08, 1) cuts (area < 30%), 16% miss it entirely and
75% are mostly background and clutter.

Pixels are the maximum of the object and the fragments (max blending): the bright garment is never
hidden and the drawing order does not matter. Randomness is counter based (SplitMix64 of (seed, split,
image, slot, draw)) and resizing is integer bilinear, so image ``i`` does not depend on how many images
are built and the bytes are the same on every platform. ``python -m timm_ferkd.data.cluttered --data-dir
DIR --plot FILE.png`` builds the cache, times it and draws samples.
"""
import argparse
import gzip
import hashlib
import io
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from timm_ferkd.bank.regions import splitmix64
from timm_ferkd.bank.writer import atomic_write_bytes
from timm_ferkd.errors import BankError, ConfigError

__all__ = [
    'CLUTTERED_PREFIX', 'CLUTTER_VERSION', 'CACHE_FOLDER', 'ClutterConfig', 'ClutteredFashionMNIST',
    'parse_cluttered_name', 'cluttered_split', 'read_idx', 'load_fashion_mnist', 'render_cluttered',
    'materialize_cluttered', 'create_cluttered_dataset', 'plot_cluttered_samples', 'main',
]

_logger = logging.getLogger(__name__)

CLUTTERED_PREFIX = 'ferkd-cluttered/'
# part of the cache key and of the dataset fingerprint: bump it whenever the bytes for given parameters change
CLUTTER_VERSION = 1
CACHE_FOLDER = 'FerKDClutteredFashionMNIST'

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
                         'Bag', 'Ankle boot')
_SOURCES = {'fashion_mnist': ('FashionMNIST', FASHION_MNIST_CLASSES)}
_IDX_PREFIX = {'train': 'train', 'test': 't10k'}
_SPLITS = {'train': 'train', 'training': 'train', 'test': 'test', 'val': 'test', 'valid': 'test',
           'validation': 'test', 'eval': 'test', 'evaluation': 'test'}
_SPLIT_IDS = {'train': 0, 'test': 1}
_SOURCE_SIZE = 28
_MAX_FRAGMENTS = 255  # one byte of the random counter numbers the fragment slots
_WEIGHT_BITS = 8  # bilinear weights in 1/256: exact integer resizing


@dataclass(frozen=True)
class ClutterConfig:
    """Parameters of the cluttered dataset; equal parameters give equal bytes.

    Args:
        canvas: Side of the square canvas in pixels.
        scale: (low, high) range of the object's resize factor (its side is ``round(28 * f)``).
        fragments: Clutter fragments per image (0 to 255).
        fragment_size: (low, high) side of the square fragments in pixels, inclusive.
        seed: Seed of positions, scales and fragments.

    Raises:
        ConfigError: Values that cannot work (the object larger than the canvas, ranges out of order, ...).
    """
    canvas: int = 64
    scale: Tuple[float, float] = (0.8, 1.2)
    fragments: int = 8
    fragment_size: Tuple[int, int] = (6, 10)
    seed: int = 0

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise the ranges to tuples once
        set_(self, 'scale', _pair(self.scale, float, 'scale'))
        set_(self, 'fragment_size', _pair(self.fragment_size, int, 'fragment_size'))
        for name in ('canvas', 'fragments', 'seed'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f'cluttered dataset: {name}={value!r} must be an integer')
            set_(self, name, int(value))
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ConfigError(f'cluttered dataset: scale={lo}-{hi} needs 0 < low <= high')
        if self.max_object_size > self.canvas:
            raise ConfigError(
                f'cluttered dataset: canvas={self.canvas} is smaller than the largest object '
                f'({self.max_object_size} px at scale {hi}); use canvas >= {self.max_object_size} or a smaller scale')
        if not 0 <= self.fragments <= _MAX_FRAGMENTS:
            raise ConfigError(f'cluttered dataset: fragments={self.fragments} must lie in [0, {_MAX_FRAGMENTS}]')
        flo, fhi = self.fragment_size
        if not 1 <= flo <= fhi <= min(_SOURCE_SIZE, self.canvas):
            raise ConfigError(
                f'cluttered dataset: fragment_size={flo}-{fhi} needs 1 <= low <= high <= '
                f'{min(_SOURCE_SIZE, self.canvas)}')
        if not 0 <= self.seed < 2 ** 63:
            raise ConfigError(f'cluttered dataset: seed={self.seed} must lie in [0, 2**63)')

    @property
    def max_object_size(self) -> int:
        return max(1, int(round(_SOURCE_SIZE * self.scale[1])))

    def canonical(self) -> str:
        """The parameters in name syntax, every one given (``canvas=64,scale=0.8-1.2,...``)."""
        return ','.join(f'{f.name}={_format_value(getattr(self, f.name))}' for f in fields(self))

    def cache_key(self) -> str:
        """Folder name of the cache: format version and a hash of the parameters."""
        digest = hashlib.sha256(f'{CLUTTER_VERSION}:{self.canonical()}'.encode()).hexdigest()
        return f'v{CLUTTER_VERSION}-{digest[:16]}'


def _pair(value: Any, kind: type, name: str) -> tuple:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        value = (value, value)
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ConfigError(f'cluttered dataset: {name}={value!r} must be a number or a (low, high) pair') from None
    out = []
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or (kind is int and float(v) != int(v)):
            raise ConfigError(f'cluttered dataset: {name}={value!r} needs {kind.__name__} values')
        out.append(kind(v))
    if out[0] > out[1]:
        raise ConfigError(f'cluttered dataset: {name}={out[0]}-{out[1]} is out of order (low > high)')
    return tuple(out)


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return '-'.join(map(repr, value))  # repr round-trips floats: distinct values never share a key
    return repr(value)


_NUMBER = r'(?:\d+(?:\.\d*)?|\.\d+)'
_RANGE_RE = re.compile(rf'^({_NUMBER})(?:-({_NUMBER}))?$')
_INT_RE = re.compile(r'^\d+$')
_NAME_KEYS = {'canvas': 'int', 'scale': 'float range', 'fragments': 'int', 'fragment_size': 'int range',
              'seed': 'int'}


def parse_cluttered_name(name: str) -> Tuple[str, Dict[str, Any]]:
    """Split ``ferkd-cluttered/<base>[:key=value,...]`` into the base dataset and its parameters.

    Keys: ``canvas`` (int), ``scale`` (float or ``low-high``), ``fragments`` (int), ``fragment_size``
    (int or ``low-high``), ``seed`` (int). Each key at most once; values are plain decimals.

    Args:
        name: The dataset name (the prefix is case-insensitive).

    Returns:
        (base name, e.g. 'fashion_mnist'; parameters given in the name, as ``ClutterConfig`` fields).

    Raises:
        ConfigError: Not this prefix, an unknown base, key or value.
    """
    if not name.lower().startswith(CLUTTERED_PREFIX):
        raise ConfigError(f'dataset {name!r} is not a {CLUTTERED_PREFIX} name')
    rest = name[len(CLUTTERED_PREFIX):]
    base, sep, spec = rest.partition(':')
    base = base.lower()
    if base not in _SOURCES:
        known = ', '.join(CLUTTERED_PREFIX + s for s in _SOURCES)
        raise ConfigError(f'dataset {name!r}: unknown base {base!r}; use {known}')
    params: Dict[str, Any] = {}
    if not sep:
        return base, params
    if not spec:
        raise ConfigError(f'dataset {name!r}: nothing after ":"; give key=value pairs such as canvas=80,seed=1')
    for item in spec.split(','):
        key, eq, text = item.partition('=')
        key = key.strip()
        text = text.strip()
        if key not in _NAME_KEYS:
            raise ConfigError(f'dataset {name!r}: unknown parameter {key!r}; use {", ".join(_NAME_KEYS)}')
        if not eq or not text:
            raise ConfigError(f'dataset {name!r}: parameter {key!r} needs a value ({key}=...)')
        if key in params:
            raise ConfigError(f'dataset {name!r}: parameter {key!r} given twice')
        params[key] = _parse_value(name, key, text)
    return base, params


def _parse_value(name: str, key: str, text: str) -> Any:
    kind = _NAME_KEYS[key]
    if kind == 'int':
        if not _INT_RE.match(text):
            raise ConfigError(f'dataset {name!r}: {key}={text!r} must be a non-negative integer')
        return int(text)
    match = _RANGE_RE.match(text)
    if match is None:
        raise ConfigError(f'dataset {name!r}: {key}={text!r} must be a number or a range low-high')
    lo, hi = match.group(1), match.group(2) or match.group(1)
    if kind == 'int range':
        if not (_INT_RE.match(lo) and _INT_RE.match(hi)):
            raise ConfigError(f'dataset {name!r}: {key}={text!r} needs integers')
        return int(lo), int(hi)
    return float(lo), float(hi)


def cluttered_split(split: str) -> str:
    """'train' or 'test' for a timm split name ('validation', 'val', 'eval', ... are the test split)."""
    key = str(split).lower()
    if key not in _SPLITS:
        raise ConfigError(f'cluttered dataset: unknown split {split!r}; use train or test (validation, val)')
    return _SPLITS[key]


def read_idx(path: os.PathLike) -> np.ndarray:
    """An IDX file (MNIST's format: unsigned bytes, big-endian dimensions) as a uint8 array.

    Args:
        path: ``*-ubyte`` file; a ``.gz`` next to it is read when the plain file is missing.

    Returns:
        The array, e.g. [N, 28, 28] for images and [N] for labels.
    """
    path = Path(path)
    if not path.is_file() and Path(str(path) + '.gz').is_file():
        with gzip.open(str(path) + '.gz', 'rb') as f:
            data = f.read()
    else:
        data = path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ConfigError(f'{path} is not an IDX file of unsigned bytes; re-extract Fashion-MNIST')
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(v) for v in np.frombuffer(data, dtype='>u4', count=ndim, offset=4))
    if len(data) != header + int(np.prod(shape)):
        raise ConfigError(f'{path} is truncated or corrupt ({len(data)} bytes for shape {shape}); re-extract it')
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(root: os.PathLike, split: str, download: bool = False):
    """(images uint8 [N, 28, 28], targets int64 [N]) of a split, read from ``<root>/FashionMNIST/raw``.

    Args:
        root: Data directory.
        split: 'train' or 'test'.
        download: Prepare the files first (Debian package or torchvision download) when missing.
    """
    folder = Path(root) / _SOURCES['fashion_mnist'][0] / 'raw'
    prefix = _IDX_PREFIX[split]
    images_path, labels_path = folder / f'{prefix}-images-idx3-ubyte', folder / f'{prefix}-labels-idx1-ubyte'

    def present(p: Path) -> bool:
        return p.is_file() or Path(str(p) + '.gz').is_file()

    if not (present(images_path) and present(labels_path)):
        if download:
            from timm_ferkd.data.fashion_mnist import ensure_fashion_mnist
            ensure_fashion_mnist(root, download=True)
        else:
            raise ConfigError(
                f'no Fashion-MNIST files in {folder} (need {images_path.name}, {labels_path.name}); pass '
                f'--dataset-download (download=True) or run timm_ferkd.data.fashion_mnist.ensure_fashion_mnist')
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (_SOURCE_SIZE, _SOURCE_SIZE) or labels.shape != images.shape[:1]:
        raise ConfigError(f'{folder}: images {images.shape} and labels {labels.shape} are not Fashion-MNIST')
    return images, labels.astype(np.int64)


# draws of slot 0 (the object) and of slots 1.. (one per fragment)
_OBJ_SCALE, _OBJ_TOP, _OBJ_LEFT = 0, 1, 2
_FRAG_SIZE, _FRAG_SOURCE, _FRAG_SRC_TOP, _FRAG_SRC_LEFT, _FRAG_TOP, _FRAG_LEFT = range(6)


class _Counter:
    """Uniform doubles in [0, 1) as a pure function of (seed, split, image, slot, draw)."""

    def __init__(self, seed: int, split: str, count: int):
        self._key = splitmix64(splitmix64(np.asarray([seed], dtype=np.uint64)) ^ np.uint64(_SPLIT_IDS[split]))
        self._images = np.arange(count, dtype=np.uint64) << np.uint64(16)

    def uniform(self, slot: int, draw: int) -> np.ndarray:
        bits = splitmix64(self._key ^ splitmix64(self._images | np.uint64((slot << 8) | draw)))
        return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def integers(self, slot: int, draw: int, high: np.ndarray) -> np.ndarray:
        """Integers in [0, high) (``high`` broadcast per image)."""
        return np.floor(self.uniform(slot, draw) * high).astype(np.int64)


def _bilinear_taps(src: int, dst: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # pixel centres aligned (half-pixel offsets), edges clamped; weights in 1/256 so the result is exact
    x = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0, src - 1)
    i0 = np.floor(x).astype(np.int64)
    i1 = np.minimum(i0 + 1, src - 1)
    w1 = np.rint((x - i0) * (1 << _WEIGHT_BITS)).astype(np.int64)
    return i0, i1, (1 << _WEIGHT_BITS) - w1, w1


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [n, size, size]: square uint8 images [n, s, s] resized bilinearly in integer arithmetic."""
    src = images.shape[-1]
    if size == src:
        return images.copy()
    i0, i1, w0, w1 = _bilinear_taps(src, size)
    x = images.astype(np.int64)
    rows = x[:, i0, :] * w0[None, :, None] + x[:, i1, :] * w1[None, :, None]
    out = rows[:, :, i0] * w0[None, None, :] + rows[:, :, i1] * w1[None, None, :]
    half = 1 << (2 * _WEIGHT_BITS - 1)
    return ((out + half) >> (2 * _WEIGHT_BITS)).astype(np.uint8)


def _paste_max(canvas: np.ndarray, which: np.ndarray, top: np.ndarray, left: np.ndarray, patches: np.ndarray) -> None:
    side = patches.shape[-1]
    r = np.arange(side)
    rows = top[:, None, None] + r[None, :, None]
    cols = left[:, None, None] + r[None, None, :]
    # each image appears once in `which`, so the fancy-indexed read-modify-write has no duplicates
    idx = (which[:, None, None], rows, cols)
    canvas[idx] = np.maximum(canvas[idx], patches)


def render_cluttered(
        images: np.ndarray,
        config: ClutterConfig,
        split: str,
        count: Optional[int] = None,
        layers: str = 'all',
) -> Tuple[np.ndarray, np.ndarray]:
    """Build the first ``count`` cluttered images of a split (vectorised over images; image ``i`` is the same
    whatever ``count`` is).

    Args:
        images: uint8 [N, 28, 28], the whole source split (the fragments' pool).
        config: Parameters.
        split: 'train' or 'test' (each split has its own random draws).
        count: Build images 0..count-1 (default all N).
        layers: 'all', or 'object' / 'clutter' for one layer alone (to test the composition).

    Returns:
        (uint8 [count, canvas, canvas] images, int64 [count, 4] object boxes as (top, left, height, width)).
    """
    n_source = images.shape[0]
    count = n_source if count is None else int(count)
    if not 0 <= count <= n_source:
        raise ConfigError(f'cluttered dataset: count {count} outside [0, {n_source}]')
    if config.fragments and n_source < 2:
        raise ConfigError('cluttered dataset: fragments need at least two source images')
    c = config.canvas
    rng = _Counter(config.seed, split, count)
    canvas = np.zeros((count, c, c), dtype=np.uint8)

    lo, hi = config.scale
    sides = np.maximum(1, np.rint(_SOURCE_SIZE * (lo + (hi - lo) * rng.uniform(0, _OBJ_SCALE)))).astype(np.int64)
    top = rng.integers(0, _OBJ_TOP, c - sides + 1)
    left = rng.integers(0, _OBJ_LEFT, c - sides + 1)
    boxes = np.stack([top, left, sides, sides], axis=1)
    if layers in ('all', 'object'):
        for side in np.unique(sides):
            which = np.nonzero(sides == side)[0]
            _paste_max(canvas, which, top[which], left[which], resize_bilinear(images[which], int(side)))

    if layers in ('all', 'clutter'):
        flo, fhi = config.fragment_size
        index = np.arange(count)
        for k in range(config.fragments):
            slot = 1 + k
            size = flo + rng.integers(slot, _FRAG_SIZE, fhi - flo + 1)
            source = rng.integers(slot, _FRAG_SOURCE, n_source - 1)
            source += source >= index  # never the image itself
            src_top = rng.integers(slot, _FRAG_SRC_TOP, _SOURCE_SIZE - size + 1)
            src_left = rng.integers(slot, _FRAG_SRC_LEFT, _SOURCE_SIZE - size + 1)
            dst_top = rng.integers(slot, _FRAG_TOP, c - size + 1)
            dst_left = rng.integers(slot, _FRAG_LEFT, c - size + 1)
            for side in np.unique(size):
                which = np.nonzero(size == side)[0]
                r = np.arange(side)
                patches = images[source[which, None, None], src_top[which, None, None] + r[None, :, None],
                                 src_left[which, None, None] + r[None, None, :]]
                _paste_max(canvas, which, dst_top[which], dst_left[which], patches)
    elif layers != 'object':
        raise ValueError(f'layers={layers!r}: use all, object or clutter')
    return canvas, boxes


_ARRAYS = ('images', 'targets', 'boxes')


def _save_npy(path: Path, array: np.ndarray) -> str:
    """Write an .npy atomically (temporary file, then rename); returns the sha256 of the array's bytes."""
    array = np.ascontiguousarray(array)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getbuffer())
    return hashlib.sha256(array.data).hexdigest()


def _load_cache(folder: Path, split: str, config: ClutterConfig) -> Optional[Dict[str, np.ndarray]]:
    """The cached arrays, or None when absent or unusable (logged: the caller rebuilds)."""
    meta_path = folder / f'{split}.json'
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get('version') != CLUTTER_VERSION or meta.get('params') != config.canonical():
            raise ValueError('written for other parameters')
        n, c = int(meta['num_images']), config.canvas
        expected = {'images': ((n, c, c), np.uint8), 'targets': ((n,), np.int64), 'boxes': ((n, 4), np.int64)}
        arrays = {}
        for key, (shape, dtype) in expected.items():
            array = np.load(folder / f'{split}-{key}.npy', mmap_mode='r', allow_pickle=False)
            if array.shape != shape or array.dtype != dtype:
                raise ValueError(f'{split}-{key}.npy has shape {array.shape} {array.dtype}, expected {shape} {dtype}')
            # 0.15 s for the 245 MB of training images: cheap next to a silently corrupt dataset
            if hashlib.sha256(array.data).hexdigest() != meta['sha256'][key]:
                raise ValueError(f'{split}-{key}.npy fails its sha256 check')
            arrays[key] = array
        return arrays
    except (OSError, ValueError, KeyError, TypeError) as e:
        _logger.warning(f'cluttered dataset cache {folder} ({split}) is unusable ({e}); rebuilding it')
        return None


def materialize_cluttered(
        root: os.PathLike,
        config: ClutterConfig,
        split: str,
        download: bool = False,
        cache: bool = True,
) -> Tuple[Dict[str, np.ndarray], Optional[Path]]:
    """The arrays of a split, from the cache (``<root>/FerKDClutteredFashionMNIST/<key>/``) or built from the IDX files.

    Args:
        root: Data directory holding ``FashionMNIST/raw``.
        config: Parameters.
        split: 'train' or 'test'.
        download: Prepare Fashion-MNIST when its files are missing.
        cache: Read and write the cache (False: always build, in memory).

    Returns:
        ({'images': uint8 [N, C, C], 'targets': int64 [N], 'boxes': int64 [N, 4]}, cache folder or None).
        Cached arrays are read-only memory maps.
    """
    folder = Path(root) / CACHE_FOLDER / config.cache_key()
    if cache:
        arrays = _load_cache(folder, split, config)
        if arrays is not None:
            return arrays, folder
    images, targets = load_fashion_mnist(root, split, download=download)
    start = time.perf_counter()
    canvases, boxes = render_cluttered(images, config, split)
    _logger.info(f'built cluttered Fashion-MNIST {split} ({len(canvases)} images, {config.canonical()}) '
                 f'in {time.perf_counter() - start:.1f} s')
    arrays = {'images': canvases, 'targets': targets, 'boxes': boxes}
    if not cache:
        return arrays, None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        digests = {key: _save_npy(folder / f'{split}-{key}.npy', arrays[key]) for key in _ARRAYS}
        meta = {'version': CLUTTER_VERSION, 'params': config.canonical(), 'split': split,
                'num_images': int(len(canvases)), 'config': asdict(config), 'sha256': digests}
        # written last: its presence says the arrays beside it are complete
        atomic_write_bytes(folder / f'{split}.json', (json.dumps(meta, indent=1) + '\n').encode())
    except (OSError, BankError) as e:  # atomic_write_bytes reports OSError as BankError
        _logger.warning(f'cannot write the cluttered dataset cache in {folder} ({e}); keeping it in memory')
        return arrays, None
    return arrays, folder


class ClutteredFashionMNIST(Dataset):
    """Cluttered Fashion-MNIST as a map-style dataset that behaves like torchvision's ``FashionMNIST``.

    ``dataset[i]`` is (PIL image, int target) after ``transform`` / ``target_transform`` (timm's loaders
    set ``dataset.transform``). ``data`` holds the uint8 [N, C, C] canvases, ``targets`` the classes
    and ``boxes`` each object's (top, left, height, width) in canvas pixels.

    Args:
        root: Data directory holding ``FashionMNIST/raw`` (the cache goes beside it).
        split: 'train' (60,000 images) or 'test' (10,000; also 'validation', 'val', 'eval').
        config: Parameters (default: :class:`ClutterConfig` defaults).
        transform: Applied to the PIL image.
        target_transform: Applied to the int target.
        image_mode: PIL mode of the returned images ('L' as stored, or 'RGB').
        download: Prepare Fashion-MNIST when its files are missing.
        cache: Use the on-disk cache.
    """

    def __init__(
            self,
            root: os.PathLike,
            split: str = 'train',
            config: Optional[ClutterConfig] = None,
            transform: Optional[Callable] = None,
            target_transform: Optional[Callable] = None,
            image_mode: str = 'L',
            download: bool = False,
            cache: bool = True,
    ):
        if root is None:
            raise ConfigError('cluttered dataset: needs a data directory (--data-dir) holding FashionMNIST/raw')
        if image_mode not in ('L', 'RGB'):
            raise ConfigError(f'cluttered dataset: image mode {image_mode!r} must be L or RGB')
        self.root = str(root)
        self.split = cluttered_split(split)
        self.config = config if config is not None else ClutterConfig()
        self.transform = transform
        self.target_transform = target_transform
        self.image_mode = image_mode
        self.classes = list(FASHION_MNIST_CLASSES)
        self._download, self._cache = download, cache
        self._set_arrays(*materialize_cluttered(self.root, self.config, self.split, download=download, cache=cache))

    def _set_arrays(self, arrays: Dict[str, np.ndarray], folder: Optional[Path]) -> None:
        self.data, self.targets, self.boxes = arrays['images'], arrays['targets'], arrays['boxes']
        self.cache_dir = folder

    @property
    def name(self) -> str:
        """Canonical timm name: every parameter spelled out."""
        return f'{CLUTTERED_PREFIX}fashion_mnist:{self.config.canonical()}'

    @property
    def fingerprint_params(self) -> str:
        """What besides the targets defines the samples; ``dataset_identity`` hashes it into the fingerprint."""
        return f'{self.name} v{CLUTTER_VERSION}'

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(np.array(self.data[index]))
        if self.image_mode != 'L':
            image = image.convert(self.image_mode)
        target = int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __getstate__(self):
        # memory maps would pickle as full copies: workers started by spawn reopen the cache instead
        state = dict(self.__dict__)
        if self.cache_dir is not None:
            for key in ('data', 'targets', 'boxes'):
                state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if 'data' not in state:
            self._set_arrays(*materialize_cluttered(self.root, self.config, self.split, self._download, self._cache))

    def __repr__(self) -> str:
        return f'ClutteredFashionMNIST({self.name!r}, split={self.split!r}, {len(self)} images, root={self.root!r})'


_KWARG_FIELDS = {'canvas': 'canvas', 'scale': 'scale', 'fragments': 'fragments', 'fragment_size': 'fragment_size',
                 'clutter_seed': 'seed'}


def create_cluttered_dataset(
        name: str,
        root: Optional[str] = None,
        split: str = 'train',
        download: bool = False,
        image_mode: str = 'L',
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        **params: Any,
) -> ClutteredFashionMNIST:
    """Build the dataset a ``ferkd-cluttered/`` name describes.

    Args:
        name: ``ferkd-cluttered/fashion_mnist[:key=value,...]`` (see :func:`parse_cluttered_name`).
        root: Data directory holding ``FashionMNIST/raw``.
        split: Split ('train', 'test', 'validation', ...).
        download: Prepare Fashion-MNIST when its files are missing.
        image_mode: PIL mode of the images.
        transform: Image transform.
        target_transform: Target transform.
        **params: ``canvas``, ``scale``, ``fragments``, ``fragment_size``, ``clutter_seed`` (the name's
            ``seed``; named apart from timm's ``seed`` argument, which seeds iterable datasets).

    Returns:
        The dataset.
    """
    _, from_name = parse_cluttered_name(name)
    values = dict(from_name)
    for key, value in params.items():
        if key not in _KWARG_FIELDS:
            raise ConfigError(f'dataset {name!r}: unknown argument {key!r}; use {", ".join(_KWARG_FIELDS)}')
        field = _KWARG_FIELDS[key]
        if field in values:
            raise ConfigError(f'dataset {name!r}: {field} is given both in the name and as the argument {key}')
        values[field] = value
    return ClutteredFashionMNIST(root, split, ClutterConfig(**values), transform=transform,
                                 target_transform=target_transform, image_mode=image_mode, download=download)


def plot_cluttered_samples(
        dataset: ClutteredFashionMNIST,
        output: os.PathLike,
        indices: Sequence[int] = tuple(range(8)),
        crops_per_image: int = 2,
        crop_seed: int = 0,
) -> None:
    """Write a PNG of samples: the canvas, the object box, and a few RandomResizedCrop(0.08, 1) regions.

    Each region is labelled with the fraction of the object box it covers, to show how often small
    crops miss the object. Needs matplotlib (``pip install "timm-ferkd[plot]"``).
    """
    from timm_ferkd.bank.regions import RegionSampler
    from timm_ferkd.bank.summary import pyplot
    plt = pyplot()
    sampler = RegionSampler(seed=crop_seed)
    cols = min(4, len(indices))
    rows = -(-len(indices) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows + 0.5), squeeze=False)
    c = dataset.config.canvas
    for ax, i in zip(axes.flat, indices):
        ax.imshow(np.asarray(dataset.data[i]), cmap='gray', vmin=0, vmax=255, interpolation='nearest')
        t, l, h, w = (int(v) for v in dataset.boxes[i])
        ax.add_patch(plt.Rectangle((l - 0.5, t - 0.5), w, h, fill=False, edgecolor='lime', linewidth=1.5))
        for box in sampler.sample(int(i), (c, c), range(crops_per_image)).boxes:
            bt, bl, bh, bw = (int(v) for v in box)
            ih = max(0, min(bt + bh, t + h) - max(bt, t))
            iw = max(0, min(bl + bw, l + w) - max(bl, l))
            ax.add_patch(plt.Rectangle((bl - 0.5, bt - 0.5), bw, bh, fill=False, edgecolor='orange', linewidth=1,
                                       linestyle='--'))
            ax.text(bl, bt + bh - 1, f'{ih * iw / (h * w):.0%}', color='orange', fontsize=7, va='bottom')
        ax.set_title(f'{i}: {dataset.classes[int(dataset.targets[i])]}', fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(indices):]:
        ax.axis('off')
    fig.suptitle(f'{dataset.name} [{dataset.split}]\ngreen: object box; orange: random crops (scale 0.08-1), '
                 'share of the object box covered', fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m timm_ferkd.data.cluttered``: build (or load) the cache, report the time, plot samples."""
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    p = argparse.ArgumentParser(
        prog='python -m timm_ferkd.data.cluttered',
        description='Build the cluttered Fashion-MNIST cache for both splits and optionally plot training samples.')
    p.add_argument('--data-dir', required=True, metavar='DIR', help='data directory holding FashionMNIST/raw')
    p.add_argument('--dataset', default=CLUTTERED_PREFIX + 'fashion_mnist', help='name, with parameters')
    p.add_argument('--plot', default=None, metavar='FILE.png', help='write a picture of training samples')
    p.add_argument('--num', type=int, default=8, help='samples in the picture (default 8)')
    p.add_argument('--download', action='store_true', help='prepare Fashion-MNIST when missing')
    p.add_argument('--splits', nargs='+', default=['train', 'test'], choices=('train', 'test'),
                   help='splits to build (default both; the picture shows the first)')
    args = p.parse_args(argv)
    try:
        datasets = {}
        for split in args.splits:
            start = time.perf_counter()
            datasets[split] = create_cluttered_dataset(args.dataset, args.data_dir, split, download=args.download)
            print(f'{split}: {len(datasets[split])} images in {time.perf_counter() - start:.2f} s '
                  f'({datasets[split].cache_dir})')
        if args.plot:
            plot_cluttered_samples(datasets[args.splits[0]], args.plot, indices=range(args.num))
            print(f'wrote {args.plot}')
    except ConfigError as e:
        print(f'{p.prog}: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
