"""``timm-ferkd inspect``: what a bank holds and how confident its teacher was."""
import argparse
import json
import os

from timm_ferkd.bank.hub import open_bank
from timm_ferkd.bank.summary import plot_max_prob_histogram, summarize_bank
from timm_ferkd.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'inspect', help='summarise a bank: size, max-probability histogram, teacher accuracy',
        description='Summarise a bank. The region max-probability histogram (FerKD Figure 2) helps choose '
                    'calibration thresholds; the quantiles printed with it can be passed as quantile thresholds. '
                    'With --show-regions N --plot FILE.png, draw N example regions per FerKD category on their '
                    'images (needs the dataset: --data-dir) for the --calib-* thresholds of train_ferkd.py.')
    p.add_argument('bank', help='bank directory or hf-hub:ORG/NAME[@REVISION]')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    p.add_argument('--plot', default=None, metavar='FILE.png',
                   help='write the max-probability histogram (with --show-regions: the region gallery)')
    p.add_argument('--bins', type=int, default=20)
    g = p.add_argument_group('region gallery (--show-regions N --plot FILE.png)')
    g.add_argument('--show-regions', type=int, default=None, metavar='N',
                   help='plot N random regions per FerKD category (discarded, hard, soft) on their images')
    g.add_argument('--data-dir', default=None, metavar='DIR', help='dataset root of the images')
    g.add_argument('--dataset', default=None, help='timm dataset name (default: the one recorded in the bank)')
    g.add_argument('--split', default=None, help='dataset split (default: the one recorded in the bank)')
    g.add_argument('--calib-low', type=float, default=0.0, metavar='T_L', help='as train_ferkd.py (default 0)')
    g.add_argument('--calib-mid', type=float, default=0.0, metavar='T_M', help='as train_ferkd.py (default 0)')
    g.add_argument('--calib-top', type=float, default=1.0, metavar='T_T', help='as train_ferkd.py (default 1)')
    g.add_argument('--calib-quantile', action='store_true', help='read --calib-low/mid/top as quantiles')
    g.add_argument('--calib-eps', type=float, default=0.1, metavar='EPS', help='as train_ferkd.py (default 0.1)')
    g.add_argument('--gallery-seed', type=int, default=0, help='seed of the choice of regions (default 0)')
    p.set_defaults(func=run)


def _plot_gallery(bank, args: argparse.Namespace):
    from timm_ferkd.data.calibration import CATEGORY_NAMES, CalibrationConfig
    from timm_ferkd.data.region_gallery import plot_region_gallery
    from timm_ferkd.data.source import create_image_source
    if not args.plot:
        raise ConfigError('--show-regions needs --plot FILE.png to write the gallery to')
    calibration = CalibrationConfig(low=args.calib_low, mid=args.calib_mid, top=args.calib_top,
                                    quantile=args.calib_quantile, eps=args.calib_eps)
    m = bank.manifest
    name = m.dataset.name if args.dataset is None else args.dataset
    split = m.dataset.split if args.split is None else args.split
    source = create_image_source(name, args.data_dir, split, image_mode='RGB')
    gallery = plot_region_gallery(bank, source, calibration, args.show_regions, args.plot, seed=args.gallery_seed)
    t = gallery.thresholds
    return {'thresholds': {'low': t.low, 'mid': t.mid, 'top': t.top, 'eps': t.eps},
            'counts': {CATEGORY_NAMES[c]: n for c, n in gallery.counts.items()}, 'plot': str(args.plot)}


def run(args: argparse.Namespace) -> int:
    if args.bins < 1:
        raise ConfigError(f'--bins {args.bins} must be >= 1')
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        raise ConfigError(f'--plot {args.plot}: directory {os.path.dirname(os.path.abspath(args.plot))} does not exist')
    bank = open_bank(args.bank, validate=True)
    summary = summarize_bank(bank, bins=args.bins)
    try:
        if args.show_regions is not None:
            summary['region_gallery'] = _plot_gallery(bank, args)
        elif args.plot:
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
          f"T={summary['temperature']}, {summary['value_dtype']} values, {summary['index_dtype'] or 'no'} indices")
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
    gallery = summary.get('region_gallery')
    if gallery is not None:
        t, counts = gallery['thresholds'], gallery['counts']
        print(f"calibration     low {t['low']:.4g}, mid {t['mid']:.4g}, top {t['top']:.4g}: "
              + ', '.join(f'{k} {v}' for k, v in counts.items()) + ' regions')
        print(f'region gallery  {args.plot}')
    elif args.plot:
        print(f'plot            {args.plot}')
    return 0
