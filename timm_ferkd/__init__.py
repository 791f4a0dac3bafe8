"""timm-ferkd: fast offline knowledge distillation for timm (FKD, FerKD, SelfMix, FNKD, DTD)."""
from timm_ferkd.version import __version__
from timm_ferkd.errors import BankError, BankMismatchError, ConfigError, FerKDError, HubError
from timm_ferkd.bank.reader import SoftLabelBank, open_bank
from timm_ferkd.bank.regions import RegionSampler
