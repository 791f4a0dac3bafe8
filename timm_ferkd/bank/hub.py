"""Soft-label banks on the Hugging Face Hub (the "label zoo").

A bank is published as a Hub *dataset* repo holding the bank files plus a generated card (``README.md``).
Wherever a bank directory is accepted, a name in timm's convention works too: ``hf-hub:ORG/NAME``,
``hf-hub:ORG/NAME@BRANCH`` (or tag) or ``hf-hub:ORG/NAME@<commit>`` (immutable). ``huggingface_hub``
resolves the names, so its cache, offline mode, token and endpoint settings apply. The revision is
resolved to a commit once and everything is fetched at that commit, so a bank is never assembled from
two pushes.
"""
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional, Tuple, Union

from timm_ferkd.bank.format import MANIFEST_NAME, BankManifest
from timm_ferkd.bank.validate import validate_manifest
from timm_ferkd.bank.writer import sha256_file
from timm_ferkd.errors import BankError, ConfigError, HubError

if TYPE_CHECKING:  # the reader imports torch; pull and push need none of it
    from timm_ferkd.bank.reader import SoftLabelBank

__all__ = [
    'HF_HUB_PREFIX', 'REPO_TYPE', 'HubBank', 'PushResult', 'parse_hub_name', 'resolved_revision',
    'pull_bank', 'resolve_bank', 'open_bank', 'push_bank',
]

HF_HUB_PREFIX = 'hf-hub:'
REPO_TYPE = 'dataset'
CARD_NAME = 'README.md'
DEFAULT_REVISION = 'main'

_REPO_PART = r'[A-Za-z0-9][A-Za-z0-9._-]*'
_REPO_ID = re.compile(rf'{_REPO_PART}/{_REPO_PART}')
_COMMIT = re.compile(r'[0-9a-f]{40}')
# shard names come from a downloaded manifest: never let one point outside the bank directory
_SHARD_FILE = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors')


@dataclass(frozen=True)
class _Revision:
    repo_id: str
    revision: str
    commit: str

    @property
    def pinned_name(self) -> str:
        """A name that always resolves to this exact content: ``hf-hub:ORG/NAME@<commit>``."""
        return f'{HF_HUB_PREFIX}{self.repo_id}@{self.commit}'


@dataclass(frozen=True)
class HubBank(_Revision):
    """A bank resolved on the Hub.

    Attributes:
        repo_id: Dataset repo (``ORG/NAME``).
        revision: The revision asked for (``main`` when the name has none).
        commit: The commit hash the revision resolved to.
        path: Local bank directory (in the Hugging Face cache, or ``local_dir``).
    """
    path: Path

    @property
    def name(self) -> str:
        """The name as asked for: ``hf-hub:ORG/NAME@REVISION``."""
        return f'{HF_HUB_PREFIX}{self.repo_id}@{self.revision}'


@dataclass(frozen=True)
class PushResult(_Revision):
    """What ``push_bank`` published.

    Attributes:
        repo_id: Dataset repo (``ORG/NAME``).
        revision: Branch pushed to.
        commit: The commit that holds the complete bank (manifest and card).
        url: Web address of the dataset repo.
    """
    url: str


def parse_hub_name(name: str) -> Tuple[str, Optional[str]]:
    """Split a bank name into (repo_id, revision).

    Args:
        name: ``hf-hub:ORG/NAME[@REVISION]``; the ``hf-hub:`` prefix is optional.

    Returns:
        (``ORG/NAME``, the revision or None when the name has none).
    """
    rest = name[len(HF_HUB_PREFIX):] if name.startswith(HF_HUB_PREFIX) else name
    repo_id, sep, revision = rest.partition('@')
    if not _REPO_ID.fullmatch(repo_id) or '..' in repo_id or (sep and not revision):
        raise HubError(
            f'{name!r} is not a Hub bank name: use hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION '
            f'(REVISION: a branch, tag or commit hash)')
    return repo_id, (revision or None)


