"""Shared fixtures: real Fashion-MNIST on disk and a tiny teacher checkpoint."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='session')
def fmnist_root(tmp_path_factory) -> Path:
    """A data directory holding real Fashion-MNIST (from Debian's dataset-fashion-mnist)."""
    from timm_ferkd.data.fashion_mnist import ensure_fashion_mnist
    cache = os.environ.get('FERKD_TEST_DATA')
    root = Path(cache) if cache else tmp_path_factory.mktemp('fmnist')
    return ensure_fashion_mnist(root)


@pytest.fixture(scope='session')
def teacher_checkpoint(tmp_path_factory) -> Path:
    """Weights of timm's tiny ``test_resnet`` with 10 classes and 1 input channel."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=10, in_chans=1)
    path = tmp_path_factory.mktemp('teacher') / 'test_resnet.pth'
    torch.save(model.state_dict(), path)
    return path


def run_cli(*args: str, check: bool = True, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``timm-ferkd`` in a fresh interpreter, as a user would."""
    result = subprocess.run(
        [sys.executable, '-m', 'timm_ferkd', *map(str, args)], capture_output=True, text=True,
        env=env, timeout=timeout, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f'timm-ferkd {" ".join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}')
    return result
