"""The CUDA paths: the region loader's copy stream and pinned memory, CUDA against CPU offline steps, AMP,
channels-last, torch.compile, DDP over NCCL, train_ferkd.py on CUDA under torchrun, generation on the GPU.

Every test marked ``cuda`` needs a GPU and is skipped without one; ``benchmarks/gpu_check.py`` runs them on a
GPU machine (``pytest -m cuda``). Where a body means something on a CPU too, the test is parametrized over the
device and its CPU variant (unmarked, a tiny model at 32 px) runs in the ordinary suite, so the code that the
GPU variants share with it stays alive.
"""
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
from timm.utils import NativeScaler, unwrap_model

from bank_factory import folder_source, make_image_folder, peaked_probs, write_bank
from conftest import REPO, train_in_process
from test_train import bank, summary_rows, train_argv  # noqa: F401 (bank: the Fashion-MNIST bank fixture)
from timm_ferkd.bank.reader import SoftLabelBank
from timm_ferkd.data.calibration import CalibrationConfig
from timm_ferkd.data.dataset import RegionDataset
from timm_ferkd.data.loader import create_region_loader
from timm_ferkd.data.mixing import create_selfmix
from timm_ferkd.labelling.generate import GenerateConfig, generate_bank
from timm_ferkd.task import FerKDTask

NUM_IMAGES, NC, R, K, SIZE, BATCH = 16, 10, 8, 2, 32, 8  # images, classes, regions, crops per image, px, crops/step

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA GPU, none here (benchmarks/gpu_check.py runs it on one)')
CUDA = (pytest.mark.cuda, requires_cuda)


def on_cuda(*values, id: Optional[str] = None):
    """A parametrization that runs only on CUDA (marked ``cuda``)."""
    return pytest.param(*values, marks=CUDA, id=id)


@contextmanager
def fp32_math():
    """Plain float32 convolutions and matmuls on CUDA (no TF32), for comparisons with the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope='module')
def region_data(tmp_path_factory):
    """(JPEG folder, bank): 16 RGB images of about 40x46 px, 8 regions each with random peaked labels."""
    root = make_image_folder(tmp_path_factory.mktemp('cuda-images'), num_images=NUM_IMAGES, num_classes=3, fmt='jpg',
                             sizes=[(36 + i % 5, 44 + 2 * (i % 3)) for i in range(NUM_IMAGES)])
    rng = np.random.default_rng(0)
    probs = peaked_probs(rng.uniform(0.2, 0.95, size=(NUM_IMAGES, R)), NC, rng.integers(0, NC, size=(NUM_IMAGES, R)))
    path = tmp_path_factory.mktemp('cuda-bank') / 'bank'
    write_bank(path, folder_source(root), probs, NC, R)
    return root, path


def region_loader(data, device, workers: int = 0, pin_memory: bool = False, distributed: bool = False):
    """The training loader of FerKD: calibration by quantiles and SelfMix (Mixup or CutMix per crop)."""
    root, path = data
    dataset = RegionDataset(folder_source(root), path, num_crops=K, input_size=SIZE, seed=3,
                            calibration=CalibrationConfig(low=0.05, mid=0.2, top=1.0, quantile=True))
    selfmix = create_selfmix(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, mode='pair', num_crops=K, seed=5)
    return create_region_loader(dataset, batch_size=BATCH, num_workers=workers, device=device, pin_memory=pin_memory,
                                persistent_workers=False, selfmix=selfmix, distributed=distributed)


def cpu_copy(target: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in target.items()}


def assert_same_targets(got, expected) -> None:
    """Step by step, every tensor of the target dicts bit for bit."""
    assert len(got) == len(expected) > 0
    for step, (g, e) in enumerate(zip(got, expected)):
        assert set(g) == set(e), step
        for key, value in e.items():
            assert g[key].dtype == value.dtype and torch.equal(g[key], value), f'step {step}: {key}'


def offline_steps(data, device, steps: int = 2, channels_last: bool = False, amp_dtype: Optional[torch.dtype] = None,
                  compile_backend: Optional[str] = None, distributed: bool = False) -> Dict[str, object]:
    """Train a seeded ``test_resnet`` for ``steps`` steps as train_ferkd.py does.

    Returns:
        ``targets`` (the dicts the loss received, on the CPU), ``losses`` [steps], ``weights`` (the student's
        final state, float32 on the CPU), ``init`` (its initial state) and ``scaler`` (float16 only).
    """
    device = torch.device(device)
    torch.manual_seed(0)
    student = timm.create_model('test_resnet', num_classes=NC)
    init = {k: v.detach().float().clone() for k, v in student.state_dict().items()}
    task = FerKDTask(student, 'ferkd', device=device, verbose=False).to(device)
    if channels_last:
        task = task.to(memory_format=torch.channels_last)
    seen = []
    loss_forward = task.criterion.forward

    def capture(logits, target, **kwargs):
        seen.append(cpu_copy(target))
        return loss_forward(logits, target, **kwargs)

    task.criterion.forward = capture
    if compile_backend:
        task.compile(backend=compile_backend)
    if distributed:
        task.prepare_distributed(device_ids=[torch.cuda.current_device()] if device.type == 'cuda' else None)
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.02, momentum=0.9)
    scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
    losses = []
    task.train()
    loader = region_loader(data, device, distributed=distributed)
    for _, (x, target) in zip(range(steps), loader):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss = task(x, target)['loss']
        if scaler is not None:
            scaler(loss, optimizer)
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float().cpu())
    weights = {k: v.detach().float().cpu() for k, v in unwrap_model(task.get_trainable_module()).state_dict().items()}
    return dict(targets=seen, losses=torch.stack(losses), weights=weights, init=init, scaler=scaler)


def update(run: Dict[str, object]) -> torch.Tensor:
    """All trained parameters' change over the run, flattened (BatchNorm statistics left out)."""
    keys = [k for k in run['init'] if 'running_' not in k and 'num_batches_tracked' not in k]
    return torch.cat([(run['weights'][k] - run['init'][k]).flatten() for k in keys])


