"""timm-ferkd: fast offline knowledge distillation for timm (FKD, FerKD, SelfMix, FNKD, DTD).

The public API: banks (``open_bank``, ``SoftLabelBank``, ``GenerateConfig``/``generate_bank``), the
Hub (``pull_bank``, ``push_bank``), the training data (``create_region_dataset``,
``create_region_loader``, ``create_selfmix``, ``CalibrationConfig``), objectives
(``create_distill_loss``), tasks (``FerKDTask``, ``create_task``) and ``register_with_timm()``.
Imports are lazy so that ``import timm_ferkd`` stays cheap in data-loader workers.
"""
import importlib
from typing import Any

from timm_ferkd.errors import BankError, BankMismatchError, ConfigError, FerKDError, HubError
from timm_ferkd.version import __version__

_LAZY = {
    'SoftLabelBank': 'timm_ferkd.bank.reader',
    'open_bank': 'timm_ferkd.bank.hub',
    'RegionSampler': 'timm_ferkd.bank.regions',
    'GenerateConfig': 'timm_ferkd.labelling.generate',
    'generate_bank': 'timm_ferkd.labelling.generate',
    'pull_bank': 'timm_ferkd.bank.hub',
    'push_bank': 'timm_ferkd.bank.hub',
    'resolve_bank': 'timm_ferkd.bank.hub',
    'create_region_dataset': 'timm_ferkd.data.dataset',
    'RegionDataset': 'timm_ferkd.data.dataset',
    'create_region_loader': 'timm_ferkd.data.loader',
    'create_selfmix': 'timm_ferkd.data.mixing',
    'CalibrationConfig': 'timm_ferkd.data.calibration',
    'create_label_transform': 'timm_ferkd.data.calibration',
    'create_distill_loss': 'timm_ferkd.losses',
    'probability_shift': 'timm_ferkd.losses',
    'FerKDTask': 'timm_ferkd.task',
    'OnlineDistillTask': 'timm_ferkd.task',
    'create_task': 'timm_ferkd.task',
    'register_with_timm': 'timm_ferkd.registration',
}

__all__ = ['__version__', 'FerKDError', 'ConfigError', 'BankError', 'BankMismatchError', 'HubError', *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f'module timm_ferkd has no attribute {name!r}')
    return getattr(importlib.import_module(module), name)
