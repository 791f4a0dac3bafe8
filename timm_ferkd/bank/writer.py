"""Atomic writes: a shard or manifest either exists whole, with its checksum, or not at all."""
import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from safetensors.numpy import save

from timm_ferkd.bank.format import MANIFEST_NAME, BankManifest, ShardRecord, shard_file_name
from timm_ferkd.errors import BankError, ConfigError

__all__ = ['atomic_write_bytes', 'sha256_file', 'write_shard', 'shard_record_path', 'finished_shards',
           'write_manifest', 'discard_unfinished', 'check_resumable']

_CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename.

    A reader (or a resumed job) never sees a half-written file: until the rename the old content
    (or nothing) is there, after it the new content is there whole.

    Args:
        path: Destination.
        data: Bytes to write.

    Raises:
        BankError: The file cannot be written (disk full, no permission); nothing is left behind.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; banks are meant to be shared
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise BankError(f'cannot write {path}: {e.strerror or e}; free disk space or fix the permissions, '
                            f'then rerun the same command') from None
        raise


def sha256_file(path: os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def shard_record_path(bank_dir: os.PathLike, shard_index: int) -> Path:
    """Where generation records a finished shard (``shard-00000.safetensors.json``)."""
    return Path(bank_dir) / (shard_file_name(shard_index) + '.json')


def write_shard(
        bank_dir: os.PathLike,
        shard_index: int,
        first_image: int,
        tensors: Dict[str, np.ndarray],
        metadata: Optional[Dict[str, str]] = None,
) -> ShardRecord:
    """Write one shard atomically, then its record (size and sha256) atomically.

    The record is written last: a shard counts as done only when its record exists, so a job
    killed between the two writes redoes the shard.

    Args:
        bank_dir: Bank directory.
        shard_index: Shard number.
        first_image: Index of the shard's first image.
        tensors: Shard arrays (see ``timm_ferkd.bank.format``).
        metadata: Extra metadata, stored as one sorted-JSON string under the header key ``timm_ferkd``
            (safetensors does not keep the order of several keys, which would change the shard's bytes).

    Returns:
        The shard's record.
    """
    header = {'timm_ferkd': json.dumps(metadata, sort_keys=True)} if metadata else None
    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=header)
    name = shard_file_name(shard_index)
    atomic_write_bytes(Path(bank_dir) / name, data)
    record = ShardRecord(
        file=name,
        first_image=first_image,
        num_images=int(tensors['targets'].shape[0]),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    atomic_write_bytes(shard_record_path(bank_dir, shard_index), json.dumps(record.__dict__).encode())
    return record


def finished_shards(bank_dir: os.PathLike, manifest: BankManifest) -> Dict[int, ShardRecord]:
    """Shards of an unfinished bank that are complete: recorded, present, of the recorded size and range.

    Args:
        bank_dir: Bank directory being written.
        manifest: The bank's manifest (its shard layout).

    Returns:
        Shard index -> record, for every finished shard.
    """
    done = {}
    for s in range(manifest.num_shards):
        try:
            record = ShardRecord(**json.loads(shard_record_path(bank_dir, s).read_text()))
        except (OSError, ValueError, TypeError, RecursionError):  # unreadable: redo the shard
            continue
        # a record is trusted only in the exact form the writer gives it
        if record.file != shard_file_name(s) or (record.first_image, record.num_images) != manifest.shard_range(s) \
                or not isinstance(record.bytes, int) or not isinstance(record.sha256, str):
            continue
        path = Path(bank_dir) / record.file
        if path.is_file() and path.stat().st_size == record.bytes:
            done[s] = record
    return done


def write_manifest(bank_dir: os.PathLike, manifest: BankManifest) -> None:
    """Record every shard in the manifest and write it, last: a bank with a manifest is complete.

    Args:
        bank_dir: Bank directory being written.
        manifest: The bank's manifest; its ``shards`` and ``created`` are set here.

    Raises:
        BankError: A shard is not finished.
    """
    done = finished_shards(bank_dir, manifest)
    missing = [s for s in range(manifest.num_shards) if s not in done]
    if missing:
        raise BankError(f'shards {missing} were not written; rerun the same command to finish the bank')
    manifest.shards = [done[s] for s in range(manifest.num_shards)]
    manifest.created = datetime.now(timezone.utc).isoformat(timespec='seconds')
    atomic_write_bytes(Path(bank_dir) / MANIFEST_NAME, manifest.to_json().encode())


def discard_unfinished(bank_dir: os.PathLike, manifest: BankManifest, settings_name: str, created: bool) -> None:
    """After a failure before any shard was finished, leave no file (and no directory we made) behind.

    Args:
        bank_dir: Bank directory being written.
        manifest: The bank's manifest (its shard layout).
        settings_name: The command's settings file in ``bank_dir`` (``generation.json``, ``import.json``).
        created: Whether the failed command created ``bank_dir``.
    """
    out = Path(bank_dir)
    if finished_shards(out, manifest):
        return  # finished shards stay: the same command resumes them
    for path in [out / settings_name, *out.glob('shard-*.safetensors*')]:
        path.unlink(missing_ok=True)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def check_resumable(bank_dir: os.PathLike, settings_name: str, settings: Dict[str, Any], what: str) -> None:
    """Refuse an output directory that holds anything but an unfinished run with the same settings.

    Args:
        bank_dir: The command's ``--output``.
        settings_name: Its settings file in ``bank_dir`` (``generation.json``, ``import.json``).
        settings: The JSON-normalised settings of this run.
        what: The run, for messages ('a bank generation', 'an FKD import').

    Raises:
        ConfigError: ``bank_dir`` is a file, is not empty without a settings file, or holds other settings.
    """
    out = Path(bank_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f'--output {out} exists and is not a directory')
    if not (out / settings_name).is_file():
        if out.is_dir() and any(out.iterdir()):
            raise ConfigError(f'--output {out} is not empty and does not hold {what}; choose another --output')
        return
    try:
        previous = json.loads((out / settings_name).read_text())
    except (OSError, ValueError, RecursionError):
        previous = None
    if not isinstance(previous, dict):
        raise ConfigError(f'--output {out} has a corrupt {settings_name}, so it cannot be resumed; delete '
                          f'{out} or choose another --output')
    diff = _differing(previous, settings)
    if diff:
        shown = '; '.join(f'{k}: {json.dumps(a)} then, {json.dumps(b)} now' for k, a, b in diff[:3])
        raise ConfigError(
            f'--output {out} holds {what} with other settings ({", ".join(k for k, _, _ in diff)} differ; '
            f'{shown}); rerun with the original flags to resume it, or choose another --output')


def _differing(previous: dict, current: dict, prefix: str = '') -> List[Tuple[str, Any, Any]]:
    """(dotted key, previous value, current value) of every setting that differs."""
    out = []
    for key in sorted(set(previous) | set(current)):
        a, b = previous.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing(a, b, f'{prefix}{key}.')
        elif a != b:
            out.append((prefix + key, a, b))
    return out
