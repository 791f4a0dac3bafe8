"""Generation on real Fashion-MNIST: content, resume after a kill, torchrun equals one process."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, call_main, cli_in_process
from timm_ferkd.labelling.generate import GenerateConfig, generate_bank
from timm_ferkd.bank.reader import SoftLabelBank
from timm_ferkd.errors import ConfigError


def gen_args(fmnist_root, teacher_checkpoint, output, num_images=24, regions=8, per_shard=8, extra=()):
    return ['generate', '--model', 'test_resnet', '--checkpoint', teacher_checkpoint, '--num-classes', '10',
            '--in-chans', '1', '--dataset', 'torch/fashion_mnist', '--data-dir', fmnist_root,
            '--num-images', num_images, '--regions', regions, '--input-size', '1', '32', '32',
            '-b', '64', '-j', '0', '--images-per-shard', per_shard, '--seed', '7', '--no-progress',
            '--output', output, *extra]


def shard_hashes(bank_dir: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(bank_dir.glob('shard-*.safetensors'))}


def config(fmnist_root, teacher_checkpoint, output, **kw) -> GenerateConfig:
    base = dict(model='test_resnet', checkpoint=str(teacher_checkpoint), num_classes=10, in_chans=1,
                dataset='torch/fashion_mnist', data_dir=str(fmnist_root), num_images=24, regions=8,
                input_size=(1, 32, 32), batch_size=64, workers=0, images_per_shard=8, seed=7, progress=False,
                output=str(output), device='cpu')
    base.update(kw)
    return GenerateConfig(**base)


@pytest.fixture(scope='module')
def reference(fmnist_root, teacher_checkpoint, tmp_path_factory) -> Path:
    """The bank of ``config()``, generated uninterrupted (tests read it, never write it)."""
    return Path(generate_bank(config(fmnist_root, teacher_checkpoint, tmp_path_factory.mktemp('gen') / 'ref')))


# 23 shards: an odd number for two ranks, the last one short; enough left after shard 1 to kill the job there
LONG = dict(num_images=90, regions=32, per_shard=4)


@pytest.fixture(scope='module')
def long_reference(fmnist_root, teacher_checkpoint, tmp_path_factory) -> Path:
    """``timm-ferkd generate`` with the LONG sizes, uninterrupted, in one process."""
    from timm_ferkd.cli import main
    out = tmp_path_factory.mktemp('gen') / 'long'
    assert call_main(main, gen_args(fmnist_root, teacher_checkpoint, out, **LONG)) == 0
    return out


def test_generated_labels_match_teacher(fmnist_root, teacher_checkpoint, reference):
    import timm
    from PIL import Image
    from timm_ferkd.bank.regions import replay_region
    out = reference
    bank = SoftLabelBank(out, validate=True)
    m = bank.manifest
    assert (m.num_images, m.regions_per_image, m.topk, m.num_shards) == (24, 8, 5, 3)
    assert m.teacher.input_size == (1, 32, 32) and m.teacher.interpolation == 'bilinear'
    assert m.teacher.checkpoint_sha256 == hashlib.sha256(Path(teacher_checkpoint).read_bytes()).hexdigest()
    assert m.dataset.num_images == 60000 and m.dataset.fingerprint_kind == 'targets'
    # recompute region 3 of image 13 by hand: crop, resize, normalise, teacher forward
    from torchvision.datasets import FashionMNIST
    ds = FashionMNIST(str(fmnist_root), train=True)
    image, target = ds[13]
    assert bank.target(13) == target and bank.image_size(13) == (28, 28)
    r = bank.regions(13, [3])
    crop = replay_region(image, r.boxes[0], r.flips[0], (32, 32), Image.Resampling.BILINEAR)
    x = (torch.from_numpy(np.array(crop)).float()[None, None] / 255 - 0.5) / 0.5
    model = timm.create_model('test_resnet', num_classes=10, in_chans=1, checkpoint_path=str(teacher_checkpoint)).eval()
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top = probs.topk(5)
    idx, val = bank.labels(13, [3])
    assert idx[0].tolist() == top.indices.tolist()
    np.testing.assert_allclose(val[0].astype(np.float32), top.values.numpy(), atol=1e-3)


def test_fnkd_labels_are_feature_normalised(fmnist_root, teacher_checkpoint, tmp_path):
    import timm
    out = generate_bank(config(fmnist_root, teacher_checkpoint, tmp_path / 'bank', num_images=8,
                               label_type='full', fnkd_tau=2.0))
    bank = SoftLabelBank(out)
    assert bank.manifest.fnkd_tau == 2.0
    from PIL import Image
    from timm_ferkd.bank.regions import replay_region
    from torchvision.datasets import FashionMNIST
    image, _ = FashionMNIST(str(fmnist_root), train=True)[5]
    r = bank.regions(5, [1])
    crop = replay_region(image, r.boxes[0], r.flips[0], (32, 32), Image.Resampling.BILINEAR)
    x = (torch.from_numpy(np.array(crop)).float()[None, None] / 255 - 0.5) / 0.5
    model = timm.create_model('test_resnet', num_classes=10, in_chans=1, checkpoint_path=str(teacher_checkpoint)).eval()
    with torch.no_grad():
        f = model.forward_head(model.forward_features(x), pre_logits=True)
        expected = torch.softmax(2.0 * model(x) / f.norm(dim=1, keepdim=True), dim=1)[0]
    np.testing.assert_allclose(bank.dense_targets(5, [1])[0].numpy(), expected.numpy(), atol=2e-3)


def test_resume_after_crash_redoes_only_missing_shards(fmnist_root, teacher_checkpoint, reference, tmp_path,
                                                      monkeypatch):
    import timm_ferkd.labelling.generate as gen
    real_write = gen._write
    calls = []

    def crash_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt('killed')
        calls.append(args[2])
        return real_write(*args, **kwargs)
    monkeypatch.setattr(gen, '_write', crash_after_one)
    out = tmp_path / 'bank'
    with pytest.raises(KeyboardInterrupt):
        generate_bank(config(fmnist_root, teacher_checkpoint, out))
    assert not (out / 'manifest.json').exists()
    assert [p.name for p in out.glob('shard-*.safetensors')] == ['shard-00000.safetensors']
    written = []
    monkeypatch.setattr(gen, '_write', lambda *a, **k: written.append(a[2]) or real_write(*a, **k))
    generate_bank(config(fmnist_root, teacher_checkpoint, out))
    assert written == [1, 2]
    assert shard_hashes(out) == shard_hashes(reference)
    SoftLabelBank(out).verify_checksums()


@pytest.mark.xdist_group('generate-long')
def test_sigkill_then_same_command_completes(fmnist_root, teacher_checkpoint, long_reference, tmp_path, capsys):
    out = tmp_path / 'bank'
    args = gen_args(fmnist_root, teacher_checkpoint, out, **LONG)
    proc = subprocess.Popen([sys.executable, '-m', 'timm_ferkd', *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / 'shard-00001.safetensors.json').exists():
        assert proc.poll() is None, 'generation ended before it could be killed'
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / 'manifest.json').exists(), 'the job finished before the kill: make it longer'
    done_before = len(list(out.glob('shard-*.safetensors.json')))
    assert 2 <= done_before < 23
    cli_in_process(capsys, *args)  # the same command again (a fresh interpreter adds nothing here)
    bank = SoftLabelBank(out, validate=True)
    bank.verify_checksums()
    assert shard_hashes(out) == shard_hashes(long_reference)
    assert not list(out.glob('.*.tmp'))


@pytest.mark.xdist_group('generate-long')
def test_torchrun_two_processes_equal_one(fmnist_root, teacher_checkpoint, long_reference, tmp_path):
    single = long_reference
    env = dict(os.environ, OMP_NUM_THREADS='1')
    multi = tmp_path / 'multi'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'timm_ferkd', *map(str, gen_args(fmnist_root, teacher_checkpoint, multi, **LONG))]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(shard_hashes(multi)) == 23
    assert shard_hashes(multi) == shard_hashes(single)
    a = json.loads((single / 'manifest.json').read_text())
    b = json.loads((multi / 'manifest.json').read_text())
    assert a['shards'] == b['shards']


def test_changed_settings_refuse_to_mix(fmnist_root, teacher_checkpoint, reference, tmp_path):
    out = tmp_path / 'bank'
    shutil.copytree(reference, out)  # a finished bank of config()'s settings
    before = shard_hashes(out)
    with pytest.raises(ConfigError, match='other settings.*regions'):
        generate_bank(config(fmnist_root, teacher_checkpoint, out, regions=4))
    assert shard_hashes(out) == before
    generate_bank(config(fmnist_root, teacher_checkpoint, out))  # same flags: nothing to do
    assert shard_hashes(out) == before


@pytest.mark.parametrize('extra,message', [
    (['--regions', '0'], '--regions 0'),
    (['--topk', '11'], '--topk 11'),
    (['--scale', '0.1', '1.5'], '--scale'),
    (['--temperature', '-1'], '--temperature'),
    (['--split', 'trian'], 'timm would read it as the test split'),
    (['--split', 'train[:100]'], 'a bank labels a whole split'),
])
def test_bad_flags_exit_2_with_one_line(fmnist_root, teacher_checkpoint, tmp_path, capsys, extra, message):
    args = gen_args(fmnist_root, teacher_checkpoint, tmp_path / 'b', extra=extra)
    result = cli_in_process(capsys, *args, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and last.startswith('timm-ferkd generate: error:')
    assert not (tmp_path / 'b' / 'manifest.json').exists()


def test_missing_checkpoint_and_unknown_model(fmnist_root, tmp_path, capsys):
    result = cli_in_process(capsys, *gen_args(fmnist_root, tmp_path / 'nope.pth', tmp_path / 'b'), check=False)
    assert result.returncode == 2 and 'does not exist' in result.stderr
    args = gen_args(fmnist_root, tmp_path / 'nope.pth', tmp_path / 'b')
    args[args.index('--checkpoint'):args.index('--checkpoint') + 2] = []
    args[args.index('test_resnet')] = 'no_such_model'
    result = cli_in_process(capsys, *args, check=False)
    assert result.returncode == 2 and 'unknown --model' in result.stderr
