"""register_with_timm: timm's own names unchanged, ferkd names added, idempotent, reversible."""
import numpy as np
import pytest
import timm.data
import timm.data.dataset_factory
import timm.loss
import timm.loss._loss_factory
import timm.task
import timm.task.classification
import torch

from bank_factory import folder_source, make_image_folder, peaked_probs, write_bank
from timm_ferkd.data.dataset import RegionDataset
from timm_ferkd.errors import ConfigError
from timm_ferkd.registration import (
    FERKD_LOSS_TYPES, is_registered, register_with_timm, unregister_from_timm)

ORIGINAL_DATASET = timm.data.dataset_factory.create_dataset
ORIGINAL_LOSS = timm.loss._loss_factory.create_classification_loss
ORIGINAL_LOSS_TYPES = timm.loss.LOSS_TYPES
DATASET_BINDINGS = [(timm.data, 'create_dataset'), (timm.data.dataset_factory, 'create_dataset')]
LOSS_BINDINGS = [(timm.loss, 'create_classification_loss'), (timm.loss._loss_factory, 'create_classification_loss'),
                 (timm.task, 'create_classification_loss'),
                 (timm.task.classification, 'create_classification_loss')]

# (kwargs) of timm loss calls that must give the same result before and after registration
LOSS_CALLS = [
    dict(), dict(loss_type='ce'), dict(loss_type='ce', smoothing=0.1), dict(loss_type='ce', soft_targets=True),
    dict(loss_type='bce'), dict(loss_type='bce', multi_label=True), dict(loss_type='poly'),
    dict(loss_type='asl', multi_label=True), dict(loss_type='jsd', jsd_splits=3), dict(multi_label=True),
]
BAD_LOSS_CALLS = [
    dict(loss_type='nope'), dict(loss_type='zlpr'), dict(loss_type='ce', multi_label=True),
    dict(loss_type='ce', pos_weight=2.0), dict(loss_type='SOFT_CE_X'), dict(loss_type='ce', temperature=2.0),
]


@pytest.fixture
def registered():
    register_with_timm()
    yield
    unregister_from_timm()


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('images'), num_images=6, num_classes=3)


def _loss_outcome(factory, kwargs):
    try:
        loss = factory(**kwargs)
    except Exception as e:  # the exact error type and message must be unchanged too
        return type(e), str(e)
    logits, target = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 1])
    if kwargs.get('multi_label') or kwargs.get('soft_targets'):
        target = torch.nn.functional.one_hot(target, 3).float()
    value = None if kwargs.get('loss_type') == 'jsd' else float(loss(logits, target))
    return type(loss), repr(loss), value


def test_every_binding_is_patched_and_restored():
    register_with_timm()
    try:
        assert is_registered()
        for module, name in DATASET_BINDINGS:
            assert getattr(module, name) is not ORIGINAL_DATASET
            assert getattr(module, name) is timm.data.create_dataset
        for module, name in LOSS_BINDINGS:
            assert getattr(module, name) is not ORIGINAL_LOSS
            assert getattr(module, name) is timm.loss.create_classification_loss
    finally:
        unregister_from_timm()
    assert not is_registered()
    assert all(getattr(m, n) is ORIGINAL_DATASET for m, n in DATASET_BINDINGS)
    assert all(getattr(m, n) is ORIGINAL_LOSS for m, n in LOSS_BINDINGS)


def test_register_twice_does_not_double_wrap(registered):
    first = timm.data.create_dataset, timm.loss.create_classification_loss
    register_with_timm()
    assert (timm.data.create_dataset, timm.loss.create_classification_loss) == first
    assert timm.data.create_dataset.__wrapped__ is ORIGINAL_DATASET
    assert timm.loss.create_classification_loss.__wrapped__ is ORIGINAL_LOSS
    unregister_from_timm()
    register_with_timm()                       # again after a restore: same single layer
    assert timm.task.classification.create_classification_loss.__wrapped__ is ORIGINAL_LOSS


def test_timm_losses_unchanged():
    before = [_loss_outcome(ORIGINAL_LOSS, kw) for kw in LOSS_CALLS + BAD_LOSS_CALLS]
    register_with_timm()
    try:
        wrapped = timm.loss.create_classification_loss
        after = [_loss_outcome(wrapped, kw) for kw in LOSS_CALLS + BAD_LOSS_CALLS]
        assert timm.loss.LOSS_TYPES is ORIGINAL_LOSS_TYPES and timm.task.LOSS_TYPES is ORIGINAL_LOSS_TYPES
        assert set(FERKD_LOSS_TYPES).isdisjoint(ORIGINAL_LOSS_TYPES)
    finally:
        unregister_from_timm()
    assert before == after
    assert any(isinstance(o[0], type) and issubclass(o[0], ValueError) for o in before)


