"""Bank statistics: size, max-probability histogram (FerKD's Figure 2 analogue), teacher accuracy."""
import os
from typing import Any, Dict, Optional

import numpy as np

from timm_ferkd.bank.reader import SoftLabelBank

from timm_ferkd.errors import ConfigError

__all__ = ['summarize_bank', 'plot_max_prob_histogram', 'pyplot']


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend; ``ConfigError`` naming the extra when it is missing."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError('plotting needs matplotlib: pip install "timm-ferkd[plot]"') from None
    return plt


def summarize_bank(bank: SoftLabelBank, bins: int = 20) -> Dict[str, Any]:
    """Everything ``timm-ferkd inspect`` reports, as a JSON-ready dictionary.

    Args:
        bank: The bank.
        bins: Number of equal-width max-probability bins over [0, 1].

    Returns:
        Manifest summary plus ``bytes_on_disk``, ``bytes_per_region``, ``max_prob_histogram``
        (``{"edges": [...], "counts": [...]}``), ``max_prob_quantiles`` and ``argmax_correct_fraction``.
    """
    m = bank.manifest
    max_probs = bank.all_max_probs()
    counts, edges = np.histogram(max_probs, bins=bins, range=(0.0, 1.0))
    argmax = bank.all_top_classes()
    targets = np.concatenate([np.asarray(bank._shard(s).arrays['targets'], dtype=np.int64)
                              for s in range(len(m.shards))])
    correct, total = int((argmax == targets[:, None]).sum()), argmax.size
    regions = m.num_images * m.regions_per_image
    size = bank.bytes_on_disk()
    return {
        'path': str(bank.path),
        'format_version': m.format_version,
        'num_images': m.num_images,
        'regions_per_image': m.regions_per_image,
        'topk': m.topk,
        'num_classes': m.num_classes,
        'label_type': m.label_type,
        'value_dtype': m.value_dtype,
        'index_dtype': m.index_dtype,
        'temperature': m.temperature,
        'seed': m.seed,
        'scale': list(m.scale),
        'ratio': list(m.ratio),
        'teacher': m.teacher.model,
        'dataset': f'{m.dataset.name or "(folder)"} [{m.dataset.split}]',
        'num_shards': len(m.shards),
        'bytes_on_disk': size,
        'bytes_per_region': size / regions,
        'max_prob_histogram': {'edges': edges.round(4).tolist(), 'counts': counts.tolist()},
        'max_prob_quantiles': {str(q): float(np.quantile(max_probs, q)) for q in (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)},
        'argmax_correct_fraction': correct / max(total, 1),
    }


def plot_max_prob_histogram(summary: Dict[str, Any], output: os.PathLike, title: Optional[str] = None) -> None:
    """Write the max-probability histogram as a PNG (needs matplotlib: ``pip install timm-ferkd[plot]``)."""
    plt = pyplot()
    hist = summary['max_prob_histogram']
    edges, counts = np.asarray(hist['edges']), np.asarray(hist['counts'])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(edges[:-1], counts / max(counts.sum(), 1), width=np.diff(edges), align='edge', edgecolor='black')
    ax.set_xlabel('region max probability (teacher confidence)')
    ax.set_ylabel('fraction of regions')
    ax.set_title(title or f'{summary["teacher"]} on {summary["dataset"]}')
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
