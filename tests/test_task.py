"""FerKDTask / OnlineDistillTask: forward contract, timm EMA + checkpoint helpers, DDP."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from timm.task import LogitDistillationTask, TrainingTask, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import unwrap_model

from timm_ferkd.losses import DTDLoss, FNKDLoss, KDLoss
from timm_ferkd.task import FerKDTask, OnlineDistillTask, StudentFeatureModule, create_task

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
IMG = 32


def _model(name: str = 'test_resnet', seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=NUM_CLASSES, in_chans=1)


def _batch(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, IMG, IMG, generator=g)
    label = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    soft = torch.randn(n, NUM_CLASSES, generator=g).softmax(-1)
    weight = torch.ones(n)
    return x, {'soft': soft, 'label': label, 'weight': weight}


class NoHeadNet(nn.Module):
    """A classifier without timm's forward_features / forward_head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, NUM_CLASSES)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


# --- FerKDTask ----------------------------------------------------------------------------------

@pytest.mark.parametrize('loss,components', [
    ('ferkd', {'soft_ce', 'kept'}),
    ('soft_ce', {'soft_ce'}),
    ('kd', {'kd'}),
    ('dtd', {'dtd', 'tau_min', 'tau_max'}),
    ('fnkd', {'ce', 'fnkd'}),
])
def test_ferkd_task_forward(loss, components):
    task = FerKDTask(_model(), loss, verbose=False)
    assert isinstance(task, TrainingTask)
    x, target = _batch()
    out = task(x, target)
    assert set(out) == {'loss', 'output'} | components
    assert out['output'].shape == (4, NUM_CLASSES)
    out['loss'].backward()
    grads = [p.grad for p in task.get_trainable_module().parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_ferkd_task_plain_label_target():
    task = FerKDTask(_model(), 'fnkd', verbose=False)
    x, target = _batch()
    out = task(x, target['label'])
    onehot = task(x, dict(target, soft=nn.functional.one_hot(target['label'], NUM_CLASSES).float()))
    assert torch.allclose(out['loss'], onehot['loss'])


def test_feature_wrapper_matches_plain_student():
    for name in ('test_resnet', 'test_vit'):
        model = timm.create_model(name, num_classes=NUM_CLASSES, in_chans=1, img_size=IMG) \
            if name == 'test_vit' else _model(name)
        task = FerKDTask(model, 'fnkd', verbose=False).eval()
        assert isinstance(task.trainable_module, StudentFeatureModule)
        assert task.get_eval_model() is model
        x, _ = _batch()
        with torch.no_grad():
            logits, features = task.trainable_module(x)
            assert torch.allclose(logits, model(x), atol=1e-5)
            assert features.shape == (4, model.num_features)


def test_loss_module_and_kwargs():
    task = FerKDTask(_model(), DTDLoss(weighting='confidence'), verbose=False)
    assert task.criterion.weighting == 'confidence'
    task = FerKDTask(_model(), 'dtd', loss_kwargs={'temperature': 2.0}, verbose=False)
    assert task.criterion.temperature == 2.0
    with pytest.raises(ValueError, match='not both'):
        FerKDTask(_model(), DTDLoss(), loss_kwargs={'temperature': 2.0})


def test_validation_errors():
    with pytest.raises(ValueError, match='Unknown distillation loss'):
        FerKDTask(_model(), 'hinton')
    with pytest.raises(ValueError, match='temperature must be > 0'):
        FerKDTask(_model(), 'kd', loss_kwargs={'temperature': -1.0})
    with pytest.raises(ValueError, match='forward_features'):
        FerKDTask(NoHeadNet(), 'fnkd')
    with pytest.raises(ValueError, match='OnlineDistillTask'):
        FerKDTask(_model(), KDLoss(online=True))
    # a model without forward_head is fine when the loss needs no features
    task = FerKDTask(NoHeadNet(), 'ferkd', verbose=False)
    x, target = _batch()
    task(x, target)['loss'].backward()


def test_compile_eager_keeps_plain_student_keys():
    model = _model()
    task = FerKDTask(model, 'fnkd', verbose=False)
    eval_model = task.compile(backend='eager')
    assert task.get_eval_model() is eval_model
    x, target = _batch()
    task(x, target)['loss'].backward()
    state = task.get_checkpoint_state()['state_dict']
    assert set(state) == set(model.state_dict())


@pytest.mark.parametrize('loss', ['ferkd', 'fnkd'])
def test_ema_and_checkpoint_round_trip(tmp_path, loss):
    task = FerKDTask(_model(), loss, verbose=False)
    task.setup_ema(decay=0.5)
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.1, momentum=0.9)
    x, target = _batch()
    for _ in range(2):
        optimizer.zero_grad()
        task(x, target)['loss'].backward()
        optimizer.step()
        task.update_ema()  # no step: constant decay (ModelEmaV3 copies for steps <= 1)

    state = task.get_checkpoint_state()
    state_ema = task.get_checkpoint_state(ema=True)
    assert set(state) == {'state_dict'} and set(state_ema) == {'state_dict_ema'}
    path = tmp_path / 'checkpoint.pth.tar'
    torch.save({
        'epoch': 3, 'version': 2, 'optimizer': optimizer.state_dict(), **state, **state_ema}, path)

    # the checkpoint is a plain timm model state: no wrapper prefixes
    plain = _model(seed=1)
    plain.load_state_dict(torch.load(path)['state_dict'])
    model = task.get_eval_model()
    for (k, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k
    ema_plain = _model(seed=2)
    ema_plain.load_state_dict(torch.load(path)['state_dict_ema'])
    assert not torch.equal(ema_plain.fc.weight, plain.fc.weight)

    resumed = FerKDTask(_model(seed=3), loss, verbose=False)
    resumed.setup_ema(decay=0.5)
    optimizer2 = torch.optim.SGD(resumed.get_trainable_module().parameters(), lr=0.1, momentum=0.9)
    epoch = resume_task_checkpoint(resumed, str(path), optimizer=optimizer2, log_info=False)
    load_task_ema_checkpoint(resumed, str(path))
    assert epoch == 4
    assert torch.equal(resumed.get_eval_model().fc.weight, plain.fc.weight)
    assert torch.equal(unwrap_model(resumed.get_eval_model(ema=True)).fc.weight, ema_plain.fc.weight)
    # optimizer state restored: the next step is identical
    for t, opt in ((task, optimizer), (resumed, optimizer2)):
        opt.zero_grad()
        t(x, target)['loss'].backward()
        opt.step()
    assert torch.allclose(resumed.get_eval_model().fc.weight, task.get_eval_model().fc.weight)


# --- online tasks -------------------------------------------------------------------------------

@pytest.mark.parametrize('loss,kwargs,components', [
    ('dtd', {'probability_shift': True, 'task_loss_weight': 0.5}, {'dtd', 'ce', 'tau_min', 'tau_max'}),
    ('fnkd', {}, {'ce', 'fnkd'}),
    ('kd', {'temperature': 2.0, 'probability_shift': True}, {'kd'}),
])
def test_online_task_step(loss, kwargs, components):
    teacher = _model('test_resnet', seed=5)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = _model('test_convnext')
    task = OnlineDistillTask(student, teacher, loss=loss, loss_kwargs=kwargs, verbose=False)
    task.train()
    assert not task.teacher.training
    assert all(not p.requires_grad for p in task.teacher.parameters())
    assert task.get_eval_model() is student

    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.1)
    x, target = _batch()
    out = task(x, target['label'])
    assert set(out) == {'loss', 'output'} | components
    assert torch.isfinite(out['loss'])
    out['loss'].backward()
    optimizer.step()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_online_kd_matches_timm_logit_distillation():
    teacher = _model('test_resnet', seed=5)
    student = _model('test_resnet', seed=6)
    x, target = _batch()
    timm_task = create_task(
        student, 'kd', loss_kwargs={'temperature': 2.0, 'task_loss_weight': 0.0, 'distill_loss_weight': 1.0},
        teacher=teacher, verbose=False)
    assert isinstance(timm_task, LogitDistillationTask)
    ours = OnlineDistillTask(student, teacher, 'kd', loss_kwargs={'temperature': 2.0}, verbose=False)
    timm_task.eval(), ours.eval()
    with torch.no_grad():
        assert torch.allclose(ours(x, target['label'])['kd'], timm_task(x, target['label'])['kd_loss'], atol=1e-6)


