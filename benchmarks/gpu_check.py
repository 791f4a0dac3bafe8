#!/usr/bin/env python3
"""GPU check: the CUDA tests and the GPU benchmarks in one command, inside a time budget.

For a fresh GPU machine whose python already has torch, torchvision, timm, safetensors and huggingface_hub
(this workplace's device machine; docs/benchmarks.md, "GPU (NVIDIA H200)"). In order, it

1. prints the versions it will use (packages, then GPU, driver, CPUs and ``/dev/shm``);
2. where timm is older than setup.cfg requires, installs the timm wheel carried in ``--wheels`` (default
   ``.whl/`` of the repository) into ``--site`` and puts that first on the path of this process and of
   every process it starts;
3. installs this package from the working tree without dependencies (``pip install --no-deps .``);
4. runs the parts, each in a forked child with its own time limit inside ``--budget``: a part that
   overruns its limit is killed (with its workers) and reported, a part that no longer fits the budget is
   skipped with a message, and the next part starts;
5. writes each part's output, ``summary.md`` (every target: measured, goal, verdict) and ``results.json``
   to ``--out`` (default ``$OUT``: 7 small files; gpu_check.sh adds its ``log.txt``) and prints them.

Parts (``--parts`` runs some, e.g. to rerun the one that failed; ``gpu`` and ``data`` run when needed):

* ``gpu``: CUDA, cuDNN, the device, ``nvidia-smi``;
* ``data``: the synthetic JPEG folder (``--images`` of 500x375, ImageNet-like, ``--classes`` classes);
* ``tests``: ``pytest -m cuda`` (tests/test_cuda.py);
* ``train``: benchmarks/train_throughput.py: plain timm (``create_loader`` + ``ClassificationTask``), ours
  offline and timm's online ``LogitDistillationTask``, for each of ``--students`` with ``--teacher``;
* ``generation``: benchmarks/generation_throughput.py: ``generate_bank`` regions/s against the teacher's
  forward-only rate, for each of ``--gen-teachers``;
* ``loader``: benchmarks/loader_throughput.py: crops/s (and per worker) of ``create_region_loader`` at 4
  crops per decode against ``timm.data.create_loader``.

Every benchmark uses its script's ``--device cuda`` preset (224 px, AMP bf16, channels_last, random
weights) with ``--workers`` loader workers. Targets (the issue's, ratios within one run):

* the offline step >= 1.1x plain timm's, and >= 0.9x the bound 1 + T/S against online KD;
* generation >= 0.9x the teacher's forward-only regions/s (its labelling loop; end to end is shown too);
* the loader >= 2x timm's crops/s per worker.

Usage::

    bash benchmarks/gpu_check.sh                               # on the GPU machine: everything, 8 minutes
    python benchmarks/gpu_check.py --parts train loader        # some parts
    python benchmarks/gpu_check.py --smoke --device cpu --out /tmp/check --no-install   # toy sizes (CI)
"""
import argparse
import configparser
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ('torch', 'torchvision', 'timm', 'safetensors', 'huggingface_hub', 'numpy', 'pillow', 'pyyaml', 'tqdm',
            'pytest', 'pytest-xdist', 'setuptools', 'pip')
PARTS = ('gpu', 'data', 'tests', 'train', 'generation', 'loader')
OUT_FILES = ('versions.txt', 'tests.txt', 'train.txt', 'generation.txt', 'loader.txt', 'summary.md', 'results.json')
MIN_PART_S = 10.0  # a part given less than this is skipped rather than started

