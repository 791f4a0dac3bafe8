#!/usr/bin/env python3
"""Scaling with processes: bank generation and offline FerKD training under ``torchrun``, 1 vs N processes.

Each configuration is a real ``torchrun --standalone --nproc_per_node N`` subprocess, exactly the
command a user runs (gloo on CPU), on Fashion-MNIST:

* generation: ``timm-ferkd generate`` (a random-weight teacher saved to a file, so every rank uses the
  same weights); the N-process bank is also checked to be byte-identical to the 1-process one;
* training: ``train_ferkd.py --soft-labels BANK`` with FerKD calibration and SelfMix (DDP, each rank
  a distinct share of the images, batch per rank ``-b / N`` so the global batch is the same).

Reported: wall time of the whole command (interpreter start, rendezvous, data scan and validation
included), throughput over that wall time, generation's labelling-loop throughput (from its log), and
the ratio N-proc / 1-proc. Every configuration gets the same cores in total: ``OMP_NUM_THREADS`` is
``cores // N`` per process. On a 2-core machine expect little or no gain from 2 processes (the
cores are already busy with one); the numbers are printed as measured.

Usage::

    python benchmarks/scaling.py                          # CPU, 1 and 2 processes
    python benchmarks/scaling.py --nprocs 1 2 --device cuda --input-size 112    # one GPU per process
    python benchmarks/scaling.py --smoke                  # seconds per run, for CI
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from train_throughput import create_model, machine_facts

REPO = Path(__file__).resolve().parent.parent


def torchrun(nproc: int) -> List[str]:
    """The torchrun launcher for ``nproc`` local processes (``python -m torch.distributed.run``)."""
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']


def run_timed(cmd: Sequence[str], log: Path, threads: int) -> Tuple[float, str]:
    """Run ``cmd`` with ``threads`` OpenMP threads per process; (seconds, output). Exits on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), FERKD_DIST_BACKEND='gloo')
    print(f'$ OMP_NUM_THREADS={threads} {" ".join(shlex.quote(str(c)) for c in cmd)}', flush=True)
    start = time.perf_counter()
    result = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env=env)
    seconds = time.perf_counter() - start
    log.write_text(result.stdout)
    if result.returncode != 0:
        print('\n'.join(result.stdout.splitlines()[-30:]), file=sys.stderr)
        raise SystemExit(f'scaling.py: command failed (exit {result.returncode}); log: {log}')
    print(f'    {seconds:.1f}s', flush=True)
    return seconds, result.stdout


