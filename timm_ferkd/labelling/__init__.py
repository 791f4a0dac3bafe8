"""Labelling: a teacher labels bank regions (``generate``), or official FKD labels are imported."""
from timm_ferkd.labelling.fkd_import import FKDImportConfig, import_fkd
from timm_ferkd.labelling.generate import GenerateConfig, generate_bank

__all__ = ['FKDImportConfig', 'import_fkd', 'GenerateConfig', 'generate_bank']