# sizes and time limits (seconds) per configuration; each part's argv adds these to its script's preset
PRESETS: Dict[str, Dict[str, object]] = {
    'cuda': dict(
        images=4096, width=500, height=375, classes=1000, workers=16, budget=480,
        teacher='vit_large_patch16_224', students=['resnet50', 'vit_small_patch16_224'],
        gen_teachers=['vit_large_patch16_224', 'resnet50'],
        limits=dict(gpu=60, data=60, tests=130, train=170, generation=45, loader=45),
        tests=['-n', '4', 'tests'],
        train=['--steps', '30', '--warmup-steps', '8', '--repeats', '2', '--regions', '16', '--compute-reps', '10'],
        generation=['--num-images', '1024', '--regions', '32', '--forward-crops', '4096'],
        loader=['--num-crops', '4', '--batch-size', '256', '--crops', '16384', '--regions', '8', '--repeats', '2']),
    'smoke': dict(
        images=32, width=64, height=48, classes=4, workers=1, budget=300,
        teacher='test_resnet', students=['test_resnet'], gen_teachers=['test_resnet'],
        limits=dict(gpu=60, data=60, tests=90, train=90, generation=60, loader=60),
        tests=['-n', '0', '-p', 'no:hypothesispytest', '--assert=plain', 'tests/test_cuda.py'],  # 2 s, not 9
        train=['--smoke', '--steps', '1'], generation=['--smoke'], loader=['--smoke', '--repeats', '1']),
}


@dataclass
class Part:
    """One step of the check, run in a child process.

    Args:
        name: Shown in the tables.
        log: File in ``--out`` that receives its output (appended).
        limit: Seconds it may run before it is killed.
        run: Called in the child with the path of its results file (JSON); returns the exit status.
    """
    name: str
    log: str
    limit: float
    run: Callable[[Path], int]


@dataclass
class Outcome:
    """How a part ended: ``status`` is 'ok', 'failed (exit N)', 'killed ...' or 'skipped: ...'."""
    name: str
    status: str
    seconds: float
    results: Optional[object] = None

    @property
    def ok(self) -> bool:
        return self.status == 'ok'


# ---------------------------------------------------------------- versions, timm wheel, install

def installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def required_timm() -> str:
    """The lowest timm version setup.cfg's ``install_requires`` accepts (``timm>=X``)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / 'setup.cfg')
    for line in cfg['options']['install_requires'].splitlines():
        found = re.fullmatch(r'\s*timm\s*>=\s*([0-9][\w.]*)\s*', line)
        if found:
            return found.group(1)
    raise SystemExit('gpu_check.py: setup.cfg lists no timm>=VERSION in install_requires')


def older(version: str, than: str) -> bool:
    """Whether ``version`` sorts before ``than`` (PEP 440 where ``packaging`` is there)."""
    try:
        from packaging.version import Version
        return Version(version) < Version(than)
    except ImportError:
        numbers = lambda v: tuple(int(n) for n in re.findall(r'\d+', v)[:3])  # noqa: E731
        return numbers(version) < numbers(than)


def prepend_path(folder: str) -> None:
    """Put ``folder`` first on the import path of this process and of every process it starts."""
    sys.path.insert(0, folder)
    os.environ['PYTHONPATH'] = os.pathsep.join([folder] + [p for p in [os.environ.get('PYTHONPATH')] if p])
    importlib.invalidate_caches()


def ensure_timm(wheels: Path, site: str, log: Callable[[str], None]) -> bool:
    """Use the installed timm when new enough, else install the carried wheels into ``site``."""
    need, have = required_timm(), installed_version('timm')
    if have is not None and not older(have, need):
        log(f'timm {have} >= {need} (setup.cfg): using the installed timm')
        return True
    found = sorted(wheels.glob('*.whl')) if wheels.is_dir() else []
    if not any(w.name.lower().startswith('timm-') for w in found):
        log(f'timm {have or "is missing"}, this package needs timm>={need}, and {wheels} holds no timm wheel: on a '
            f'machine with pip, `python3 -m pip download --no-deps --only-binary=:all: -d .whl timm=={need}` in the '
            f'repository root, then carry .whl (docs/benchmarks.md, "GPU (NVIDIA H200)")')
        return False
    log(f'timm {have or "is missing"} < {need}: installing {", ".join(w.name for w in found)} into {site}')
    result = subprocess.run(
        [sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile', '--no-cache-dir',
         '--upgrade', '--target', site, *map(str, found)], capture_output=True, text=True)
    if result.returncode:
        log(f'pip could not install the carried wheels (exit {result.returncode}): {_last_line(result)}')
        return False
    prepend_path(site)
    have = installed_version('timm')
    log(f'timm {have} from {site}')
    return have is not None and not older(have, need)


def install_package(target: Optional[str], log: Callable[[str], None]) -> None:
    """``pip install --no-deps`` this working tree (into ``target`` when given); the working tree on failure."""
    cmd = [sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation', '--no-index',
           '--no-cache-dir']
    if target:
        cmd += ['--target', target, '--upgrade']
    start = time.monotonic()
    result = subprocess.run(cmd + [str(REPO)], capture_output=True, text=True)
    if result.returncode:
        log(f'pip install of the working tree failed (exit {result.returncode}): {_last_line(result)}; '
            f'using the working tree on the path instead')
        prepend_path(str(REPO))
        return
    if target:
        prepend_path(target)
    log(f'installed timm-ferkd {installed_version("timm-ferkd")} from {REPO} without dependencies'
        f'{f" into {target}" if target else ""} in {time.monotonic() - start:.1f}s')


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr or result.stdout or '').strip().splitlines()
    return lines[-1][:300] if lines else 'no output'


def package_lines() -> List[str]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    lines = [f'python {platform.python_version()} ({sys.executable}), {platform.platform()}, '
             f'{os.cpu_count()} CPUs ({usable} usable)']
    lines += [f'{name} {installed_version(name) or "MISSING"}' for name in PACKAGES]
    return lines


# ---------------------------------------------------------------- parts (each runs in the child)

def gpu_facts(device: str) -> Callable[[Path], int]:
    def run(results: Path) -> int:
        import torch
        import timm
        import timm_ferkd
        from train_throughput import write_results
        facts = {'torch': torch.__version__, 'torch_cuda': torch.version.cuda, 'timm': timm.__version__,
                 'timm_ferkd': timm_ferkd.__version__, 'timm_ferkd_from': str(Path(timm_ferkd.__file__).parent),
                 'cuda_available': torch.cuda.is_available()}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            facts.update(gpu=props.name, capability=f'{props.major}.{props.minor}',
                         gpu_memory_gib=props.total_memory / 2 ** 30, multiprocessors=props.multi_processor_count,
                         cudnn=torch.backends.cudnn.version(), gpus=torch.cuda.device_count())
        if shutil.which('nvidia-smi'):
            query = subprocess.run(
                ['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm',
                 '--format=csv,noheader'], capture_output=True, text=True, timeout=30)
            facts['nvidia_smi'] = query.stdout.strip() or _last_line(query)
        if os.path.isdir('/dev/shm'):  # DataLoader workers hand their batches over through it
            facts['dev_shm_free_gib'] = shutil.disk_usage('/dev/shm').free / 2 ** 30
        for key, value in facts.items():
            print(f'{key}: {value:.1f}' if isinstance(value, float) else f'{key}: {value}')
        if facts.get('dev_shm_free_gib', 64) < 8:
            print('warning: under 8 GiB free in /dev/shm: 16 loader workers with 256-crop batches may run out')
        write_results(results, facts)
        if device == 'cuda' and not torch.cuda.is_available():
            print('CUDA is not available here: run on a GPU machine, or use --smoke --device cpu')
            return 2
        return 0
    return run


def data_folder(folder: Path, preset: Dict[str, object]) -> Callable[[Path], int]:
    def run(results: Path) -> int:
        from loader_throughput import make_jpeg_folder
        start = time.perf_counter()
        if sum(1 for _ in folder.rglob('*.jpg')) != preset['images']:  # a reused --work-dir keeps its folder
            for stale in [folder, *folder.parent.glob('bank*')]:  # banks label the images they were made for
                shutil.rmtree(stale, ignore_errors=True)
            make_jpeg_folder(folder, preset['images'], preset['width'], preset['height'], preset['classes'],
                             workers=preset['workers'])
        print(f'{preset["images"]} JPEGs of {preset["width"]}x{preset["height"]} in {preset["classes"]} classes at '
              f'{folder} ({time.perf_counter() - start:.1f}s)')
        return 0
    return run


class OutcomeTally:
    """pytest plugin: counts outcomes (reports from xdist workers too) and keeps failures and skip reasons."""

    def __init__(self):
        self.counts = {'passed': 0, 'failed': 0, 'error': 0, 'skipped': 0}
        self.failures: List[str] = []
        self.skips: List[str] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.skipped:
            self.counts['skipped'] += 1
            reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skips.append(f'{report.nodeid}: {reason}')
        elif report.failed:
            self.counts['failed' if report.when == 'call' else 'error'] += 1
            self.failures.append(f'{report.nodeid} ({report.when})')
        elif report.when == 'call':
            self.counts['passed'] += 1


def cuda_tests(pytest_args: Sequence[str], basetemp: Path) -> Callable[[Path], int]:
    def run(results: Path) -> int:
        import pytest
        from train_throughput import write_results
        os.chdir(REPO)
        for name in ('PYTEST_XDIST_WORKER', 'PYTEST_XDIST_WORKER_COUNT', 'PYTEST_CURRENT_TEST'):
            os.environ.pop(name, None)  # when this check itself runs inside a test
        tally = OutcomeTally()
        code = int(pytest.main(['-m', 'cuda', '-q', '-rfEs', '-p', 'no:cacheprovider', f'--basetemp={basetemp}',
                                '--durations=10', *pytest_args], plugins=[tally]))
        write_results(results, dict(tally.counts, exit=code, failures=tally.failures, skips=tally.skips))
        return code
    return run


def script_main(module: str, argv: Sequence[str]) -> Callable[[Path], int]:
    """A benchmark script's ``main(argv + ['--results', FILE])``."""
    def run(results: Path) -> int:
        main = importlib.import_module(module).main
        print(f'$ python benchmarks/{module}.py {" ".join(argv)}', flush=True)
        return main([*argv, '--results', str(results)])
    return run


