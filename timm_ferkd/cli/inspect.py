"""``timm-ferkd inspect``: what a bank holds and how confident its teacher was."""
import argparse
import json
import os

from timm_ferkd.bank.inspect import plot_max_prob_histogram, summarize_bank
from timm_ferkd.bank.reader import open_bank
from timm_ferkd.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'inspect', help='summarise a bank: size, max-probability histogram, teacher accuracy',
        description='Summarise a bank. The region max-probability histogram (FerKD Figure 2) helps choose '
                    'calibration thresholds; the quantiles printed with it can be passed as quantile thresholds.')
    p.add_argument('bank', help='bank directory or hf-hub:ORG/NAME[@REVISION]')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    p.add_argument('--plot', default=None, metavar='FILE.png', help='write the max-probability histogram')
    p.add_argument('--bins', type=int, default=20)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.bins < 1:
        raise ConfigError(f'--bins {args.bins} must be >= 1')
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        raise ConfigError(f'--plot {args.plot}: directory {os.path.dirname(os.path.abspath(args.plot))} does not exist')
    summary = summarize_bank(open_bank(args.bank, validate=True), bins=args.bins)
    if args.plot:
        try:
            plot_max_prob_histogram(summary, args.plot)
        except OSError as e:
            raise ConfigError(f'cannot write --plot {args.plot}: {e.strerror or e}') from None
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"bank            {summary['path']}")
    print(f"teacher         {summary['teacher']}")
    print(f"dataset         {summary['dataset']}")
    print(f"images          {summary['num_images']} x {summary['regions_per_image']} regions "
          f"({summary['num_shards']} shards)")
    print(f"labels          {summary['label_type']}, top-{summary['topk']} of {summary['num_classes']} classes, "
          f"T={summary['temperature']}")
    print(f"regions         seed {summary['seed']}, scale {summary['scale']}, ratio "
          f"{[round(r, 4) for r in summary['ratio']]}")
    print(f"size            {summary['bytes_on_disk']} bytes, {summary['bytes_per_region']:.2f} B/region")
    print(f"argmax == label {summary['argmax_correct_fraction']:.4f} of regions")
    print('max probability histogram:')
    hist = summary['max_prob_histogram']
    total = max(sum(hist['counts']), 1)
    for lo, hi, count in zip(hist['edges'][:-1], hist['edges'][1:], hist['counts']):
        bar = '#' * round(50 * count / total)
        print(f'  [{lo:.2f}, {hi:.2f})  {count / total:6.1%}  {bar}')
    quantiles = ', '.join(f'q{float(q):g}={v:.3f}' for q, v in summary['max_prob_quantiles'].items())
    print(f'quantiles       {quantiles}')
    if args.plot:
        print(f'plot            {args.plot}')
    return 0