def _display(repo_id: str, revision: Optional[str]) -> str:
    return f'{HF_HUB_PREFIX}{repo_id}' + (f'@{revision}' if revision else '')


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@contextmanager
def _hub_errors(repo_id: str, revision: Optional[str], action: str = 'resolve') -> Iterator[None]:
    """Turn ``huggingface_hub`` exceptions into one-line ``HubError`` messages."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled,
        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, RevisionResolutionError)
    from huggingface_hub.utils import httpx  # httpx or httpx2, whichever this huggingface_hub uses
    name = _display(repo_id, revision)
    try:
        yield
    except GatedRepoError:
        raise HubError(
            f'{name}: the dataset repo is gated; accept its conditions on the Hub and log in '
            f'(`hf auth login` or HF_TOKEN)') from None
    except RepositoryNotFoundError:
        raise HubError(
            f'{name}: no dataset repo {repo_id} on {constants.ENDPOINT} (or it is private: log in with '
            f'`hf auth login` or set HF_TOKEN); check the name') from None
    except RevisionNotFoundError:
        raise HubError(
            f'{name}: dataset repo {repo_id} has no revision {revision!r}; use an existing branch, tag or '
            f'commit hash') from None
    except RemoteEntryNotFoundError:
        raise HubError(
            f'{name}: dataset repo {repo_id} is not a timm-ferkd bank (no {MANIFEST_NAME} at this revision); '
            f'publish one with `timm-ferkd push BANK {repo_id}`') from None
    except (RevisionResolutionError, LocalEntryNotFoundError, OfflineModeIsEnabled, httpx.TransportError) as e:
        if action == 'push':
            raise HubError(f'cannot {action} {name}: the Hub at {constants.ENDPOINT} cannot be reached '
                           f'({_first_line(e)}); check your network, HF_ENDPOINT and HF_HUB_OFFLINE') from None
        raise _unreachable(name) from None
    except HFValidationError as e:
        raise HubError(f'{name}: invalid repo name or revision ({_first_line(e)})') from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, 'response', None), 'status_code', None)
        hint = ' (check that your token has write access: `hf auth login` or HF_TOKEN)' \
            if status in (401, 403) else ''
        raise HubError(f'cannot {action} {name}: the Hub answered {status}: {_first_line(e)}{hint}') from None


def _unreachable(name: str) -> HubError:
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return HubError(
            f'{name} is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1): go online '
            f'(unset HF_HUB_OFFLINE) or run `timm-ferkd pull {name}` on a machine with network first')
    return HubError(
        f'{name} is not in the local Hugging Face cache and the Hub at {constants.ENDPOINT} cannot be reached: '
        f'go online (check your network and HF_ENDPOINT) or run `timm-ferkd pull {name}` first')


def _api():
    from huggingface_hub import HfApi
    return HfApi()


def _progress_bar_class(progress: Optional[bool]):
    """``tqdm_class`` for ``snapshot_download``; None: huggingface_hub's own bars (``HF_HUB_DISABLE_PROGRESS_BARS``)."""
    # under torchrun, one bar per node is enough
    if progress is None and os.environ.get('LOCAL_RANK', '0') == '0':
        return None
    from tqdm.auto import tqdm
    if progress:
        return tqdm

    class _Quiet(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **dict(kwargs, disable=True))

    return _Quiet


def resolved_revision(name: str, cache_dir: Optional[os.PathLike] = None) -> str:
    """The commit hash a bank name resolves to now (from the Hub, or the cache when offline).

    Args:
        name: ``hf-hub:ORG/NAME[@REVISION]``.
        cache_dir: Hugging Face cache (default: ``HF_HUB_CACHE``).

    Returns:
        The 40-hex-digit commit hash.
    """
    repo_id, revision = parse_hub_name(name)
    with _hub_errors(repo_id, revision):
        return _api().resolve_revision(repo_id, repo_type=REPO_TYPE, revision=revision, cache_dir=cache_dir).resolved


