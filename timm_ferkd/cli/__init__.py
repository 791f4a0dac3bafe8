"""The ``timm-ferkd`` command: one subcommand per module of this package.

Errors the user can fix (``timm_ferkd.errors.FerKDError``) print one line on stderr and exit 2.
"""
import argparse
import importlib
import logging
import sys
from dataclasses import fields
from typing import List, Optional

from timm_ferkd.errors import FerKDError
from timm_ferkd.version import __version__

__all__ = ['main', 'build_parser', 'config_from_args']

# modules of this package defining register(subparsers), in the order `timm-ferkd --help` lists them
_COMMANDS = ('generate', 'inspect', 'verify', 'plot', 'demo', 'pull', 'push', 'import_fkd')


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog='timm-ferkd', description='Offline knowledge distillation for timm: soft-label banks and tools.')
    parser.add_argument('--version', action='version', version=f'timm-ferkd {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for module in _COMMANDS:
        importlib.import_module(f'timm_ferkd.cli.{module}').register(subparsers)
    return parser


def config_from_args(cls: type, args: argparse.Namespace):
    """The dataclass ``cls`` built from the parsed flags named like its fields (lists become tuples).

    Args:
        cls: A config dataclass (``GenerateConfig``, ...).
        args: Parsed command line.
    """
    names = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names})


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``timm-ferkd``; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except FerKDError as e:
        print(f'timm-ferkd {args.command}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'timm-ferkd {args.command}: interrupted; rerun the same command to resume', file=sys.stderr)
        return 130