def create_parts(args: argparse.Namespace, preset: Dict[str, object], work: Path) -> List[Part]:
    limits, device, images = preset['limits'], args.device, work / 'images'
    common = ['--device', device, '--num-classes', str(preset['classes'])]
    parts = [Part('gpu', 'versions.txt', limits['gpu'], gpu_facts(device))]
    if set(args.parts) & {'train', 'generation', 'loader'}:
        parts.append(Part('data', 'versions.txt', limits['data'], data_folder(images, preset)))
    if 'tests' in args.parts:
        parts.append(Part('tests', 'tests.txt', limits['tests'], cuda_tests(preset['tests'], work / 'pytest')))
    if 'train' in args.parts:
        pairs = [f'{preset["teacher"]}:{student}' for student in preset['students']]
        argv = [*common, '--pairs', *pairs, '--data-dir', str(work), '-j', str(preset['workers']), *preset['train']]
        parts.append(Part('train', 'train.txt', limits['train'], script_main('train_throughput', argv)))
    if 'generation' in args.parts:
        for teacher in preset['gen_teachers']:
            argv = [*common, '--model', teacher, '--data-dir', str(images), '-j', str(preset['workers']),
                    *preset['generation']]
            parts.append(Part(f'generation {teacher}', 'generation.txt', limits['generation'],
                              script_main('generation_throughput', argv)))
    if 'loader' in args.parts:
        argv = [*common, '--data-dir', str(work), '--num-images', str(preset['images']), '--width',
                str(preset['width']), '--height', str(preset['height']), '--workers', str(preset['workers']),
                *preset['loader']]
        parts.append(Part('loader', 'loader.txt', limits['loader'], script_main('loader_throughput', argv)))
    return parts


# ---------------------------------------------------------------- running a part

