"""``timm-ferkd import-fkd``: convert official FKD / FerKD soft-label folders into a bank."""
import argparse

from timm_ferkd.cli import config_from_args
from timm_ferkd.bank.codes import VALUE_DTYPES
from timm_ferkd.labelling.fkd_import import FKD_LABEL_TYPES, REPORT_NAME, FKDImportConfig, import_fkd


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'import-fkd', help='convert official FKD/FerKD label files (.tar per image) into a bank',
        description='Convert the per-image label files of the FKD/FerKD reference code (SRC_DIR/<split>/<class>/'
                    '<image>.tar, torch.save([coords, flip, labels])) into a bank that keeps their boxes. Files are '
                    'matched to the dataset images by relative path, and loaded without running pickled code: a '
                    'file that needs anything but numpy arrays is refused.')
    p.add_argument('src', metavar='SRC_DIR', help='FKD label folder (holding <split>/ or the class folders)')
    p.add_argument('--dataset', default='', help="timm dataset name of the image folder ('' = image folder)")
    p.add_argument('--data-dir', required=True, metavar='DIR', help='dataset root (the images the labels belong to)')
    p.add_argument('--split', default='train')
    p.add_argument('--label-type', required=True, metavar='TYPE',
                   help=f'FKD --label_type the files were made with: {", ".join(FKD_LABEL_TYPES)}')
    p.add_argument('--num-classes', type=int, default=None, metavar='C', help='default: classes of the dataset')
    p.add_argument('--regions', type=int, default=None, metavar='R',
                   help='keep the first R regions of every file (default: all; every file must have the same count)')
    p.add_argument('--teacher', default=FKDImportConfig.teacher, help='teacher name to record in the manifest')
    p.add_argument('--temperature', type=float, default=1.0, help='softmax temperature the labels were made with')
    p.add_argument('--scale', type=float, nargs=2, default=(0.08, 0.936), metavar=('LO', 'HI'),
                   help='RandomResizedCrop scale the labels were made with (recorded only)')
    p.add_argument('--fill-missing', action='store_true',
                   help='give images without a label file hard ground-truth labels (whole image) instead of failing')
    p.add_argument('--value-dtype', default='float16', choices=VALUE_DTYPES,
                   help='float16 values, or uint8: 8-bit values and bit-packed indices (format 2; docs/bank-format.md)')
    p.add_argument('--images-per-shard', type=int, default=1000, metavar='N')
    p.add_argument('-j', '--workers', type=int, default=4, help='loading processes (default 4)')
    p.add_argument('--no-progress', dest='progress', action='store_false')
    p.add_argument('--output', required=True, metavar='BANK', help='bank directory to write')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = import_fkd(config_from_args(FKDImportConfig, args))
    print(report.summary())
    if report.extra:
        print(f'label files without an image, e.g. {report.extra[0]} (all listed in {args.output}/{REPORT_NAME})')
    print(f'bank {args.output}: explicit boxes, {report.num_images} images')
    return 0
