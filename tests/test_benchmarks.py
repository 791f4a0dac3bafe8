"""Smoke runs of the benchmark scripts: each runs end to end at tiny sizes and prints its table.

Only the shape of the output is checked (exit status, table header, ratio / goal lines), never a
timing: CI machines are too noisy for that. The numbers come from full runs (benchmarks/README.md).
"""
import json
import subprocess
import sys
import time

from conftest import REPO

BENCHMARKS = REPO / 'benchmarks'


def run_benchmark(script: str, *args, timeout: float = 300) -> str:
    """Run ``benchmarks/<script> --smoke ...`` in a fresh interpreter; return its stdout + stderr."""
    cmd = [sys.executable, str(BENCHMARKS / script), '--smoke', *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f'{" ".join(cmd)} failed:\n{out[-5000:]}'
    assert 'machine: ' in out and 'timm 1.' in out, out
    return out


def test_train_throughput():
    out = run_benchmark('train_throughput.py', '--repeats', '2', '--profile')
    assert 'profile of one step' in out and 'task: loss' in out and 'data: SelfMix' in out
    assert 'ours/plain per repeat: ' in out and 'spread (max - min) / mean' in out
    assert 'method' in out and 'crops/s' in out and 'vs online' in out
    for row in ('plain timm', 'online KD timm', 'ferkd offline'):
        assert row in out
    assert 'bound 1 + T/S' in out and 'ours/plain = ' in out and 'ours/online = ' in out


def test_label_read():
    out = run_benchmark('label_read.py')
    assert 'B/region' in out and 'ratio vs FKD fp16' in out
    assert 'us/image' in out and 'speedup vs torch.load' in out and 'format 2: read_batch' in out
    assert 'format 1 <= 23 B/region' in out and 'format 2 <= 12 B/region' in out
    assert "speed goal: the loader's read (read_batch) >= 20x" in out and 'recovery error' in out


def test_generation_throughput():
    out = run_benchmark('generation_throughput.py')
    assert 'regions/s' in out and 'teacher forward only' in out and 'generate_bank, end to end' in out
    assert 'goal: generate_bank >= 0.9 x forward only' in out and 'caveat:' in out


def test_accuracy(fmnist_root, teacher_checkpoint, tmp_path):
    # a ready teacher (random test_resnet) skips teacher training; three methods cover the three modes
    out = run_benchmark('accuracy.py', '--data-dir', fmnist_root, '--teacher-dir', teacher_checkpoint,
                        '--methods', 'plain', 'online_kd', 'fkd', 'ferkd_selfmix', '--output', tmp_path)
    results = (tmp_path / 'results.md').read_text()
    # selection on the validation split, then the test split once
    assert '## Selection on the validation split (train[59936:]' in results and '## Test split' in results
    assert '| method | LR | final top-1 | best top-1 | final - plain (paired, ± s.e.) |' in results
    for method in ('plain', 'online_kd', 'fkd', 'ferkd_selfmix'):
        assert f'| {method} | 0.1 |' in results
    assert "| plain | 0.1 | " in out and (tmp_path / 'convergence.png').is_file()
    runs = tmp_path / 'runs'
    assert (runs / 'sel-plain-lr0.1-s100').is_dir() and (runs / 'test-ferkd_selfmix-s0').is_dir()


def test_scaling(fmnist_root):
    out = run_benchmark('scaling.py', '--data-dir', fmnist_root)
    assert out.count('processes') >= 2 and 'regions/s' in out and 'crops/s' in out
    assert 'same bytes' in out and 'ratio = throughput with N processes' in out
    # the 2-process bank is byte-identical to the 1-process one
    generation = out.split('same bytes')[1].split('training:')[0]
    assert generation.split() and generation.split()[-1] == 'yes' and 'NO' not in generation


def test_gpu_check(tmp_path):
    # the device machine's one command at toy size on the CPU: every part runs, the CUDA tests are collected
    # and skipped, the tables land in --out
    out_dir = tmp_path / 'out'
    out = run_benchmark('gpu_check.py', '--device', 'cpu', '--no-install', '--out', out_dir)
    results = json.loads((out_dir / 'results.json').read_text())
    parts = {p['name']: p for p in results['parts']}
    assert list(parts) == ['gpu', 'data', 'tests', 'train', 'generation test_resnet', 'loader']
    assert all(p['status'] == 'ok' for p in parts.values()), results['parts']
    tests = parts['tests']['results']
    assert tests['passed'] == tests['failed'] == tests['error'] == 0 and tests['skipped'] >= 10
    assert all('needs a CUDA GPU' in reason for reason in tests['skips'])
    summary = (out_dir / 'summary.md').read_text()
    for target in ('tests marked cuda', 'offline step vs plain timm', 'offline vs online KD',
                   'generation vs forward only', 'loader crops/s per worker vs timm'):
        assert summary.count(target) == 1 and target in out, target
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ['versions.txt', 'tests.txt', 'train.txt', 'generation.txt', 'loader.txt', 'summary.md', 'results.json'])
    assert out.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary is printed last

    # a part over its limit is killed with its process group, one past the budget is skipped
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCHMARKS))
    sleeper = gpu_check.Part('sleeper', 'sleeper.txt', 0.5, lambda results: time.sleep(60))
    start = time.monotonic()
    killed = gpu_check.run_part(sleeper, tmp_path, tmp_path, deadline=start + 60)
    assert killed.status.startswith('killed after') and time.monotonic() - start < 10
    failing = gpu_check.Part('failing', 'failing.txt', 30, lambda results: 1 / 0)
    assert gpu_check.run_part(failing, tmp_path, tmp_path, deadline=start + 60).status == 'failed (exit 1)'
    assert 'ZeroDivisionError' in (tmp_path / 'failing.txt').read_text()
    skipped = gpu_check.run_part(sleeper, tmp_path, tmp_path, deadline=time.monotonic() + 1)
    assert skipped.status.startswith('skipped: ') and skipped.seconds == 0
