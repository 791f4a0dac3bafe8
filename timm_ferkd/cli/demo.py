"""``timm-ferkd demo``: the whole pipeline on Fashion-MNIST (teacher, bank, plain/FKD/FerKD students)."""
import argparse
import os
import shutil
import subprocess
from dataclasses import fields

from timm_ferkd.cli import config_from_args
from timm_ferkd.data.fashion_mnist import DEBIAN_DIR, DEBIAN_PACKAGE
from timm_ferkd.demo import DemoConfig, run_demo


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'demo', help='run the Fashion-MNIST demo: teacher, bank, plain/FKD/FerKD students, table and plot',
        description='Train a small teacher on Fashion-MNIST, label regions into a bank, train the same student '
                    'plainly, with FKD and with FerKD (calibration + SelfMix), then print top-1 per method and '
                    'write a convergence plot. About 12 to 14 minutes on two CPU cores with the defaults. Installs '
                    f'Debian\'s {DEBIAN_PACKAGE} when it can (root, apt-get), else downloads with torchvision.')
    defaults = DemoConfig()
    for f in fields(DemoConfig):
        p.add_argument('--' + f.name.replace('_', '-'), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name))
    p.add_argument('--no-apt', action='store_true', help=f'do not try `apt-get install {DEBIAN_PACKAGE}`')
    p.set_defaults(func=run)


def _apt_install() -> None:
    """The data offline, from Debian's package; the demo downloads it with torchvision when this fails."""
    if DEBIAN_DIR.is_dir() or shutil.which('apt-get') is None or os.geteuid() != 0:
        return
    print(f'installing Debian package {DEBIAN_PACKAGE} (apt-get; --no-apt to skip)', flush=True)
    for cmd in ('install', 'update', 'install'):
        subprocess.run(['apt-get', cmd, '-y', '-qq'] + ([DEBIAN_PACKAGE] if cmd == 'install' else []),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if DEBIAN_DIR.is_dir():
            return


def run(args: argparse.Namespace) -> int:
    if not args.no_apt:
        _apt_install()
    run_demo(config_from_args(DemoConfig, args))
    return 0
