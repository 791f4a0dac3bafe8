"""Training runs on disk: read ``summary.csv`` + ``args.yaml`` and plot convergence curves."""
import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from timm_ferkd.errors import ConfigError

__all__ = ['Run', 'load_run', 'plot_runs']


@dataclass
class Run:
    """One training run: its name, per-epoch metrics and crops per image per epoch.

    Attributes:
        name: Experiment name (the run directory's name).
        path: Run directory.
        metrics: Column name -> values per epoch (``epoch``, ``train_loss``, ``eval_top1``, ...).
        crops_per_image: Crops of each image per epoch (``--num-crops`` for offline runs, else 1).
    """
    name: str
    path: Path
    metrics: Dict[str, List[float]] = field(default_factory=dict)
    crops_per_image: int = 1

    @property
    def best_top1(self) -> float:
        return max(self.metrics.get('eval_top1', [float('nan')]))

    @property
    def final_top1(self) -> float:
        return self.metrics.get('eval_top1', [float('nan')])[-1]


def load_run(path: os.PathLike) -> Run:
    """Read a ``train_ferkd.py`` output directory.

    Args:
        path: Directory holding ``summary.csv`` (and ``args.yaml``).

    Returns:
        The run.
    """
    path = Path(path)
    summary = path / 'summary.csv'
    if not summary.is_file():
        raise ConfigError(f'{path} has no summary.csv: pass output directories of train_ferkd.py runs')
    metrics: Dict[str, List[float]] = {}
    with open(summary, newline='') as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                try:
                    metrics.setdefault(key, []).append(float(value))
                except (TypeError, ValueError):
                    pass
    crops = 1
    args_path = path / 'args.yaml'
    if args_path.is_file():
        args = yaml.safe_load(args_path.read_text()) or {}
        if args.get('soft_labels'):
            crops = int(args.get('num_crops', 1))
    return Run(name=path.name, path=path, metrics=metrics, crops_per_image=crops)


def plot_runs(runs: Sequence[Run], output: os.PathLike, x: str = 'epoch', title: Optional[str] = None) -> None:
    """Plot validation top-1 and training loss of several runs side by side (needs matplotlib).

    Args:
        runs: The runs.
        output: PNG file to write.
        x: ``'epoch'`` or ``'crops'`` (crops seen per image: epochs x crops per image, the fair axis when
            offline runs replay several crops per decoded image).
        title: Figure title.
    """
    from timm_ferkd.bank.summary import pyplot
    if x not in ('epoch', 'crops'):
        raise ConfigError(f'--x {x!r} must be epoch or crops')
    plt = pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        epochs = [e + 1 for e in run.metrics.get('epoch', [])]
        xs = [e * run.crops_per_image for e in epochs] if x == 'crops' else epochs
        if 'eval_top1' in run.metrics:
            ax_acc.plot(xs, run.metrics['eval_top1'], marker='o', markersize=3, label=run.name)
        if 'train_loss' in run.metrics:
            ax_loss.plot(xs, run.metrics['train_loss'], marker='o', markersize=3, label=run.name)
    xlabel = 'epochs' if x == 'epoch' else 'crops seen per image'
    ax_acc.set(xlabel=xlabel, ylabel='validation top-1 (%)', title='accuracy')
    ax_loss.set(xlabel=xlabel, ylabel='training loss', title='loss (objectives differ between methods)')
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
