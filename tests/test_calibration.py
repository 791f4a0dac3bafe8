"""Label transforms: FerKD calibration at its boundaries, quantiles, probability shift, re-tempering."""
import numpy as np
import pytest
import torch

from bank_factory import folder_source, make_image_folder, peaked_probs, write_bank
from timm_ferkd.data.calibration import (
    CATEGORY_DISCARD, CATEGORY_HARD, CATEGORY_SOFT, CalibrationConfig, FerKDCalibration, ProbabilityShift,
    Retemper, create_label_transform, smoothed_one_hot)
from timm_ferkd.data.dataset import RegionDataset
from timm_ferkd.errors import ConfigError

C = 4
D, H, S = CATEGORY_DISCARD, CATEGORY_HARD, CATEGORY_SOFT


# ---------------------------------------------------------------- configuration checks

@pytest.mark.parametrize('kwargs, words', [
    (dict(low=0.5, mid=0.3, top=0.9), 'out of order'),
    (dict(low=0.1, mid=0.95, top=0.9), 'out of order'),
    (dict(low=-0.1), '[0, 1]'),
    (dict(top=1.5), '[0, 1]'),
    (dict(low=0.1, mid=0.2, top=0.3, quantile=True, eps=1.0), 'eps'),
    (dict(eps=-0.01), 'eps'),
])
def test_config_rejects_bad_values(kwargs, words):
    with pytest.raises(ConfigError, match=words.replace('[', r'\[').replace(']', r'\]')):
        CalibrationConfig(**kwargs)


def test_config_accepts_equal_thresholds_and_defaults_keep_everything():
    CalibrationConfig(low=0.3, mid=0.3, top=0.3)
    t = CalibrationConfig().resolve()
    ferkd = FerKDCalibration(t, C)
    m = np.array([0.0, 0.25, 0.999, 1.0], dtype=np.float32)
    assert (ferkd.categorize(m) == S).all()


# ---------------------------------------------------------------- categories and targets

def test_categories_at_the_boundaries():
    # T_L = 0.25, T_M = 0.5, T_T = 0.75, all exact in float16 and float32
    ferkd = FerKDCalibration(CalibrationConfig(low=0.25, mid=0.5, top=0.75).resolve(), C)
    m = np.array([0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875], dtype=np.float16).astype(np.float32)
    # m < T_L discard; T_L <= m < T_M hard; T_M <= m <= T_T soft; m > T_T discard
    assert ferkd.categorize(m).tolist() == [D, H, H, S, S, S, D]
    assert ferkd.categorize(m).dtype == np.int8


def test_hard_regions_get_the_softened_ground_truth():
    eps = 0.1
    ferkd = FerKDCalibration(CalibrationConfig(low=0.25, mid=0.5, top=0.75, eps=eps).resolve(), C)
    soft = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.1, 0.6, 0.2, 0.1]])
    label = torch.tensor([2, 0])
    category = torch.tensor([H, S], dtype=torch.int8)
    out = ferkd(soft, label, category)
    off = eps / (C - 1)
    assert torch.allclose(out[0], torch.tensor([off, off, 1 - eps, off]))
    assert torch.equal(out[1], soft[1])
    assert torch.allclose(out.sum(1), torch.ones(2))


def test_smoothed_one_hot_eps_zero_is_one_hot():
    out = smoothed_one_hot(torch.tensor([1, 3]), C, 0.0)
    assert torch.equal(out, torch.eye(C)[[1, 3]])


def test_quantile_thresholds():
    rng = np.random.default_rng(0)
    m = rng.uniform(0.25, 1.0, size=(50, 20)).astype(np.float32)
    t = CalibrationConfig(low=0.1, mid=0.4, top=0.95, quantile=True).resolve(m)
    # quantiles of the tie-broken confidences: within the 2**-24 jitter of the stored values' quantiles
    expected = np.quantile(m.astype(np.float64), [0.1, 0.4, 0.95])
    assert np.allclose((t.low, t.mid, t.top), expected, rtol=0, atol=2.0 ** -23) and t.tie_break
    cat = FerKDCalibration(t, C).categorize(m)
    n = m.size
    assert abs((m < t.low).sum() / n - 0.1) < 0.01
    assert (cat == D).sum() == (m < t.low).sum() + (m > t.top).sum()
    assert abs((cat == H).mean() - 0.3) < 0.01
    # quantiles 0 and 1 are the extremes: nothing is discarded
    t = CalibrationConfig(low=0.0, mid=0.0, top=1.0, quantile=True).resolve(m)
    assert (t.low, t.top) == (-np.inf, np.inf)
    assert (FerKDCalibration(t, C).categorize(m) == S).all()


