"""Soft-label banks: the format and its I/O, local and on the Hub (imports nothing above it)."""
from timm_ferkd.bank.format import BankManifest, DatasetIdentity, TeacherInfo
from timm_ferkd.bank.hub import HF_HUB_PREFIX, open_bank, pull_bank, push_bank, resolve_bank
from timm_ferkd.bank.identity import check_bank_matches
from timm_ferkd.bank.reader import RegionBatch, SoftLabelBank
from timm_ferkd.bank.regions import RegionSampler, Regions, replay_region

__all__ = [
    'BankManifest', 'DatasetIdentity', 'TeacherInfo', 'HF_HUB_PREFIX', 'open_bank', 'pull_bank', 'push_bank',
    'resolve_bank', 'check_bank_matches', 'RegionBatch', 'SoftLabelBank', 'RegionSampler', 'Regions', 'replay_region',
]
