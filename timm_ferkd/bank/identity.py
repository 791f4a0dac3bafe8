"""Dataset identity (which images, in which order, with which targets a bank belongs to) and bank identity."""
import hashlib
import json
import logging
import os
from typing import Any, Optional

import numpy as np

from timm_ferkd.bank.format import BankManifest, DatasetIdentity
from timm_ferkd.errors import BankMismatchError

__all__ = ['dataset_targets', 'dataset_identity', 'check_bank_matches', 'bank_fingerprint']

_logger = logging.getLogger(__name__)


def _sample_paths(dataset: Any) -> Optional[list]:
    reader = getattr(dataset, 'reader', None)
    if reader is not None and hasattr(reader, 'samples') and hasattr(reader, 'filename'):
        return [str(reader.filename(i)) for i in range(len(reader))]
    if hasattr(dataset, 'samples') and hasattr(dataset, 'root'):  # torchvision ImageFolder
        return [os.path.relpath(p, dataset.root) for p, _ in dataset.samples]
    return None


def dataset_targets(dataset: Any) -> np.ndarray:
    """int64 [N]: the class of every sample, without decoding images where the dataset allows it.

    Args:
        dataset: A dataset made by ``timm.data.create_dataset`` (folder, ``torch/...``, ``hfds/...``).

    Returns:
        The targets in dataset order.
    """
    reader = getattr(dataset, 'reader', None)
    if reader is not None and hasattr(reader, 'samples'):
        return np.asarray([t for _, t in reader.samples], dtype=np.int64)
    if reader is not None and hasattr(reader, 'dataset') and hasattr(reader, 'label_key'):
        targets = reader.dataset[reader.label_key]
        if getattr(reader, 'remap_class', False):
            targets = [reader.class_to_idx[reader._source_names[t]] for t in targets]
        return np.asarray(targets, dtype=np.int64)
    targets = getattr(dataset, 'targets', None)
    if targets is not None:
        return np.asarray(targets, dtype=np.int64)
    _logger.warning('dataset has no target list: reading every sample to fingerprint it (slow)')
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def dataset_identity(dataset: Any, name: str, split: str) -> DatasetIdentity:
    """Identity of a dataset split: size and a fingerprint of its ordered sample list.

    A generated dataset (e.g. cluttered Fashion-MNIST) exposes ``fingerprint_params``, a string of
    the parameters that define its images besides the targets; it is hashed in first, so banks made
    with other parameters do not match.

    Args:
        dataset: The dataset.
        name: Its timm name (``torch/fashion_mnist``, a folder name, ...).
        split: Its split.

    Returns:
        The identity recorded in (and checked against) bank manifests.
    """
    targets = dataset_targets(dataset)
    paths = _sample_paths(dataset)
    digest = hashlib.sha256()
    params = getattr(dataset, 'fingerprint_params', None)
    if isinstance(params, str):
        digest.update(f'{params}\n'.encode())
        digest.update(targets.astype('<i8').tobytes())
        kind = 'params+targets'
    elif paths is not None:
        for path, target in zip(paths, targets.tolist()):
            digest.update(f'{path}\t{target}\n'.encode())
        kind = 'paths+targets'
    else:
        digest.update(targets.astype('<i8').tobytes())
        kind = 'targets'
    return DatasetIdentity(
        name=name, split=split, num_images=len(targets), fingerprint='sha256:' + digest.hexdigest(),
        fingerprint_kind=kind)


def check_bank_matches(manifest: BankManifest, identity: DatasetIdentity, num_classes: Optional[int] = None) -> None:
    """Raise ``BankMismatchError`` unless a bank was generated on this dataset (and class count).

    Args:
        manifest: The bank's manifest.
        identity: Identity of the dataset at hand.
        num_classes: The model's class count, when known.
    """
    recorded = manifest.dataset
    if recorded.num_images != identity.num_images:
        raise BankMismatchError(
            f'the bank was generated on {recorded.num_images} images ({recorded.name}, split {recorded.split}) '
            f'but this dataset ({identity.name}, split {identity.split}) has {identity.num_images}: '
            f'use the dataset and split the bank was made for, or generate a bank for this one')
    if recorded.fingerprint != identity.fingerprint:
        raise BankMismatchError(
            f'the bank belongs to another dataset or sample order ({recorded.name}, split {recorded.split}: '
            f'fingerprint {recorded.fingerprint[:19]}... vs {identity.fingerprint[:19]}...): '
            f'use the same dataset files and split, or generate a bank for this dataset')
    if num_classes is not None and num_classes != manifest.num_classes:
        raise BankMismatchError(
            f'the bank has {manifest.num_classes} classes but the model has {num_classes}: '
            f'set --num-classes {manifest.num_classes} or use a bank made for {num_classes} classes')


def bank_fingerprint(manifest: BankManifest) -> str:
    """Identity of a bank's labels: sha256 of its settings and of its shards' records (sizes, sha256s).

    Copies of one bank (a local directory, the same bank pulled from the Hub) share it; the time of
    generation and the package version do not enter it. Training records it in its checkpoints, so a
    resume with another bank is noticed.

    Args:
        manifest: The bank's manifest.

    Returns:
        ``'sha256:<hex>'``.
    """
    content = {'settings': manifest.settings(), 'shards': [vars(r) for r in manifest.shards]}
    return 'sha256:' + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