def pull_bank(
        name: str,
        local_dir: Optional[os.PathLike] = None,
        download_shards: bool = True,
        verify_checksums: bool = False,
        force_download: bool = False,
        cache_dir: Optional[os.PathLike] = None,
        progress: Optional[bool] = None,
        max_workers: int = 8,
) -> HubBank:
    """Download a bank from the Hub: its manifest first, then the shards the manifest lists.

    Args:
        name: ``hf-hub:ORG/NAME[@REVISION]`` (the prefix is optional here).
        local_dir: Put the bank files in this directory instead of the Hugging Face cache.
        download_shards: Also fetch the shards (False: the manifest only).
        verify_checksums: Check each shard's sha256 against the manifest (sizes are always checked).
        force_download: Download again even when cached.
        cache_dir: Hugging Face cache (default: ``HF_HUB_CACHE``).
        progress: Show progress bars (default: huggingface_hub's, unless disabled there; rank 0 only).
        max_workers: Parallel shard downloads.

    Returns:
        The resolved bank, with its commit hash and local directory.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    repo_id, revision = parse_hub_name(name)
    display = _display(repo_id, revision)
    if local_dir is not None and Path(local_dir).exists() and not Path(local_dir).is_dir():
        raise ConfigError(f'--local-dir {local_dir} exists and is not a directory; choose a directory')
    if max_workers < 1:
        raise ConfigError(f'--max-workers is {max_workers}; give at least 1 (parallel shard downloads)')
    commit = resolved_revision(name, cache_dir)
    where = dict(repo_type=REPO_TYPE, local_dir=local_dir, cache_dir=cache_dir, force_download=force_download)
    with _hub_errors(repo_id, revision):
        manifest_path = Path(hf_hub_download(repo_id, MANIFEST_NAME, revision=commit, **where))
    manifest = BankManifest.load(manifest_path, schema=validate_manifest, source=f'{display} {MANIFEST_NAME}')
    for record in manifest.shards:
        if not _SHARD_FILE.fullmatch(record.file):
            raise BankError(f'{display}: {MANIFEST_NAME} lists an invalid shard file name {record.file!r}; '
                            f'the repo is not a usable bank')
    bank_dir = manifest_path.parent
    if download_shards and manifest.shards:
        shard_files = [r.file for r in manifest.shards]
        # the names match _SHARD_FILE, which has no glob characters: each pattern selects exactly its file
        with _hub_errors(repo_id, revision):
            snapshot_download(repo_id, revision=commit, allow_patterns=shard_files, max_workers=max_workers,
                              tqdm_class=_progress_bar_class(progress), **where)
        missing = [f for f in shard_files if not (bank_dir / f).is_file()]
        if missing:
            raise _missing_shards(repo_id, revision, commit, missing, local_dir, cache_dir)
        _check_files(manifest, bank_dir, display, verify_checksums)
    return HubBank(repo_id=repo_id, revision=revision or DEFAULT_REVISION, commit=commit, path=bank_dir)


def _missing_shards(repo_id: str, revision: Optional[str], commit: str, missing: List[str], local_dir,
                    cache_dir) -> HubError:
    """Why shards the manifest lists are absent after ``snapshot_download`` returned."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError
    name = _display(repo_id, revision)
    try:  # snapshot_download caches the file listing it got from the Hub
        get_cached_repo_tree(repo_id, repo_type=REPO_TYPE, revision=commit, local_dir=local_dir, cache_dir=cache_dir)
    except CachedRepoTreeNotFoundError:  # no listing: the Hub was not reached and the cache is incomplete
        return _unreachable(name)
    return HubError(
        f'{name}: the repo at commit {commit[:10]} lacks {", ".join(missing)}, which its {MANIFEST_NAME} '
        f'lists (an interrupted push?); push the bank again or use an earlier revision')


def _check_files(manifest: BankManifest, bank_dir: Path, name: str, verify_checksums: bool) -> None:
    for record in manifest.shards:
        path = bank_dir / record.file
        size = path.stat().st_size
        if size != record.bytes:
            raise BankError(
                f'{name}: shard {record.file} has {size} bytes, the manifest says {record.bytes} (corrupt download '
                f'or inconsistent repo); run `timm-ferkd pull {name} --force-download`')
        if verify_checksums and sha256_file(path) != record.sha256:
            raise BankError(
                f'{name}: shard {record.file} fails its sha256 check (corrupt download or inconsistent repo); '
                f'run `timm-ferkd pull {name} --force-download`')


def resolve_bank(name: str, local_dir: Optional[os.PathLike] = None, download_shards: bool = True) -> Path:
    """Local directory of a Hub bank, downloading what is missing (the entry point of ``open_bank``).

    Args:
        name: ``hf-hub:ORG/NAME[@REVISION]``.
        local_dir: Put the bank files here instead of the Hugging Face cache.
        download_shards: Also fetch the shards (False: the manifest only).

    Returns:
        The bank directory.
    """
    return pull_bank(name, local_dir=local_dir, download_shards=download_shards).path