def test_timm_datasets_unchanged(registered, folder):
    for kwargs in (dict(name='', root=str(folder)), dict(name='', root=str(folder), split='train', class_map=None)):
        old = ORIGINAL_DATASET(**kwargs)
        new = timm.data.create_dataset(**kwargs)
        assert type(new) is type(old) and len(new) == len(old)
        assert new.reader.samples == old.reader.samples
        assert np.array_equal(np.asarray(new[2][0]), np.asarray(old[2][0])) and new[2][1] == old[2][1]
    for name in ('torch/not_a_dataset', 'hfds'):
        errors = []
        for factory in (ORIGINAL_DATASET, timm.data.create_dataset):
            try:
                factory(name, root=str(folder))
                errors.append(None)
            except Exception as e:
                errors.append((type(e), str(e)))
        assert errors[0] == errors[1]


def test_ferkd_dataset_prefix(registered, folder, tmp_path):
    source = folder_source(folder)
    bank = write_bank(tmp_path / 'b', source, peaked_probs(np.full((6, 4), 0.5), 5, 0), 5, 4)
    # the arguments timm's train script passes, plus the region dataset's own
    ds = timm.data.create_dataset(
        'ferkd/', root=str(folder), split='train', is_training=True, class_map='', download=False, batch_size=8,
        seed=3, repeats=0, input_img_mode='RGB', soft_labels=str(bank.path), num_crops=2, input_size=16)
    assert isinstance(ds, RegionDataset) and len(ds) == 6 and ds.seed == 3 and ds.input_size == (3, 16, 16)
    crops, target = ds[0]
    assert crops.shape == (2, 3, 16, 16)
    # no split: 'train' (the bank's), not timm's 'validation'
    assert len(timm.data.create_dataset('ferkd/', str(folder), soft_labels=bank)) == 6
    with pytest.raises(ConfigError, match='soft_labels'):
        timm.data.create_dataset('ferkd/', root=str(folder))
    with pytest.raises(ConfigError, match='nested'):
        timm.data.create_dataset('ferkd/ferkd/', root=str(folder), soft_labels=str(bank.path))
    with pytest.raises(ConfigError, match='load_bytes'):
        timm.data.create_dataset('FERKD/', root=str(folder), soft_labels=str(bank.path), load_bytes=True)


def test_ferkd_losses(registered):
    from timm_ferkd import losses
    from timm_ferkd.registration import TimmCriterion
    for name in FERKD_LOSS_TYPES:
        loss = timm.loss.create_classification_loss(loss_type=name)
        assert isinstance(loss, TimmCriterion) and type(loss.loss) is type(losses.create_distill_loss(name))
    # FNKD needs features: timm's ClassificationTask cannot pass them, this package's tasks take the same criterion
    fnkd = timm.loss.create_classification_loss(loss_type='fnkd', tau=2.0)
    assert fnkd.loss.needs_features and fnkd.loss.tau == 2.0
    soft4 = torch.softmax(torch.randn(2, 5), dim=1)
    with pytest.raises(ConfigError, match='FerKDTask'):
        fnkd(torch.randn(2, 5), {'soft': soft4, 'label': soft4.argmax(1), 'weight': torch.ones(2)})
    from timm_ferkd.task import FerKDTask
    assert FerKDTask(timm.create_model('test_resnet', num_classes=5), fnkd, verbose=False).criterion is fnkd.loss
    online = timm.loss.create_classification_loss(loss_type='dtd', online=True)
    assert online.loss.needs_teacher
    assert timm.loss.create_classification_loss('kd', temperature=3.0).loss.temperature == 3.0
    with pytest.raises(ConfigError, match='smoothing'):
        timm.loss.create_classification_loss('ferkd', smoothing=0.1)
    with pytest.raises(ConfigError, match='multi_label'):
        timm.loss.create_classification_loss('soft_ce', multi_label=True)
    # timm's ClassificationTask builds its criterion through the patched binding and trains on its loss tensor
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=5)
    task = timm.task.ClassificationTask(model, criterion_kwargs=dict(loss_type='ferkd'))
    assert isinstance(task.criterion, TimmCriterion) and isinstance(task.criterion.loss, losses.FerKDLoss)
    x = torch.randn(4, 3, 32, 32)
    soft = torch.softmax(torch.randn(4, 5), dim=1)
    target = {'soft': soft, 'label': soft.argmax(1), 'weight': torch.ones(4)}
    result = task(x, target)
    assert result['loss'].ndim == 0
    expected = losses.FerKDLoss()(result['output'], target)['loss']
    torch.testing.assert_close(result['loss'], expected)
    result['loss'].backward()