def test_quantile_needs_the_distribution():
    with pytest.raises(ConfigError, match='max probabilities'):
        CalibrationConfig(low=0.1, quantile=True).resolve(None)


def test_mid_defaults_to_low():
    cfg = CalibrationConfig(low=0.3, top=0.9)
    assert cfg.mid == 0.3
    cat = FerKDCalibration(cfg.resolve(), C).categorize(np.array([0.29, 0.3, 0.5]))
    assert cat.tolist() == [D, S, S]


# ---------------------------------------------------------------- probability shift, re-tempering

def test_probability_shift_swaps_argmax_and_ground_truth():
    soft = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.1, 0.6, 0.3, 0.0], [0.25, 0.25, 0.4, 0.1]])
    label = torch.tensor([2, 1, 3])
    out = ProbabilityShift()(soft, label, torch.zeros(3, dtype=torch.int8))
    assert torch.equal(out[0], torch.tensor([0.1, 0.3, 0.6, 0.0]))
    assert torch.equal(out[1], soft[1])                        # correct prediction: unchanged
    assert torch.equal(out[2], torch.tensor([0.25, 0.25, 0.1, 0.4]))
    assert torch.equal(out.sum(1), soft.sum(1))
    assert torch.equal(out.argmax(1), label)
    assert torch.equal(soft[0], torch.tensor([0.1, 0.6, 0.3, 0.0]))  # input not modified


def test_retemper():
    q = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    out = Retemper(2.0)(q, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.int8))
    expected = q.sqrt() / q.sqrt().sum()
    assert torch.allclose(out, expected)
    assert out[0, 3] == 0                                      # zero classes stay zero
    sharp = Retemper(0.5)(q, None, None)
    assert torch.allclose(sharp, q ** 2 / (q ** 2).sum())
    assert Retemper(1.0)(q, None, None) is q
    with pytest.raises(ConfigError, match='temperature'):
        Retemper(0.0)


def test_pipeline_order_calibrates_last():
    eps = 0.2
    transform = create_label_transform(
        C, CalibrationConfig(low=0.25, mid=0.5, top=0.75, eps=eps), prob_shift=True, temperature=2.0)
    names = [type(t).__name__ for t in transform.transforms]
    assert names == ['Retemper', 'ProbabilityShift', 'FerKDCalibration']
    soft = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.1, 0.6, 0.3, 0.0]])
    label = torch.tensor([2, 2])
    out = transform(soft, label, torch.tensor([H, S], dtype=torch.int8))
    # hard crop: exactly the softened label, untouched by re-tempering
    assert torch.allclose(out[0], smoothed_one_hot(label[:1], C, eps)[0])
    # soft crop: re-tempered, then shifted to the ground truth
    retempered = soft[1].sqrt() / soft[1].sqrt().sum()
    expected = retempered.clone()
    expected[1], expected[2] = retempered[2], retempered[1]
    assert torch.allclose(out[1], expected)


# ---------------------------------------------------------------- on a dataset

R = 8
NC = 10  # classes of the dataset banks: confidences down to 1 / NC = 0.1 stay the maximum


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    return folder_source(make_image_folder(tmp_path_factory.mktemp('calib_images'), num_images=6, num_classes=2))


def _bank(tmp_path, source, m):
    # m: [6, R] confidences at class 3 (never a ground truth here, so calibration is visible)
    return write_bank(tmp_path / 'bank', source, peaked_probs(np.asarray(m), NC, 3), NC, R)


