"""train_ferkd.py end to end on a Fashion-MNIST subset: every mode, resume, torchrun, checkpoints, errors.

The plain and FKD runs, resume, torchrun and SIGTERM run the script as a subprocess, as a user does; the other
runs and the bad-input cases call ``train_ferkd.main`` in-process, where a fresh interpreter adds nothing. Runs
that several tests read are module fixtures, and those tests one pytest-xdist group.
"""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, call_main, train_in_process

IMAGES = 192


@pytest.fixture(scope='module')
def bank(fmnist_root, teacher_checkpoint, tmp_path_factory) -> Path:
    from timm_ferkd.cli import main
    out = tmp_path_factory.mktemp('train') / 'bank'
    assert call_main(main, [
        'generate', '--model', 'test_resnet', '--checkpoint', teacher_checkpoint, '--num-classes', '10',
        '--in-chans', '1', '--dataset', 'torch/fashion_mnist', '--data-dir', fmnist_root,
        '--num-images', IMAGES, '--regions', '8', '--input-size', '1', '28', '28', '-j', '0',
        '--images-per-shard', '96', '--no-progress', '--output', out]) == 0
    return out


def train_argv(fmnist_root, output, *extra):
    return ['--data-dir', str(fmnist_root), '--dataset', 'torch/fashion_mnist',
            '--model', 'test_resnet', '--num-classes', '10', '--input-size', '1', '28', '28',
            '--val-subset', '128', '-b', '32', '--epochs', '1', '--warmup-epochs', '0', '-j', '0',
            '--lr', '0.05', '--output', str(output), '--log-interval', '2', '--seed', '3', *map(str, extra)]


