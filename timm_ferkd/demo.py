"""The Fashion-MNIST demo: teacher -> bank -> students (plain, FKD, FerKD) -> table and plot.

Every step runs the real command line (``train_ferkd.py`` and ``timm-ferkd``) in a subprocess, so the
demo is also a worked example of the commands a user types. The teacher sees more images than the
students, as a large pretrained teacher does in practice: that knowledge is what its labels pass on.
"""
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

from timm_ferkd.data.fashion_mnist import ensure_fashion_mnist
from timm_ferkd.errors import FerKDError

__all__ = ['DemoConfig', 'run_demo']


@dataclass
class DemoConfig:
    """Demo sizes and the settings ``benchmarks/accuracy.py`` chose on the validation split.

    Args:
        output: Directory for data, bank, runs, table and plot.
        data_dir: Fashion-MNIST data directory (default: ``output/data``).
        images: Student training images (the first N of the 60k): few, where a teacher helps most.
        val_images: Validation split: the last N training images, on which no model trains (the teacher
            picks its best epoch there); students are evaluated once, on the whole test split.
        teacher: timm teacher model.
        student: timm student model.
        teacher_epochs: Teacher training epochs, on the training images outside the validation split.
        teacher_images: Teacher training images, the first N (0: every image outside the validation split).
        epochs: Offline student epochs; plain training gets ``epochs * num_crops`` (the same steps).
        regions: Regions labelled per image.
        num_crops: Crops replayed per decoded image.
        batch_size: Crops per step.
        plain_lr: Plain training's learning rate.
        offline_lr: FKD's and FerKD's learning rate.
        calib: FerKD calibration quantiles ``low,mid,top``.
        selfmix_prob: SelfMix probability per step (Mixup 0.8 / CutMix 1.0).
        workers: Data loading workers.
        seed: Seed of everything.
    """
    output: str = 'demo-output'
    data_dir: str = ''
    images: int = 4000
    val_images: int = 5000
    teacher: str = 'test_resnet'
    student: str = 'test_resnet'
    teacher_epochs: int = 4
    teacher_images: int = 0
    epochs: int = 4
    regions: int = 24
    num_crops: int = 4
    batch_size: int = 128
    plain_lr: float = 0.2
    offline_lr: float = 0.4
    calib: str = '0.1,0.1,0.9'
    selfmix_prob: float = 0.25
    workers: int = 2
    seed: int = 0


def _run(step: str, cmd: Sequence[str], log: Path) -> None:
    print(f'\n=== {step}\n$ {" ".join(shlex.quote(c) for c in cmd)}', flush=True)
    start = time.perf_counter()
    with open(log, 'w') as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            f.write(line)
            # progress for the user: the log lines of training and the summary lines of the tools
            if line.startswith(('train epoch', 'epoch ', 'labelled', '***', 'timm-ferkd', 'train_ferkd')) \
                    or 'error' in line.lower():
                print('   ' + line.rstrip(), flush=True)
        proc.wait()
    if proc.returncode != 0:
        raise FerKDError(f'demo step "{step}" failed (exit {proc.returncode}); see {log}')
    print(f'   done in {time.perf_counter() - start:.0f}s', flush=True)


