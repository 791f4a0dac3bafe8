"""Region-replay dataset: exact replay, region choice, bank checks, bad input."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from bank_factory import folder_source, make_image_folder, peaked_probs, write_bank
from timm_ferkd.bank.regions import pil_interpolation
from timm_ferkd.data.calibration import CATEGORY_SOFT, CalibrationConfig
from timm_ferkd.data.dataset import EpochKey, RegionDataset, collate_regions, create_region_dataset
from timm_ferkd.errors import BankMismatchError, ConfigError

NC = 5
R = 12


def _direct_crop(image: Image.Image, box, flip, size, interpolation) -> np.ndarray:
    """The crop computed by hand from a stored box: PIL crop, resize, flip."""
    top, left, h, w = (int(v) for v in box)
    crop = image.crop((left, top, left + w, top + h)).resize((size[1], size[0]), pil_interpolation(interpolation))
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(crop)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('images'), num_images=8, num_classes=2, fmt='jpg')


@pytest.fixture(scope='module')
def source(folder):
    return folder_source(folder)


@pytest.fixture(scope='module')
def bank(tmp_path_factory, source):
    m = np.random.default_rng(0).uniform(0.3, 0.9, size=(len(source), R))
    return write_bank(tmp_path_factory.mktemp('bank') / 'b', source, peaked_probs(m, NC, 1), NC, R)


# ---------------------------------------------------------------- exact replay

@pytest.mark.parametrize('interpolation, size', [('bilinear', (16, 16)), ('bicubic', (12, 20))])
def test_replayed_crops_equal_direct_crops(source, bank, interpolation, size):
    ds = RegionDataset(source, bank, num_crops=4, input_size=size, interpolation=interpolation)
    flips = set()
    for i in range(len(ds)):
        crops, target = ds[i]
        assert crops.dtype == torch.uint8 and crops.shape == (4, 3) + size
        image, label = source.load(i)
        ids = target['region'].numpy()
        regions = bank.regions(i, ids)
        for crop, box, flip in zip(crops, regions.boxes, regions.flips):
            assert np.array_equal(crop.numpy(), _direct_crop(image, box, flip, size, interpolation))
            flips.add(bool(flip))
        assert torch.equal(target['soft'], bank.dense_targets(i, ids))
        assert (target['label'] == label).all() and (target['image'] == i).all()
        assert (target['category'] == CATEGORY_SOFT).all() and target['category'].dtype == torch.int8
    assert flips == {True, False}


@pytest.fixture(scope='module')
def fashion(tmp_path_factory):
    """A bank made by `generate` with a tiny untrained teacher on the first 24 Fashion-MNIST images."""
    from timm_ferkd.data.fashion_mnist import DEBIAN_DIR, ensure_fashion_mnist
    if not DEBIAN_DIR.is_dir():
        pytest.skip('Fashion-MNIST (Debian dataset-fashion-mnist) is not installed')
    import timm
    from timm_ferkd.labelling.generate import GenerateConfig, generate_bank
    tmp = tmp_path_factory.mktemp('fashion')
    root = ensure_fashion_mnist(tmp / 'data')
    checkpoint = tmp / 'teacher.pth'
    torch.manual_seed(0)
    torch.save(timm.create_model('test_resnet', num_classes=10, in_chans=1).state_dict(), checkpoint)
    out = generate_bank(GenerateConfig(
        model='test_resnet', output=str(tmp / 'bank'), dataset='torch/fashion_mnist', data_dir=str(root),
        checkpoint=str(checkpoint), num_classes=10, in_chans=1, num_images=24, regions=8, input_size=(1, 16, 16),
        workers=0, images_per_shard=16, device='cpu', progress=False, batch_size=64))
    return root, out


def test_real_bank_on_fashion_mnist_replays_exactly_and_covers_first_images(fashion, caplog):
    root, bank_dir = fashion
    with caplog.at_level(logging.INFO, logger='timm_ferkd.data.dataset'):
        ds = create_region_dataset('torch/fashion_mnist', str(root), 'train', soft_labels=str(bank_dir),
                                   num_crops=3, input_size=20, interpolation='bicubic', num_classes=10)
    assert len(ds) == 24 and ds.input_size == (1, 20, 20)    # in_chans from the teacher
    assert 'first 24 of 60000' in caplog.text
    for i in (0, 23):
        crops, target = ds[i]
        image, label = ds.source.load(i)
        regions = ds.bank.regions(i, target['region'].numpy())
        for crop, box, flip in zip(crops, regions.boxes, regions.flips):
            assert np.array_equal(crop.numpy(), _direct_crop(image, box, flip, (20, 20), 'bicubic'))
        assert (target['label'] == label).all()
        assert torch.allclose(target['soft'].sum(1), torch.ones(3))
    with pytest.raises(IndexError):
        ds[24]
    with pytest.raises(BankMismatchError, match='classes'):
        create_region_dataset('torch/fashion_mnist', str(root), 'train', soft_labels=str(bank_dir), num_classes=100)


# ---------------------------------------------------------------- region choice

def test_region_choice_is_deterministic_per_seed_and_epoch(source, bank):
    a = RegionDataset(source, bank, num_crops=4, input_size=8, seed=3)
    b = RegionDataset(source, bank, num_crops=4, input_size=8, seed=3)
    other_seed = RegionDataset(source, bank, num_crops=4, input_size=8, seed=4)
    for i in range(len(a)):
        for epoch in range(3):
            assert np.array_equal(a.region_ids(i, epoch), b.region_ids(i, epoch))
    choice = lambda ds, e: np.stack([ds.region_ids(i, e) for i in range(len(ds))])  # noqa: E731
    assert not np.array_equal(choice(a, 0), choice(a, 1))
    assert not np.array_equal(choice(a, 0), choice(other_seed, 0))
    # set_epoch, an EpochKey and a plain (index, epoch) tuple select the same regions
    a.set_epoch(2)
    assert torch.equal(a[5][1]['region'], b[EpochKey(5, 2)][1]['region'])
    assert torch.equal(a[5][0], b[(5, 2)][0])


def test_crops_of_an_image_are_distinct_regions(source, bank):
    ds = RegionDataset(source, bank, num_crops=R, input_size=8)
    for i in range(len(ds)):
        for epoch in range(4):
            ids = ds.region_ids(i, epoch)
            assert len(set(ids.tolist())) == R                  # as many crops as regions: all of them


def test_fewer_eligible_regions_than_crops_repeats_eligible_ones(tmp_path, source):
    m = np.full((len(source), R), 0.95, dtype=np.float32)
    m[:, [2, 7]] = 0.5                                        # only regions 2 and 7 survive top=0.9
    bank = write_bank(tmp_path / 'b', source, peaked_probs(m, NC, 1), NC, R)
    ds = RegionDataset(source, bank, num_crops=4, input_size=8, calibration=CalibrationConfig(top=0.9))
    assert (ds.num_eligible == 2).all()
    for i in range(len(ds)):
        ids = ds.region_ids(i, 0)
        assert len(ids) == 4 and set(ids.tolist()) == {2, 7}   # each eligible region at least once


def test_colour_jitter_is_deterministic_and_photometric_only(source, bank):
    plain = RegionDataset(source, bank, num_crops=2, input_size=16)
    jitter = RegionDataset(source, bank, num_crops=2, input_size=16, color_jitter=0.4)
    again = RegionDataset(source, bank, num_crops=2, input_size=16, color_jitter=0.4)
    x0, t0 = plain[3]
    x1, t1 = jitter[3]
    x2, _ = again[3]
    assert torch.equal(t0['region'], t1['region'])             # jitter does not change region choice
    assert torch.equal(x1, x2) and not torch.equal(x0, x1)
    with pytest.raises(ConfigError, match='color_jitter'):
        RegionDataset(source, bank, color_jitter=-1)


def test_collate_is_image_major(source, bank):
    ds = RegionDataset(source, bank, num_crops=3, input_size=8)
    crops, target = collate_regions([ds[i] for i in (4, 1)])
    assert crops.shape == (6, 3, 8, 8)
    assert target['image'].tolist() == [4, 4, 4, 1, 1, 1]
    assert torch.equal(target['weight'], torch.ones(6))
    assert set(target) == {'soft', 'label', 'weight', 'category', 'image', 'region'}


# ---------------------------------------------------------------- bad input

def test_bank_of_another_dataset_is_rejected(tmp_path, source, bank):
    more = folder_source(make_image_folder(tmp_path / 'more', num_images=9, num_classes=2))
    with pytest.raises(BankMismatchError, match='9'):
        RegionDataset(more, bank)
    renamed = make_image_folder(tmp_path / 'renamed', num_images=8, num_classes=2)
    (renamed / 'class_0' / 'img_000.png').rename(renamed / 'class_0' / 'img_zzz.png')
    with pytest.raises(BankMismatchError, match='fingerprint'):
        RegionDataset(folder_source(renamed), bank)
    with pytest.raises(BankMismatchError, match='classes'):
        RegionDataset(source, bank, num_classes=NC + 1)


def test_changed_image_is_caught_on_load(tmp_path):
    root = make_image_folder(tmp_path / 'imgs', num_images=4, num_classes=2)
    source = folder_source(root)
    bank = write_bank(tmp_path / 'b', source, peaked_probs(np.full((4, R), 0.5), NC, 1), NC, R)
    Image.new('RGB', (40, 30)).save(root / 'class_1' / 'img_001.png')     # same name, other size
    ds = RegionDataset(folder_source(root), bank, num_crops=2, input_size=8)
    ds[0]
    with pytest.raises(BankMismatchError, match='image 2 .*regenerate'):
        ds[2]


@pytest.mark.parametrize('num_crops', [0, -1, 1.5])
def test_num_crops_below_one_is_rejected_before_loading(tmp_path, source, bank, num_crops):
    with pytest.raises(ConfigError, match='num_crops'):
        RegionDataset(source, bank, num_crops=num_crops)
    with pytest.raises(ConfigError, match='num_crops'):
        create_region_dataset('', str(tmp_path / 'does-not-exist'), soft_labels=bank, num_crops=num_crops)


def test_other_bad_arguments(folder, source, bank):
    with pytest.raises(ConfigError, match='soft_labels'):
        create_region_dataset('', str(folder))
    with pytest.raises(ConfigError, match='channels'):
        RegionDataset(source, bank, input_size=(1, 8, 8))
    with pytest.raises(ConfigError, match='interpolation'):
        RegionDataset(source, bank, interpolation='sideways')
    with pytest.raises(ConfigError, match='seed'):
        RegionDataset(source, bank, seed=-1)


def test_create_region_dataset_on_a_folder(folder, bank):
    ds = create_region_dataset('', str(folder), soft_labels=bank.path, num_crops=2, input_size=(10, 12),
                               in_chans=3, interpolation='bicubic', seed=1)
    assert len(ds) == 8 and ds.input_size == (3, 10, 12)
    crops, target = ds[0]
    assert crops.shape == (2, 3, 10, 12) and target['soft'].shape == (2, NC)