def train(fmnist_root, output, *extra, check=True, env=None, launcher=()):
    cmd = [*launcher] if launcher else [sys.executable]
    cmd += [str(REPO / 'train_ferkd.py'), *train_argv(fmnist_root, output, *extra)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f'{" ".join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
    return result


def train_here(capsys, fmnist_root, output, *extra, check=True):
    """``train`` in this process (for runs a fresh interpreter adds nothing to)."""
    return train_in_process(capsys, *train_argv(fmnist_root, output, *extra), check=check)


@pytest.fixture(scope='module')
def plain_run(fmnist_root, tmp_path_factory):
    """Two epochs without a teacher: (the process's result, its run folder)."""
    out = tmp_path_factory.mktemp('plain')
    return train(fmnist_root, out, '--experiment', 'plain', '--train-subset', IMAGES, '--epochs', '2'), out / 'plain'


@pytest.fixture(scope='module')
def offline_run(fmnist_root, bank, tmp_path_factory):
    """Two epochs on the bank (4 crops, soft CE), the first a per-update warmup: (result, run folder)."""
    out = tmp_path_factory.mktemp('fkd')
    result = train(fmnist_root, out, '--experiment', 'fkd', '--soft-labels', bank, '--num-crops', '4',
                   '--distill-loss', 'soft_ce', '--epochs', '2', '--warmup-epochs', '1', '--lr', '0.1')
    return result, out / 'fkd'


def summary_rows(run_dir: Path):
    import csv
    with open(run_dir / 'summary.csv') as f:
        return list(csv.DictReader(f))


@pytest.mark.xdist_group('train-runs')
def test_plain(plain_run):
    run = plain_run[1]
    for name in ('last.pth.tar', 'model_best.pth.tar', 'args.yaml', 'summary.csv'):
        assert (run / name).is_file(), name
    rows = summary_rows(run)
    assert [r['epoch'] for r in rows] == ['0', '1']
    assert 0 <= float(rows[-1]['eval_top1']) <= 100


def test_online_kd_uses_timm_logit_distillation(fmnist_root, teacher_checkpoint, tmp_path, capsys):
    result = train_here(capsys, fmnist_root, tmp_path, '--experiment', 'kd', '--train-subset', IMAGES,
                        '--kd-model-name', 'test_resnet', '--kd-checkpoint', teacher_checkpoint,
                        '--kd-temperature', '2')
    assert 'LogitDistillationTask' in result.stdout + result.stderr
    assert 'train_kd_loss' in (tmp_path / 'kd' / 'summary.csv').read_text()


@pytest.mark.parametrize('flags, task, term', [
    (('--kd-loss', 'fnkd', '--fnkd-tau', '2'), 'OnlineDistillTask: loss=FNKDLoss', 'train_fnkd'),
    (('--kd-loss', 'kd', '--kd-prob-shift'), 'OnlineDistillTask: loss=KDLoss', 'train_kd'),
    (('--soft-labels', None, '--num-crops', '2', '--distill-loss', 'fnkd'), 'FerKDTask: loss=FNKDLoss', 'train_fnkd'),
])
def test_criteria_come_from_timms_loss_factory(fmnist_root, teacher_checkpoint, bank, tmp_path, capsys, flags,
                                               task, term):
    # every distillation criterion is built by timm's create_classification_loss (patched by register_with_timm)
    import timm.loss
    from timm_ferkd.losses import TimmCriterion
    from timm_ferkd.registration import register_with_timm, unregister_from_timm
    register_with_timm()  # what train_ferkd.main does first; the spy below wraps the patched factory
    patched, built = timm.loss.create_classification_loss, []
    timm.loss.create_classification_loss = lambda *a, **k: built.append(patched(*a, **k)) or built[-1]
    flags = tuple(bank if f is None else f for f in flags)
    teacher = () if '--soft-labels' in flags else ('--kd-model-name', 'test_resnet', '--kd-checkpoint', teacher_checkpoint)
    try:
        result = train_here(capsys, fmnist_root, tmp_path, '--experiment', 'x', '--train-subset', 64, *teacher, *flags)
    finally:
        timm.loss.create_classification_loss = patched
        unregister_from_timm()
    assert task in result.stdout + result.stderr
    assert len(built) == 1 and isinstance(built[0], TimmCriterion)
    assert term in (tmp_path / 'x' / 'summary.csv').read_text()


@pytest.mark.xdist_group('train-runs')
def test_fkd_offline(offline_run):
    result, run = offline_run
    log = result.stdout + result.stderr
    assert f'One epoch = {IMAGES} images decoded once x 4 crop(s) = {IMAGES * 4} crops' in log
    assert 'train_soft_ce' in (run / 'summary.csv').read_text()


def test_ferkd_selfmix_vit_student(fmnist_root, bank, tmp_path, capsys):
    train_here(capsys, fmnist_root, tmp_path, '--experiment', 'ferkd', '--soft-labels', bank, '--num-crops', '4',
               '--distill-loss', 'ferkd', '--calib-quantile', '--calib-low', '0.05', '--calib-mid', '0.3',
               '--selfmix', '0.8', '--selfmix-cutmix', '1.0', '--selfmix-prob', '1.0',
               '--model', 'test_vit', '--model-kwargs', 'patch_size=4', '--opt', 'adamw', '--lr', '1e-3')
    import timm
    model = timm.create_model('test_vit', num_classes=10, in_chans=1, img_size=28, patch_size=4,
                              checkpoint_path=str(tmp_path / 'ferkd' / 'model_best.pth.tar'))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_vit_patch_size_mismatch_is_a_clear_error(fmnist_root, bank, tmp_path, capsys):
    result = train_here(capsys, fmnist_root, tmp_path, '--soft-labels', bank, '--model', 'test_vit', check=False)
    assert result.returncode == 2
    assert "not a multiple of test_vit's patch size (16, 16)" in result.stderr


def test_resume_equals_uninterrupted_and_best_checkpoint_loads(fmnist_root, bank, tmp_path):
    common = ('--soft-labels', bank, '--num-crops', '4', '--distill-loss', 'ferkd', '--selfmix', '0.8',
              '--model-ema', '--model-ema-decay', '0.9', '--epochs', '2', '--calib-quantile', '--calib-mid', '0.2',
              '--drop-path', '0.1', '--color-jitter', '0.2', '-j', '2')
    train(fmnist_root, tmp_path, '--experiment', 'full', *common)
    full = tmp_path / 'full'
    # a new process started from the epoch-0 checkpoint is a run killed after epoch 0: resuming it must
    # replay epoch 1 (regions, jitter, SelfMix, drop-path, optimizer, scheduler, EMA) exactly
    train(fmnist_root, tmp_path, '--experiment', 'resumed', *common, '--resume', full / 'checkpoint-0.pth.tar')
    resumed = tmp_path / 'resumed'
    full_state = torch.load(full / 'last.pth.tar', map_location='cpu', weights_only=False)
    resumed_state = torch.load(resumed / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert resumed_state['epoch'] == full_state['epoch'] == 1
    for key in ('state_dict', 'state_dict_ema'):
        for name, value in full_state[key].items():
            torch.testing.assert_close(resumed_state[key][name], value, rtol=0, atol=0, msg=f'{key}.{name}')
    assert [r['epoch'] for r in summary_rows(resumed)] == ['1']
    import timm
    best = timm.create_model('test_resnet', num_classes=10, in_chans=1,
                             checkpoint_path=str(full / 'model_best.pth.tar')).eval()
    assert best(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_torchrun_two_processes(fmnist_root, bank, tmp_path):
    launcher = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2')
    result = train(fmnist_root, tmp_path, '--experiment', 'ddp', '--soft-labels', bank, '--num-crops', '4',
                   '--selfmix', '0.8', launcher=launcher)
    log = result.stdout + result.stderr
    assert 'distributed mode with 2 processes' in log
    # 192 images / 2 ranks / (32 / 4 images per step) = 12 steps per rank
    assert '[  12/12]' in log
    assert len(summary_rows(tmp_path / 'ddp')) == 1


def test_sigterm_writes_recovery_checkpoint(fmnist_root, bank, tmp_path, capsys):
    cmd = [sys.executable, str(REPO / 'train_ferkd.py'), '--data-dir', str(fmnist_root), '--dataset',
           'torch/fashion_mnist', '--model', 'test_resnet', '--num-classes', '10', '--input-size', '1', '28', '28',
           '--soft-labels', str(bank), '--num-crops', '4', '-b', '4', '--epochs', '50', '-j', '0',
           '--log-interval', '1', '--output', str(tmp_path), '--experiment', 'term', '--val-subset', '64']
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    deadline = time.time() + 120
    for line in proc.stdout:
        if 'train epoch 0 [   3/' in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline
    proc.stdout.read()
    assert proc.wait(60) == 143
    recovery = list((tmp_path / 'term').glob('recovery-0-*.pth.tar'))
    assert len(recovery) == 1
    state = torch.load(recovery[0], map_location='cpu', weights_only=False)
    assert state['epoch'] == -1  # resume restarts the interrupted epoch 0
    result = train_here(capsys, fmnist_root, tmp_path, '--experiment', 'term2', '--soft-labels', bank,
                        '--resume', recovery[0])
    assert 'epoch 0:' in result.stdout + result.stderr


def _logged_lrs(log: str, epoch: int):
    return [float(line.split(' lr ')[1].split()[0]) for line in log.splitlines() if f'train epoch {epoch} [' in line]


@pytest.mark.xdist_group('train-runs')
def test_offline_schedule_steps_per_update_plain_per_epoch(offline_run, plain_run):
    log = offline_run[0].stdout + offline_run[0].stderr
    warmup, decay = _logged_lrs(log, 0), _logged_lrs(log, 1)
    # 192 images x 4 crops / 32 = 24 updates per epoch: warmup rises and cosine decays within the epochs
    assert '24 steps of 32 crops' in log
    # (the last line of epoch 0 is logged after update 24, where timm's cosine takes over from warmup)
    assert len(warmup) > 3 and all(a < b for a, b in zip(warmup[:-1], warmup[1:-1]))
    assert len(decay) > 3 and all(a > b for a, b in zip(decay, decay[1:]))
    plain = plain_run[0]
    assert len(set(_logged_lrs(plain.stdout + plain.stderr, 1))) == 1


def test_validation_on_a_held_out_range_of_the_training_split(fmnist_root, tmp_path, capsys):
    result = train_here(capsys, fmnist_root, tmp_path, '--experiment', 'held', '--train-subset', '64',
                        '--val-split', 'train[59900:]', '--val-subset', '1000')
    assert (tmp_path / 'held' / 'summary.csv').is_file()
    import yaml
    assert yaml.safe_load((tmp_path / 'held' / 'args.yaml').read_text())['val_split'] == 'train[59900:]'
    assert result.returncode == 0


@pytest.mark.parametrize('case', ['model', 'dataset', 'other_split', 'classes', 'crops', 'resume', 'kd_checkpoint',
                                  'warmup', 'empty_range', 'sliced_bank_split', 'val_split_typo', 'bank_split_typo',
                                  'bad_range'])
def test_bad_input_exits_2_before_training(fmnist_root, bank, tmp_path, capsys, case):
    junk = tmp_path / 'junk.pth.tar'
    junk.write_bytes(b'not a checkpoint')
    extra = {
        'model': ('--model', 'no_such_net'),
        'dataset': ('--dataset', 'torch/no_such_set', '--train-subset', '10'),
        'other_split': ('--soft-labels', bank, '--train-split', 'validation'),
        'classes': ('--soft-labels', bank, '--num-classes', '7'),
        'crops': ('--soft-labels', bank, '--num-crops', '16', '-b', '32'),
        'resume': ('--resume', junk, '--train-subset', '10'),
        'kd_checkpoint': ('--kd-model-name', 'test_resnet', '--kd-checkpoint', junk, '--train-subset', '10'),
        'warmup': ('--soft-labels', bank, '--epochs', '3', '--warmup-epochs', '3'),
        'empty_range': ('--train-subset', '10', '--val-split', 'train[70000:]'),
        'sliced_bank_split': ('--soft-labels', bank, '--train-split', 'train[:100]'),
        'val_split_typo': ('--train-subset', '10', '--val-split', 'tset'),
        'bank_split_typo': ('--soft-labels', bank, '--train-split', 'trian'),
        'bad_range': ('--train-subset', '10', '--val-split', 'train[59000:'),
    }[case]
    expected = {
        'model': 'unknown --model', 'dataset': 'no_such_set', 'other_split': 'bank was generated on',
        'classes': 'classes', 'crops': 'exceeds the bank', 'resume': 'cannot resume',
        'kd_checkpoint': 'is not a checkpoint of test_resnet', 'warmup': 'never leave warmup',
        'empty_range': 'selects no images', 'sliced_bank_split': 'images its bank labels',
        'val_split_typo': 'timm would read it as the test split', 'bank_split_typo': 'timm would read it as the test',
        'bad_range': 'is not NAME or NAME[START:STOP]',
    }[case]
    result = train_here(capsys, fmnist_root, tmp_path, '--experiment', case, *extra, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('train_ferkd.py: error:') and expected in last, last
    assert not (tmp_path / case / 'last.pth.tar').exists()
