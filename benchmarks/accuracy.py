#!/usr/bin/env python3
"""Accuracy on Fashion-MNIST at equal crops seen: plain, online KD and the offline methods, over seeds.

Every run is the real command line, ``train_ferkd.py`` (and ``timm-ferkd generate``) in a subprocess,
like ``timm-ferkd demo``: a teacher is trained (or reused with ``--teacher-dir``), it labels
``--regions`` regions of every training image (or ``--bank`` is reused), then the student trains once
per method and seed. Offline methods train ``--epochs`` epochs with ``--num-crops`` crops per decoded
image; plain and online KD train ``num_crops x epochs`` epochs of one crop, so every method sees the
same number of crops per image.

Methods (``--methods``, all by default):

==============  ========  ==============================================================================
plain           plain     ground truth, RandomResizedCrop, label smoothing 0.1
online_kd       online    teacher in the loop, timm's ``LogitDistillationTask`` (``--kd-temperature``)
fkd             offline   FKD: soft CE on the stored region labels
ferkd           offline   FerKD calibration only (``--calib-*`` thresholds, no SelfMix)
ferkd_selfmix   offline   FerKD calibration + SelfMix (Mixup 0.8 / CutMix 1.0, p 0.5)
prob_shift      offline   FKD labels after the probability shift
dtd             offline   dynamic temperature distillation on the stored labels (+ CE)
fnkd            offline   FNKD on the stored labels (+ CE); the student side is feature-normalised,
                          the teacher side is the stored softmax (a standard bank keeps no teacher norms)
==============  ========  ==============================================================================

Prints best and final top-1 (mean and std over ``--seeds``) per method, writes ``results.md`` and the
convergence plot ``convergence.png`` (mean curve per method, x = crops seen per image) to ``--output``.

Usage::

    python benchmarks/accuracy.py                                   # ~30-40 min on 2 CPU cores
    python benchmarks/accuracy.py --teacher-dir demo-output/runs/teacher --bank demo-output/bank
    python benchmarks/accuracy.py --device cuda --images 60000 --epochs 10 --workers 8
    python benchmarks/accuracy.py --smoke --output /tmp/acc          # seconds per run, for CI
"""
import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from train_throughput import machine_facts

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Method:
    """One row of the comparison: a name, a description, a mode and its extra train_ferkd.py flags."""
    name: str
    mode: str  # 'plain' | 'online' | 'offline'
    description: str
    flags: List[str] = field(default_factory=list)


def methods_for(args: argparse.Namespace) -> Dict[str, Method]:
    """All methods, with the calibration thresholds and temperatures of ``args``."""
    calib = ['--calib-low', str(args.calib_low), '--calib-mid', str(args.calib_mid), '--calib-top', str(args.calib_top)]
    if args.calib_quantile:
        calib.append('--calib-quantile')
    selfmix = ['--selfmix', '0.8', '--selfmix-cutmix', '1.0', '--selfmix-prob', '0.5']
    rows = [
        Method('plain', 'plain', 'supervised, RandomResizedCrop, label smoothing 0.1'),
        Method('online_kd', 'online', 'online KD, teacher in the loop (timm LogitDistillationTask)',
               ['--kd-loss', 'kd', '--kd-temperature', str(args.kd_temperature)]),
        Method('fkd', 'offline', 'FKD: soft CE on stored region labels', ['--distill-loss', 'soft_ce']),
        Method('ferkd', 'offline', 'FerKD: region calibration only', ['--distill-loss', 'ferkd', *calib]),
        Method('ferkd_selfmix', 'offline', 'FerKD: region calibration + SelfMix',
               ['--distill-loss', 'ferkd', *calib, *selfmix]),
        Method('prob_shift', 'offline', 'FKD labels with probability shift',
               ['--distill-loss', 'soft_ce', '--prob-shift']),
        Method('dtd', 'offline', 'dynamic temperature distillation (stored labels)', ['--distill-loss', 'dtd']),
        Method('fnkd', 'offline', 'FNKD, student feature-normalised (stored labels)', ['--distill-loss', 'fnkd']),
    ]
    return {m.name: m for m in rows}


