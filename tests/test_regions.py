import numpy as np
import pytest
from PIL import Image

from timm_ferkd.bank.regions import RegionSampler, check_region_params, explicit_regions, replay_region, uniform
from timm_ferkd.errors import ConfigError


def test_uniform_is_version_stable():
    # pinned values: a change here silently changes every bank's regions (bump SAMPLER_VERSION instead)
    u = uniform(0, 0, np.array([0, 1]), np.array([0, 0]))
    np.testing.assert_allclose(u, [0.88331081, 0.19069836], rtol=0, atol=1e-8)
    far = uniform(123456789, 10**9, np.array([65535]), np.array([40]))
    np.testing.assert_allclose(far, [0.14538341], rtol=0, atol=1e-8)
    assert uniform(1, 0, np.array([0]), np.array([0]))[0] != u[0]


def test_pinned_boxes():
    s = RegionSampler(seed=3, scale=(0.08, 1.0))
    r = s.sample(5, (28, 28), range(3))
    np.testing.assert_array_equal(r.boxes, [[12, 5, 14, 15], [2, 4, 9, 8], [0, 2, 27, 24]])
    np.testing.assert_array_equal(r.flips, [False, True, True])


@pytest.mark.parametrize('size', [(28, 28), (375, 500), (600, 40)])
def test_boxes_inside_image_and_within_bounds(size):
    scale, ratio = (0.25, 0.9), (3 / 4, 4 / 3)
    s = RegionSampler(seed=11, scale=scale, ratio=ratio)
    r = s.sample(7, size, range(2000))
    top, left, h, w = r.boxes.T
    H, W = size
    assert np.all(top >= 0) and np.all(left >= 0)
    assert np.all(top + h <= H) and np.all(left + w <= W)
    assert np.all(h > 0) and np.all(w > 0)
    if size == (375, 500):
        # every region comes from a successful attempt: area and ratio in range (up to pixel rounding)
        area = h * w / (H * W)
        assert area.min() >= scale[0] * 0.95 and area.max() <= scale[1] * 1.05
        aspect = w / h
        assert aspect.min() >= ratio[0] * 0.97 and aspect.max() <= ratio[1] * 1.03
    assert 0.45 < r.flips.mean() < 0.55


def test_determinism_and_subsets():
    s = RegionSampler(seed=5)
    a = s.sample(3, (100, 80), range(50))
    b = s.sample(3, (100, 80), [10, 3, 49])
    np.testing.assert_array_equal(a.boxes[[10, 3, 49]], b.boxes)
    np.testing.assert_array_equal(a.flips[[10, 3, 49]], b.flips)
    other_image = s.sample(4, (100, 80), range(50))
    assert not np.array_equal(a.boxes, other_image.boxes)
    other_seed = RegionSampler(seed=6).sample(3, (100, 80), range(50))
    assert not np.array_equal(a.boxes, other_seed.boxes)


def test_fallback_central_crop_for_extreme_image():
    # ratio range cannot fit a 1000x1 strip: torchvision's fallback is the central crop clamped to the ratio
    s = RegionSampler(seed=0, scale=(0.9, 1.0), ratio=(1.0, 1.0))
    r = s.sample(0, (1, 1000), range(4))
    np.testing.assert_array_equal(r.boxes, [[0, 499, 1, 1]] * 4)


def test_normalized_boxes():
    s = RegionSampler(seed=0)
    r = s.sample(0, (50, 100), [0])
    t, l, h, w = r.boxes[0]
    np.testing.assert_allclose(r.normalized()[0], [t / 50, l / 100, h / 50, w / 100])


def test_explicit_regions_round_like_pil():
    r = explicit_regions(np.array([[0.1, 0.25, 0.5, 0.5]]), np.array([1]), (10, 20))
    # top=round(1.0)=1, left=round(5.0)=5, bottom=round(6.0)=6, right=round(15.0)=15
    np.testing.assert_array_equal(r.boxes, [[1, 5, 5, 10]])
    assert r.flips.tolist() == [True]


def test_replay_region_crops_resizes_flips():
    arr = np.arange(8 * 8, dtype=np.uint8).reshape(8, 8)
    img = Image.fromarray(arr, 'L')
    out = replay_region(img, (2, 1, 4, 3), False, (4, 3), Image.Resampling.NEAREST)
    np.testing.assert_array_equal(np.asarray(out), arr[2:6, 1:4])
    flipped = replay_region(img, (2, 1, 4, 3), True, (4, 3), Image.Resampling.NEAREST)
    np.testing.assert_array_equal(np.asarray(flipped), arr[2:6, 1:4][:, ::-1])


@pytest.mark.parametrize('scale,ratio,regions', [((0, 1), (0.75, 1.33), 5), ((0.5, 1.2), (0.75, 1.33), 5),
                                                 ((0.5, 0.4), (0.75, 1.33), 5), ((0.1, 1), (2, 1), 5),
                                                 ((0.1, 1), (0.75, 1.33), 0)])
def test_bad_region_params(scale, ratio, regions):
    with pytest.raises(ConfigError):
        check_region_params(scale, ratio, regions)
