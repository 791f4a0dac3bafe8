#!/usr/bin/env python3
"""Soft-label storage: bytes per region on disk, the loader's label read per image, and 8-bit recovery error.

The same labels (``--num-images`` images x ``--regions`` regions, ``--num-classes`` classes, top-5
``marginal_smoothing`` of random peaked distributions, the same boxes and flips) are written five ways:

* FKD reference layout, fp32: one ``torch.save([coords, flip, quantized])`` per image of numpy arrays
  (coords float32 [R, 4] normalised (top, left, height, width), flip bool [R], quantized
  ``marginal_smoothing_k5`` float32 [R, 2, 5]: row 0 the top-5 classes as floats, row 1 their
  probabilities), in ``train/<class>/<image>.tar`` like the reference generator;
* FKD reference layout with ``--use_fp16`` (coords and quantized as float16);
* our bank, format 1 (manifest + safetensors shard): boxes and flips re-derived from the seed, so only
  fp16 values and uint16 indices are stored;
* our bank, format 2 (``--value-dtype uint8``): 8-bit values and 10-bit packed indices;
* our bank with explicit boxes (``sampler: explicit``), what ``timm-ferkd import-fkd`` writes.

Sizes count every file (manifest included) by its length and by the blocks the file system allocates
(a small file takes at least one block).

Reads (the headline): what a training loader needs per image, for ``--crops`` random regions: their
boxes and flips, and their soft labels. FKD's loader does ``torch.load(file, weights_only=False)``
(trusted, self-written files here) and indexes the regions. Ours is what ``RegionDataset`` calls:
per DataLoader batch of ``--batch-images`` images, ``bank.read_batch`` (boxes and flips re-derived
from the seed, image sizes and classes, [crops, C] float32 targets), divided by the batch's images;
the one-image calls ``regions`` + ``dense_targets`` and ``labels`` alone are timed too. Images in
random order, distinct random regions, page cache warm, best of ``--rounds`` rounds. Goals: the loader
read >= 20x faster than FKD's faster ``torch.load``; format 2 <= 12 B/region at 1000 classes.

Recovery error: the dense ``marginal_smoothing`` targets recovered from the fp16 and the 8-bit bank
against the same targets computed from the float32 probabilities, over every region written.

Usage::

    python benchmarks/label_read.py              # 200 images x 500 regions, 1000 classes
    python benchmarks/label_read.py --smoke      # seconds, for CI
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from train_throughput import machine_facts

IMAGE_SIZE = (375, 500)  # (height, width) of every synthetic image: boxes are normalised by it
TOPK = 5


def synthetic_labels(num_images: int, regions: int, num_classes: int, seed: int = 0):
    """Top-5 classes and probabilities of random peaked distributions, per image.

    Each region's logits are Gaussian with a random scale, so confidences spread from nearly
    uniform to nearly one-hot, like a real teacher's (the values do not change sizes or speed).

    Yields:
        (indices int64 [R, 5], values float32 [R, 5]) per image, values descending.
    """
    rng = np.random.default_rng(seed)
    for _ in range(num_images):
        logits = rng.standard_normal((regions, num_classes)) * rng.uniform(0.5, 6.0, size=(regions, 1))
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        top = np.argpartition(-probs, TOPK, axis=1)[:, :TOPK]
        top_values = np.take_along_axis(probs, top, axis=1)
        order = np.argsort(-top_values, axis=1)
        yield np.take_along_axis(top, order, axis=1), np.take_along_axis(top_values, order, axis=1).astype(np.float32)


def write_fkd_file(path: Path, boxes: np.ndarray, flips: np.ndarray, indices: np.ndarray, values: np.ndarray,
                   fp16: bool) -> None:
    """One image's labels exactly as the FKD reference saves them (``--use_fp16`` casts coords and labels)."""
    coords = boxes.astype(np.float32)
    quantized = np.stack([indices.astype(np.float32), values], axis=1)  # [R, 2, k]
    state = [np.float16(coords), flips, np.float16(quantized)] if fp16 else [coords, flips, quantized]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def write_our_bank(path: Path, indices: np.ndarray, values: np.ndarray, targets: np.ndarray,
                   num_classes: int, boxes: Optional[np.ndarray] = None, flips: Optional[np.ndarray] = None,
                   value_dtype: str = 'float16') -> None:
    """A bank of the same labels; with ``boxes`` an explicit-sampler bank like ``import-fkd`` writes."""
    from timm_ferkd.bank.codes import label_storage, label_tensors
    from timm_ferkd.bank.format import EXPLICIT_SAMPLER, MANIFEST_NAME, BankManifest, DatasetIdentity, TeacherInfo
    from timm_ferkd.bank.writer import atomic_write_bytes, write_shard
    n, regions, k = values.shape
    storage = label_storage(num_classes, 'marginal_smoothing', value_dtype)
    manifest = BankManifest(
        num_classes=num_classes, regions_per_image=regions, topk=k, label_type='marginal_smoothing',
        temperature=1.0, num_images=n, images_per_shard=1000, seed=0, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
        teacher=TeacherInfo(model='synthetic'), index_dtype=storage.index_dtype, value_dtype=storage.value_dtype,
        format_version=storage.format_version,
        dataset=DatasetIdentity(name='synthetic', split='train', num_images=n, fingerprint='sha256:' + '0' * 64,
                                fingerprint_kind='targets'))
    if boxes is not None:
        manifest.sampler = EXPLICIT_SAMPLER
    path.mkdir(parents=True, exist_ok=True)
    for s in range(manifest.num_shards):
        first, count = manifest.shard_range(s)
        rows = slice(first, first + count)
        tensors = {
            'image_sizes': np.tile(np.asarray([IMAGE_SIZE], dtype=np.int32), (count, 1)),
            'targets': targets[rows].astype(np.int32),
            **label_tensors(indices[rows], values[rows], storage),
        }
        if boxes is not None:
            tensors['boxes'] = boxes[rows].astype(np.float32)
            tensors['flips'] = flips[rows].astype(np.uint8)
        manifest.shards.append(write_shard(path, s, first, tensors))
    atomic_write_bytes(path / MANIFEST_NAME, manifest.to_json().encode())


