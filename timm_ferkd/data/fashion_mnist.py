"""Fashion-MNIST on disk for the demo and tests, without network where possible.

torchvision's ``FashionMNIST`` reads ``<root>/FashionMNIST/raw/*-ubyte``. Debian's package
``dataset-fashion-mnist`` installs the gzip files in ``/usr/share/datasets/fashion-mnist``;
this module unpacks them into a data directory, or, only when allowed to, downloads them with
torchvision. It installs nothing: ``timm-ferkd demo`` is what offers to run apt-get.
"""
import gzip
import logging
import os
import shutil
from pathlib import Path

from timm_ferkd.errors import ConfigError

__all__ = ['DEBIAN_DIR', 'DEBIAN_PACKAGE', 'ensure_fashion_mnist']

_logger = logging.getLogger(__name__)

DEBIAN_DIR = Path('/usr/share/datasets/fashion-mnist')
DEBIAN_PACKAGE = 'dataset-fashion-mnist'
_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


def ensure_fashion_mnist(root: os.PathLike, download: bool = False) -> Path:
    """Make ``root`` a data directory that ``create_dataset('torch/fashion_mnist', root)`` can read.

    Args:
        root: Data directory to fill (``--data-dir``).
        download: Download with torchvision when neither ``root`` nor Debian's package has the files.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    raw = root / 'FashionMNIST' / 'raw'
    if all((raw / f).is_file() for f in _FILES):
        return root
    if (DEBIAN_DIR / (_FILES[0] + '.gz')).is_file():
        raw.mkdir(parents=True, exist_ok=True)
        for name in _FILES:
            tmp = raw / (name + '.tmp')
            with gzip.open(DEBIAN_DIR / (name + '.gz'), 'rb') as src, open(tmp, 'wb') as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, raw / name)
        return root
    if not download:
        raise ConfigError(f'no Fashion-MNIST in {raw} or {DEBIAN_DIR}: install it (apt-get install {DEBIAN_PACKAGE}) '
                          f'or allow a download (download=True, --dataset-download)')
    from torchvision.datasets import FashionMNIST
    _logger.info(f'{DEBIAN_PACKAGE} is not installed: downloading Fashion-MNIST with torchvision')
    FashionMNIST(str(root), train=True, download=True)
    FashionMNIST(str(root), train=False, download=True)
    return root
