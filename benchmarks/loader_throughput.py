#!/usr/bin/env python3
"""Crops per second: the multi-crop region loader against timm's plain training loader.

Both loaders read the same synthetic JPEG folder with the same workers and the same student
input size, and both deliver normalised float batches on the same device (``--device``; pinned memory
on CUDA):

* ``timm``: ``timm.data.create_loader(is_training=True)``, one RandomResizedCrop (+ flip) per
  decoded image, colour jitter off, timm's prefetcher;
* ``ferkd``: ``create_region_loader`` over ``create_region_dataset`` with ``num_crops`` replayed
  regions per decoded image, colour jitter off, our prefetcher.

The bank is generated once with a tiny untrained teacher (the teacher's cost is not measured).
Each loader runs a warm-up (worker start, page cache), then is timed over whole passes until at
least ``--crops`` crops have been delivered. Crops/s per worker is the rate divided by ``--workers``
(the same for both loaders), the unit in which decoding is saved.

Usage::

    python benchmarks/loader_throughput.py                # 512 images of 500x375, 224 px, 2 workers
    python benchmarks/loader_throughput.py --device cuda --workers 16 --batch-size 256
    python benchmarks/loader_throughput.py --smoke        # seconds, for CI
"""
import argparse
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from train_throughput import machine_facts, synchronize, write_results


def make_jpeg_folder(root: Path, num_images: int, width: int, height: int, num_classes: int, seed: int = 0,
                     workers: int = 1) -> None:
    """Natural-looking JPEGs (smooth colour fields plus grain) so decode cost is realistic.

    Image ``i`` (class ``i % num_classes``) depends only on ``(seed, i)``, so ``workers`` processes write the
    same folder as one.
    """
    root = Path(root)
    for c in range(min(num_classes, num_images)):
        (root / f'class_{c}').mkdir(parents=True, exist_ok=True)
    chunks = [range(start, min(start + 64, num_images)) for start in range(0, num_images, 64)]
    write = partial(_write_jpegs, root, width, height, num_classes, seed)
    if workers > 1 and len(chunks) > 1:
        with multiprocessing.Pool(min(workers, len(chunks))) as pool:
            pool.map(write, chunks)
    else:
        for chunk in chunks:
            write(chunk)


