"""Untransformed access to any timm dataset: decoded images in a fixed colour mode, plus identity."""
import os
from functools import cached_property
from typing import Any, Optional, Sequence, Tuple

from PIL import Image
from timm.data import create_dataset

from timm_ferkd.bank.format import DatasetIdentity
from timm_ferkd.bank.identity import dataset_identity
from timm_ferkd.data.cluttered import CLUTTERED_PREFIX, create_cluttered_dataset
from timm_ferkd.data.splits import parse_split
from timm_ferkd.errors import ConfigError

__all__ = ['ImageSource', 'create_image_source', 'image_mode_for_chans', 'stats_for_chans']


def image_mode_for_chans(in_chans: int) -> str:
    """PIL mode that feeds a model with ``in_chans`` input channels."""
    if in_chans == 1:
        return 'L'
    if in_chans == 3:
        return 'RGB'
    raise ConfigError(f'--in-chans {in_chans} is not supported for image data: use 1 (grayscale) or 3 (RGB)')


def stats_for_chans(values: Sequence[float], in_chans: int) -> Tuple[float, ...]:
    """Per-channel mean or std for ``in_chans`` channels: e.g. RGB statistics averaged for a grayscale model."""
    values = tuple(values)
    if len(values) == in_chans:
        return values
    return (sum(values) / len(values),) * in_chans


class ImageSource:
    """A timm dataset read without transforms: ``load(i)`` gives (decoded image, target).

    Args:
        dataset: A dataset from ``timm.data.create_dataset``.
        name: Its timm name.
        split: Its split.
        image_mode: PIL mode every image is converted to ('RGB' or 'L').
    """

    def __init__(self, dataset: Any, name: str, split: str, image_mode: str = 'RGB'):
        self.dataset = dataset
        self.name = name
        self.split = split
        self.image_mode = image_mode
        if hasattr(dataset, 'transform'):
            dataset.transform = None
        if hasattr(dataset, 'target_transform'):
            dataset.target_transform = None

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Tuple[Image.Image, int]:
        """Decoded image ``index`` in ``image_mode``, and its target."""
        image, target = self.dataset[index][:2]
        if not isinstance(image, Image.Image):
            raise ConfigError(f'dataset {self.name} yields {type(image).__name__}, not images; use an image dataset')
        if image.mode != self.image_mode:
            image = image.convert(self.image_mode)
        return image, int(target)

    @cached_property
    def identity(self) -> DatasetIdentity:
        """Identity (size and fingerprint) of the split, computed once."""
        return dataset_identity(self.dataset, self.name, self.split)


def create_image_source(
        name: str,
        root: Optional[str],
        split: str = 'train',
        image_mode: str = 'RGB',
        download: bool = False,
        **kwargs: Any,
) -> ImageSource:
    """Create an ``ImageSource`` from timm dataset arguments.

    Args:
        name: timm dataset name: '' or a folder reader for image folders, ``torch/NAME`` for torchvision
            datasets, ``hfds/NAME`` for Hugging Face datasets, ``ferkd-cluttered/fashion_mnist[:...]`` for
            cluttered Fashion-MNIST (:mod:`timm_ferkd.data.cluttered`).
        root: Data directory (``--data-dir``).
        split: Split name (``train``, ``validation``, ...).
        image_mode: PIL mode of the decoded images.
        download: Let torchvision datasets download when missing.
        **kwargs: Passed to ``timm.data.create_dataset``.

    Returns:
        The source.
    """
    if root is not None and not name.lower().startswith(('hfds/', 'hfids/')) and not os.path.exists(root):
        raise ConfigError(f'--data-dir {root} does not exist')
    split_name, span = parse_split(split, name, root)
    if span is not None:
        raise ConfigError(f'--split {split!r}: a bank labels a whole split (its first N images with '
                          f'generate --num-images N); give the split name {split_name!r}')
    try:
        if name.lower().startswith(CLUTTERED_PREFIX):
            dataset = create_cluttered_dataset(name, root, split, download=download, image_mode=image_mode, **kwargs)
        else:
            dataset = create_dataset(name, root=root, split=split, download=download, is_training=False,
                                     input_img_mode=image_mode, **kwargs)
    except AssertionError as e:
        raise ConfigError(f'unknown dataset {name!r}: {e}') from None
    except (RuntimeError, FileNotFoundError) as e:
        raise ConfigError(f'cannot open dataset {name!r} in {root}: {str(e).splitlines()[0]}') from None
    if hasattr(dataset, '__iter__') and not hasattr(dataset, '__getitem__'):
        raise ConfigError(f'dataset {name!r} is iterable-only; banks need random access (folders, torch/, hfds/)')
    if len(dataset) == 0:
        raise ConfigError(f'dataset {name!r} in {root} (split {split}) is empty')
    return ImageSource(dataset, name=name, split=split, image_mode=image_mode)