def run_demo(cfg: DemoConfig) -> List[dict]:
    """Run the whole pipeline and print a table of top-1 per method.

    Args:
        cfg: Demo sizes and settings.

    Returns:
        One row per student: method, final and best top-1 on the test split.
    """
    from timm_ferkd.runs import load_run, plot_runs
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(cfg.data_dir or out / 'data')
    print(f'preparing Fashion-MNIST in {data_dir}', flush=True)
    ensure_fashion_mnist(data_dir, download=True)
    runs, logs = out / 'runs', out / 'logs'
    logs.mkdir(exist_ok=True)
    py = sys.executable
    holdout = 60000 - cfg.val_images
    teacher_images = min(cfg.teacher_images or holdout, holdout)
    common = ['--data-dir', str(data_dir), '--dataset', 'torch/fashion_mnist', '--num-classes', '10',
              '--input-size', '1', '28', '28', '-j', str(cfg.workers), '--seed', str(cfg.seed), '--output', str(runs),
              '--log-interval', '40', '--opt', 'sgd', '--weight-decay', '5e-4', '--sched', 'cosine',
              '--sched-on-updates', '--warmup-epochs', '0', '--checkpoint-hist', '1']
    start = time.perf_counter()

    teacher_dir = runs / 'teacher'
    if not (teacher_dir / 'model_best.pth.tar').is_file():
        _run('1/5 train the teacher', [
            py, '-m', 'train_ferkd', *common, '--model', cfg.teacher, '--experiment', 'teacher',
            '--train-subset', str(teacher_images), '--val-split', f'train[{holdout}:]',
            '--epochs', str(cfg.teacher_epochs),
            '-b', str(cfg.batch_size),
            # no label smoothing: it flattens the teacher's probabilities, which is what students learn from
            '--lr', '0.1', '--scale', '0.35', '1', '--smoothing', '0'], logs / 'teacher.log')
    bank = out / 'bank'
    _run('2/5 label regions with the teacher (soft-label bank)', [
        py, '-m', 'timm_ferkd', 'generate', '--model', cfg.teacher, '--checkpoint',
        str(teacher_dir / 'model_best.pth.tar'), '--num-classes', '10', '--in-chans', '1',
        '--dataset', 'torch/fashion_mnist', '--data-dir', str(data_dir), '--num-images', str(cfg.images),
        '--regions', str(cfg.regions), '--input-size', '1', '28', '28', '--scale', '0.35', '1',
        '--seed', str(cfg.seed), '-j', str(cfg.workers), '-b', '512', '--images-per-shard', '2000',
        '--output', str(bank)], logs / 'generate.log')
    _run('   inspect the bank', [py, '-m', 'timm_ferkd', 'inspect', str(bank), '--plot', str(out / 'bank_max_prob.png')],
         logs / 'inspect.log')
    print((logs / 'inspect.log').read_text(), flush=True)

    low, mid, top = cfg.calib.split(',')
    test = ['--val-split', 'test', '--model', cfg.student, '-b', str(cfg.batch_size)]
    offline = ['--soft-labels', str(bank), '--num-crops', str(cfg.num_crops), '--epochs', str(cfg.epochs),
               '--lr', str(cfg.offline_lr)]
    methods = [
        ('plain', 'supervised, RandomResizedCrop, label smoothing 0.1',
         ['--train-subset', str(cfg.images), '--epochs', str(cfg.epochs * cfg.num_crops), '--val-interval',
          str(cfg.num_crops), '--scale', '0.35', '1', '--lr', str(cfg.plain_lr)]),
        ('fkd', 'FKD: soft CE on stored region labels', [*offline, '--distill-loss', 'soft_ce']),
        ('ferkd', f'FerKD: calibration (quantiles {cfg.calib}) + SelfMix p={cfg.selfmix_prob:g}',
         [*offline, '--distill-loss', 'ferkd', '--calib-quantile', '--calib-low', low, '--calib-mid', mid,
          '--calib-top', top, '--selfmix', '0.8', '--selfmix-cutmix', '1.0', '--selfmix-prob', str(cfg.selfmix_prob)]),
    ]
    for i, (name, _, flags) in enumerate(methods):
        shutil.rmtree(runs / name, ignore_errors=True)  # a rerun replaces the student runs
        _run(f'{3 + i}/5 train the student: {name}',
             [py, '-m', 'train_ferkd', *common, *test, '--experiment', name, *flags], logs / f'{name}.log')

    loaded = [load_run(runs / name) for name, _, _ in methods]
    plot = out / 'convergence.png'
    plot_runs(loaded, plot, x='crops', title=f'{cfg.student} on Fashion-MNIST ({cfg.images} images), seed {cfg.seed}')
    teacher_run = load_run(teacher_dir)
    rows = [dict(method=name, description=desc, final=r.final_top1, best=r.best_top1)
            for (name, desc, _), r in zip(methods, loaded)]
    lines = [f'Fashion-MNIST demo: student {cfg.student} on {cfg.images} training images, teacher {cfg.teacher} '
             f'(validation top-1 {teacher_run.best_top1:.2f}, trained on {teacher_images} images), '
             f'{cfg.epochs * cfg.num_crops} crops seen per image, the same optimizer steps for every method, '
             f'top-1 on the 10,000 test images',
             f'{"method":<8} {"final top-1":>11} {"best top-1":>10}  description']
    lines += [f'{r["method"]:<8} {r["final"]:>11.2f} {r["best"]:>10.2f}  {r["description"]}' for r in rows]
    lines.append(f'One seed ({cfg.seed}): differences under about 0.5 points are within seed-to-seed noise; '
                 f'docs/benchmarks.md has the 5-seed comparison (benchmarks/accuracy.py).')
    lines.append(f'plot: {plot}   bank histogram: {out / "bank_max_prob.png"}   '
                 f'total time {time.perf_counter() - start:.0f}s')
    table = '\n'.join(lines)
    (out / 'results.txt').write_text(table + '\n')
    print('\n' + table, flush=True)
    return rows