def _write_jpegs(root: Path, width: int, height: int, num_classes: int, seed: int, indices: Sequence[int]) -> None:
    for i in indices:
        rng = np.random.default_rng((seed, i))
        low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)
        grain = rng.normal(0, 8, size=(height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f'class_{i % num_classes}' / f'img_{i:05d}.jpg', quality=90)


def make_bank(folder: Path, out: Path, num_classes: int, regions: int, workers: int) -> Path:
    import timm
    from timm_ferkd.labelling.generate import GenerateConfig, generate_bank
    checkpoint = out.parent / 'teacher.pth'
    torch.manual_seed(0)
    torch.save(timm.create_model('test_resnet', num_classes=num_classes).state_dict(), checkpoint)
    return generate_bank(GenerateConfig(
        model='test_resnet', output=str(out), dataset='', data_dir=str(folder), checkpoint=str(checkpoint),
        num_classes=num_classes, regions=regions, topk=min(5, num_classes), input_size=(3, 32, 32),
        workers=workers, device='cpu',
        progress=False, batch_size=256, images_per_shard=1000))


def measure(loader, min_crops: int, warmup_steps: int, device: torch.device) -> float:
    """Crops per second over whole passes, after ``warmup_steps`` untimed steps (device work included)."""
    epoch, steps, crops, start = 0, 0, 0, None
    while start is None or crops < min_crops:
        if hasattr(getattr(loader, 'sampler', None), 'set_epoch'):  # timm's idiom; ours selects regions too
            loader.sampler.set_epoch(epoch)
        for x, _ in loader:
            steps += 1
            if start is None:
                if steps >= warmup_steps:
                    synchronize(device)
                    start = time.perf_counter()
                continue
            crops += x.shape[0]
        epoch += 1
    synchronize(device)
    return crops / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='where both loaders deliver their batches')
    parser.add_argument('--num-images', type=int, default=512)
    parser.add_argument('--width', type=int, default=500)
    parser.add_argument('--height', type=int, default=375)
    parser.add_argument('--input-size', type=int, default=224)
    parser.add_argument('--num-crops', type=int, default=4)
    parser.add_argument('--batch-size', type=int, default=128, help='crops per step, both loaders')
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--regions', type=int, default=8, help='regions per image in the bank')
    parser.add_argument('--num-classes', type=int, default=8, help='classes of the synthetic folder and the bank')
    parser.add_argument('--crops', type=int, default=4096, help='minimum crops timed per loader')
    parser.add_argument('--warmup-steps', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=2, help='alternate the two loaders this many times')
    parser.add_argument('--data-dir', default=None, help='keep the images and bank here (reused when present)')
    parser.add_argument('--results', default=None, metavar='FILE', help='also write the numbers to FILE (JSON)')
    parser.add_argument('--smoke', action='store_true', help='tiny, fast configuration for CI')
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_images, args.width, args.height, args.input_size = 32, 160, 120, 64
        args.batch_size, args.crops, args.warmup_steps, args.workers = 16, 128, 1, min(args.workers, 1)
    logging.basicConfig(level=logging.WARNING)

    from timm.data import create_dataset, create_loader
    from timm_ferkd.data.dataset import create_region_dataset
    from timm_ferkd.data.loader import create_region_loader

    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix='ferkd-bench-')
        base = Path(tmp.name)
    else:
        base = Path(args.data_dir)
    folder, bank_dir = base / 'images', base / 'bank'
    if not folder.is_dir():
        t0 = time.perf_counter()
        make_jpeg_folder(folder, args.num_images, args.width, args.height, num_classes=args.num_classes,
                         workers=args.workers)
        print(f'wrote {args.num_images} JPEGs of {args.width}x{args.height} in {time.perf_counter() - t0:.1f}s')
    if not (bank_dir / 'manifest.json').is_file():
        t0 = time.perf_counter()
        make_bank(folder, bank_dir, num_classes=args.num_classes, regions=args.regions, workers=args.workers)
        print(f'generated a bank of {args.regions} regions per image in {time.perf_counter() - t0:.1f}s')

    device = torch.device(args.device)
    pin_memory = device.type == 'cuda'
    size = args.input_size
    timm_loader = create_loader(
        create_dataset('', root=str(folder), split='train', is_training=True), input_size=(3, size, size),
        batch_size=args.batch_size, is_training=True, num_workers=args.workers, color_jitter=0.,
        interpolation='bilinear', device=device, pin_memory=pin_memory, persistent_workers=True, use_prefetcher=True)
    ferkd_loader = create_region_loader(
        create_region_dataset('', str(folder), 'train', soft_labels=str(bank_dir), num_crops=args.num_crops,
                              input_size=size, interpolation='bilinear'),
        batch_size=args.batch_size, is_training=True, num_workers=args.workers, device=device,
        pin_memory=pin_memory, persistent_workers=True)

    results = {'timm': [], 'ferkd': []}
    for _ in range(args.repeats):
        results['timm'].append(measure(timm_loader, args.crops, args.warmup_steps, device))
        results['ferkd'].append(measure(ferkd_loader, args.crops, args.warmup_steps, device))
    timm_rate, ferkd_rate = max(results['timm']), max(results['ferkd'])

    workers = max(args.workers, 1)  # 0 workers: the main process decodes
    print(machine_facts(device))
    print(f'\n{args.num_images} JPEGs {args.width}x{args.height}, student input {size}x{size}, '
          f'batch {args.batch_size} crops, {args.workers} workers, {os.cpu_count()} CPUs, device {device}')
    print(f'{"loader":<44} {"crops/s":>10} {"per worker":>11} {"images/s":>10} {"ratio":>7}')
    print(f'{"timm create_loader (1 RRC per image)":<44} {timm_rate:>10.1f} {timm_rate / workers:>11.1f} '
          f'{timm_rate:>10.1f} {1.0:>7.2f}')
    print(f'{f"ferkd create_region_loader ({args.num_crops} crops/image)":<44} {ferkd_rate:>10.1f} '
          f'{ferkd_rate / workers:>11.1f} {ferkd_rate / args.num_crops:>10.1f} {ferkd_rate / timm_rate:>7.2f}')
    if args.results:
        write_results(args.results, {
            'device': str(device), 'workers': args.workers, 'num_crops': args.num_crops, 'batch_size': args.batch_size,
            'input_size': size, 'timm_crops_per_s': timm_rate, 'ferkd_crops_per_s': ferkd_rate,
            'timm_per_worker': timm_rate / workers, 'ferkd_per_worker': ferkd_rate / workers,
            'ratio': ferkd_rate / timm_rate, 'repeats': results})
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main())