def test_online_fnkd_teacher_features_single_pass():
    teacher = _model('test_resnet', seed=5)
    task = OnlineDistillTask(_model('test_resnet'), teacher, 'fnkd', verbose=False)
    x, _ = _batch()
    t_logits, t_features = task._forward_teacher(x)
    with torch.no_grad():
        assert torch.allclose(t_logits, teacher(x), atol=1e-5)
    assert t_features.shape == (4, teacher.num_features)


def test_create_task_dispatch_and_online_errors():
    teacher = _model('test_resnet', seed=5)
    assert isinstance(create_task(_model(), 'ferkd', verbose=False), FerKDTask)
    ps_kd = create_task(_model(), 'kd', {'probability_shift': True}, teacher=teacher, verbose=False)
    assert isinstance(ps_kd, OnlineDistillTask) and ps_kd.criterion.probability_shift
    assert isinstance(create_task(_model(), 'dtd', teacher=teacher, verbose=False), OnlineDistillTask)
    with pytest.raises(ValueError, match='kd, dtd, fnkd'):
        OnlineDistillTask(_model(), teacher, 'ferkd')
    with pytest.raises(ValueError, match='online=True'):
        OnlineDistillTask(_model(), teacher, FNKDLoss())
    with pytest.raises(ValueError, match='teacher pre-logit'):
        OnlineDistillTask(_model(), NoHeadNet(), 'fnkd')