def open_bank(name: Union[str, os.PathLike], validate: bool = False) -> 'SoftLabelBank':
    """Open a bank by local path or Hub name (``hf-hub:ORG/NAME[@REVISION]``).

    Args:
        name: Local bank directory, or a Hub dataset repo with timm's ``hf-hub:`` prefix.
        validate: Check every shard's header and size now.

    Returns:
        The bank.
    """
    from timm_ferkd.bank.reader import SoftLabelBank
    name = str(name)
    path = resolve_bank(name) if name.startswith(HF_HUB_PREFIX) else Path(name)
    if not path.exists():
        raise BankError(f'no bank at {path}: pass a bank directory or an hf-hub:ORG/NAME[@REVISION] name')
    return SoftLabelBank(path, validate=validate)


def _remote_shard_files(repo_id: str, revision: Optional[str]) -> List[str]:
    """Shard files listed by the bank already at ``revision`` (empty for a new repo)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
    try:
        path = hf_hub_download(repo_id, MANIFEST_NAME, repo_type=REPO_TYPE, revision=revision)
        data = json.loads(Path(path).read_text())
        return [s['file'] for s in data.get('shards', []) if _SHARD_FILE.fullmatch(str(s.get('file', '')))]
    except (EntryNotFoundError, HfHubHTTPError, ValueError, KeyError, TypeError, AttributeError):
        return []


def push_bank(
        bank_dir: os.PathLike,
        repo: str,
        private: bool = False,
        revision: Optional[str] = None,
        license: str = 'other',
        commit_message: Optional[str] = None,
        verify: bool = True,
) -> PushResult:
    """Publish a local bank as a Hub dataset repo, with a generated dataset card.

    The shards are uploaded first (``upload_folder``: resumable, possibly in several commits), then
    the manifest and the card in one last commit, so every commit that has a manifest has all of
    its shards. Shards of a previous bank at the same revision that the new one lacks are deleted
    in that last commit. Generation bookkeeping (``generation.json``, ``*.safetensors.json``) is
    never uploaded.

    Args:
        bank_dir: Local bank directory.
        repo: ``ORG/NAME`` (``hf-hub:`` prefix and ``@BRANCH`` suffix accepted).
        private: Create the repo private (only when it does not exist yet).
        revision: Branch to push to (created from the default branch when missing).
        license: License id for the card (``other`` when unknown; the dataset's license binds the labels).
        commit_message: Message of the last commit.
        verify: Check every shard's sha256 and the values of every image before uploading (otherwise
            the quick check: headers and a sample of images).

    Returns:
        The repo, branch and commit of the published bank.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from timm_ferkd.bank.card import bank_card
    from timm_ferkd.bank.reader import SoftLabelBank
    repo_id, name_revision = parse_hub_name(repo)
    if revision and name_revision and revision != name_revision:
        raise HubError(f'two revisions given ({name_revision!r} in the name, --revision {revision!r}); give one')
    revision = revision or name_revision
    if revision is not None and _COMMIT.fullmatch(revision):
        raise HubError(f'cannot push to commit {revision}: push to a branch name (--revision BRANCH)')
    bank_dir = Path(bank_dir)
    bank = SoftLabelBank(bank_dir, validate=True)
    if verify:
        bank.validate(full=True)
    manifest = bank.manifest
    shard_files = [r.file for r in manifest.shards]
    card = bank_card(manifest, repo_id, revision=revision, license=license, bytes_on_disk=bank.bytes_on_disk())
    api = _api()
    with _hub_errors(repo_id, revision, action='push'):
        url = str(api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True))
        if revision is not None and revision != DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True)
        stale = sorted(set(_remote_shard_files(repo_id, revision)) - set(shard_files))
        if shard_files:
            api.upload_folder(
                repo_id=repo_id, folder_path=str(bank_dir), repo_type=REPO_TYPE, revision=revision,
                allow_patterns=shard_files, commit_message=f'Upload {len(shard_files)} bank shards')
        operations = [
            CommitOperationAdd(path_in_repo=MANIFEST_NAME, path_or_fileobj=str(bank_dir / MANIFEST_NAME)),
            CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=str(card).encode()),
        ] + [CommitOperationDelete(path_in_repo=f) for f in stale]
        info = api.create_commit(
            repo_id, operations, repo_type=REPO_TYPE, revision=revision,
            commit_message=commit_message or (
                f'timm-ferkd bank: {manifest.teacher.model} on {manifest.dataset.name or "image folder"} '
                f'[{manifest.dataset.split}], {manifest.regions_per_image} regions, top-{manifest.topk}'))
    return PushResult(repo_id=repo_id, revision=revision or DEFAULT_REVISION, commit=info.oid, url=url)
