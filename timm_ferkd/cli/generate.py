"""``timm-ferkd generate``: label regions of every training image with a teacher."""
import argparse

from timm_ferkd.cli import config_from_args
from timm_ferkd.labelling.generate import GenerateConfig, generate_bank
from timm_ferkd.bank.codes import VALUE_DTYPES
from timm_ferkd.bank.labels import LABEL_TYPES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'generate', help='label R regions of every image with a teacher and write a bank',
        description='Label R random regions (RandomResizedCrop box + flip) of every image with a frozen teacher '
                    'and write a soft-label bank. Run under torchrun to split shards across processes; rerun the '
                    'same command after an interruption to finish only the missing shards.')
    g = p.add_argument_group('teacher')
    g.add_argument('--model', required=True, help='timm model name of the teacher')
    g.add_argument('--checkpoint', default=None, metavar='FILE', help='teacher weights (timm checkpoint)')
    g.add_argument('--pretrained', action='store_true', help="load the teacher's pretrained weights")
    g.add_argument('--num-classes', type=int, default=None, metavar='C')
    g.add_argument('--in-chans', type=int, default=3, metavar='N')
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                   help="teacher input size (default: teacher's pretrained_cfg)")
    g.add_argument('--interpolation', default=None, help="resize filter (default: teacher's pretrained_cfg)")
    g.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    g.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    d = p.add_argument_group('data')
    d.add_argument('--dataset', default='', help="timm dataset name ('' = image folder, torch/fashion_mnist, hfds/...)")
    d.add_argument('--data-dir', default=None, metavar='DIR')
    d.add_argument('--split', default='train')
    d.add_argument('--num-images', type=int, default=None, metavar='N', help='label only the first N images')
    d.add_argument('--dataset-download', dest='download', action='store_true',
                   help='let torchvision datasets download when missing')
    r = p.add_argument_group('regions and labels')
    r.add_argument('--regions', type=int, default=500, metavar='R', help='regions per image (default 500)')
    r.add_argument('--topk', type=int, default=5, metavar='K', help='classes kept per region (default 5)')
    r.add_argument('--label-type', default='marginal_smoothing', choices=LABEL_TYPES)
    r.add_argument('--temperature', type=float, default=1.0, metavar='T', help='softmax(z / T) (default 1)')
    r.add_argument('--fnkd-tau', type=float, default=None, metavar='TAU',
                   help="store FNKD's feature-normalised distribution softmax(TAU z / ||f||) instead of softmax(z / T)")
    r.add_argument('--value-dtype', default='float16', choices=VALUE_DTYPES,
                   help='float16 values (format 1), or uint8: 8-bit values and bit-packed indices, 12 B/region for '
                        'top-5 of 1000 classes instead of 20 (format 2; docs/bank-format.md)')
    r.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), metavar=('LO', 'HI'))
    r.add_argument('--ratio', type=float, nargs=2, default=(3 / 4, 4 / 3), metavar=('LO', 'HI'))
    r.add_argument('--seed', type=int, default=0, help='region seed: the same seed gives the same regions')
    x = p.add_argument_group('execution')
    x.add_argument('-b', '--batch-size', type=int, default=256, help='crops per teacher forward (default 256)')
    x.add_argument('-j', '--workers', type=int, default=4, help='data loading workers (default 4)')
    x.add_argument('--device', default=GenerateConfig.__dataclass_fields__['device'].default)
    x.add_argument('--amp', action='store_true', help='mixed precision teacher forward')
    x.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'))
    x.add_argument('--channels-last', action='store_true')
    x.add_argument('--images-per-shard', type=int, default=1000, metavar='N')
    x.add_argument('--no-progress', dest='progress', action='store_false')
    p.add_argument('--output', required=True, metavar='DIR', help='bank directory to write')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = generate_bank(config_from_args(GenerateConfig, args))
    from timm_ferkd.bank.reader import SoftLabelBank
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        bank = SoftLabelBank(out)
        m = bank.manifest
        size = bank.bytes_on_disk()
        regions = m.num_images * m.regions_per_image
        print(f'bank {out}: {m.num_images} images x {m.regions_per_image} regions, top-{m.topk} {m.label_type}, '
              f'{size / 1e6:.2f} MB ({size / regions:.2f} B/region)')
    return 0
