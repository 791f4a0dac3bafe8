"""``timm-ferkd push``: publish a bank as a Hugging Face Hub dataset repo, with a dataset card."""
import argparse

from timm_ferkd.bank.hub import push_bank


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'push', help='publish a bank on the Hugging Face Hub (label zoo)',
        description='Create the dataset repo ORG/NAME if needed, upload the shards (resumable: rerun after an '
                    'interruption), then the manifest and a generated dataset card (README.md) in one last commit. '
                    'Log in first with `hf auth login` or set HF_TOKEN.')
    p.add_argument('bank', metavar='BANK', help='local bank directory')
    p.add_argument('repo', metavar='ORG/NAME', help='dataset repo to publish to (hf-hub: prefix optional)')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--revision', default=None, metavar='BRANCH', help='branch to push to (created when missing)')
    p.add_argument('--license', default='other', help='license id for the dataset card (default: other)')
    p.add_argument('--commit-message', default=None, metavar='MSG')
    p.add_argument('--no-verify', dest='verify', action='store_false',
                   help='check headers and a sample of images before upload instead of every sha256 and value')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = push_bank(args.bank, args.repo, private=args.private, revision=args.revision, license=args.license,
                       commit_message=args.commit_message, verify=args.verify)
    print(f'pushed {args.bank} to {result.url} (branch {result.revision}, commit {result.commit})')
    print(f'use it as: {result.pinned_name}')
    return 0
