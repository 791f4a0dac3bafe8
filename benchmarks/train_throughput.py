#!/usr/bin/env python3
"""Training throughput: FerKD offline against plain timm training and timm's online KD.

Crops per second of whole training steps (data loading included), measured over ``--steps`` steps
after ``--warmup-steps`` untimed ones, for three ways of training the same student on the same
synthetic JPEG folder, with the same workers, batch (in crops), input size, optimiser and device:

* ``plain``: ``timm.data.create_loader`` (one RandomResizedCrop + flip per decoded image, colour
  jitter off) and ``timm.task.ClassificationTask`` (label smoothing 0.1);
* ``online KD``: the same loader and timm's ``LogitDistillationTask`` (the teacher runs every step);
* ``ferkd``: ``create_region_loader`` over ``create_region_dataset`` (``--num-crops`` stored regions per
  decoded image, FerKD calibration by quantiles, SelfMix on every step) and ``FerKDTask('ferkd')``.

In the same run, pure compute on synthetic tensors of the same batch: the teacher's forward time T
and the student's training step time S. Offline training drops the teacher from the step, so its
speedup over online KD is bounded by ``1 + T / S`` (when loading is hidden); the table prints our
speedup as a fraction of that bound. Goals: ours/plain >= 1.0 and ours/online >= 0.9 x bound.

The soft-label bank is generated once with ``generate_bank``. Its values do not change training
speed (the shapes are fixed and quantile calibration discards the same fraction whatever the
teacher), so on CPU it is labelled by a tiny random ``test_resnet`` (``--bank-teacher``); on GPU by
each pair's own (random-weight) teacher.

Usage::

    python benchmarks/train_throughput.py                    # CPU: 112 px, resnet50/resnet152 -> resnet18
    python benchmarks/train_throughput.py --device cuda      # GPU: 224 px, AMP, resnet50/vit_large -> resnet18
    python benchmarks/train_throughput.py --smoke            # seconds, for CI
"""
import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity

# presets per target; any flag given on the command line wins
PRESETS: Dict[str, Dict[str, object]] = {
    'cpu': dict(pairs=['resnet50:resnet18', 'resnet152:resnet18'], input_size=112, batch_size=32, workers=2,
                steps=8, warmup_steps=2, num_images=None, width=500, height=375, num_classes=100, regions=8,
                amp=False, channels_last=False, bank_teacher='test_resnet', compute_reps=3, threads=0),
    'cuda': dict(pairs=['resnet50:resnet18', 'vit_large_patch16_224:resnet18'], input_size=224, batch_size=256,
                 workers=min(16, os.cpu_count() or 1), steps=40, warmup_steps=10, num_images=8192, width=500,
                 height=375, num_classes=1000, regions=16, amp=True, channels_last=True, bank_teacher='pair',
                 compute_reps=20, threads=0),
    'smoke': dict(pairs=['test_resnet:test_resnet'], input_size=32, batch_size=8, workers=1, steps=2,
                  warmup_steps=1, num_images=16, width=64, height=48, num_classes=4, regions=4, amp=False,
                  channels_last=False, bank_teacher='test_resnet', compute_reps=1, threads=1),
}


def machine_facts(device: torch.device) -> str:
    """One line of the facts that numbers depend on: CPUs, threads, versions, device."""
    import timm
    import timm_ferkd
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()
    return (f'machine: {os.cpu_count()} CPUs ({usable} usable), torch {torch.__version__} '
            f'({torch.get_num_threads()} threads), timm {timm.__version__}, timm-ferkd {timm_ferkd.__version__}, '
            f'python {platform.python_version()}, device {device} ({name})')


def write_results(path: str, results: object) -> None:
    """Write a benchmark's numbers as JSON to ``path`` (atomically: a reader never sees half a file)."""
    import json
    tmp = Path(f'{path}.tmp')
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)


