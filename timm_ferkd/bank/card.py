"""Dataset card (``README.md``) of a bank published on the Hugging Face Hub, generated from its manifest."""
from typing import Optional

from timm_ferkd.bank.format import EXPLICIT_SAMPLER, BankManifest

__all__ = ['CARD_TAGS', 'bank_card', 'size_category', 'format_bytes']

CARD_TAGS = ('knowledge-distillation', 'timm', 'timm-ferkd', 'soft-labels')
# the Hub's size_categories, bucket i holding fewer than 10 ** (i + 3) images
_SIZE_CATEGORIES = ('n<1K', '1K<n<10K', '10K<n<100K', '100K<n<1M', '1M<n<10M', '10M<n<100M', '100M<n<1B',
                    '1B<n<10B', '10B<n<100B', '100B<n<1T')


def size_category(num_images: int) -> str:
    """The Hub's ``size_categories`` bucket for a number of labelled images."""
    for exponent, name in enumerate(_SIZE_CATEGORIES, start=3):
        if num_images < 10 ** exponent:
            return name
    return 'n>1T'


def format_bytes(num_bytes: float) -> str:
    """Human size in decimal units ('12.3 MB')."""
    for unit in ('B', 'kB', 'MB', 'GB'):
        if abs(num_bytes) < 1000:
            return f'{num_bytes:.0f} B' if unit == 'B' else f'{num_bytes:.1f} {unit}'
        num_bytes /= 1000
    return f'{num_bytes:.1f} TB'


def _train_command(manifest: BankManifest, hub_name: str) -> str:
    dataset = manifest.dataset
    parts = ['torchrun --nproc_per_node=8 train_ferkd.py']
    if dataset.name:
        parts.append(f'--dataset {dataset.name}')
    parts.append('--data-dir /path/to/data')
    if dataset.split != 'train':
        parts.append(f'--train-split {dataset.split}')
    parts += ['--model resnet50', f'--num-classes {manifest.num_classes}', f'--soft-labels {hub_name}',
              '--num-crops 4']
    return ' '.join(parts)


def bank_card(
        manifest: BankManifest,
        repo_id: str,
        revision: Optional[str] = None,
        license: str = 'other',
        bytes_on_disk: Optional[int] = None,
):
    """Build the dataset card of a bank.

    Args:
        manifest: The bank's manifest.
        repo_id: Dataset repo (``ORG/NAME``) the card is for.
        revision: Branch the bank is pushed to (None: the default branch).
        license: License id for the YAML metadata.
        bytes_on_disk: Size of the bank (manifest + shards), when known.

    Returns:
        A ``huggingface_hub.DatasetCard``; ``str(card)`` is the ``README.md`` text.
    """
    from huggingface_hub import DatasetCard, DatasetCardData
    m = manifest
    dataset = m.dataset
    hub_name = f'hf-hub:{repo_id}' + (f'@{revision}' if revision and revision != 'main' else '')
    regions = m.num_images * m.regions_per_image
    size = bytes_on_disk if bytes_on_disk is not None else sum(r.bytes for r in m.shards)
    dataset_name = dataset.name or 'image folder'
    data = DatasetCardData(
        license=license,
        pretty_name=f'{m.teacher.model} soft labels for {dataset_name} ({dataset.split})',
        tags=list(CARD_TAGS),
        task_categories=['image-classification'],
        size_categories=[size_category(m.num_images)],
        viewer=False,
        teacher=m.teacher.model,
        dataset=dataset_name,
        split=dataset.split,
        num_classes=m.num_classes,
        regions=m.regions_per_image,
        k=m.topk,
        label_type=m.label_type,
        size=format_bytes(size),
        bank_format_version=m.format_version,
    )
    teacher = m.teacher
    boxes = ('stored per region (imported labels)' if m.sampler == EXPLICIT_SAMPLER else
             f're-derived from seed {m.seed} (sampler {m.sampler} v{m.sampler_version}), '
             f'scale {tuple(m.scale)}, ratio {tuple(round(r, 4) for r in m.ratio)}')
    body = f"""
# {teacher.model} region soft labels for {dataset_name} [{dataset.split}]

A `timm-ferkd` soft-label bank for fast offline knowledge distillation (FKD / FerKD):
for each of the {m.num_images:,} images of `{dataset_name}` (split `{dataset.split}`), {m.regions_per_image} random
regions (RandomResizedCrop box + horizontal flip) were labelled once by the teacher `{teacher.model}`, keeping the
top-{m.topk} class probabilities (label type `{m.label_type}`). A student replays the stored regions and trains
against their labels with no teacher in the loop.

## Usage

```bash
pip install timm-ferkd
timm-ferkd pull {hub_name}            # optional: download ahead of training
{_train_command(m, hub_name)}
```

```python
from timm_ferkd import open_bank
bank = open_bank('{hub_name}')
regions = bank.regions(0, [0, 1])        # pixel boxes and flips of two regions of image 0
targets = bank.dense_targets(0, [0, 1])  # their [2, {m.num_classes}] soft labels
```

Pin an exact version for reproducible runs with `hf-hub:{repo_id}@<commit>`; the training script records the
resolved commit. Check that the bank matches your copy of the data with
`timm-ferkd verify {hub_name} --data-dir /path/to/data`.

## Bank

| | |
|---|---|
| teacher | `{teacher.model}` (input {tuple(teacher.input_size)}, {teacher.interpolation}) |
| dataset | `{dataset_name}`, split `{dataset.split}`, {dataset.num_images:,} images, {m.num_classes} classes |
| labelled images | {m.num_images:,} |
| regions per image | {m.regions_per_image} ({regions:,} in all) |
| label | `{m.label_type}`, top-{m.topk}, temperature {m.temperature:g}, {m.value_dtype} values |
| boxes | {boxes} |
| size | {format_bytes(size)} in {len(m.shards)} shards ({size / max(regions, 1):.1f} bytes per region) |
| dataset fingerprint | `{dataset.fingerprint}` ({dataset.fingerprint_kind}) |
| bank format | `{m.format}` v{m.format_version}, made by timm-ferkd {m.package_version} |

Files: `manifest.json` (settings, shard list with sizes and sha256) and `shard-*.safetensors`.

## License

The labels are derived from the dataset's images and the teacher's weights; their terms apply to this bank.
"""
    return DatasetCard(f'---\n{data.to_yaml()}\n---\n{body}')
