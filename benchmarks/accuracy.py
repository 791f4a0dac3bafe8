#!/usr/bin/env python3
"""Accuracy at equal optimizer steps: plain, online KD and the offline methods, settings chosen on validation.

Every run is the real command line, ``train_ferkd.py`` (and ``timm-ferkd generate``) in a subprocess.
The protocol keeps the test set out of every choice:

1. **Split.** The last ``--val-images`` training images are the validation split (``train[N-V:]``): no
   teacher, bank or student trains on them. The test split is used only in step 4.
2. **Teacher and banks.** A teacher trains on the other training images (or ``--teacher-dir`` is
   reused); it labels ``--regions`` regions of the first ``--images`` training images (the students'
   images) into a bank, and into a second bank with ``--fnkd-tau`` for FNKD.
3. **Selection, on the validation split** (``--select-seeds``): the learning rate of plain and of FKD
   from ``--lr-grid`` (online KD uses plain's, the other offline methods FKD's); FerKD's calibration quantiles from ``--calib-grid`` (at FKD's LR);
   SelfMix's probability from ``--selfmix-grid`` (at the chosen calibration).
4. **Test**, once, with the chosen settings, ``--seeds`` seeds per method: final and best top-1 on the
   whole test split, the paired difference to plain per seed (mean ± standard error), and the step at
   which each method's mean curve first reaches FKD's final top-1.

Fairness: every method makes the same optimizer steps with the same per-update cosine schedule, batch
and crops seen per image. Offline methods train ``--epochs`` epochs of ``--num-crops`` crops per decoded
image, spread so that every step holds ``-b`` distinct images; plain and online KD train
``num_crops x epochs`` epochs of one crop. Validation runs every offline epoch and every ``num_crops``
plain epochs, so the curves have the same points.

Methods: plain (label smoothing 0.1), online_kd (timm ``LogitDistillationTask``, T = 1, its default CE
weight), fkd (soft CE on stored labels), ferkd (calibration), ferkd_selfmix (calibration + SelfMix),
fkd_uint8 (FKD from an 8-bit bank of the same regions), prob_shift (FKD labels after the probability shift), dtd (dynamic temperature, no CE term),
fnkd (bank generated with ``--fnkd-tau``, student feature-normalised, + CE).

Usage::

    python benchmarks/accuracy.py --output accuracy-output                  # Fashion-MNIST, ~1.5 h on 2 CPUs
    python benchmarks/accuracy.py --dataset cluttered --output acc-cluttered
    python benchmarks/accuracy.py --smoke                                   # seconds per run, for CI
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
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from train_throughput import machine_facts

REPO = Path(__file__).resolve().parent.parent

DATASETS = {
    # name: (timm dataset name, input size, training images in the split)
    'fashion_mnist': ('torch/fashion_mnist', 28, 60000),
    'cluttered': ('ferkd-cluttered/fashion_mnist', 64, 60000),
}


@dataclass
class Method:
    """One row of the comparison: a name, a mode and its extra train_ferkd.py flags."""
    name: str
    mode: str  # 'plain' | 'online' | 'offline'
    description: str
    flags: List[str] = field(default_factory=list)
    bank: str = 'bank'


def calib_flags(spec: str) -> List[str]:
    """``'low,mid,top'`` quantiles -> train_ferkd.py flags (``'0,0,1'`` keeps every region: FKD)."""
    low, mid, top = (float(v) for v in spec.split(','))
    return ['--calib-quantile', '--calib-low', str(low), '--calib-mid', str(mid), '--calib-top', str(top)]


def selfmix_flags(prob: float) -> List[str]:
    return ['--selfmix', '0.8', '--selfmix-cutmix', '1.0', '--selfmix-prob', str(prob)]


def methods_for(calib: str, selfmix_prob: float) -> Dict[str, Method]:
    """All methods, with the chosen calibration and SelfMix probability."""
    rows = [
        Method('plain', 'plain', 'supervised, RandomResizedCrop, label smoothing 0.1'),
        Method('online_kd', 'online', 'online KD, teacher in the loop (timm LogitDistillationTask, T=1)',
               ['--kd-loss', 'kd', '--kd-temperature', '1']),
        Method('fkd', 'offline', 'FKD: soft CE on stored region labels', ['--distill-loss', 'soft_ce']),
        Method('fkd_uint8', 'offline', 'FKD from the same teacher\'s 8-bit bank (generate --value-dtype uint8)',
               ['--distill-loss', 'soft_ce'], bank='bank-uint8'),
        Method('ferkd', 'offline', f'FerKD: calibration (quantiles {calib})',
               ['--distill-loss', 'ferkd', *calib_flags(calib)]),
        Method('ferkd_selfmix', 'offline', f'FerKD: calibration + SelfMix p={selfmix_prob}',
               ['--distill-loss', 'ferkd', *calib_flags(calib), *selfmix_flags(selfmix_prob)]),
        Method('prob_shift', 'offline', 'FKD labels after the probability shift',
               ['--distill-loss', 'soft_ce', '--prob-shift']),
        Method('dtd', 'offline', 'dynamic temperature distillation, no CE term', ['--distill-loss', 'dtd']),
        Method('fnkd', 'offline', 'FNKD: bank of softmax(tau z/||f||), student normalised, + CE',
               ['--distill-loss', 'fnkd'], bank='bank-fnkd'),
    ]
    return {m.name: m for m in rows}


class Bench:
    """Runs, caches and reads the benchmark's training runs."""

    def __init__(self, args: argparse.Namespace, out: Path):
        self.args = args
        self.out = out
        self.runs = out / 'runs'
        self.logs = out / 'logs'
        self.logs.mkdir(parents=True, exist_ok=True)
        self.dataset, self.size, train_images = DATASETS[args.dataset]
        if args.dataset == 'cluttered' and args.clutter:
            self.dataset += ':' + args.clutter
            params = dict(kv.split('=', 1) for kv in args.clutter.split(','))
            self.size = int(params.get('canvas', self.size))
        self.holdout = train_images - args.val_images
        self.val_split = f'train[{self.holdout}:]'
        self.seconds: Dict[str, float] = {}

    def run(self, step: str, cmd: Sequence[str], log: Path) -> float:
        """Run ``cmd`` with its output in ``log``; exit with the log's tail if it fails."""
        print(f'=== {step}\n$ {" ".join(shlex.quote(str(c)) for c in cmd)}', flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.args.threads)) if self.args.threads else None
        start = time.perf_counter()
        with open(log, 'w') as f:
            result = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            print('\n'.join(log.read_text().splitlines()[-30:]), file=sys.stderr)
            raise SystemExit(f'accuracy.py: step "{step}" failed (exit {result.returncode}); full log: {log}')
        print(f'    done in {seconds:.0f}s', flush=True)
        return seconds

    def common(self) -> List[str]:
        a = self.args
        return ['--data-dir', a.data_dir, '--dataset', self.dataset, '--num-classes', '10',
                '--input-size', '1', str(self.size), str(self.size), '-j', str(a.workers), '--device', a.device,
                '--output', str(self.runs), '--log-interval', '100', '--opt', 'sgd', '--weight-decay', '5e-4',
                '--sched', 'cosine', '--sched-on-updates', '--warmup-epochs', '0', '--checkpoint-hist', '1',
                *(['--amp', '--amp-dtype', 'bfloat16'] if a.amp else [])]

    def teacher(self) -> Path:
        a = self.args
        if a.teacher_dir:
            path = Path(a.teacher_dir)
            checkpoint = path / 'model_best.pth.tar' if path.is_dir() else path
            if not checkpoint.is_file():
                raise SystemExit(f'accuracy.py: --teacher-dir {path} has no model_best.pth.tar')
            return checkpoint
        run = self.runs / 'teacher'
        if not completed(run):
            shutil.rmtree(run, ignore_errors=True)
            self.run('train the teacher on the training images outside the validation split', [
                sys.executable, REPO / 'train_ferkd.py', *self.common(), '--model', a.teacher,
                '--experiment', 'teacher', '--train-subset', str(a.teacher_images or self.holdout),
                '--val-split', self.val_split,
                '--epochs', str(a.teacher_epochs), '-b', '128', '--lr', '0.1', '--scale', *map(str, a.scale),
                '--smoothing', '0', '--seed', '0'], self.logs / 'teacher.log')
        return run / 'model_best.pth.tar'

    def bank(self, teacher: Path, name: str, extra: Sequence[str] = ()) -> Path:
        a = self.args
        out = self.out / name
        if not (out / 'manifest.json').is_file():
            shutil.rmtree(out, ignore_errors=True)
            self.run(f'label regions with the teacher ({name})', [
                sys.executable, '-m', 'timm_ferkd', 'generate', '--model', a.teacher, '--checkpoint', teacher,
                '--num-classes', '10', '--in-chans', '1', '--dataset', self.dataset, '--data-dir', a.data_dir,
                '--num-images', str(a.images), '--regions', str(a.regions),
                '--input-size', '1', str(self.size), str(self.size), '--scale', *map(str, a.scale), '--seed', '0',
                '-j', str(a.workers), '-b', '512', '--device', a.device, '--no-progress',
                '--images-per-shard', '2000', *extra, '--output', out], self.logs / f'{name}.log')
        return out

    def train(self, exp: str, method: Method, seed: int, lr: float, validate_on: str, teacher: Path,
              extra: Sequence[str] = ()):
        """One student run (reused when finished); ``validate_on`` is 'val' or 'test'."""
        from timm_ferkd.runs import load_run
        a = self.args
        run_dir = self.runs / exp
        if not completed(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            if method.mode == 'offline':
                flags = ['--soft-labels', str(self.out / method.bank), '--num-crops', str(a.num_crops),
                         '--epochs', str(a.epochs)]
            else:
                # num_crops x the epochs of one crop: the same steps; validated at the offline epochs' steps
                flags = ['--train-subset', str(a.images), '--epochs', str(a.epochs * a.num_crops),
                         '--val-interval', str(a.num_crops), '--scale', *map(str, a.scale)]
                if method.mode == 'online':
                    flags += ['--kd-model-name', a.teacher, '--kd-checkpoint', str(teacher)]
            val = ['--val-split', self.val_split] if validate_on == 'val' else ['--val-split', 'test']
            if a.smoke:
                val += ['--val-subset', '256']
            self.seconds[exp] = self.run(f'{exp}: {method.description}', [
                sys.executable, REPO / 'train_ferkd.py', *self.common(), '--model', a.student,
                '-b', str(a.batch_size), '--lr', str(lr), '--experiment', exp, '--seed', str(seed), *val,
                *flags, *method.flags, *extra], self.logs / f'{exp}.log')
        return load_run(run_dir)


def completed(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run (its last epoch validated and saved)."""
    import yaml
    summary, args_yaml = run_dir / 'summary.csv', run_dir / 'args.yaml'
    if not (summary.is_file() and args_yaml.is_file()):
        return False
    epochs = int((yaml.safe_load(args_yaml.read_text()) or {}).get('epochs', -1))
    rows = summary.read_text().strip().splitlines()[1:]
    return bool(rows) and int(float(rows[-1].split(',')[0])) == epochs - 1


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def std(values: Sequence[float]) -> float:
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def pm(values: Sequence[float]) -> str:
    return f'{mean(values):.2f} ± {std(values):.2f}'


def steps_of(run, steps_per_epoch: int) -> List[int]:
    return [int(e + 1) * steps_per_epoch for e in run.metrics['epoch']]


def check_reuse(out: Path, args: argparse.Namespace) -> None:
    """Finished runs in ``out`` are reused; refuse if they were made with other sizes or settings."""
    keys = ('dataset', 'clutter', 'images', 'val_images', 'epochs', 'num_crops', 'regions', 'scale', 'teacher',
            'teacher_epochs', 'teacher_images', 'teacher_dir', 'student', 'batch_size', 'device', 'amp', 'fnkd_tau')
    config = json.loads(json.dumps({k: getattr(args, k) for k in keys}))
    path = out / 'benchmark-config.json'
    if path.is_file():
        previous = json.loads(path.read_text())
        diff = sorted(k for k in config if previous.get(k) != config[k])
        if diff:
            raise SystemExit(f'accuracy.py: {out} holds runs made with other settings ({", ".join(diff)} differ); '
                             f'choose another --output or remove it')
    path.write_text(json.dumps(config, indent=2))


def select(bench: Bench, teacher: Path) -> Tuple[Dict[str, float], str, float, List[str]]:
    """Step 3: LRs, calibration and SelfMix strength, chosen on the validation split. Returns them and a report."""
    a = bench.args
    report = [f'## Selection on the validation split ({bench.val_split}, seeds {" ".join(map(str, a.select_seeds))})',
              '', 'Final validation top-1, mean over the selection seeds.', '']
    base = methods_for('0,0,1', 0.5)
    lrs: Dict[str, float] = {}
    report += ['| method | ' + ' | '.join(f'lr {lr:g}' for lr in a.lr_grid) + ' | chosen |',
               '|---|' + '---|' * (len(a.lr_grid) + 1)]
    for name in [n for n in ('plain', 'fkd') if n in a.methods or n == 'fkd']:
        scores = {}
        for lr in a.lr_grid:
            scores[lr] = mean([bench.train(f'sel-{name}-lr{lr:g}-s{s}', base[name], s, lr, 'val', teacher).final_top1
                               for s in a.select_seeds])
        lrs[name] = max(scores, key=scores.get)
        if name == 'fkd':
            fkd_scores = scores
        report.append(f'| {name} | ' + ' | '.join(f'{scores[lr]:.2f}' for lr in a.lr_grid) + f' | {lrs[name]:g} |')
    offline_lr = lrs['fkd']
    report += ['', f'FerKD calibration (quantiles low,mid,top; at FKD\'s LR {offline_lr:g}): `0,0,1` keeps every '
               f'region (FKD); regions below the low and above the top quantile are discarded, those between '
               f'low and mid get the ground truth smoothed by eps 0.1.', '',
               '| quantiles | val top-1 | vs FKD |', '|---|---|---|']
    fkd_val = None
    calib_scores = {}
    for spec in a.calib_grid:
        if spec == '0,0,1':  # no calibration: the FKD runs at that LR
            calib_scores[spec] = fkd_val = fkd_scores[offline_lr]
            continue
        method = Method('ferkd', 'offline', f'FerKD calibration {spec}', ['--distill-loss', 'ferkd', *calib_flags(spec)])
        tag = spec.replace(',', '_')
        calib_scores[spec] = mean([bench.train(f'sel-ferkd-{tag}-s{s}', method, s, offline_lr, 'val', teacher).final_top1
                                   for s in a.select_seeds])
    fkd_val = fkd_scores[offline_lr] if fkd_val is None else fkd_val
    calib = max((s for s in a.calib_grid if s != '0,0,1'), key=calib_scores.get, default=a.calib_grid[0])
    for spec in a.calib_grid:
        mark = ' (chosen)' if spec == calib else ''
        report.append(f'| `{spec}`{mark} | {calib_scores[spec]:.2f} | {calib_scores[spec] - fkd_val:+.2f} |')
    report += ['', f'SelfMix (Mixup 0.8 / CutMix 1.0, at calibration `{calib}`):', '',
               '| probability | val top-1 | vs calibration only |', '|---|---|---|']
    mix_scores = {}
    for prob in a.selfmix_grid:
        method = Method('ferkd_selfmix', 'offline', f'FerKD {calib} + SelfMix p={prob}',
                        ['--distill-loss', 'ferkd', *calib_flags(calib), *selfmix_flags(prob)])
        tag = calib.replace(',', '_')
        mix_scores[prob] = mean([bench.train(f'sel-selfmix-{tag}-p{prob:g}-s{s}', method, s, offline_lr, 'val',
                                             teacher).final_top1 for s in a.select_seeds])
    selfmix_prob = max(mix_scores, key=mix_scores.get)
    for prob in a.selfmix_grid:
        mark = ' (chosen)' if prob == selfmix_prob else ''
        report.append(f'| {prob:g}{mark} | {mix_scores[prob]:.2f} | {mix_scores[prob] - calib_scores[calib]:+.2f} |')
    return lrs, calib, selfmix_prob, report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--output', default=None, help='runs, logs, results.md, convergence.png '
                        '(default: accuracy-output; a temp dir with --smoke)')
    parser.add_argument('--dataset', default='fashion_mnist', choices=sorted(DATASETS))
    parser.add_argument('--clutter', default=None, metavar='K=V,...',
                        help='cluttered dataset parameters, e.g. canvas=40,scale=0.6-0.8 (default: its defaults)')
    parser.add_argument('--data-dir', default=None, help='Fashion-MNIST directory (default: OUTPUT/data, prepared)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast in every run')
    parser.add_argument('--methods', nargs='+', default=None, help='subset of the methods (default: all)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None, help='test seeds (default 0 1 2 3 4)')
    parser.add_argument('--select-seeds', type=int, nargs='+', default=None, help='selection seeds (default 100 101)')
    parser.add_argument('--images', type=int, default=None, help='student images, the first N (default 4000)')
    parser.add_argument('--val-images', type=int, default=None, help='validation split: the last N (default 5000)')
    parser.add_argument('--epochs', type=int, default=None, help='offline epochs E; plain/online get num_crops x E')
    parser.add_argument('--num-crops', type=int, default=4)
    parser.add_argument('--regions', type=int, default=None, help='regions per image in the bank (default 24)')
    parser.add_argument('--scale', type=float, nargs=2, default=None,
                        help='RandomResizedCrop scale of the bank regions and of plain/online training '
                             '(default 0.35 1 on Fashion-MNIST, 0.08 1 on cluttered)')
    parser.add_argument('--teacher', default=None, help='teacher model (default test_resnet)')
    parser.add_argument('--teacher-epochs', type=int, default=None, help='teacher training epochs (default 4)')
    parser.add_argument('--teacher-images', type=int, default=None,
                        help='teacher training images, the first N (default: all outside the validation split)')
    parser.add_argument('--teacher-dir', default=None, help='reuse a teacher: a train_ferkd.py run dir or checkpoint')
    parser.add_argument('--student', default=None, help='student model (default test_resnet)')
    parser.add_argument('-b', '--batch-size', type=int, default=128, help='crops per step, every run')
    parser.add_argument('--lr-grid', type=float, nargs='+', default=None, help='LR grid (default 0.1 0.2 0.4)')
    parser.add_argument('--calib-grid', nargs='+', default=None,
                        help='FerKD quantile triples low,mid,top to choose from (0,0,1 is FKD)')
    parser.add_argument('--selfmix-grid', type=float, nargs='+', default=None, help='SelfMix probabilities')
    parser.add_argument('--fnkd-tau', type=float, default=2.0, help='tau of the FNKD bank')
    parser.add_argument('-j', '--workers', type=int, default=2)
    parser.add_argument('--threads', type=int, default=0,
                        help='OMP_NUM_THREADS of every run (default 0: torch\'s choice; 1 with --smoke)')
    parser.add_argument('--smoke', action='store_true', help='tiny sizes, one seed, one thread, for CI')
    args = parser.parse_args(argv)
    defaults = dict(images=4000, val_images=5000, epochs=4, regions=24, teacher='test_resnet', teacher_epochs=4,
                    student='test_resnet', seeds=[0, 1, 2, 3, 4], select_seeds=[100, 101], lr_grid=[0.1, 0.2, 0.4],
                    calib_grid=['0,0,1', '0.05,0.05,1', '0.05,0.05,0.95', '0.1,0.1,0.9'],
                    selfmix_grid=[0.25, 0.5],
                    scale=[0.08, 1.0] if args.dataset == 'cluttered' else [0.35, 1.0])
    if args.smoke:
        defaults.update(images=64, val_images=64, epochs=1, regions=8, teacher_epochs=1, teacher_images=256, seeds=[0],
                        select_seeds=[100], lr_grid=[0.1], calib_grid=['0,0,1', '0.1,0.1,0.9'], selfmix_grid=[0.5])
        args.batch_size, args.workers = 32, 0
        args.threads = args.threads or 1
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    all_methods = methods_for('0,0,1', 0.5)
    args.methods = args.methods or list(all_methods)
    unknown = [m for m in args.methods if m not in all_methods]
    if unknown:
        raise SystemExit(f'accuracy.py: unknown --methods {unknown}; choose from {", ".join(all_methods)}')

    tmp = tempfile.TemporaryDirectory(prefix='ferkd-acc-bench-') if args.output is None and args.smoke else None
    out = Path(tmp.name if tmp else (args.output or 'accuracy-output')).resolve()
    bench = Bench(args, out)
    check_reuse(out, args)
    from timm_ferkd.data.fashion_mnist import ensure_fashion_mnist
    args.data_dir = str(ensure_fashion_mnist(Path(args.data_dir) if args.data_dir else out / 'data', download=True))
    start = time.perf_counter()
    facts = machine_facts(torch.device(args.device))
    print(facts, flush=True)

    teacher = bench.teacher()
    bench.bank(teacher, 'bank')
    if 'fnkd' in args.methods:
        bench.bank(teacher, 'bank-fnkd', ['--fnkd-tau', str(args.fnkd_tau)])
    if 'fkd_uint8' in args.methods:
        bench.bank(teacher, 'bank-uint8', ['--value-dtype', 'uint8'])
    lrs, calib, selfmix_prob, selection = select(bench, teacher)
    methods = methods_for(calib, selfmix_prob)

    from timm_ferkd.runs import load_run
    results = {}
    for name in args.methods:
        method = methods[name]
        lr = lrs.get(name, lrs['fkd'] if method.mode == 'offline' else lrs['plain'])
        results[name] = [bench.train(f'test-{name}-s{s}', method, s, lr, 'test', teacher) for s in args.seeds]

    steps_per_epoch = (args.images // args.batch_size) * args.num_crops  # per offline epoch
    teacher_run = teacher.parent
    teacher_top1 = load_run(teacher_run).best_top1 if (teacher_run / 'summary.csv').is_file() else float('nan')
    header = (f'{args.dataset}: student {args.student}, teacher {args.teacher} (validation top-1 {teacher_top1:.2f}, '
              f'trained on {bench.holdout} images), students on the first {args.images} training images, '
              f'{args.epochs} x {args.num_crops} crops per image = {args.epochs * steps_per_epoch} steps of '
              f'{args.batch_size}, bank of {args.regions} regions per image (scale {args.scale[0]:g}-{args.scale[1]:g}), '
              f'test split (all images) once, seeds {" ".join(map(str, args.seeds))}')
    fkd_final = mean([r.final_top1 for r in results['fkd']]) if 'fkd' in results else None
    rows = ['| method | LR | final top-1 | best top-1 | final - plain (paired, ± s.e.) | steps to FKD\'s final |',
            '|---|---|---|---|---|---|']
    curves = {}
    for name in args.methods:
        method, runs = methods[name], results[name]
        lr = lrs.get(name, lrs['fkd'] if method.mode == 'offline' else lrs['plain'])
        finals = [r.final_top1 for r in runs]
        paired = 'n/a'
        if 'plain' in results and name != 'plain':
            diffs = [f - p.final_top1 for f, p in zip(finals, results['plain'])]
            paired = f'{mean(diffs):+.2f} ± {std(diffs) / math.sqrt(len(diffs)):.2f}'
        epochs = min(len(r.metrics['eval_top1']) for r in runs)
        curve = [mean([r.metrics['eval_top1'][e] for r in runs]) for e in range(epochs)]
        xs = [(e + 1) * args.epochs * steps_per_epoch // epochs for e in range(epochs)]
        curves[name] = (xs, curve)
        reach = 'n/a'
        if fkd_final is not None:
            hit = next((x for x, v in zip(xs, curve) if v >= fkd_final), None)
            reach = f'{hit} ({hit / xs[-1]:.0%})' if hit else 'not reached'
        rows.append(f'| {name} | {lr:g} | {pm(finals)} | {pm([r.best_top1 for r in runs])} | {paired} | {reach} |')
        print(rows[-1], flush=True)

    plot = out / 'convergence.png'
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, (xs, curve) in curves.items():
            ax.plot(xs, curve, marker='o', markersize=3, label=name)
        ax.set(xlabel='optimizer steps', ylabel='test top-1 (%)',
               title=f'{args.student} on {args.dataset}, mean of {len(args.seeds)} seeds')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        plt.close(fig)
    except ImportError:
        plot = None
    md = '\n'.join(['# Accuracy at equal optimizer steps', '', header + '.', '', facts, '', *selection, '',
                    '## Test split', '', *rows, '', f'Plot: {plot.name if plot else "none (no matplotlib)"}. '
                    f'Total {time.perf_counter() - start:.0f} s.', ''])
    (out / 'results.md').write_text(md)
    print(f'\n{md}\nresults: {out / "results.md"}', flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main())