def apply_presets(args: argparse.Namespace, presets: Dict[str, Dict[str, object]]) -> str:
    """Fill the flags left at None from the preset of ``--smoke`` or of the device; return its name."""
    key = 'smoke' if args.smoke else ('cuda' if args.device.startswith('cuda') else 'cpu')
    for name, value in presets[key].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return key


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock time covers it."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def create_model(name: str, num_classes: int, size: int, in_chans: int = 3) -> nn.Module:
    """A randomly initialised timm model; fixed-size models (ViTs) are built for ``size``."""
    import timm
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    kwargs = {'img_size': size} if cfg is not None and cfg.fixed_input_size else {}
    return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)


def autocast_for(device: torch.device, amp: bool) -> Callable:
    """Autocast context factory: bfloat16 (no loss scaler needed) when ``amp``, else a no-op."""
    if not amp:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass
class Pair:
    """A teacher -> student pair, parsed from ``TEACHER:STUDENT``."""
    teacher: str
    student: str

    @classmethod
    def parse(cls, text: str) -> 'Pair':
        teacher, sep, student = text.partition(':')
        if not sep or not teacher or not student:
            raise SystemExit(f'--pairs entries are TEACHER:STUDENT, got {text!r}')
        return cls(teacher, student)

    def __str__(self) -> str:
        return f'{self.teacher} -> {self.student}'


# ---------------------------------------------------------------- data

def prepare_images(folder: Path, args: argparse.Namespace) -> None:
    """Write the synthetic JPEG folder unless it exists (see ``loader_throughput.make_jpeg_folder``)."""
    from loader_throughput import make_jpeg_folder
    if folder.is_dir():
        args.num_images = sum(1 for _ in folder.rglob('*.jpg'))  # a reused --data-dir keeps its own images
        return
    start = time.perf_counter()
    make_jpeg_folder(folder, args.num_images, args.width, args.height, num_classes=args.num_classes)
    print(f'wrote {args.num_images} JPEGs of {args.width}x{args.height} in {time.perf_counter() - start:.1f}s',
          flush=True)


def prepare_bank(folder: Path, out: Path, teacher: str, args: argparse.Namespace, device: torch.device) -> Path:
    """Label ``args.regions`` regions per image with a random-weight ``teacher`` (reused when present)."""
    from timm_ferkd.labelling.generate import GenerateConfig, generate_bank
    if (out / 'manifest.json').is_file():
        return out
    size = 32 if teacher == 'test_resnet' else args.input_size
    checkpoint = out.parent / f'{out.name}-teacher.pth'
    torch.manual_seed(0)
    torch.save(create_model(teacher, args.num_classes, size).state_dict(), checkpoint)
    start = time.perf_counter()
    generate_bank(GenerateConfig(
        model=teacher, output=str(out), data_dir=str(folder), checkpoint=str(checkpoint),
        num_classes=args.num_classes, regions=args.regions, topk=min(5, args.num_classes), input_size=(3, size, size),
        workers=args.workers,
        device=str(device), amp=args.amp, progress=False, batch_size=256, images_per_shard=1000))
    print(f'generated a bank of {args.regions} regions per image with {teacher} in '
          f'{time.perf_counter() - start:.1f}s', flush=True)
    return out


def plain_loader(folder: Path, student: nn.Module, args: argparse.Namespace, device: torch.device):
    """timm's training loader: one RandomResizedCrop (+ flip) per decoded image, jitter off."""
    from timm.data import create_dataset, create_loader, resolve_data_config
    cfg = resolve_data_config(model=student)
    return create_loader(
        create_dataset('', root=str(folder), split='train', is_training=True),
        input_size=(3, args.input_size, args.input_size), batch_size=args.batch_size, is_training=True,
        num_workers=args.workers, color_jitter=0., interpolation='bilinear', mean=cfg['mean'], std=cfg['std'],
        device=device, pin_memory=device.type == 'cuda', persistent_workers=True, use_prefetcher=True)