def run_part(part: Part, out: Path, work: Path, deadline: float) -> Outcome:
    """Fork, run the part with its output in its log file, and kill its process group at its limit."""
    left = deadline - time.monotonic()
    if left < MIN_PART_S:
        message = f'skipped: {left:.0f}s of the budget left, under the {MIN_PART_S:.0f}s a part needs'
        print(f'\n== {part.name}: {message}', flush=True)
        return Outcome(part.name, message, 0.0)
    limit = min(part.limit, left)
    results = work / f'results-{re.sub(r"[^A-Za-z0-9_.-]", "_", part.name)}.json'
    results.unlink(missing_ok=True)
    log = out / part.log
    offset = log.stat().st_size if log.is_file() else 0  # several parts append to one file
    print(f'\n== {part.name} (limit {limit:.0f}s, output in {log.name})', flush=True)
    sys.stderr.flush()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(part, log, results)
    code = _wait(pid, start + limit)
    seconds = time.monotonic() - start
    if code is None:
        status = f'killed after {seconds:.0f}s: over its limit of {limit:.0f}s'
    else:
        status = 'ok' if code == 0 else f'failed (exit {code})'
    try:
        numbers = json.loads(results.read_text()) if results.is_file() else None
    except ValueError:
        numbers = None
    print(_tail(log, offset, 60 if part.name == 'tests' else 200), end='')
    print(f'-- {part.name}: {status} ({seconds:.0f}s)', flush=True)
    return Outcome(part.name, status, seconds, numbers)