def write_all(base: Path, args: argparse.Namespace) -> Tuple[List[Path], List[Path], np.ndarray, np.ndarray]:
    """Write both FKD folders and the three banks.

    Returns:
        The FKD fp32 and fp16 file lists (image order), and the float32 labels (indices, values).
    """
    from timm_ferkd.bank.regions import RegionSampler
    sampler = RegionSampler(seed=0)
    n, r = args.num_images, args.regions
    all_indices = np.empty((n, r, TOPK), dtype=np.int64)
    all_values = np.empty((n, r, TOPK), dtype=np.float32)
    all_boxes = np.empty((n, r, 4), dtype=np.float32)
    all_flips = np.empty((n, r), dtype=bool)
    targets = np.arange(n) % args.num_classes
    fp32_files, fp16_files = [], []
    for i, (indices, values) in enumerate(synthetic_labels(n, r, args.num_classes)):
        # the bank's own regions, so every storage holds exactly the same boxes and flips
        regions = sampler.sample(i, IMAGE_SIZE, range(r))
        boxes = regions.normalized().astype(np.float32)
        rel = Path('train') / f'class_{targets[i]:04d}' / f'img_{i:06d}.tar'
        for fp16, files, folder in ((False, fp32_files, 'fkd-fp32'), (True, fp16_files, 'fkd-fp16')):
            write_fkd_file(base / folder / rel, boxes, regions.flips, indices, values, fp16)
            files.append(base / folder / rel)
        all_indices[i], all_values[i], all_boxes[i], all_flips[i] = indices, values, boxes, regions.flips
    write_our_bank(base / 'bank', all_indices, all_values, targets, args.num_classes)
    write_our_bank(base / 'bank-u8', all_indices, all_values, targets, args.num_classes, value_dtype='uint8')
    write_our_bank(base / 'bank-explicit', all_indices, all_values, targets, args.num_classes,
                   boxes=all_boxes, flips=all_flips)
    return fp32_files, fp16_files, all_indices, all_values


def disk_usage(path: Path) -> Tuple[int, int, int]:
    """(files, bytes by file length, bytes allocated) of everything under ``path``, directories included."""
    files, length, allocated = 0, 0, 0
    for root, dirs, names in os.walk(path):
        for name in dirs:
            allocated += os.stat(os.path.join(root, name)).st_blocks * 512
        for name in names:
            st = os.stat(os.path.join(root, name))
            files, length, allocated = files + 1, length + st.st_size, allocated + st.st_blocks * 512
    return files, length, allocated


def time_reads(read: Callable[[int, np.ndarray], object], plan: Sequence[Tuple[int, np.ndarray]], rounds: int) -> float:
    """Best seconds per read over ``rounds`` passes of ``plan`` (one untimed pass warms caches)."""
    for image, ids in plan:
        read(image, ids)
    best = float('inf')
    for _ in range(rounds):
        start = time.perf_counter()
        for image, ids in plan:
            read(image, ids)
        best = min(best, (time.perf_counter() - start) / len(plan))
    return best