def region_loader(folder: Path, bank: Path, student: nn.Module, args: argparse.Namespace, device: torch.device):
    """Our multi-crop loader: FerKD calibration (quantiles 0.05 / 0.2, as the README) and SelfMix."""
    from timm.data import resolve_data_config
    from timm_ferkd.data.calibration import CalibrationConfig
    from timm_ferkd.data.dataset import create_region_dataset
    from timm_ferkd.data.loader import create_region_loader
    from timm_ferkd.data.mixing import create_selfmix
    cfg = resolve_data_config(model=student)
    dataset = create_region_dataset(
        '', str(folder), 'train', soft_labels=str(bank), num_crops=args.num_crops, input_size=args.input_size,
        interpolation='bilinear', calibration=CalibrationConfig(low=0.05, mid=0.2, top=1.0, quantile=True))
    # prob 1: every step is mixed, the upper bound of SelfMix's cost
    selfmix = create_selfmix(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, num_crops=args.num_crops)
    return create_region_loader(
        dataset, batch_size=args.batch_size, is_training=True, num_workers=args.workers, device=device,
        pin_memory=device.type == 'cuda', persistent_workers=True, mean=cfg['mean'], std=cfg['std'],
        selfmix=selfmix)


# ---------------------------------------------------------------- timing

def batches(loader) -> Iterable:
    """Endless batches over successive epochs (epoch boundaries included, as in real training)."""
    epoch = 0
    while True:
        if hasattr(getattr(loader, 'sampler', None), 'set_epoch'):  # timm's idiom; ours selects regions too
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def to_device(module: nn.Module, args: argparse.Namespace, device: torch.device) -> nn.Module:
    """Move a model or task to the device, channels-last when asked (as train_ferkd.py does)."""
    module = module.to(device)
    return module.to(memory_format=torch.channels_last) if args.channels_last else module


def time_training(task: nn.Module, loader, args: argparse.Namespace, device: torch.device,
                  profile: Optional[Dict[str, float]] = None) -> float:
    """Crops per second of whole steps (load, forward, backward, SGD update) after the warm-up.

    With ``profile`` (a dict), the timed steps run under ``torch.profiler`` instead, with each phase of
    the step (and the parts of the data path and task listed in :func:`phase_labels`) in a
    ``record_function``; the dict receives milliseconds per step for each phase.
    """
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.01, momentum=0.9)
    autocast = autocast_for(device, args.amp)
    task.train()
    crops, start = 0, None
    stream = batches(loader)
    phase = _phase if profile is not None else lambda name: nullcontext()
    with ExitStack() as stack:
        for step in range(args.warmup_steps + args.steps):
            if step == args.warmup_steps:
                synchronize(device)
                if profile is not None:
                    for owner, attr, label in phase_labels(task, loader):
                        stack.enter_context(_labelled(owner, attr, label))
                    prof = stack.enter_context(torch.profiler.profile(activities=[ProfilerActivity.CPU]))
                start = time.perf_counter()
            with phase('data'):
                x, target = next(stream)
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            with phase('forward + loss'):
                with autocast():
                    loss = task(x, target)['loss']
            with phase('backward'):
                loss.backward()
            with phase('optimizer'):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if start is not None:
                crops += x.shape[0]
        synchronize(device)
        elapsed = time.perf_counter() - start
    if profile is not None:
        totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key in PHASES}
        profile.update({name: totals.get(name, 0.0) / 1e3 / args.steps for name in PHASES})
        profile['whole step'] = elapsed * 1e3 / args.steps
    return crops / elapsed


# the phases of a profiled step: the loop's four, then parts inside them (ms of each include their parts)
PHASES = ('data', 'data: to device + normalise', 'data: SelfMix', 'forward + loss', 'task: target dict',
          'task: loss', 'backward', 'optimizer')


