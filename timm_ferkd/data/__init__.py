"""Training data from a bank: image sources, region datasets, the loader, calibration and SelfMix."""
from timm_ferkd.data.calibration import CalibrationConfig, create_label_transform
from timm_ferkd.data.dataset import RegionDataset, create_region_dataset
from timm_ferkd.data.loader import RegionLoader, create_region_loader
from timm_ferkd.data.mixing import SelfMix, create_selfmix
from timm_ferkd.data.source import ImageSource, create_image_source

__all__ = [
    'CalibrationConfig', 'create_label_transform', 'RegionDataset', 'create_region_dataset', 'RegionLoader',
    'create_region_loader', 'SelfMix', 'create_selfmix', 'ImageSource', 'create_image_source',
]
