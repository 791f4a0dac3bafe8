"""``timm-ferkd verify``: checksums, schema, label values, and (optionally) the match with a dataset."""
import argparse
import time

from timm_ferkd.bank.identity import check_bank_matches
from timm_ferkd.bank.hub import open_bank
from timm_ferkd.data.source import create_image_source


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'verify', help="check a bank's shard checksums, schema and label values, and its match with a dataset",
        description='Check the manifest schema, then every shard against it: size, sha256, safetensors header, '
                    'tensor names, shapes and dtypes, and every label value (finite probabilities in [0, 1], '
                    'sorted, at most 1 in all; class indices below the class count). With --data-dir, also check '
                    'that the bank was generated on that dataset split.')
    p.add_argument('bank', help='bank directory or hf-hub:ORG/NAME[@REVISION]')
    p.add_argument('--dataset', default=None, help='timm dataset name (default: the one recorded in the bank)')
    p.add_argument('--data-dir', default=None, metavar='DIR')
    p.add_argument('--split', default=None, help='dataset split (default: the one recorded in the bank)')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    bank = open_bank(args.bank)
    start = time.perf_counter()
    bank.validate(full=True)
    m = bank.manifest
    print(f'{bank.path}: {len(m.shards)} shards, checksums and schema OK (format {m.format_version}: '
          f'{m.value_dtype} values, {m.index_dtype or "no"} indices), {m.num_images * m.regions_per_image} '
          f'region labels valid ({time.perf_counter() - start:.1f}s)')
    if args.data_dir is not None or args.dataset is not None:
        name = m.dataset.name if args.dataset is None else args.dataset
        split = m.dataset.split if args.split is None else args.split
        source = create_image_source(name, args.data_dir, split)
        check_bank_matches(m, source.identity)
        print(f'matches dataset {name or "(folder)"} split {split} ({source.identity.num_images} images)')
    return 0