def run_logged(step: str, cmd: Sequence[str], log: Path, threads: int = 0) -> float:
    """Run ``cmd`` with its output in ``log``; exit with the log's tail if it fails. Returns seconds."""
    print(f'=== {step}\n$ {" ".join(shlex.quote(str(c)) for c in cmd)}', flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    start = time.perf_counter()
    with open(log, 'w') as f:
        result = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        print('\n'.join(tail), file=sys.stderr)
        raise SystemExit(f'accuracy.py: step "{step}" failed (exit {result.returncode}); full log: {log}')
    print(f'    done in {seconds:.0f}s', flush=True)
    return seconds


def completed(run_dir: Path, epochs: int) -> bool:
    """Whether ``run_dir`` holds a finished run of ``epochs`` epochs (so a rerun can skip it)."""
    summary = run_dir / 'summary.csv'
    return summary.is_file() and len(summary.read_text().strip().splitlines()) == epochs + 1


def check_reuse(out: Path, args: argparse.Namespace) -> None:
    """Finished runs in ``out`` are reused; refuse if they were made with other sizes or settings.

    Seeds and methods may change between invocations (more seeds, more methods): they add runs.
    """
    keys = ('images', 'val_images', 'epochs', 'num_crops', 'regions', 'scale', 'teacher', 'teacher_epochs',
            'teacher_dir', 'bank', 'student', 'batch_size', 'lr', 'kd_temperature', 'calib_low', 'calib_mid',
            'calib_top', 'calib_quantile', 'device', 'amp')
    config = json.loads(json.dumps({k: getattr(args, k) for k in keys}))
    path = out / 'benchmark-config.json'
    if path.is_file():
        previous = json.loads(path.read_text())
        diff = sorted(k for k in config if previous.get(k) != config[k])
        if diff:
            raise SystemExit(f'accuracy.py: {out} holds runs made with other settings ({", ".join(diff)} differ); '
                             f'choose another --output or remove it')
    path.write_text(json.dumps(config, indent=2))


def common_flags(args: argparse.Namespace, runs: Path) -> List[str]:
    """train_ferkd.py flags every run shares (data, input, optimiser, schedule, output)."""
    return ['--data-dir', args.data_dir, '--dataset', 'torch/fashion_mnist', '--num-classes', '10',
            '--input-size', '1', '28', '28', '--val-subset', str(args.val_images), '-j', str(args.workers),
            '--device', args.device, '--output', str(runs), '--log-interval', '50', '--opt', 'sgd',
            '--weight-decay', '5e-4', '--sched', 'cosine', '--warmup-epochs', '0', '--checkpoint-hist', '1',
            *(['--amp', '--amp-dtype', 'bfloat16'] if args.amp else [])]


def prepare_teacher(args: argparse.Namespace, runs: Path, logs: Path) -> Path:
    """The teacher checkpoint: ``--teacher-dir``'s (or file), else train one."""
    if args.teacher_dir:
        path = Path(args.teacher_dir)
        checkpoint = path / 'model_best.pth.tar' if path.is_dir() else path
        if not checkpoint.is_file():
            raise SystemExit(f'accuracy.py: --teacher-dir {path} has no model_best.pth.tar')
        args_yaml = checkpoint.parent / 'args.yaml'
        if args_yaml.is_file():
            import yaml
            model = (yaml.safe_load(args_yaml.read_text()) or {}).get('model')
            if model and model != args.teacher:
                print(f'using teacher model {model} from {args_yaml} (instead of --teacher {args.teacher})')
                args.teacher = model
        return checkpoint
    run = runs / 'teacher'
    if not completed(run, args.teacher_epochs):
        shutil.rmtree(run, ignore_errors=True)
        run_logged('train the teacher', [
            sys.executable, REPO / 'train_ferkd.py', *common_flags(args, runs), '--model', args.teacher,
            '--experiment', 'teacher', '--train-subset', str(args.images), '--epochs', str(args.teacher_epochs),
            '-b', str(args.batch_size), '--lr', '0.1', '--scale', *map(str, args.scale), '--smoothing', '0.1',
            '--seed', '0'], logs / 'teacher.log', args.threads)
    return run / 'model_best.pth.tar'


def prepare_bank(args: argparse.Namespace, teacher: Path, out: Path, logs: Path) -> Path:
    """The soft-label bank: ``--bank``, else label ``--regions`` regions of every image with the teacher."""
    if args.bank:
        from timm_ferkd.bank.reader import open_bank
        bank = open_bank(args.bank)
        if bank.manifest.num_images != args.images:
            print(f'the bank labels {bank.manifest.num_images} images: every method trains on those '
                  f'(instead of --images {args.images})')
            args.images = bank.manifest.num_images
        if args.teacher_dir is None and 'online_kd' in args.methods:
            print('warning: --bank without --teacher-dir: online KD uses a newly trained teacher, not the bank\'s')
        return Path(args.bank)
    if not (out / 'manifest.json').is_file():
        shutil.rmtree(out, ignore_errors=True)
        run_logged('label regions with the teacher (soft-label bank)', [
            sys.executable, '-m', 'timm_ferkd', 'generate', '--model', args.teacher, '--checkpoint', teacher,
            '--num-classes', '10', '--in-chans', '1', '--dataset', 'torch/fashion_mnist', '--data-dir', args.data_dir,
            '--num-images', str(args.images), '--regions', str(args.regions), '--input-size', '1', '28', '28',
            '--scale', *map(str, args.scale), '--seed', '0', '-j', str(args.workers), '-b', '512',
            '--device', args.device, '--no-progress', '--images-per-shard', '2000', '--output', out],
            logs / 'generate.log', args.threads)
    return out


def train_flags(method: Method, args: argparse.Namespace, bank: Path, teacher: Path) -> List[str]:
    """Flags of one method: offline methods E epochs x num_crops crops, the others num_crops x E epochs."""
    if method.mode == 'offline':
        return ['--soft-labels', str(bank), '--num-crops', str(args.num_crops), '--epochs', str(args.epochs),
                *method.flags]
    flags = ['--train-subset', str(args.images), '--epochs', str(args.epochs * args.num_crops),
             '--scale', *map(str, args.scale)]
    if method.mode == 'online':
        flags += ['--kd-model-name', args.teacher, '--kd-checkpoint', str(teacher)]
    return flags + method.flags


def mean_std(values: Sequence[float]) -> str:
    """'mean ± std' (sample std; 0 for one value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f'{mean:.2f} ± {std:.2f}'


def mean_run(name: str, runs: list):
    """A Run whose metrics are the per-epoch mean over seeds (for one curve per method)."""
    from timm_ferkd.runs import Run
    epochs = min(len(r.metrics.get('epoch', [])) for r in runs)
    metrics = {}
    for key in ('epoch', 'eval_top1', 'train_loss'):
        if all(key in r.metrics for r in runs):
            metrics[key] = [sum(r.metrics[key][e] for r in runs) / len(runs) for e in range(epochs)]
    return Run(name=name, path=runs[0].path, metrics=metrics, crops_per_image=runs[0].crops_per_image)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--output', default=None, help='runs, logs, results.md, convergence.png '
                        '(default: accuracy-output; a temp dir with --smoke)')
    parser.add_argument('--data-dir', default=None, help='Fashion-MNIST directory (default: OUTPUT/data, prepared)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast in every run')
    parser.add_argument('--methods', nargs='+', default=None, help='subset of the methods (default: all)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None, help='student seeds (default 0 1 2)')
    parser.add_argument('--images', type=int, default=None, help='training images, the first N (default 2000)')
    parser.add_argument('--val-images', type=int, default=None, help='validation images (default 2000)')
    parser.add_argument('--epochs', type=int, default=None, help='offline epochs E; plain/online get num_crops x E')
    parser.add_argument('--num-crops', type=int, default=4)
    parser.add_argument('--regions', type=int, default=None, help='regions per image in the bank (default 24)')
    parser.add_argument('--scale', type=float, nargs=2, default=(0.35, 1.0),
                        help='RandomResizedCrop scale of the bank regions and of plain/online training')
    parser.add_argument('--teacher', default=None, help='teacher model (default resnet18)')
    parser.add_argument('--teacher-epochs', type=int, default=None, help='teacher training epochs (default 8)')
    parser.add_argument('--teacher-dir', default=None, help='reuse a teacher: a train_ferkd.py run dir or checkpoint')
    parser.add_argument('--bank', default=None, help='reuse a bank made by that teacher (else generated)')
    parser.add_argument('--student', default=None, help='student model (default test_resnet)')
    parser.add_argument('-b', '--batch-size', type=int, default=128, help='crops per step, every run')
    parser.add_argument('--lr', type=float, default=0.2, help='student learning rate, every method')
    parser.add_argument('-j', '--workers', type=int, default=2)
    parser.add_argument('--kd-temperature', type=float, default=1.0, help='online KD temperature')
    parser.add_argument('--calib-low', type=float, default=0.05, help='FerKD T_L (a quantile with --calib-quantile)')
    parser.add_argument('--calib-mid', type=float, default=0.2, help='FerKD T_M')
    parser.add_argument('--calib-top', type=float, default=1.0, help='FerKD T_T')
    parser.add_argument('--calib-quantile', action=argparse.BooleanOptionalAction, default=True,
                        help='read the thresholds as quantiles of the bank\'s max probabilities (default on)')
    parser.add_argument('--threads', type=int, default=0,
                        help='OMP_NUM_THREADS of every run (default 0: torch\'s choice; 1 with --smoke)')
    parser.add_argument('--smoke', action='store_true', help='tiny sizes, one seed, one thread, for CI')
    args = parser.parse_args(argv)
    defaults = dict(images=2000, val_images=2000, epochs=3, regions=24, teacher='resnet18', teacher_epochs=8,
                    student='test_resnet', seeds=[0, 1, 2])
    if args.smoke:
        defaults.update(images=64, val_images=64, epochs=1, regions=8, teacher='test_resnet', teacher_epochs=1,
                        seeds=[0])
        args.batch_size, args.workers = 32, 0
        args.threads = args.threads or 1
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    all_methods = methods_for(args)
    args.methods = args.methods or list(all_methods)
    unknown = [m for m in args.methods if m not in all_methods]
    if unknown:
        raise SystemExit(f'accuracy.py: unknown --methods {unknown}; choose from {", ".join(all_methods)}')

    tmp = None
    if args.output is None and args.smoke:
        tmp = tempfile.TemporaryDirectory(prefix='ferkd-acc-bench-')
    out = Path(tmp.name if tmp else (args.output or 'accuracy-output')).resolve()
    runs, logs = out / 'runs', out / 'logs'
    logs.mkdir(parents=True, exist_ok=True)
    check_reuse(out, args)
    from timm_ferkd.data.fashion_mnist import ensure_fashion_mnist
    args.data_dir = str(ensure_fashion_mnist(Path(args.data_dir) if args.data_dir else out / 'data'))
    start = time.perf_counter()
    facts = machine_facts(torch.device(args.device))
    print(facts, flush=True)

    teacher = prepare_teacher(args, runs, logs)
    bank = prepare_bank(args, teacher, out / 'bank', logs)
    calib = (f'calibration thresholds ({"quantiles" if args.calib_quantile else "absolute"}): '
             f'T_L={args.calib_low}, T_M={args.calib_mid}, T_T={args.calib_top}')
    print(calib, flush=True)

    from timm_ferkd.runs import load_run, plot_runs
    student = ['--model', args.student, '-b', str(args.batch_size), '--lr', str(args.lr)]
    results, seconds = {}, {}
    for name in args.methods:
        method = all_methods[name]
        epochs = args.epochs if method.mode == 'offline' else args.epochs * args.num_crops
        results[name], seconds[name] = [], []
        for seed in args.seeds:
            exp = f'{name}-s{seed}'
            if not completed(runs / exp, epochs):
                shutil.rmtree(runs / exp, ignore_errors=True)
                seconds[name].append(run_logged(f'{exp}: {method.description}', [
                    sys.executable, REPO / 'train_ferkd.py', *common_flags(args, runs), *student,
                    '--experiment', exp, '--seed', str(seed), *train_flags(method, args, bank, teacher)],
                    logs / f'{exp}.log', args.threads))
            results[name].append(load_run(runs / exp))

    teacher_top1 = load_run(teacher.parent).best_top1 if (teacher.parent / 'summary.csv').is_file() else float('nan')
    crops_seen = args.epochs * args.num_crops
    header = (f'Fashion-MNIST: student {args.student}, teacher {args.teacher} (top-1 {teacher_top1:.2f}), '
              f'{args.images} training images, {crops_seen} crops seen per image, {args.val_images} validation '
              f'images, bank of {args.regions} regions per image, seeds {" ".join(map(str, args.seeds))}')
    rows = []
    for name in args.methods:
        method, loaded = all_methods[name], results[name]
        wall = f'{sum(seconds[name]) / len(seconds[name]):.0f}' if seconds[name] else 'reused'
        rows.append((name, method.mode, f'{args.epochs if method.mode == "offline" else crops_seen} x '
                     f'{args.num_crops if method.mode == "offline" else 1}',
                     mean_std([r.best_top1 for r in loaded]), mean_std([r.final_top1 for r in loaded]), wall,
                     method.description))
    plain_best = [r.best_top1 for r in results['plain']] if 'plain' in results else None
    columns = ('method', 'mode', 'epochs x crops', 'best top-1', 'final top-1', 's/run', 'description')
    print(f'\n{header}\n{calib}')
    print(f'{columns[0]:<14} {columns[1]:<8} {columns[2]:>14} {columns[3]:>14} {columns[4]:>14} {columns[5]:>6}'
          f' {"vs plain":>9}  {columns[6]}')
    for row in rows:
        best = [r.best_top1 for r in results[row[0]]]
        delta = f'{sum(best) / len(best) - sum(plain_best) / len(plain_best):+.2f}' if plain_best else 'n/a'
        print(f'{row[0]:<14} {row[1]:<8} {row[2]:>14} {row[3]:>14} {row[4]:>14} {row[5]:>6} {delta:>9}  {row[6]}')

    plot = out / 'convergence.png'
    try:
        plot_runs([mean_run(name, results[name]) for name in args.methods], plot, x='crops',
                  title=f'{args.student} on Fashion-MNIST, mean of {len(args.seeds)} seed(s)')
    except Exception as e:  # matplotlib missing: the table is the result, the plot a courtesy
        plot = None
        print(f'no plot: {e}')
    table = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    table += ['| ' + ' | '.join(row) + ' |' for row in rows]
    md = '\n'.join(['# Accuracy at equal crops seen\n', header + '.', '', calib + '.', '', facts, '', *table, '',
                    f'Best / final top-1: mean ± std over seeds. Plot: {plot.name if plot else "none"}.', ''])
    (out / 'results.md').write_text(md)
    print(f'results: {out / "results.md"}   plot: {plot}   total {time.perf_counter() - start:.0f}s', flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main())
