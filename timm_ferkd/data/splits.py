"""Split names, checked before timm sees them.

timm maps every split name of a torchvision dataset other than ``train``/``training`` to the test split,
and a folder dataset without a sub-folder of that name to the whole folder, so a typo (``trian``,
``tset``, ``train[abc:]``) silently labels, trains or validates on other images. :func:`parse_split`
accepts timm's own names and ``NAME[START:STOP]`` (a range of a split's images) and refuses the rest.
"""
import os
import re
from typing import Optional, Tuple

from timm_ferkd.errors import ConfigError

__all__ = ['TRAIN_SPLITS', 'EVAL_SPLITS', 'parse_split']

# timm's synonyms (timm.data.dataset_factory): these, and only these, select the two torchvision splits
TRAIN_SPLITS = ('train', 'training')
EVAL_SPLITS = ('test', 'validation', 'val', 'valid', 'eval', 'evaluation')
# torchvision datasets with a train flag only (timm: train=split in its train synonyms)
_TWO_SPLIT_DATASETS = ('cifar10', 'cifar100', 'mnist', 'kmnist', 'fashion_mnist', 'qmnist')
# datasets whose loaders parse (and check) split names themselves
_SELF_CHECKED_PREFIXES = ('hfds/', 'hfids/', 'tfds/', 'wds/')
_RANGE = re.compile(r'(?P<name>[^\[\]:]+)\[(?P<start>-?\d+)?:(?P<stop>-?\d+)?\]')


def _known_names(dataset_name: str) -> Optional[Tuple[str, ...]]:
    """The split names a dataset accepts, or None when its loader checks them itself."""
    name = dataset_name.lower()
    if name.startswith('torch/'):
        return TRAIN_SPLITS + EVAL_SPLITS if name[len('torch/'):] in _TWO_SPLIT_DATASETS else None
    if name.startswith('ferkd-cluttered/'):
        return TRAIN_SPLITS + EVAL_SPLITS
    return None


def parse_split(
        split: str,
        dataset_name: str = '',
        root: Optional[str] = None,
        flag: str = '--split',
) -> Tuple[str, Optional[slice]]:
    """Check a split name and split off its image range.

    Args:
        split: ``NAME`` or ``NAME[START:STOP]`` (Python slice bounds, either may be empty).
        dataset_name: timm dataset name (``torch/fashion_mnist``, ``''`` for a folder, ``hfds/...``).
        root: The data directory; for folder datasets a name that is not timm's must be a sub-folder of it.
        flag: The flag that gave the split, for messages.

    Returns:
        (the split name, the range or None). Hugging Face and other self-checking datasets get the split
        back unparsed: they slice splits themselves.

    Raises:
        ConfigError: A name timm would silently read as another split, or a malformed range.
    """
    if not isinstance(split, str) or not split.strip():
        raise ConfigError(f'{flag} is empty; give a split name such as train or test')
    if dataset_name.lower().startswith(_SELF_CHECKED_PREFIXES):
        return split, None
    name, span = split, None
    if '[' in split or ']' in split:
        match = _RANGE.fullmatch(split)
        if match is None:
            raise ConfigError(f'{flag} {split!r} is not NAME or NAME[START:STOP] with integer bounds '
                              f'(e.g. train[55000:] or train[:1000])')
        name = match['name']
        span = slice(*(None if match[k] is None else int(match[k]) for k in ('start', 'stop')))
    known = _known_names(dataset_name)
    if known is not None:
        if name not in known:
            raise ConfigError(
                f'{flag} {name!r} is not a split of {dataset_name}: timm would read it as the test split; use one '
                f'of train, test ({", ".join(n for n in known if n not in ("train", "test"))} also name them)')
    elif not dataset_name.lower().startswith('torch/') and root is not None and os.path.isdir(root):
        # folders: timm looks for root/NAME (or a synonym's folder) and falls back to the whole root
        if name not in TRAIN_SPLITS + EVAL_SPLITS and not os.path.isdir(os.path.join(root, name)):
            raise ConfigError(
                f'{flag} {name!r}: {root} has no folder {name!r} and it is not one of timm\'s split names '
                f'({", ".join(TRAIN_SPLITS + EVAL_SPLITS)}), so timm would read the whole folder; fix the name')
    return name, span