def assert_close_weights(got: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], **tolerance) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, msg=name, **tolerance)


# ---------------------------------------------------------------- the region loader

@pytest.mark.parametrize('device', ['cpu', on_cuda('cuda')])
def test_region_loader_copy_stream_and_pinned_memory(region_data, device):
    """Workers, pinned memory and the side stream deliver what one CPU process makes, while the consumer lags."""
    reference = []
    cpu_loader = region_loader(region_data, 'cpu')
    cpu_loader.set_epoch(1)
    for x, target in cpu_loader:
        reference.append((x.double().sum(dim=(1, 2, 3)), cpu_copy(target)))
    cuda = device == 'cuda'
    loader = region_loader(region_data, device, workers=2, pin_memory=cuda)
    if cuda:
        assert loader.is_cuda and loader.loader.pin_memory
        crops, target = next(iter(loader.loader))
        assert crops.is_pinned() and all(v.is_pinned() for v in target.values())
    loader.set_epoch(1)
    sums, targets = [], []
    for x, target in loader:
        assert x.device.type == device and {v.device.type for v in target.values()} == {device}
        if cuda:
            # the consumer's work queues up behind this: a copy into memory it still reads would change the sums
            torch.cuda._sleep(20_000_000)
        sums.append(x.double().sum(dim=(1, 2, 3)))
        targets.append(target)
    if cuda:
        assert isinstance(loader.stream, torch.cuda.Stream)
    assert len(sums) == len(reference) == len(loader) == 2 * K
    for got, (expected, _) in zip(sums, reference):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-3)  # SelfMix's lerp rounds per device
    assert_same_targets([cpu_copy(t) for t in targets], [t for _, t in reference])


# ---------------------------------------------------------------- offline steps

@pytest.mark.parametrize('device, channels_last', [
    pytest.param('cpu', True, id='cpu-channels_last'), on_cuda('cuda', False, id='cuda'),
    on_cuda('cuda', True, id='cuda-channels_last')])
