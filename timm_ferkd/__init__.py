"""timm-ferkd: fast offline knowledge distillation for timm (FKD, FerKD, SelfMix, FNKD, DTD).

The public API is ``__all__``; the rest lives in the subpackages (``timm_ferkd.bank``, ``timm_ferkd.data``,
``timm_ferkd.labelling``). Imports are lazy so that ``import timm_ferkd`` stays cheap in data-loader workers.
"""
import importlib
from typing import Any, List

from timm_ferkd.errors import BankError, BankMismatchError, ConfigError, FerKDError, HubError
from timm_ferkd.version import __version__

_LAZY = {
    'open_bank': 'timm_ferkd.bank',
    'SoftLabelBank': 'timm_ferkd.bank',
    'pull_bank': 'timm_ferkd.bank',
    'push_bank': 'timm_ferkd.bank',
    'GenerateConfig': 'timm_ferkd.labelling',
    'generate_bank': 'timm_ferkd.labelling',
    'create_region_dataset': 'timm_ferkd.data',
    'create_region_loader': 'timm_ferkd.data',
    'create_selfmix': 'timm_ferkd.data',
    'CalibrationConfig': 'timm_ferkd.data',
    'create_distill_loss': 'timm_ferkd.losses',
    'FerKDTask': 'timm_ferkd.task',
    'create_task': 'timm_ferkd.task',
    'register_with_timm': 'timm_ferkd.registration',
}

__all__ = ['__version__', 'FerKDError', 'ConfigError', 'BankError', 'BankMismatchError', 'HubError', *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f'module timm_ferkd has no attribute {name!r}')
    return getattr(importlib.import_module(module), name)


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY))