def read_plan(num_images: int, regions: int, reads: int, crops: int, seed: int = 1) -> List[Tuple[int, np.ndarray]]:
    """Random images (each once per permutation) with ``crops`` distinct random regions each."""
    rng = np.random.default_rng(seed)
    images = np.concatenate([rng.permutation(num_images) for _ in range(-(-reads // num_images))])[:reads]
    return [(int(i), rng.choice(regions, size=crops, replace=False)) for i in images]


def batch_plan(plan: Sequence[Tuple[int, np.ndarray]], batch_images: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """The same reads grouped into DataLoader batches: (images [b], region ids [b, crops])."""
    return [(np.array([i for i, _ in plan[s:s + batch_images]]), np.stack([ids for _, ids in plan[s:s + batch_images]]))
            for s in range(0, len(plan), batch_images)]


def recovery_errors(indices: np.ndarray, values: np.ndarray, num_classes: int,
                    chunk: int = 20000) -> Dict[str, Tuple[float, float, float]]:
    """(max |error|, mean |error| over the stored classes, max |error| of the top value) of recovered targets.

    The reference is the dense ``marginal_smoothing`` target of the float32 top-5; the stored ones
    round the values to fp16, or to the 8-bit codes of ``timm_ferkd.bank.codes``.
    """
    from timm_ferkd.bank.codes import decode_values, encode_values
    from timm_ferkd.bank.labels import dense_targets
    idx = indices.reshape(-1, indices.shape[-1])
    val = values.reshape(-1, values.shape[-1])
    stored = {'fp16 (format 1)': lambda v: v.astype(np.float16),
              'uint8 (format 2)': lambda v: decode_values(encode_values(v))}
    out = {}
    for name, store in stored.items():
        worst = mean_sum = top = 0.0
        for s in range(0, len(val), chunk):
            i, v = idx[s:s + chunk], val[s:s + chunk]
            ref = dense_targets(i, v, num_classes, 'marginal_smoothing').numpy()
            got = dense_targets(i, store(v), num_classes, 'marginal_smoothing').numpy()
            err = np.abs(got - ref)
            worst = max(worst, float(err.max()))
            mean_sum += float(np.take_along_axis(err, i, axis=1).sum())
            top = max(top, float(np.abs(store(v).astype(np.float32)[:, 0] - v[:, 0]).max()))
        out[name] = (worst, mean_sum / idx.size, top)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--num-images', type=int, default=200)
    parser.add_argument('--regions', type=int, default=500, help='regions per image')
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--crops', type=int, default=4, help='regions read per image (num_crops)')
    parser.add_argument('--batch-images', type=int, default=64,
                        help='images per DataLoader batch (batch size / crops) for the batched read')
    parser.add_argument('--reads', type=int, default=4000, help='reads per round and method')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--data-dir', default=None, help='write the label files here (default: a temp dir)')
    parser.add_argument('--smoke', action='store_true', help='tiny, fast configuration for CI')
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_images, args.regions, args.reads, args.rounds, args.batch_images = 8, 32, 64, 1, 8
    from timm_ferkd.bank.reader import SoftLabelBank

    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix='ferkd-label-bench-')
        base = Path(tmp.name)
    else:
        base = Path(args.data_dir)
    start = time.perf_counter()
    fp32_files, fp16_files, all_indices, all_values = write_all(base, args)
    print(f'wrote {args.num_images} images x {args.regions} regions in 5 storages '
          f'in {time.perf_counter() - start:.1f}s')
    print(machine_facts(torch.device('cpu')))
    total_regions = args.num_images * args.regions

    # ---- size
    storages = [('FKD torch.save, fp32 (one file per image)', base / 'fkd-fp32'),
                ('FKD torch.save, --use_fp16', base / 'fkd-fp16'),
                ('ours: bank format 1 (seeded, fp16 + uint16)', base / 'bank'),
                ('ours: bank format 2 (seeded, uint8 + 10-bit)', base / 'bank-u8'),
                ('ours: bank with explicit boxes (import-fkd)', base / 'bank-explicit')]
    usage = {name: disk_usage(path) for name, path in storages}
    fkd16 = usage[storages[1][0]][1] / total_regions
    print(f'\n{args.num_images} images x {args.regions} regions, {args.num_classes} classes, top-{TOPK}')
    print(f'{"storage":<46} {"files":>6} {"B/region":>9} {"allocated B/region":>19} {"ratio vs FKD fp16":>18}')
    for name, _ in storages:
        files, length, allocated = usage[name]
        print(f'{name:<46} {files:>6} {length / total_regions:>9.2f} {allocated / total_regions:>19.2f} '
              f'{length / total_regions / fkd16:>18.3f}')
    v1_size = usage[storages[2][0]][1] / total_regions
    v2_size = usage[storages[3][0]][1] / total_regions
    print(f'size goals: format 1 <= 23 B/region: {v1_size:.2f} ({"met" if v1_size <= 23 else "MISSED"}); '
          f'format 2 <= 12 B/region: {v2_size:.2f} ({"met" if v2_size <= 12 else "MISSED"})')

    # ---- read speed
    plan = read_plan(args.num_images, args.regions, args.reads, args.crops)
    batches = batch_plan(plan, args.batch_images)
    bank = SoftLabelBank(base / 'bank')
    bank_u8 = SoftLabelBank(base / 'bank-u8')
    explicit = SoftLabelBank(base / 'bank-explicit')

    def fkd_reader(files: List[Path]) -> Callable[[int, np.ndarray], object]:
        def read(image: int, ids: np.ndarray):
            # trusted, self-written files: the reference's own call (see the module docstring)
            coords, flip, quantized = torch.load(files[image], weights_only=False)
            return coords[ids], flip[ids], quantized[ids]
        return read

    def one_image(b: SoftLabelBank) -> Callable[[int, np.ndarray], object]:
        return lambda image, ids: (b.regions(image, ids), b.dense_targets(image, ids))

    def batched(b: SoftLabelBank) -> Callable[[np.ndarray, np.ndarray], object]:
        return b.read_batch

    loader_reads = {
        'ours, format 1: read_batch': batched(bank),
        'ours, format 2: read_batch': batched(bank_u8),
        'ours, explicit boxes: read_batch': batched(explicit),
    }
    methods: Dict[str, Callable[[int, np.ndarray], object]] = {
        'FKD torch.load(weights_only=False) fp32 + index': fkd_reader(fp32_files),
        'FKD torch.load(weights_only=False) fp16 + index': fkd_reader(fp16_files),
        'ours, format 1: regions + dense_targets (one image)': one_image(bank),
        'ours, format 2: regions + dense_targets (one image)': one_image(bank_u8),
        'ours, format 1: labels(i, ids) only': bank.labels,
        'ours, format 1: dense_targets(i, ids) only': bank.dense_targets,
        'ours, format 1: regions(i, ids) only (seeded boxes)': bank.regions,
        'ours, format 2: labels(i, ids) only': bank_u8.labels,
    }
    times = {name: time_reads(read, plan, args.rounds) for name, read in methods.items()}
    for name, read in loader_reads.items():
        times[name] = time_reads(read, batches, args.rounds) * len(batches) / len(plan)
    baseline = min(times[name] for name in list(methods)[:2])  # the faster torch.load: the conservative goal
    print(f'\nper image: boxes, flips and soft labels of {args.crops} random regions; {len(plan)} images per round '
          f'(batched: {len(batches)} batches of {args.batch_images}), best of {args.rounds}, warm page cache')
    print(f'{"method":<60} {"us/image":>9} {"speedup vs torch.load":>22}')
    order = list(methods)[:2] + list(loader_reads) + list(methods)[2:]
    for name in order:
        print(f'{name:<60} {times[name] * 1e6:>9.1f} {baseline / times[name]:>22.1f}')
    headline = {name: baseline / times[name] for name in list(loader_reads)[:2]}
    print('speed goal: the loader\'s read (read_batch) >= 20x faster than torch.load: '
          + ', '.join(f'{name.split(":")[0][6:]} {x:.1f}x' for name, x in headline.items())
          + f' ({"met" if min(headline.values()) >= 20 else "MISSED"})')

    # ---- recovery error of the stored labels
    print(f'\nrecovery error of dense marginal_smoothing targets over {total_regions} regions, vs float32 top-{TOPK}')
    print(f'{"stored values":<20} {"max |error|":>12} {"mean |error| (top-5)":>21} {"max |error| top value":>22}')
    for name, (worst, mean, top) in recovery_errors(all_indices, all_values, args.num_classes).items():
        print(f'{name:<20} {worst:>12.2e} {mean:>21.2e} {top:>22.2e}')
    if tmp is not None:
        del bank, bank_u8, explicit
        tmp.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main())