def test_offline_step_matches_cpu(region_data, device, channels_last):
    """The targets the loss sees are bit-identical to a CPU step's; losses and weights agree to float32 rounding."""
    with fp32_math():
        reference = offline_steps(region_data, 'cpu')
        got = offline_steps(region_data, device, channels_last=channels_last)
    assert {'soft', 'weight', 'label', 'lam', 'partner_region'} <= set(got['targets'][0])
    assert_same_targets(got['targets'], reference['targets'])
    torch.testing.assert_close(got['losses'], reference['losses'], rtol=1e-4, atol=1e-5)
    assert_close_weights(got['weights'], reference['weights'], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('device, amp_dtype', [
    pytest.param('cpu', torch.bfloat16, id='cpu-bfloat16'), pytest.param('cpu', torch.float16, id='cpu-float16'),
    on_cuda('cuda', torch.bfloat16, id='cuda-bfloat16'), on_cuda('cuda', torch.float16, id='cuda-float16')])
def test_amp_offline_step(region_data, device, amp_dtype):
    """AMP steps train on the float32 targets of a float32 step, to AMP precision; float16 through timm's loss
    scaler, which skips a step whose gradients overflowed and halves its scale."""
    steps = 4
    reference = offline_steps(region_data, 'cpu', steps=steps)
    got = offline_steps(region_data, device, steps=steps, amp_dtype=amp_dtype)
    assert_same_targets(got['targets'], reference['targets'])
    assert got['targets'][0]['soft'].dtype == torch.float32
    assert torch.isfinite(got['losses']).all()
    if amp_dtype == torch.bfloat16:
        assert got['scaler'] is None  # bfloat16 needs no loss scaling
        torch.testing.assert_close(got['losses'], reference['losses'], rtol=5e-2, atol=2e-2)
        # four steps of a tiny net drift apart, but the weights move the same way
        assert torch.cosine_similarity(update(got), update(reference), dim=0) > 0.7
    else:
        scale = got['scaler'].state_dict()['scale']
        skipped = round(np.log2(2.0 ** 16 / scale))  # from timm's initial 2**16, halved once per overflow
        assert scale == 2.0 ** (16 - skipped) and 0 <= skipped < steps
        # until the first step is taken the weights are the initial ones, as in the reference's first step
        torch.testing.assert_close(got['losses'][:skipped + 1], reference['losses'][:1].expand(skipped + 1),
                                   rtol=5e-2, atol=2e-2)
    assert not torch.equal(got['weights']['fc.weight'], got['init']['fc.weight'])  # a step was taken


@pytest.mark.cuda
@requires_cuda
def test_torch_compile_offline_step(region_data):
    """``FerKDTask.compile`` (inductor) trains like eager mode on the same targets."""
    with fp32_math():
        eager = offline_steps(region_data, 'cuda')
        compiled = offline_steps(region_data, 'cuda', compile_backend='inductor')
    assert_same_targets(compiled['targets'], eager['targets'])
    torch.testing.assert_close(compiled['losses'], eager['losses'], rtol=1e-3, atol=1e-4)
    assert_close_weights(compiled['weights'], eager['weights'], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize('device, backend', [pytest.param('cpu', 'gloo', id='cpu-gloo'),
                                             on_cuda('cuda', 'nccl', id='cuda-nccl')])
def test_ddp_in_a_one_process_group(region_data, tmp_path, device, backend):
    """DDP over a 1-process group (NCCL on CUDA, with float16 AMP there) trains as the task does without DDP.

    ``torchrun --nproc_per_node 1 train_ferkd.py`` makes no process group (timm's ``init_distributed_device``
    treats WORLD_SIZE=1 as not distributed), so on one GPU NCCL and DDP are reached only like this.
    """
    amp_dtype = torch.float16 if device == 'cuda' else None
    with fp32_math():
        alone = offline_steps(region_data, device, amp_dtype=amp_dtype)
        dist.init_process_group(backend, init_method=(tmp_path / 'rendezvous').as_uri(), rank=0, world_size=1)
        try:
            assert dist.get_backend() == backend
            ddp = offline_steps(region_data, device, amp_dtype=amp_dtype, distributed=True)
            ones = torch.ones(3, device=device)
            dist.all_reduce(ones)
            assert ones.tolist() == [1.0, 1.0, 1.0]
        finally:
            dist.destroy_process_group()
    assert_same_targets(ddp['targets'], alone['targets'])
    # equal up to cuDNN's run-to-run nondeterminism (its backward convolutions accumulate in any order)
    torch.testing.assert_close(ddp['losses'], alone['losses'], rtol=1e-4, atol=1e-5)
    assert_close_weights(ddp['weights'], alone['weights'], rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------- train_ferkd.py on CUDA

def train_cuda_argv(fmnist_root, bank_dir, output, experiment, *extra):
    return train_argv(fmnist_root, output, '--experiment', experiment, '--soft-labels', bank_dir, '--num-crops', '4',
                      '--selfmix', '0.8', '--device', 'cuda', '--channels-last', '--pin-mem', '-j', '2', *extra)


def load_checkpoint_state(path: Path) -> dict:
    # written by the test's own run a moment ago (trusted): timm keeps the argparse Namespace in it
    return torch.load(path, map_location='cpu', weights_only=False)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.xdist_group('cuda-train')
def test_train_ferkd_under_torchrun_on_cuda_float16(fmnist_root, bank, tmp_path):
    """One CUDA process under torchrun: float16 AMP with timm's loss scaler, channels-last, pinned memory."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1',
           str(REPO / 'train_ferkd.py'),
           *train_cuda_argv(fmnist_root, bank, tmp_path, 'fp16', '--amp', '--amp-dtype', 'float16')]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert 'offline training of test_resnet' in log and 'crops/s' in log
    state = load_checkpoint_state(tmp_path / 'fp16' / 'last.pth.tar')
    assert state['args'].amp and state['args'].amp_dtype == 'float16' and state['args'].channels_last
    assert state['amp_scaler']['scale'] > 0  # the loss scaler's state is checkpointed for resume


@pytest.mark.cuda
@requires_cuda
@pytest.mark.xdist_group('cuda-train')
def test_train_ferkd_on_cuda_bfloat16(fmnist_root, bank, tmp_path, capsys):
    """bfloat16 AMP on CUDA: no loss scaler, a finite loss, a checkpoint that loads into timm on the CPU."""
    train_in_process(capsys, *train_cuda_argv(fmnist_root, bank, tmp_path, 'bf16', '--amp', '--amp-dtype', 'bfloat16'))
    run = tmp_path / 'bf16'
    state = load_checkpoint_state(run / 'last.pth.tar')
    assert 'amp_scaler' not in state
    rows = summary_rows(run)
    assert len(rows) == 1 and np.isfinite(float(rows[0]['train_loss']))
    model = timm.create_model('test_resnet', num_classes=10, in_chans=1, checkpoint_path=str(run / 'last.pth.tar'))
    model.eval()
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


# ---------------------------------------------------------------- generation

@pytest.fixture(scope='module')
def rgb_teacher(tmp_path_factory) -> Path:
    """Random ``test_resnet`` weights for NC classes and 3 channels."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('cuda-teacher') / 'teacher.pth'
    torch.save(timm.create_model('test_resnet', num_classes=NC).state_dict(), path)
    return path


def generate(data, teacher: Path, out: Path, device: str, amp: bool = False, channels_last: bool = False,
             workers: int = 0) -> SoftLabelBank:
    return SoftLabelBank(generate_bank(GenerateConfig(
        model='test_resnet', output=str(out), data_dir=str(data[0]), checkpoint=str(teacher), num_classes=NC,
        regions=R, input_size=(3, SIZE, SIZE), batch_size=16, workers=workers, device=device, amp=amp,
        channels_last=channels_last, images_per_shard=8, progress=False)))


@pytest.mark.parametrize('device, amp, channels_last', [
    pytest.param('cpu', True, False, id='cpu-bfloat16'), on_cuda('cuda', False, False, id='cuda-float32'),
    on_cuda('cuda', True, True, id='cuda-bfloat16-channels_last')])
def test_generation_matches_cpu(region_data, rgb_teacher, tmp_path, device, amp, channels_last):
    """The same regions and labels as a float32 CPU bank: to float16 storage precision in float32, to bfloat16's
    with AMP."""
    with fp32_math():
        reference = generate(region_data, rgb_teacher, tmp_path / 'reference', 'cpu')
        bank_dir = tmp_path / device
        got = generate(region_data, rgb_teacher, bank_dir, device, amp=amp, channels_last=channels_last,
                       workers=2 if device == 'cuda' else 0)
    assert got.manifest.settings() == reference.manifest.settings()
    execution = json.loads((bank_dir / 'generation.json').read_text())['execution']
    assert execution['device'] == device and execution['amp'] == amp and execution['channels_last'] == channels_last
    tolerance = 3e-2 if amp else 2e-3
    for i in range(NUM_IMAGES):
        a, b = got.regions(i), reference.regions(i)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.flips, b.flips)
        assert got.target(i) == reference.target(i)
        torch.testing.assert_close(got.dense_targets(i), reference.dense_targets(i), rtol=0, atol=tolerance)
