"""Fashion-MNIST on disk for the demo and tests, without network where possible.

torchvision's ``FashionMNIST`` reads ``<root>/FashionMNIST/raw/*-ubyte``. Debian's package
``dataset-fashion-mnist`` installs the gzip files in ``/usr/share/datasets/fashion-mnist``;
this module unpacks them into a data directory, installing the package first when it is
missing and apt-get can run, and falls back to torchvision's download.
"""
import gzip
import logging
import os
import shutil
import subprocess
from pathlib import Path

__all__ = ['DEBIAN_DIR', 'ensure_fashion_mnist']

_logger = logging.getLogger(__name__)

DEBIAN_DIR = Path('/usr/share/datasets/fashion-mnist')
_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


def _try_apt_install() -> bool:
    if shutil.which('apt-get') is None or os.geteuid() != 0:
        return False
    _logger.info('installing Debian package dataset-fashion-mnist')
    for cmd in (['apt-get', 'install', '-y', '-qq', 'dataset-fashion-mnist'],
                ['apt-get', 'update', '-qq'],
                ['apt-get', 'install', '-y', '-qq', 'dataset-fashion-mnist']):
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if (DEBIAN_DIR / (_FILES[0] + '.gz')).is_file():
            return True
    return False


def ensure_fashion_mnist(root: os.PathLike) -> Path:
    """Make ``root`` a data directory that ``create_dataset('torch/fashion_mnist', root)`` can read.

    Args:
        root: Data directory to fill (``--data-dir``).

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    raw = root / 'FashionMNIST' / 'raw'
    if all((raw / f).is_file() for f in _FILES):
        return root
    raw.mkdir(parents=True, exist_ok=True)
    if not (DEBIAN_DIR / (_FILES[0] + '.gz')).is_file():
        _try_apt_install()
    if (DEBIAN_DIR / (_FILES[0] + '.gz')).is_file():
        for name in _FILES:
            tmp = raw / (name + '.tmp')
            with gzip.open(DEBIAN_DIR / (name + '.gz'), 'rb') as src, open(tmp, 'wb') as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, raw / name)
        return root
    from torchvision.datasets import FashionMNIST
    _logger.info('Debian package unavailable: downloading Fashion-MNIST with torchvision')
    FashionMNIST(str(root), train=True, download=True)
    FashionMNIST(str(root), train=False, download=True)
    return root