def generate_cmd(nproc: int, args: argparse.Namespace, checkpoint: Path, out: Path) -> List[str]:
    """``timm-ferkd generate`` under torchrun; shards small enough that every rank gets several."""
    per_shard = max(1, args.images // (4 * max(args.nprocs)))
    return [*torchrun(nproc), '-m', 'timm_ferkd', 'generate', '--model', args.teacher, '--checkpoint', checkpoint,
            '--num-classes', '10', '--in-chans', '1', '--dataset', 'torch/fashion_mnist', '--data-dir', args.data_dir,
            '--num-images', str(args.images), '--regions', str(args.regions),
            '--input-size', '1', str(args.input_size), str(args.input_size), '--scale', '0.35', '1',
            '-b', str(args.gen_batch_size), '-j', str(args.workers), '--device', args.device, '--no-progress',
            '--images-per-shard', str(per_shard), '--output', out]


def train_cmd(nproc: int, args: argparse.Namespace, bank: Path, runs: Path) -> List[str]:
    """Offline FerKD training under torchrun; the global batch is ``-b`` whatever the process count."""
    per_rank = args.batch_size // nproc
    return [*torchrun(nproc), REPO / 'train_ferkd.py', '--data-dir', args.data_dir, '--dataset', 'torch/fashion_mnist',
            '--model', args.student, '--num-classes', '10', '--input-size', '1', str(args.input_size),
            str(args.input_size), '--soft-labels', bank, '--num-crops', '4', '-b', str(per_rank), '--epochs',
            str(args.epochs), '--warmup-epochs', '0', '--lr', '0.2', '--val-subset', str(args.val_images),
            '-j', str(args.workers), '--device', args.device, '--distill-loss', 'ferkd', '--calib-quantile',
            '--calib-low', '0.05', '--calib-mid', '0.2', '--selfmix', '0.8', '--selfmix-cutmix', '1.0',
            '--log-interval', '1000', '--checkpoint-hist', '1', '--output', runs, '--experiment', f'ferkd-{nproc}proc']


def loop_seconds(output: str) -> Optional[float]:
    """Seconds of generation's labelling loop on rank 0 (ranks run side by side), from its log."""
    found = re.search(r'labelled \d+ images \(\d+ regions\) on rank 0 in ([\d.]+)s', output)
    return None if not found else float(found.group(1))


def shard_hashes(bank: Path) -> List[str]:
    """sha256 of every shard, from the manifest."""
    return [s['sha256'] for s in json.loads((bank / 'manifest.json').read_text())['shards']]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--nprocs', type=int, nargs='+', default=[1, 2], help='process counts; the first is the base')
    parser.add_argument('--device', default='cpu', help='cpu (gloo) or cuda (one GPU per process)')
    parser.add_argument('--data-dir', default=None, help='Fashion-MNIST directory (default: a temp dir, prepared)')
    parser.add_argument('--images', type=int, default=None, help='training images (default 1000)')
    parser.add_argument('--regions', type=int, default=None, help='regions per image (default 16)')
    parser.add_argument('--teacher', default=None, help='generation teacher, random weights (default resnet18)')
    parser.add_argument('--student', default=None, help='trained student (default resnet18)')
    parser.add_argument('--input-size', type=int, default=28, help='teacher and student input px')
    parser.add_argument('--epochs', type=int, default=None, help='training epochs (default 2)')
    parser.add_argument('-b', '--batch-size', type=int, default=128, help='global training batch in crops')
    parser.add_argument('--gen-batch-size', type=int, default=512, help='crops per teacher forward')
    parser.add_argument('--val-images', type=int, default=None, help='validation images per epoch (default 256)')
    parser.add_argument('-j', '--workers', type=int, default=1, help='loader workers per process')
    parser.add_argument('--threads', type=int, default=None,
                        help='OMP_NUM_THREADS per process (default: cores // N, so every N gets the same cores)')
    parser.add_argument('--smoke', action='store_true', help='tiny sizes, one thread per process, for CI')
    args = parser.parse_args(argv)
    defaults = dict(images=1000, regions=16, teacher='resnet18', student='resnet18', epochs=2, val_images=256)
    if args.smoke:
        defaults.update(images=64, regions=8, teacher='test_resnet', student='test_resnet', epochs=1, val_images=32)
        args.batch_size, args.workers = 32, 0
        args.threads = args.threads or 1
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_size % (4 * max(args.nprocs)):
        raise SystemExit(f'scaling.py: -b {args.batch_size} must split into 4-crop images on {max(args.nprocs)} ranks')
    if args.device.startswith('cuda') and max(args.nprocs) > torch.cuda.device_count():
        raise SystemExit(f'scaling.py: {max(args.nprocs)} processes need as many GPUs, '
                         f'found {torch.cuda.device_count()}')

    with tempfile.TemporaryDirectory(prefix='ferkd-scaling-') as tmp:
        base = Path(tmp)
        from timm_ferkd.data.fashion_mnist import ensure_fashion_mnist
        args.data_dir = str(ensure_fashion_mnist(Path(args.data_dir) if args.data_dir else base / 'data', download=True))
        torch.manual_seed(0)
        checkpoint = base / 'teacher.pth'
        torch.save(create_model(args.teacher, 10, args.input_size, in_chans=1).state_dict(), checkpoint)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        print(machine_facts(torch.device(args.device)), flush=True)

        gen: Dict[int, Tuple[float, Optional[float]]] = {}
        train: Dict[int, float] = {}
        banks: Dict[int, Path] = {}
        for nproc in args.nprocs:
            threads = args.threads or max(1, cores // nproc)
            banks[nproc] = base / f'bank-{nproc}proc'
            seconds, output = run_timed(generate_cmd(nproc, args, checkpoint, banks[nproc]),
                                        base / f'generate-{nproc}.log', threads)
            gen[nproc] = (seconds, loop_seconds(output))
        first = args.nprocs[0]
        for nproc in args.nprocs:
            # every process count trains on the same bank: the base run's
            seconds, _ = run_timed(train_cmd(nproc, args, banks[first], base / 'runs'),
                                   base / f'train-{nproc}.log', args.threads or max(1, cores // nproc))
            train[nproc] = seconds

        regions = args.images * args.regions
        crops = args.images * 4 * args.epochs
        print(f'\nFashion-MNIST, {args.images} images at {args.input_size} px, device {args.device}, {cores} cores '
              f'shared by all processes (OMP_NUM_THREADS = {args.threads or "cores // N"}), '
              f'{args.workers} loader worker(s) per process')
        print(f'generation: teacher {args.teacher} (random weights), {args.regions} regions per image '
              f'({regions} regions), batch {args.gen_batch_size} crops')
        print(f'{"processes":>9} {"wall s":>8} {"regions/s":>10} {"ratio":>6} {"loop s":>8} {"loop regions/s":>15} '
              f'{"ratio":>6} {"same bytes":>10}')
        base_hashes = shard_hashes(banks[first])
        for nproc in args.nprocs:
            wall, loop = gen[nproc]
            base_wall, base_loop = gen[first]
            loop_text = f'{loop:>8.1f} {regions / loop:>15.1f} {base_loop / loop:>6.2f}' if loop and base_loop \
                else f'{"n/a":>8} {"n/a":>15} {"n/a":>6}'
            same = 'yes' if shard_hashes(banks[nproc]) == base_hashes else 'NO'
            print(f'{nproc:>9} {wall:>8.1f} {regions / wall:>10.1f} {base_wall / wall:>6.2f} {loop_text} {same:>10}')
        print(f'training: offline FerKD + SelfMix, student {args.student}, {args.epochs} epoch(s) x 4 crops '
              f'({crops} crops), global batch {args.batch_size} crops, '
              f'validation on {args.val_images} images per epoch')
        print(f'{"processes":>9} {"wall s":>8} {"crops/s":>10} {"ratio":>6}')
        for nproc in args.nprocs:
            print(f'{nproc:>9} {train[nproc]:>8.1f} {crops / train[nproc]:>10.1f} {train[first] / train[nproc]:>6.2f}')
        print(f'ratio = throughput with N processes / with {first}; wall times include interpreter start, '
              f'rendezvous and dataset scan', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
