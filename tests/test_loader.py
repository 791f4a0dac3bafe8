"""Multi-crop loader: batch format, normalisation, epochs, ranks, workers, SelfMix, bad input."""
import numpy as np
import pytest
import torch

from bank_factory import folder_source, make_image_folder, peaked_probs, write_bank
from timm_ferkd.data.dataset import RegionDataset
from timm_ferkd.data.loader import RegionLoader, create_region_loader
from timm_ferkd.data.mixing import create_selfmix
from timm_ferkd.errors import ConfigError

NUM_IMAGES = 12
NC = 5
R = 10
K = 2
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp('images'), num_images=NUM_IMAGES, num_classes=3)
    source = folder_source(root)
    m = np.random.default_rng(0).uniform(0.3, 0.9, size=(NUM_IMAGES, R))
    bank = write_bank(tmp_path_factory.mktemp('bank') / 'b', source, peaked_probs(m, NC, 2), NC, R)
    return RegionDataset(source, bank, num_crops=K, input_size=8, seed=7)


def _loader(dataset, **kwargs):
    args = dict(batch_size=2 * K, num_workers=0, device='cpu', mean=MEAN, std=STD)
    args.update(kwargs)
    return create_region_loader(dataset, **args)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), {k: v.clone() for k, v in t.items()}) for x, t in loader]


def test_batch_format_and_device_normalisation(dataset):
    loader = _loader(dataset, batch_size=3 * K)
    assert isinstance(loader, RegionLoader) and len(loader) == NUM_IMAGES // 3 and loader.batch_size == 3 * K
    x, target = next(iter(loader))
    assert x.shape == (3 * K, 3, 8, 8) and x.dtype == torch.float32
    assert set(target) >= {'soft', 'label', 'weight', 'category', 'image'}
    assert target['soft'].dtype == torch.float32 and target['soft'].shape == (3 * K, NC)
    assert torch.allclose(target['soft'].sum(1), torch.ones(3 * K))
    assert target['label'].dtype == torch.long and target['image'].dtype == torch.long
    assert torch.equal(target['weight'], torch.ones(3 * K))
    # image-major: the crops of one image are neighbours
    images = target['image'].view(3, K)
    assert (images == images[:, :1]).all()
    # normalisation equals the reference on the worker's uint8 crops
    for j, i in enumerate(images[:, 0].tolist()):
        crops, item = dataset[(i, 0)]
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        assert torch.allclose(x[j * K:(j + 1) * K], (crops.float() / 255 - mean) / std, atol=1e-5)
        assert torch.equal(target['region'][j * K:(j + 1) * K], item['region'])


def test_epochs_are_deterministic_and_differ(dataset):
    a, b = _loader(dataset), _loader(dataset)
    e0, e0_again, e1 = _epoch(a, 0), _epoch(b, 0), _epoch(a, 1)
    for (x0, t0), (x1, t1) in zip(e0, e0_again):
        assert torch.equal(x0, x1) and torch.equal(t0['region'], t1['region'])
    order = lambda ep: torch.cat([t['image'] for _, t in ep])  # noqa: E731
    assert not torch.equal(order(e0), order(e1))
    # every image once per epoch, num_crops crops each
    assert sorted(order(e0).tolist()) == sorted(list(range(NUM_IMAGES)) * K)
    assert a.state_dict() == {'epoch': 1, 'seed': 7}


def test_workers_and_persistent_workers_follow_set_epoch(dataset):
    reference = _loader(dataset)
    loader = _loader(dataset, num_workers=2, persistent_workers=True)
    for epoch in (0, 3):
        expected = _epoch(reference, epoch)
        got = _epoch(loader, epoch)
        assert len(got) == len(expected)
        for (x0, t0), (x1, t1) in zip(expected, got):
            assert torch.equal(x0, x1) and torch.equal(t0['region'], t1['region'])
    assert loader.sampler.epoch == 3 and loader.dataset.epoch == 3


def test_two_ranks_see_distinct_images(dataset):
    seen = []
    for rank in (0, 1):
        loader = _loader(dataset, distributed=True, num_replicas=2, rank=rank)
        assert loader.sampler.num_replicas == 2 and loader.sampler.rank == rank
        images = set(torch.cat([t['image'] for _, t in _epoch(loader, 5)]).tolist())
        seen.append(images)
        # per (seed, epoch, rank) determinism
        again = set(torch.cat([t['image'] for _, t in _epoch(_loader(dataset, distributed=True, num_replicas=2,
                                                                            rank=rank), 5)]).tolist())
        assert images == again
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(NUM_IMAGES))


def test_uneven_split_drops_instead_of_repeating(tmp_path):
    root = make_image_folder(tmp_path / 'imgs', num_images=7, num_classes=2)
    source = folder_source(root)
    bank = write_bank(tmp_path / 'b', source, peaked_probs(np.full((7, R), 0.5), NC, 0), NC, R)
    ds = RegionDataset(source, bank, num_crops=K, input_size=8)
    seen = [set(torch.cat([t['image'] for _, t in _epoch(_loader(ds, batch_size=K, distributed=True,
                                                                   num_replicas=2, rank=r), 0)]).tolist())
            for r in (0, 1)]
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 3


def test_selfmix_in_the_loader(dataset):
    mix = create_selfmix(mixup_alpha=1.0, cutmix_alpha=1.0, num_crops=K, mode='pair', seed=1)
    loader = _loader(dataset, selfmix=mix)
    first = _epoch(loader, 2)
    again = _epoch(loader, 2)
    for (x, t), (x2, t2) in zip(first, again):
        assert torch.equal(x, x2)
        assert torch.equal(t['image'][t['partner']], t['image'])
        assert torch.allclose(t['soft'].sum(1), torch.ones(len(x)))
        assert 'lam' in t
    assert mix.epoch == 2
    loader.mixup_enabled = False
    x, t = next(iter(loader))
    assert not loader.mixup_enabled and (t['lam'] == 1).all()


def test_bad_batch_size_and_mismatched_selfmix(dataset):
    with pytest.raises(ConfigError, match='multiple of num_crops'):
        _loader(dataset, batch_size=3)
    with pytest.raises(ConfigError, match='multiple of num_crops'):
        _loader(dataset, batch_size=0)
    with pytest.raises(ConfigError, match='num_crops'):
        _loader(dataset, selfmix=create_selfmix(num_crops=4))
    with pytest.raises(ConfigError, match='fewer than one step'):
        _loader(dataset, batch_size=100 * K)
    with pytest.raises(ConfigError, match='process group'):
        _loader(dataset, distributed=True)