def _child(part: Part, log: Path, results: Path) -> None:
    code = 1
    try:
        os.setsid()  # its own process group: the parent kills the part together with its workers
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        # fresh streams on the redirected descriptors, whatever sys.stdout was (a test's capture, say)
        sys.stdout = open(1, 'w', buffering=1, closefd=False)
        sys.stderr = open(2, 'w', buffering=1, closefd=False)
        returned = part.run(results)
        code = 0 if returned is None else int(returned)
    except SystemExit as e:  # argparse and the scripts' own exits
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, deadline: float) -> Optional[int]:
    """The child's exit status, or None when it was killed at ``deadline``; its group is killed either way."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            _kill_group(pid)  # workers it left behind
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            _kill_group(pid)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.2)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:  # the group is gone already
        pass


def _tail(path: Path, offset: int, lines: int) -> str:
    """The last ``lines`` lines written to ``path`` after ``offset``."""
    if not path.is_file():
        return ''
    with open(path, 'rb') as f:
        f.seek(offset)
        text = f.read().decode(errors='replace').splitlines()
    cut = [f'[... {len(text) - lines} lines before these in {path.name}]'] if len(text) > lines else []
    return ''.join(f'{line}\n' for line in cut + text[-lines:])


# ---------------------------------------------------------------- targets and summary

# what each part measures against a goal, for the rows of the parts that did not run
GOALS = {'tests': ('tests marked cuda', 'all pass, none skipped'),
         'train': ('offline step vs plain timm; offline vs online KD', '>= 1.1; >= 0.9 x (1 + T/S)'),
         'generation': ('generation vs forward only', '>= 0.9'),
         'loader': ('loader crops/s per worker vs timm', '>= 2.0')}


def target_rows(outcomes: Sequence[Outcome], device: str,
                parts: Sequence[str] = ()) -> List[Tuple[str, str, str, str]]:
    """(target, measured, goal, verdict) of every number with a goal, and of each part in ``parts`` that never ran."""
    def verdict(ok: bool) -> str:
        return 'met' if ok else 'MISSED'

    rows = []
    for outcome in outcomes:
        numbers = outcome.results
        if outcome.name == 'tests':
            if not isinstance(numbers, dict):
                rows.append(('tests marked cuda', outcome.status, 'all pass', 'NOT RUN'))
                continue
            counts = ', '.join(f'{numbers[k]} {k}' for k in ('passed', 'failed', 'error', 'skipped'))
            if device == 'cuda':
                good = numbers['passed'] > 0 and not (numbers['failed'] or numbers['error'] or numbers['skipped'])
                rows.append(('tests marked cuda', counts, 'all pass, none skipped', verdict(good)))
            else:
                rows.append(('tests marked cuda', counts, 'all pass, none skipped', 'skipped: no CUDA here'))
        elif outcome.name == 'train' and isinstance(numbers, dict):
            for pair in numbers['pairs']:
                plain = pair['ours_plain']
                rows.append((f'offline step vs plain timm, student {pair["student"]}',
                             f'{plain:.2f} ({", ".join(f"{r:.2f}" for r in pair["ours_plain_repeats"])})', '>= 1.1',
                             verdict(plain >= 1.1)))
                rows.append((f'offline vs online KD, {pair["teacher"]} -> {pair["student"]}',
                             f'{pair["ours_online"]:.2f} = {pair["fraction_of_bound"]:.2f} x bound '
                             f'{pair["bound"]:.2f}', '>= 0.9 x (1 + T/S)', verdict(pair['fraction_of_bound'] >= 0.9)))
        elif outcome.name.startswith('generation') and isinstance(numbers, dict):
            rows.append((f'generation vs forward only, teacher {numbers["model"]}',
                         f'{numbers["loop_ratio"]:.2f} (end to end {numbers["end_to_end_ratio"]:.2f}; '
                         f'{numbers["loop_regions_per_s"]:.0f} vs {numbers["forward_regions_per_s"]:.0f} regions/s)',
                         '>= 0.9', verdict(numbers['loop_ratio'] >= 0.9)))
        elif outcome.name == 'loader' and isinstance(numbers, dict):
            rows.append((f'loader crops/s per worker vs timm ({numbers["num_crops"]} crops per decode)',
                         f'{numbers["ratio"]:.2f} ({numbers["ferkd_per_worker"]:.0f} vs '
                         f'{numbers["timm_per_worker"]:.0f} per worker, {numbers["workers"]} workers)',
                         '>= 2.0', verdict(numbers['ratio'] >= 2.0)))
        elif outcome.name in ('train', 'loader') or outcome.name.startswith('generation'):
            rows.append((outcome.name, outcome.status, 'see its target', 'NOT MEASURED'))
    ran = {o.name.split()[0] for o in outcomes}
    rows += [(GOALS[p][0], 'not run', GOALS[p][1], 'NOT MEASURED') for p in parts if p in GOALS and p not in ran]
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(c).replace('|', '/') for c in row) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'


def summary(args: argparse.Namespace, outcomes: Sequence[Outcome], seconds: float) -> str:
    facts = next((o.results for o in outcomes if o.name == 'gpu' and isinstance(o.results, dict)), {})
    machine = facts.get('gpu') or f'{platform.processor() or platform.machine()} (no GPU)'
    text = (f'# GPU check {time.strftime("%Y-%m-%d %H:%M")}\n\n'
            f'`python benchmarks/gpu_check.py {" ".join(args.argv)}` on {machine}, {os.cpu_count()} CPUs, '
            f'torch {facts.get("torch", "?")} (CUDA {facts.get("torch_cuda")}), timm {facts.get("timm", "?")}, '
            f'timm-ferkd {facts.get("timm_ferkd", "?")}; {seconds:.0f}s of a {args.budget:.0f}s budget\n')
    if args.smoke:
        text += '\n**smoke run**: toy sizes, so the ratios below say nothing about speed\n'
    rows = target_rows(outcomes, args.device, args.parts)
    text += '\n' + markdown_table(('target', 'measured', 'goal', 'verdict'), rows)
    text += '\n' + markdown_table(('part', 'status', 'seconds'), [(o.name, o.status, f'{o.seconds:.0f}')
                                                                  for o in outcomes])
    return text


# ---------------------------------------------------------------- main

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda', choices=('cuda', 'cpu'), help='cpu needs --smoke')
    parser.add_argument('--smoke', action='store_true', help='toy sizes, seconds (what the test suite runs)')
    parser.add_argument('--parts', nargs='+', default=['tests', 'train', 'generation', 'loader'],
                        choices=PARTS[2:], help='parts to run (default: all)')
    parser.add_argument('--budget', type=float, default=None, help='seconds for everything (cuda: 480, smoke: 300)')
    parser.add_argument('--out', default=os.environ.get('OUT') or '/tmp/ferkd-gpu-check',
                        help='folder for the tables (default: $OUT)')
    parser.add_argument('--work-dir', default=None,
                        help='images, banks, checkpoints (default: a temporary folder, removed at the end; '
                             'a given one is kept and its images reused)')
    parser.add_argument('--workers', type=int, default=None, help='loader workers (cuda: min(16, CPUs))')
    parser.add_argument('--images', type=int, default=None, help='synthetic JPEGs (cuda: 4096)')
    parser.add_argument('--teacher', default=None, help='training teacher (cuda: vit_large_patch16_224)')
    parser.add_argument('--students', nargs='+', default=None, help='cuda: resnet50 vit_small_patch16_224')
    parser.add_argument('--gen-teachers', nargs='+', default=None, help='cuda: vit_large_patch16_224 resnet50')
    parser.add_argument('--wheels', default=str(REPO / '.whl'), help='carried wheels, used when timm is too old')
    parser.add_argument('--site', default='/tmp/site', help='where carried wheels are installed')
    parser.add_argument('--no-install', action='store_true', help='use the working tree without pip install')
    parser.add_argument('--install-target', default=None, help='pip install --target DIR instead of site-packages')
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.device == 'cpu' and not args.smoke:
        parser.error('--device cpu needs --smoke: on a CPU the benchmark scripts run on their own '
                     '(benchmarks/README.md)')
    return args


@contextmanager
def work_folder(path: Optional[str]) -> Iterator[Path]:
    """``path`` (created, kept), or a temporary folder removed afterwards."""
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix='ferkd-gpu-check-') as tmp:
        yield Path(tmp)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    preset = dict(PRESETS['smoke' if args.smoke else 'cuda'])
    for name in ('workers', 'images', 'teacher', 'students', 'gen_teachers', 'budget'):
        if getattr(args, name) is not None:
            preset[name] = getattr(args, name)
    if not args.smoke and args.workers is None:
        preset['workers'] = min(16, os.cpu_count() or 1)
    args.budget = float(preset['budget'])
    deadline = start + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:
        (out / name).unlink(missing_ok=True)
    versions = out / 'versions.txt'

    def log(line: str) -> None:
        print(line, flush=True)
        with open(versions, 'a') as f:
            f.write(line + '\n')

    for line in package_lines():
        log(line)
    if not ensure_timm(Path(args.wheels), args.site, log):
        return 2
    if args.no_install:
        log('--no-install: using the package of the path (PYTHONPATH or the installed one)')
    else:
        install_package(args.install_target, log)
    if args.device == 'cpu':
        # one import for every part (children inherit it); never with CUDA, which must not be touched before a fork
        for module in ('torch', 'timm', 'timm_ferkd', 'train_throughput', 'generation_throughput',
                       'loader_throughput', 'pytest'):
            importlib.import_module(module)

    outcomes: List[Outcome] = []
    with work_folder(args.work_dir) as work:
        for part in create_parts(args, preset, work):
            outcome = run_part(part, out, work, deadline)
            outcomes.append(outcome)
            if part.name in ('gpu', 'data') and not outcome.ok:
                log(f'{part.name} did not succeed ({outcome.status}): nothing else can run')
                break
    seconds = time.monotonic() - start
    text = summary(args, outcomes, seconds)
    (out / 'summary.md').write_text(text)
    (out / 'results.json').write_text(json.dumps({
        'argv': args.argv, 'date': time.strftime('%Y-%m-%d %H:%M:%S'), 'device': args.device, 'smoke': args.smoke,
        'seconds': seconds, 'budget': args.budget, 'preset': preset,
        'parts': [{'name': o.name, 'status': o.status, 'seconds': o.seconds, 'results': o.results} for o in outcomes],
        'targets': [dict(zip(('target', 'measured', 'goal', 'verdict'), row))
                    for row in target_rows(outcomes, args.device, args.parts)]}, indent=2))
    print('\n' + text, flush=True)
    return 0 if outcomes and all(o.ok for o in outcomes) else 1


if __name__ == '__main__':
    sys.exit(main())
