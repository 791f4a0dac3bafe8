"""Example regions of each FerKD calibration category, drawn on their images (``timm-ferkd inspect
--show-regions N --plot FILE.png``). It lives in ``data/`` because it needs the images.
"""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from timm_ferkd.bank.identity import check_bank_matches
from timm_ferkd.bank.reader import SoftLabelBank
from timm_ferkd.bank.summary import pyplot
from timm_ferkd.data.calibration import (
    CATEGORY_DISCARD, CATEGORY_HARD, CATEGORY_SOFT, CalibrationConfig, CalibrationThresholds, FerKDCalibration)
from timm_ferkd.data.source import ImageSource
from timm_ferkd.errors import BankMismatchError, ConfigError

__all__ = ['GalleryRegion', 'RegionGallery', 'select_gallery_regions', 'plot_region_gallery']

# rows of the figure, top to bottom
_ORDER = (CATEGORY_DISCARD, CATEGORY_HARD, CATEGORY_SOFT)


@dataclass(frozen=True)
class GalleryRegion:
    """One region shown in the gallery.

    Attributes:
        image: Image index in the bank.
        region: Region index within the image.
        max_prob: Stored teacher confidence m.
        predicted: The teacher's top class on the region.
        target: Ground-truth class of the image.
        box: (top, left, height, width) in pixels of the decoded image.
    """
    image: int
    region: int
    max_prob: float
    predicted: int
    target: int
    box: tuple


@dataclass(frozen=True)
class RegionGallery:
    """Regions chosen per category, with the thresholds and the category sizes of the whole bank."""
    thresholds: CalibrationThresholds
    counts: Dict[int, int]
    regions: Dict[int, List[GalleryRegion]]


def select_gallery_regions(
        bank: SoftLabelBank,
        calibration: CalibrationConfig,
        per_category: int,
        seed: int = 0,
) -> RegionGallery:
    """Pick ``per_category`` random regions of every FerKD category (sorted by confidence).

    Args:
        bank: The bank.
        calibration: Thresholds, as given to ``train_ferkd.py`` (quantiles are resolved on this bank).
        per_category: Regions per category (fewer where a category has fewer).
        seed: Seed of the choice.

    Returns:
        The chosen regions per category.
    """
    if per_category < 1:
        raise ConfigError(f'--show-regions {per_category} must be >= 1')
    max_probs = bank.all_max_probs()
    thresholds = calibration.resolve(max_probs)
    categories = FerKDCalibration(thresholds, bank.num_classes).categorize(max_probs)
    rng = np.random.default_rng(seed)
    regions_per_image = max_probs.shape[1]
    chosen, counts = {}, {}
    for category in _ORDER:
        flat = np.flatnonzero(categories == category)
        counts[category] = int(flat.size)
        pick = rng.choice(flat, size=min(per_category, flat.size), replace=False) if flat.size else flat
        pick = pick[np.argsort(max_probs.reshape(-1)[pick], kind='stable')]
        chosen[category] = [_gallery_region(bank, *divmod(int(f), regions_per_image)) for f in pick]
    return RegionGallery(thresholds=thresholds, counts=counts, regions=chosen)


def _gallery_region(bank: SoftLabelBank, image: int, region: int) -> GalleryRegion:
    indices, values = bank.labels(image, [region])
    top = int(values[0].argmax())
    predicted = top if indices is None else int(indices[0, top])
    box = tuple(int(v) for v in bank.regions(image, [region]).boxes[0])
    return GalleryRegion(image=image, region=region, max_prob=float(values[0, top]), predicted=predicted,
                         target=bank.target(image), box=box)


def _row_title(category: int, t: CalibrationThresholds, count: int, total: int) -> str:
    share = f'{count / max(total, 1):.1%} of regions'
    if category == CATEGORY_DISCARD:
        return f'discarded\nm < {t.low:.4g} or m > {t.top:.4g}\n{share}'
    if category == CATEGORY_HARD:
        return f'hard: softened GT\n{t.low:.4g} <= m < {t.mid:.4g}\n{share}'
    return f'soft: teacher label\n{t.mid:.4g} <= m <= {t.top:.4g}\n{share}'


def plot_region_gallery(
        bank: SoftLabelBank,
        source: ImageSource,
        calibration: CalibrationConfig,
        per_category: int,
        output: os.PathLike,
        seed: int = 0,
        class_names: Optional[Sequence[str]] = None,
) -> RegionGallery:
    """Write a PNG with ``per_category`` example regions per FerKD category, boxes drawn on their images.

    Args:
        bank: The bank.
        source: The images the bank was generated on (checked against the bank's dataset identity).
        calibration: Thresholds, as given to ``train_ferkd.py``.
        per_category: Regions per category (columns).
        output: PNG path.
        seed: Seed of the choice of regions.
        class_names: Names of the classes (default: the dataset's ``classes``, else indices).

    Returns:
        The regions drawn.
    """
    plt = pyplot()
    check_bank_matches(bank.manifest, source.identity)
    gallery = select_gallery_regions(bank, calibration, per_category, seed=seed)
    if class_names is None:
        class_names = getattr(source.dataset, 'classes', None)

    def name(c: int) -> str:
        return str(class_names[c]) if class_names is not None and 0 <= c < len(class_names) else str(c)

    total = sum(gallery.counts.values())
    fig, axes = plt.subplots(len(_ORDER), per_category, figsize=(1.9 * per_category + 1.2, 2.2 * len(_ORDER)),
                             squeeze=False)
    for row, category in enumerate(_ORDER):
        regions = gallery.regions[category]
        for col in range(per_category):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(_row_title(category, gallery.thresholds, gallery.counts[category], total), fontsize=8)
            if col >= len(regions):
                ax.text(0.5, 0.5, 'none' if col == 0 else '', ha='center', va='center', transform=ax.transAxes)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                continue
            r = regions[col]
            image, _ = source.load(r.image)
            if (image.height, image.width) != bank.image_size(r.image):
                raise BankMismatchError(
                    f'image {r.image} is {image.height}x{image.width} but was {bank.image_size(r.image)} when the '
                    f'bank was generated: use the dataset the bank was made on')
            pixels = np.asarray(image)
            ax.imshow(pixels, cmap='gray' if pixels.ndim == 2 else None, vmin=0, vmax=255, interpolation='nearest')
            t, l, h, w = r.box
            color = 'red' if category == CATEGORY_DISCARD else ('orange' if category == CATEGORY_HARD else 'lime')
            ax.add_patch(plt.Rectangle((l - 0.5, t - 0.5), w, h, fill=False, edgecolor=color, linewidth=1.5))
            ax.set_title(f'm={r.max_prob:.2f} {name(r.predicted)}\nGT {name(r.target)}', fontsize=7)
    m = bank.manifest
    fig.suptitle(f'{m.teacher.model} on {m.dataset.name or "(folder)"} [{m.dataset.split}]: '
                 f'random regions per FerKD category', fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return gallery
