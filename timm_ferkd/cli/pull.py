"""``timm-ferkd pull``: download a bank from the Hugging Face Hub and check it against its manifest."""
import argparse

from timm_ferkd.bank.hub import pull_bank


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'pull', help='download a bank from the Hugging Face Hub (label zoo)',
        description='Resolve ORG/NAME[@REVISION] to a commit, download its manifest, then the shards it lists, '
                    'and check every shard\'s size and sha256. Downloads go to the Hugging Face cache (HF_HUB_CACHE) '
                    'and resume when interrupted; afterwards hf-hub:ORG/NAME works offline (HF_HUB_OFFLINE=1).')
    p.add_argument('name', metavar='ORG/NAME[@REVISION]', help='dataset repo of the bank (hf-hub: prefix optional)')
    p.add_argument('--local-dir', default=None, metavar='DIR',
                   help='put the bank files in DIR instead of the Hugging Face cache')
    p.add_argument('--force-download', action='store_true', help='download again even when cached')
    p.add_argument('--no-verify', dest='verify', action='store_false', help='skip the sha256 check (sizes are checked)')
    p.add_argument('--max-workers', type=int, default=8, metavar='N', help='parallel shard downloads (default 8)')
    p.add_argument('--no-progress', dest='progress', action='store_false')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    bank = pull_bank(args.name, local_dir=args.local_dir, verify_checksums=args.verify,
                     force_download=args.force_download, progress=None if args.progress else False,
                     max_workers=args.max_workers)
    print(f'{bank.name} -> commit {bank.commit}')
    print(f'bank directory: {bank.path}')
    print(f'pinned name: {bank.pinned_name}')
    return 0
