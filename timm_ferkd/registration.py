"""Make timm's name-dispatched dataset and loss factories accept this package's names.

After :func:`register_with_timm`, ``timm.data.create_dataset`` builds ``'ferkd/<timm name>'`` (a
:class:`~timm_ferkd.data.dataset.RegionDataset`, ``soft_labels=BANK``) and ``'ferkd-cluttered/...'``
datasets, and ``timm.loss.create_classification_loss`` builds the losses of :data:`FERKD_LOSS_TYPES`.
Every other name goes to timm's original function untouched. timm's modules import these functions by
name, so every loaded ``timm`` module binding an original is patched; :func:`unregister_from_timm`
restores them, and :func:`create_dataset` gives the same dispatch without patching anything.
"""
import functools
import inspect
import sys
from typing import Any, Callable, Dict, List, Tuple

from timm_ferkd.errors import ConfigError
from timm_ferkd.losses import DISTILL_LOSS_TYPES, TimmCriterion, create_distill_loss

__all__ = [
    'FERKD_DATASET_PREFIX', 'FERKD_CLUTTERED_PREFIX', 'FERKD_LOSS_TYPES', 'create_dataset', 'register_with_timm',
    'unregister_from_timm', 'is_registered', 'TimmCriterion',
]

FERKD_DATASET_PREFIX = 'ferkd/'
FERKD_CLUTTERED_PREFIX = 'ferkd-cluttered/'  # kept equal to timm_ferkd.data.cluttered.CLUTTERED_PREFIX
FERKD_LOSS_TYPES: Tuple[str, ...] = DISTILL_LOSS_TYPES

_MARK = '_timm_ferkd_original'
_wrappers: Dict[str, Callable] = {}

# timm create_dataset arguments that only steer iterable datasets (or the default 42 seed);
# a region dataset is map-style, so they are accepted and ignored
_ITERABLE_ONLY_ARGS = ('is_training', 'batch_size', 'num_samples', 'repeats')
_IMG_MODE_CHANS = {'L': 1, 'RGB': 3}


def _original(func: Callable) -> Callable:
    return getattr(func, _MARK, func)


