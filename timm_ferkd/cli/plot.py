"""``timm-ferkd plot``: convergence curves of several training runs in one figure."""
import argparse

from timm_ferkd.runs import load_run, plot_runs


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'plot', help='plot top-1 and loss against epoch for several runs',
        description='Plot validation top-1 and training loss of train_ferkd.py runs in one figure '
                    '(needs matplotlib: pip install "timm-ferkd[plot]").')
    p.add_argument('runs', nargs='+', metavar='RUN_DIR', help='output directories of train_ferkd.py')
    p.add_argument('--output', required=True, metavar='FILE.png')
    p.add_argument('--x', default='epoch', choices=('epoch', 'crops'),
                   help='x axis: epochs, or crops seen per image (fair across --num-crops)')
    p.add_argument('--title', default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    runs = [load_run(path) for path in args.runs]
    plot_runs(runs, args.output, x=args.x, title=args.title)
    width = max(len(r.name) for r in runs)
    print(f'{"run":<{width}}  epochs  best top-1  final top-1')
    for r in runs:
        print(f'{r.name:<{width}}  {len(r.metrics.get("epoch", [])):>6d}  {r.best_top1:>10.2f}  {r.final_top1:>11.2f}')
    print(f'wrote {args.output}')
    return 0
