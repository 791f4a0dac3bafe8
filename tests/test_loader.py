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
    loader = _loader(dataset, batch_size=3 * K, crop_layout='image')
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
    assert a.epoch == 1


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


def test_timm_sampler_set_epoch_selects_the_whole_epoch(dataset):
    # timm's train loop calls loader.sampler.set_epoch(epoch): regions, order and SelfMix must follow it
    def make():
        mix = create_selfmix(mixup_alpha=1.0, cutmix_alpha=1.0, num_crops=K, mode='pair', seed=1)
        return _loader(dataset, selfmix=mix)
    expected = _epoch(make(), 4)
    loader = make()
    loader.sampler.set_epoch(4)
    got = [(x.clone(), t) for x, t in loader]
    assert loader.epoch == 4 and loader.dataset.epoch == 4 and loader.mixing.epoch == 4
    for (x0, t0), (x1, t1) in zip(expected, got):
        assert torch.equal(x0, x1) and torch.equal(t0['region'], t1['region'])
    assert not torch.equal(_epoch(make(), 0)[0][0], expected[0][0])


def test_two_ranks_see_distinct_images(dataset):
    seen = []
    for rank in (0, 1):
        loader = _loader(dataset, batch_size=3, distributed=True, num_replicas=2, rank=rank)
        assert loader.sampler.num_replicas == 2 and loader.sampler.rank == rank
        images = set(torch.cat([t['image'] for _, t in _epoch(loader, 5)]).tolist())
        seen.append(images)
        # per (seed, epoch, rank) determinism
        again = set(torch.cat([t['image'] for _, t in _epoch(_loader(dataset, batch_size=3, distributed=True,
                                                                            num_replicas=2, rank=rank), 5)]).tolist())
        assert images == again
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(NUM_IMAGES))


def test_uneven_split_drops_instead_of_repeating(tmp_path):
    root = make_image_folder(tmp_path / 'imgs', num_images=7, num_classes=2)
    source = folder_source(root)
    bank = write_bank(tmp_path / 'b', source, peaked_probs(np.full((7, R), 0.5), NC, 0), NC, R)
    ds = RegionDataset(source, bank, num_crops=K, input_size=8)
    seen = [set(torch.cat([t['image'] for _, t in _epoch(_loader(ds, batch_size=1, distributed=True,
                                                                   num_replicas=2, rank=r), 0)]).tolist())
            for r in (0, 1)]
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 3


def _replayed(dataset, image, epoch):
    return set(dataset.region_ids(int(image), epoch).tolist())


@pytest.mark.parametrize('layout', ['spread', 'image'])
def test_selfmix_in_the_loader(dataset, layout):
    mix = create_selfmix(mixup_alpha=1.0, cutmix_alpha=1.0, num_crops=K, mode='pair', seed=1)
    loader = _loader(dataset, selfmix=mix, crop_layout=layout)
    first = _epoch(loader, 2)
    again = _epoch(loader, 2)
    for (x, t), (x2, t2) in zip(first, again):
        assert torch.equal(x, x2)
        # every crop was mixed (prob 1) with another replayed region of its own image
        for image, region, partner in zip(t['image'], t['region'], t['partner_region']):
            assert partner != region and int(partner) in _replayed(dataset, image, 2)
        assert torch.allclose(t['soft'].sum(1), torch.ones(len(x)))
        assert 'lam' in t
    assert mix.epoch == 2
    loader.mixup_enabled = False
    x, t = next(iter(loader))
    assert not loader.mixup_enabled and (t['lam'] == 1).all()


def test_bad_batch_size_and_mismatched_selfmix(dataset):
    with pytest.raises(ConfigError, match='multiple of num_crops'):
        _loader(dataset, batch_size=3, crop_layout='image')
    with pytest.raises(ConfigError, match='must be >= 1'):
        _loader(dataset, batch_size=0)
    with pytest.raises(ConfigError, match='crop_layout'):
        _loader(dataset, crop_layout='diagonal')
    with pytest.raises(ConfigError, match='num_crops'):
        _loader(dataset, selfmix=create_selfmix(num_crops=4))
    with pytest.raises(ConfigError, match='fewer than one window'):
        _loader(dataset, batch_size=100 * K)
    with pytest.raises(ConfigError, match='process group'):
        _loader(dataset, distributed=True)


def test_spread_steps_hold_distinct_images_and_replay_every_crop(dataset):
    b = 3
    loader = _loader(dataset, batch_size=b)
    assert loader.crop_layout == 'spread' and loader.batch_size == b
    assert len(loader) == (NUM_IMAGES // b) * K
    steps = _epoch(loader, 4)
    assert len(steps) == len(loader)
    for window in range(NUM_IMAGES // b):
        group = steps[window * K:(window + 1) * K]
        images = group[0][1]['image']
        for j, (x, t) in enumerate(group):
            assert x.shape == (b, 3, 8, 8)
            # B different images per step, the same images through the window, crop j at step j
            assert len(set(t['image'].tolist())) == b and torch.equal(t['image'], images)
            for row, image in enumerate(images.tolist()):
                crops, item = dataset[(image, 4)]
                assert int(t['region'][row]) == int(item['region'][j])
                mean = torch.tensor(MEAN).view(3, 1, 1)
                std = torch.tensor(STD).view(3, 1, 1)
                assert torch.allclose(x[row], (crops[j].float() / 255 - mean) / std, atol=1e-5)
                assert torch.equal(t['soft'][row], item['soft'][j])
    # every image of the epoch, each with all K of its regions
    seen = {}
    for _, t in steps:
        for image, region in zip(t['image'].tolist(), t['region'].tolist()):
            seen.setdefault(image, []).append(region)
    assert sorted(seen) == list(range(NUM_IMAGES))
    assert all(sorted(r) == sorted(_replayed(dataset, i, 4)) for i, r in seen.items())


def test_spread_steps_are_the_same_for_any_number_of_workers_and_ranks(dataset):
    for kwargs in ({}, {'distributed': True, 'num_replicas': 2, 'rank': 1}):
        reference = _epoch(_loader(dataset, batch_size=3, **kwargs), 1)
        with_workers = _epoch(_loader(dataset, batch_size=3, num_workers=2, **kwargs), 1)
        assert len(reference) == len(with_workers) > 0
        for (x0, t0), (x1, t1) in zip(reference, with_workers):
            assert torch.equal(x0, x1) and torch.equal(t0['region'], t1['region'])


def test_spread_selfmix_batch_mode_draws_once_per_step(dataset):
    mix = create_selfmix(mixup_alpha=1.0, num_crops=K, mode='batch', prob=1.0, seed=3)
    steps = _epoch(_loader(dataset, batch_size=3, selfmix=mix), 0)
    lams = [t['lam'] for _, t in steps]
    assert all((lam == lam[0]).all() for lam in lams)
    assert len({round(float(lam[0]), 6) for lam in lams}) > 1