def test_dataset_crops_follow_their_region_category(tmp_path, source):
    levels = np.array([0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 0.5], dtype=np.float32)
    bank = _bank(tmp_path, source, np.tile(levels, (6, 1)))
    ds = RegionDataset(source, bank, num_crops=4, input_size=8,
                       calibration=CalibrationConfig(low=0.25, mid=0.5, top=0.75, eps=0.1))
    expected = np.array([D, H, H, S, S, S, D, S])
    assert (ds.categories == expected).all()
    assert ds.category_counts() == {'soft': 24, 'hard': 12, 'discard': 12}
    for i in range(len(ds)):
        for epoch in range(3):
            ds.set_epoch(epoch)
            _, target = ds[i]
            regions = target['region'].numpy()
            assert (expected[regions] != D).all()                   # discarded regions never appear
            assert target['category'].tolist() == expected[regions].tolist()
            hard = target['category'] == H
            gt = target['label'][0].item()
            assert torch.allclose(target['soft'][hard], smoothed_one_hot(target['label'][hard], NC, 0.1))
            assert torch.allclose(target['soft'][~hard], bank.dense_targets(i, regions[~hard.numpy()]))
            assert (target['soft'][hard].argmax(1) == gt).all()


def test_dataset_quantile_thresholds(tmp_path, source):
    m = np.random.default_rng(1).uniform(0.3, 0.95, size=(6, R))
    bank = _bank(tmp_path, source, m)
    cfg = CalibrationConfig(low=0.1, mid=0.5, top=0.9, quantile=True)
    ds = RegionDataset(source, bank, num_crops=2, input_size=8, calibration=cfg)
    t = cfg.resolve(bank.all_max_probs())
    assert ds.label_transform.calibration.thresholds == t
    stored = bank.all_max_probs()
    assert ((ds.categories == D) == ((stored < t.low) | (stored > t.top))).all()


def test_an_image_whose_every_region_is_discarded_keeps_them(tmp_path, source):
    m = np.full((6, R), 0.5, dtype=np.float32)
    m[4] = 0.875                                       # image 4 is confident everywhere: above T_T
    m[2] = 0.125                                       # image 2 is unsure everywhere: below T_L
    bank = _bank(tmp_path, source, m)
    ds = RegionDataset(source, bank, num_crops=2, input_size=8, calibration=CalibrationConfig(0.25, 0.5, 0.75))
    assert ds.fallback_images == 2 and (ds.num_eligible == R).all()
    assert (ds.categories[4] == CATEGORY_SOFT).all() and (ds.categories[2] == CATEGORY_HARD).all()
    assert (ds.categories[[0, 1, 3, 5]] == CATEGORY_SOFT).all()   # 0.5 = T_M: the teacher label
    _, target = ds[2]
    assert torch.allclose(target['soft'].max(1).values, torch.full((2,), 0.9))


def test_prob_shift_and_temperature_reach_the_crops(tmp_path, source):
    bank = _bank(tmp_path, source, np.full((6, R), 0.5, dtype=np.float32))
    ds = RegionDataset(source, bank, num_crops=2, input_size=8, prob_shift=True, label_temperature=2.0)
    _, target = ds[0]
    stored = bank.dense_targets(0, target['region'].numpy())
    assert (target['soft'].argmax(1) == target['label']).all()
    assert torch.allclose(target['soft'].sum(1), torch.ones(2))
    assert target['soft'].max() < stored.max()        # flattened by T = 2


def test_quantiles_discard_their_fraction_even_among_tied_confidences():
    m = np.concatenate([np.linspace(0.2, 0.99, 500), np.ones(500)]).astype(np.float32).reshape(10, 100)
    cfg = CalibrationConfig(low=0.05, mid=0.2, top=0.9, quantile=True)
    ferkd = FerKDCalibration(cfg.resolve(m), num_classes=10)
    categories = ferkd.categorize(m)
    # 10% of the regions are discarded at the top although half of them store exactly 1.0
    top = (categories == D) & (m == 1.0)
    assert top.sum() == 100 and ((categories == D) & (m < 0.5)).sum() == 50
    assert (categories == H).sum() == 150
    # deterministic, and distinct values keep their order
    assert np.array_equal(categories, ferkd.categorize(m.copy()))
    from timm_ferkd.data.calibration import tie_broken
    t = tie_broken(m).reshape(-1)
    assert (np.diff(t[:500]) > 0).all() and len(np.unique(t)) == m.size
    # the extremes discard nothing
    keep_all = FerKDCalibration(CalibrationConfig(0.0, 0.0, 1.0, quantile=True).resolve(m), 10).categorize(m)
    assert (keep_all == S).all()