def _phase(name: str):
    return torch.profiler.record_function(name)


@contextmanager
def _labelled(owner: object, attr: str, label: str):
    """Run ``owner.attr`` inside ``record_function(label)`` for the duration of the context."""
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(label):
            return original(*args, **kwargs)

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, original)


def phase_labels(task: nn.Module, loader) -> List[Tuple[object, str, str]]:
    """(owner, attribute, label) of the parts of a step worth naming, for this task and loader.

    Instance attributes where Python looks them up on the instance (``forward``, ``_to_device``); the
    class for ``__call__``; the module global for ``make_target``. Parts a method lacks are skipped.
    """
    import timm_ferkd.task
    labels = [(task.criterion, 'forward', 'task: loss')]
    if hasattr(loader, '_to_device'):
        labels.append((loader, '_to_device', 'data: to device + normalise'))
        labels.append((timm_ferkd.task, 'make_target', 'task: target dict'))
    if getattr(loader, 'mixing', None) is not None:
        labels.append((type(loader.mixing), '__call__', 'data: SelfMix'))
    return labels


def time_compute(fn: Callable[[], None], reps: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` (one untimed warm-up call first)."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / reps


def compute_times(pair: Pair, args: argparse.Namespace, device: torch.device) -> Tuple[float, float]:
    """(teacher forward, student step) seconds on one synthetic batch, no data loading."""
    autocast = autocast_for(device, args.amp)
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    teacher = to_device(create_model(pair.teacher, args.num_classes, args.input_size), args, device).eval()

    @torch.inference_mode()
    def teacher_forward() -> None:
        with autocast():
            teacher(x)

    t = time_compute(teacher_forward, args.compute_reps, device)
    del teacher
    student = to_device(create_model(pair.student, args.num_classes, args.input_size), args, device).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def student_step() -> None:
        with autocast():
            loss = criterion(student(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    s = time_compute(student_step, args.compute_reps, device)
    return t, s


def run_plain(folder: Path, pair: Pair, args: argparse.Namespace, device: torch.device,
              profile: Optional[Dict[str, float]] = None) -> float:
    """Crops/s of plain timm training of the pair's student."""
    from timm.task import ClassificationTask
    student = create_model(pair.student, args.num_classes, args.input_size)
    task = to_device(ClassificationTask(student, criterion_kwargs=dict(smoothing=0.1), device=device, verbose=False),
                     args, device)
    return time_training(task, plain_loader(folder, student, args, device), args, device, profile)


def run_online(folder: Path, pair: Pair, args: argparse.Namespace, device: torch.device) -> float:
    """Crops/s of timm's online KD: the same loader as plain, the teacher forward in every step."""
    from timm.task import LogitDistillationTask
    student = create_model(pair.student, args.num_classes, args.input_size)
    teacher = create_model(pair.teacher, args.num_classes, args.input_size)
    task = to_device(LogitDistillationTask(student, teacher, criterion_kwargs=dict(smoothing=0.1), temperature=1.0,
                                           device=device, verbose=False), args, device)
    return time_training(task, plain_loader(folder, student, args, device), args, device)


def run_ferkd(folder: Path, bank: Path, pair: Pair, args: argparse.Namespace, device: torch.device,
              profile: Optional[Dict[str, float]] = None) -> float:
    """Crops/s of offline FerKD: region loader (calibration, SelfMix) and ``FerKDTask``."""
    from timm_ferkd.task import FerKDTask
    student = create_model(pair.student, args.num_classes, args.input_size)
    task = to_device(FerKDTask(student, 'ferkd', device=device, verbose=False), args, device)
    return time_training(task, region_loader(folder, bank, student, args, device), args, device, profile)


def verdict(ok: bool) -> str:
    """How a goal line reads."""
    return 'met' if ok else 'MISSED'


def report(pair: Pair, rates: Dict[str, float], t: float, s: float, num_crops: int,
           ratios: Sequence[float]) -> Dict[str, object]:
    """Print one pair's table, ratios (with their spread over repeats) and goals; return the numbers."""
    plain, online, ours = rates['plain'], rates['online'], rates['ferkd']
    bound = 1 + t / s
    print(f'\npair {pair}: teacher forward {t * 1e3:.1f} ms/batch, student step {s * 1e3:.1f} ms/batch '
          f'(pure compute), bound 1 + T/S = {bound:.2f}')
    print(f'{"method":<58} {"crops/s":>9} {"vs plain":>9} {"vs online":>10}')
    rows = [('plain timm (create_loader + ClassificationTask)', plain),
            ('online KD timm (create_loader + LogitDistillationTask)', online),
            (f'ferkd offline (region loader, {num_crops} crops/image, SelfMix)', ours)]
    for name, rate in rows:
        print(f'{name:<58} {rate:>9.1f} {rate / plain:>9.2f} {rate / online:>10.2f}')
    fraction = ours / online / bound
    mean = statistics.fmean(ratios)
    spread = (max(ratios) - min(ratios)) / mean
    std = statistics.stdev(ratios) / mean if len(ratios) > 1 else float('nan')
    print(f'ours/plain per repeat: {", ".join(f"{r:.3f}" for r in ratios)}; mean {mean:.3f}, '
          f'spread (max - min) / mean = {spread:.1%}, std / mean = {std:.1%}, '
          f'standard error / mean = {std / len(ratios) ** 0.5:.1%}')
    print(f'ours/plain = {mean:.2f} (goal >= 1.0: {verdict(mean >= 1.0)}); '
          f'ours/online = {ours / online:.2f} = {fraction:.2f} x bound {bound:.2f} '
          f'(goal >= 0.9 x bound: {verdict(fraction >= 0.9)})', flush=True)
    return {'pair': str(pair), 'teacher': pair.teacher, 'student': pair.student, 'crops_per_s': dict(rates),
            'teacher_forward_s': t, 'student_step_s': s, 'bound': bound, 'ours_plain': mean,
            'ours_plain_repeats': list(ratios), 'ours_online': ours / online, 'fraction_of_bound': fraction}


def report_profile(student: str, plain: Dict[str, float], ours: Dict[str, float]) -> None:
    """Print ms per step of each phase, plain timm against ours."""
    print(f'\nprofile of one step, {student} (torch.profiler, CPU time of each phase in ms/step; '
          f'a phase includes the parts indented under it)')
    print(f'{"phase":<34} {"plain":>8} {"ferkd":>8} {"ferkd - plain":>14}')
    for name in ('whole step',) + PHASES:
        a, b = plain.get(name, 0.0), ours.get(name, 0.0)
        label = name if ':' not in name else '  ' + name
        print(f'{label:<34} {a:>8.1f} {b:>8.1f} {b - a:>+14.1f}')


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--pairs', nargs='+', default=None, metavar='TEACHER:STUDENT',
                        help='teacher:student pairs (CPU: resnet50:resnet18 resnet152:resnet18)')
    parser.add_argument('--input-size', type=int, default=None, help='student (and online teacher) input px')
    parser.add_argument('-b', '--batch-size', type=int, default=None, help='crops per step, every method')
    parser.add_argument('-j', '--workers', type=int, default=None, help='loader workers, every method')
    parser.add_argument('--steps', type=int, default=None, help='timed steps per method')
    parser.add_argument('--warmup-steps', type=int, default=None)
    parser.add_argument('--num-crops', type=int, default=4, help='stored regions replayed per decoded image')
    parser.add_argument('--num-images', type=int, default=None,
                        help='images in the folder (default: enough for one plain pass over all steps)')
    parser.add_argument('--width', type=int, default=None)
    parser.add_argument('--height', type=int, default=None)
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--regions', type=int, default=None, help='regions per image in the bank')
    parser.add_argument('--bank-teacher', default=None,
                        help="'pair' (each pair's teacher) or a model name labelling one bank for all pairs")
    parser.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                        help='bfloat16 autocast (default: on for cuda)')
    parser.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                        help='channels-last models and inputs (default: on for cuda)')
    parser.add_argument('--compute-reps', type=int, default=None, help='repetitions of the pure-compute timings')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch intra-op threads of the main process (default 0: torch\'s choice; smoke: 1)')
    parser.add_argument('--data-dir', default=None, help='keep the images and banks here (reused when present)')
    parser.add_argument('--repeats', type=int, default=1,
                        help='measure plain and ferkd this many times, alternating, and report the spread')
    parser.add_argument('--profile', action='store_true',
                        help='also profile plain and ferkd steps with torch.profiler and print ms per phase')
    parser.add_argument('--results', default=None, metavar='FILE', help='also write the numbers to FILE (JSON)')
    parser.add_argument('--smoke', action='store_true', help='tiny, fast configuration for CI')
    args = parser.parse_args(argv)
    apply_presets(args, PRESETS)
    if args.num_images is None:
        args.num_images = max(args.num_classes, (args.warmup_steps + args.steps) * args.batch_size)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        # one thread keeps CI runs fast on a busy machine (spinning OpenMP threads stall when oversubscribed)
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pairs = [Pair.parse(p) for p in args.pairs]

    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix='ferkd-train-bench-')
        base = Path(tmp.name)
    else:
        base = Path(args.data_dir)
    base.mkdir(parents=True, exist_ok=True)
    folder = base / 'images'
    prepare_images(folder, args)
    print(machine_facts(device))
    print(f'{args.num_images} JPEGs {args.width}x{args.height}, {args.num_classes} classes, '
          f'input {args.input_size} px, '
          f'batch {args.batch_size} crops, {args.workers} workers, amp {args.amp}, channels_last {args.channels_last}, '
          f'{args.steps} timed steps after {args.warmup_steps}', flush=True)

    # plain and ferkd depend only on the student: measured once per student, --repeats times, alternating
    # which goes first so that a drift of the machine's speed does not favour one
    per_student: Dict[str, Tuple[Dict[str, float], List[float]]] = {}
    results = []
    for pair in pairs:
        bank_teacher = pair.teacher if args.bank_teacher == 'pair' else args.bank_teacher
        bank = prepare_bank(folder, base / f'bank-{bank_teacher}', bank_teacher, args, device)
        if pair.student not in per_student:
            runs = {'plain': [], 'ferkd': []}
            for repeat in range(args.repeats):
                order = ('plain', 'ferkd') if repeat % 2 == 0 else ('ferkd', 'plain')
                for method in order:
                    runs[method].append(run_plain(folder, pair, args, device) if method == 'plain'
                                        else run_ferkd(folder, bank, pair, args, device))
            ratios = [o / p for o, p in zip(runs['ferkd'], runs['plain'])]
            per_student[pair.student] = ({k: statistics.fmean(v) for k, v in runs.items()}, ratios)
            if args.profile:
                plain_profile, ours_profile = {}, {}
                run_plain(folder, pair, args, device, plain_profile)
                run_ferkd(folder, bank, pair, args, device, ours_profile)
                report_profile(pair.student, plain_profile, ours_profile)
        rates, ratios = per_student[pair.student]
        rates = dict(rates, online=run_online(folder, pair, args, device))
        t, s = compute_times(pair, args, device)
        results.append(report(pair, rates, t, s, args.num_crops, ratios))
        if args.results:  # after every pair, so a run stopped early keeps the pairs it finished
            write_results(args.results, {'device': str(device), 'input_size': args.input_size,
                                         'batch_size': args.batch_size, 'workers': args.workers,
                                         'num_crops': args.num_crops, 'amp': args.amp, 'pairs': results})
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main())
