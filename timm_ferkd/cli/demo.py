"""``timm-ferkd demo``: the whole pipeline on Fashion-MNIST (teacher, bank, plain/FKD/FerKD students)."""
import argparse
from dataclasses import fields

from timm_ferkd.demo import DemoConfig, run_demo


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'demo', help='run the Fashion-MNIST demo: teacher, bank, plain/FKD/FerKD students, table and plot',
        description='Train a small teacher on Fashion-MNIST, label regions into a bank, train the same student '
                    'plainly, with FKD and with FerKD (calibration + SelfMix), then print top-1 per method and '
                    'write a convergence plot. About eight minutes on two CPU cores with the defaults.')
    defaults = DemoConfig()
    for f in fields(DemoConfig):
        p.add_argument('--' + f.name.replace('_', '-'), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)})
    run_demo(cfg)
    return 0