def _wrap_create_dataset(original: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def create_dataset(name, *args, **kwargs):
        if isinstance(name, str) and name.lower().startswith(FERKD_DATASET_PREFIX):
            return _create_ferkd_dataset(signature, name, args, kwargs)
        if isinstance(name, str) and name.lower().startswith(FERKD_CLUTTERED_PREFIX):
            return _create_cluttered_dataset(signature, name, args, kwargs)
        return original(name, *args, **kwargs)

    setattr(create_dataset, _MARK, original)
    return create_dataset


def _bind(signature: inspect.Signature, name: str, args: tuple, kwargs: dict) -> Tuple[dict, dict]:
    """(timm's named arguments but ``name``, the extra keyword arguments) of a ``create_dataset`` call."""
    try:
        given = dict(signature.bind(name, *args, **kwargs).arguments)
    except TypeError as e:
        raise ConfigError(f'dataset {name!r}: {e}') from None
    given.pop('name')
    return given, dict(given.pop('kwargs', {}))


def _create_ferkd_dataset(signature: inspect.Signature, name: str, args: tuple, kwargs: dict):
    from timm_ferkd.data.dataset import create_region_dataset
    inner = name[len(FERKD_DATASET_PREFIX):]
    if inner.lower().startswith(FERKD_DATASET_PREFIX):
        raise ConfigError(f'dataset {name!r}: the {FERKD_DATASET_PREFIX!r} prefix cannot be nested')
    given, extra = _bind(signature, name, args, kwargs)
    for key in _ITERABLE_ONLY_ARGS:
        given.pop(key, None)
    if given.pop('load_bytes', False):
        raise ConfigError(f'dataset {name!r}: load_bytes is not supported, region replay decodes the images')
    mode = given.pop('input_img_mode', None)
    if mode is not None and 'in_chans' not in extra:
        if mode not in _IMG_MODE_CHANS:
            raise ConfigError(f'dataset {name!r}: input_img_mode {mode!r} must be one of {", ".join(_IMG_MODE_CHANS)}')
        extra['in_chans'] = _IMG_MODE_CHANS[mode]
    if given.get('trust_remote_code') is False:
        given.pop('trust_remote_code')  # timm's default; not every inner dataset accepts it
    return create_region_dataset(inner, **given, **extra)


def _create_cluttered_dataset(signature: inspect.Signature, name: str, args: tuple, kwargs: dict):
    from timm_ferkd.data.cluttered import create_cluttered_dataset
    given, extra = _bind(signature, name, args, kwargs)
    if given.get('load_bytes'):
        raise ConfigError(f'dataset {name!r}: load_bytes is not supported, the images live in arrays')
    if given.get('class_map'):
        raise ConfigError(f'dataset {name!r}: class_map is not supported, the classes are Fashion-MNIST\'s ten')
    mode = given.get('input_img_mode')
    return create_cluttered_dataset(
        name, root=given.get('root'), split=given.get('split', signature.parameters['split'].default),
        download=bool(given.get('download', False)), image_mode='L' if mode is None else mode, **extra)


def _wrap_create_classification_loss(original: Callable) -> Callable:
    from timm.loss import _loss_factory
    signature = inspect.signature(original)
    timm_types = set(_loss_factory.LOSS_TYPES)

    @functools.wraps(original)
    def create_classification_loss(loss_type=None, *args, **kwargs):
        if not (isinstance(loss_type, str) and loss_type not in timm_types
                and loss_type.lower().replace('-', '_') in FERKD_LOSS_TYPES):
            return original(loss_type, *args, **kwargs)
        return _create_ferkd_loss(signature, loss_type, args, kwargs)

    setattr(create_classification_loss, _MARK, original)
    return create_classification_loss


def _create_ferkd_loss(signature: inspect.Signature, loss_type: str, args: tuple, kwargs: dict):
    timm_kwargs = {k: v for k, v in kwargs.items() if k in signature.parameters}
    extra = {k: v for k, v in kwargs.items() if k not in signature.parameters}
    try:
        bound = signature.bind(loss_type, *args, **timm_kwargs)
    except TypeError as e:
        raise ConfigError(f'loss {loss_type!r}: {e}') from None
    for key, value in bound.arguments.items():
        if key in ('loss_type', 'soft_targets'):  # our losses always take the soft target dict
            continue
        default = signature.parameters[key].default
        try:
            unchanged = value is default or bool(value == default)
        except (TypeError, ValueError, RuntimeError):  # tensors and sequences compare elementwise
            unchanged = False
        if not unchanged:
            raise ConfigError(
                f'loss {loss_type!r} is a timm-ferkd distillation loss: timm option {key}={value!r} does not apply '
                f'(pass the loss\'s own arguments, e.g. temperature=..., instead)')
    return TimmCriterion(create_distill_loss(loss_type, **extra))


def _targets() -> List[Tuple[str, Callable, Callable]]:
    """(key, original function, wrapper factory) of each patched timm factory."""
    import timm.data.dataset_factory
    import timm.loss._loss_factory
    import timm.task  # noqa: F401, loads the modules that bind create_classification_loss
    return [
        ('create_dataset', _original(timm.data.dataset_factory.create_dataset), _wrap_create_dataset),
        ('create_classification_loss', _original(timm.loss._loss_factory.create_classification_loss),
         _wrap_create_classification_loss),
    ]


def _rebind(old: Callable, new: Callable) -> None:
    """Replace ``old`` by ``new`` wherever a loaded timm module binds it."""
    for name, module in list(sys.modules.items()):
        if module is not None and (name == 'timm' or name.startswith('timm.')):
            for attr, value in list(vars(module).items()):
                if value is old:
                    setattr(module, attr, new)


def _wrapper(key: str, original: Callable, factory: Callable) -> Callable:
    """The wrapper of ``original``, made once (again if timm's function was replaced since)."""
    wrapper = _wrappers.get(key)
    if wrapper is None or _original(wrapper) is not original:
        wrapper = _wrappers[key] = factory(original)
    return wrapper


def create_dataset(name: str, *args: Any, **kwargs: Any) -> Any:
    """``timm.data.create_dataset`` that also knows this package's names, without patching timm.

    ``'ferkd/<name>'`` wraps timm's ``<name>`` (``'ferkd/'`` alone: an image folder; ``split`` defaults to
    'train'; ``input_img_mode`` picks the channels; extra keyword arguments go to
    :func:`~timm_ferkd.data.dataset.create_region_dataset`); ``'ferkd-cluttered/fashion_mnist[:key=value,...]'``
    builds :mod:`timm_ferkd.data.cluttered`'s dataset. Options that only steer iterable datasets are ignored.

    Args:
        name: The dataset name.
        *args: timm's positional ``create_dataset`` arguments.
        **kwargs: timm's keyword arguments, plus the extra ones above.
    """
    import timm.data.dataset_factory
    original = _original(timm.data.dataset_factory.create_dataset)
    return _wrapper('create_dataset', original, _wrap_create_dataset)(name, *args, **kwargs)


def register_with_timm() -> None:
    """Patch timm's dataset and loss factories to accept timm-ferkd names (idempotent).

    After this call ``timm.data.create_dataset('ferkd/<name>', ..., soft_labels=BANK)`` builds a region
    dataset and ``timm.loss.create_classification_loss(loss_type='ferkd')`` (or ``'soft_ce'``, ``'kd'``,
    ``'dtd'``, ``'fnkd'``) a distillation loss; all of timm's own names behave exactly as before.
    """
    for key, original, factory in _targets():
        _rebind(original, _wrapper(key, original, factory))


def unregister_from_timm() -> None:
    """Restore timm's original factories everywhere :func:`register_with_timm` patched them."""
    for key, original, _ in _targets():
        wrapper = _wrappers.get(key)
        if wrapper is not None:
            _rebind(wrapper, original)


def is_registered() -> bool:
    """Whether ``timm.data.create_dataset`` and ``timm.loss.create_classification_loss`` are patched."""
    import timm.data
    import timm.loss
    return all(hasattr(f, _MARK) for f in (timm.data.create_dataset, timm.loss.create_classification_loss))
