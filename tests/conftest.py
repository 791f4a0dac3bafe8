"""Shared fixtures (real Fashion-MNIST on disk, a tiny teacher checkpoint) and ways to run the entry points."""
import logging
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

if os.environ.get('PYTEST_XDIST_WORKER'):
    # one thread per test process: pytest-xdist already runs one worker per core
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))


@contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (parallel test workers preparing one shared folder)."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): workers do not share folders there
        yield
        return
    with open(lock_path, 'w') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope='session')
def fmnist_root(tmp_path_factory) -> Path:
    """A data directory holding real Fashion-MNIST (from Debian's dataset-fashion-mnist)."""
    from timm_ferkd.data.fashion_mnist import ensure_fashion_mnist
    cache = os.environ.get('FERKD_TEST_DATA')
    if cache:
        root = Path(cache)
    elif os.environ.get('PYTEST_XDIST_WORKER'):
        root = tmp_path_factory.getbasetemp().parent / 'fmnist'  # shared by this run's workers
    else:
        root = tmp_path_factory.mktemp('fmnist')
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root.parent / f'.{root.name}.lock'):
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


@contextmanager
def entry_point_state():
    """Undo what an entry point run in-process changes in the test process: log handlers and level, SIGTERM,
    the registration with timm's factories."""
    from timm_ferkd.registration import is_registered, unregister_from_timm
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    sigterm = signal.getsignal(signal.SIGTERM)
    registered = is_registered()
    try:
        yield
    finally:
        if is_registered() and not registered:
            unregister_from_timm()
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        signal.signal(signal.SIGTERM, sigterm)


def call_main(main, args) -> int:
    """``main(argv)`` as the interpreter would exit: its return value, or the code of a ``SystemExit`` (argparse)."""
    with entry_point_state():
        try:
            return main([str(a) for a in args])
        except SystemExit as e:
            return 0 if e.code is None else e.code if isinstance(e.code, int) else 1


def _in_process(main, name, capsys, args, check) -> subprocess.CompletedProcess:
    capsys.readouterr()
    rc = call_main(main, args)
    out, err = capsys.readouterr()
    if check and rc != 0:
        raise AssertionError(f'{name} {" ".join(map(str, args))} failed:\n{out[-3000:]}\n{err[-5000:]}')
    return subprocess.CompletedProcess([name, *map(str, args)], rc, out, err)


def cli_in_process(capsys, *args, check: bool = True) -> subprocess.CompletedProcess:
    """``run_cli`` through ``timm_ferkd.cli.main`` in this process, for tests a fresh interpreter adds nothing to."""
    from timm_ferkd.cli import main
    return _in_process(main, 'timm-ferkd', capsys, args, check)


def train_in_process(capsys, *args, check: bool = True) -> subprocess.CompletedProcess:
    """``train_ferkd.py`` through its ``main`` in this process: (exit status, stdout, stderr) like a subprocess."""
    import train_ferkd
    return _in_process(train_ferkd.main, 'train_ferkd.py', capsys, args, check)