# --- DDP ----------------------------------------------------------------------------------------

_DDP_WORKER = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    import timm
    from timm_ferkd.task import FerKDTask

    def main(work_dir):
        dist.init_process_group('gloo')
        rank, world = dist.get_rank(), dist.get_world_size()
        data = torch.load(f'{work_dir}/batch.pt')
        n = data['x'].shape[0] // world
        local = slice(rank * n, (rank + 1) * n)
        x = data['x'][local]
        target = {k: data[k][local] for k in ('soft', 'label', 'weight')}
        for loss in ('ferkd', 'fnkd'):
            model = timm.create_model('test_vit', num_classes=10, in_chans=1, img_size=32)
            model.load_state_dict(data['init'])
            task = FerKDTask(model, loss, verbose=False).prepare_distributed()
            optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.5)
            task(x, target)['loss'].backward()
            optimizer.step()
            if rank == 0:
                torch.save(task.get_checkpoint_state()['state_dict'], f'{work_dir}/{loss}.pt')
        dist.destroy_process_group()

    if __name__ == '__main__':
        main(sys.argv[1])
''')


def test_ddp_two_process_step_matches_single_process(tmp_path):
    # test_vit: LayerNorm only, so a sample's output does not depend on the rest of its batch
    # (BatchNorm statistics would differ between the halves and the full batch).
    torch.manual_seed(0)
    model = timm.create_model('test_vit', num_classes=10, in_chans=1, img_size=32)
    x, target = _batch(n=8, seed=3)
    # Each rank averages over its own weight sum and DDP averages the gradients over ranks, so
    # the 2-rank step equals the full-batch step iff both halves have the same weight sum:
    # here 3 + 3, with a discarded crop in each half.
    target['weight'] = torch.tensor([1., 0., 1., 1., 1., 1., 0., 1.])
    torch.save({'x': x, 'init': model.state_dict(), **target}, tmp_path / 'batch.pt')
    script = tmp_path / 'ddp_worker.py'
    script.write_text(_DDP_WORKER)

    env = dict(os.environ, OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get('PYTHONPATH')) if p)
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
         str(script), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for loss in ('ferkd', 'fnkd'):
        single = timm.create_model('test_vit', num_classes=10, in_chans=1, img_size=32)
        single.load_state_dict(model.state_dict())
        task = FerKDTask(single, loss, verbose=False)
        optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.5)
        task(x, target)['loss'].backward()
        optimizer.step()
        ddp_state = torch.load(tmp_path / f'{loss}.pt')
        moved = 0
        for k, v in single.state_dict().items():
            assert torch.allclose(ddp_state[k], v, atol=1e-6), (loss, k)
            moved += not torch.equal(v, model.state_dict()[k])
        assert moved > 0
