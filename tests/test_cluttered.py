"""Cluttered Fashion-MNIST: determinism, composition, names, registration, cache, and the CLI on it."""
import hashlib
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm.data
from PIL import Image

from bank_factory import folder_source, make_image_folder, peaked_probs, write_bank
from conftest import cli_in_process
from timm_ferkd.bank.identity import dataset_identity
from timm_ferkd.data.calibration import CATEGORY_DISCARD, CATEGORY_HARD, CATEGORY_SOFT, CalibrationConfig
from timm_ferkd.data.cluttered import (
    CLUTTER_VERSION, CLUTTERED_PREFIX, ClutterConfig, ClutteredFashionMNIST, create_cluttered_dataset,
    load_fashion_mnist, parse_cluttered_name, render_cluttered, resize_bilinear)
from timm_ferkd.errors import ConfigError
from timm_ferkd.registration import (
    FERKD_CLUTTERED_PREFIX, create_dataset, is_registered, register_with_timm, unregister_from_timm)

NAME = 'ferkd-cluttered/fashion_mnist'
FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


@pytest.fixture(scope='module')
def idx_root(fmnist_root, tmp_path_factory) -> Path:
    """A data directory holding nothing but the four Fashion-MNIST IDX files (links to the real ones)."""
    root = tmp_path_factory.mktemp('idx_only')
    raw = root / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True)
    for name in FILES:
        (raw / name).symlink_to(Path(fmnist_root, 'FashionMNIST', 'raw', name).resolve())
    return root


@pytest.fixture(scope='module')
def test_images(idx_root):
    return load_fashion_mnist(idx_root, 'test')


@pytest.fixture(scope='module')
def test_split(idx_root) -> ClutteredFashionMNIST:
    """The real default test split (10,000 images), built once into the module's data directory."""
    return ClutteredFashionMNIST(idx_root, 'test')


def test_defaults_and_dataset_protocol(test_split, idx_root):
    ds = test_split
    assert ds.config == ClutterConfig(canvas=64, scale=(0.8, 1.2), fragments=8, fragment_size=(6, 10), seed=0)
    assert len(ds) == 10000 and ds.data.shape == (10000, 64, 64) and ds.boxes.shape == (10000, 4)
    image, target = ds[3]
    assert isinstance(image, Image.Image) and image.mode == 'L' and image.size == (64, 64)
    assert isinstance(target, int) and target == int(ds.targets[3])
    assert np.array_equal(np.asarray(image), ds.data[3])
    ds.transform, ds.target_transform = (lambda im: np.asarray(im).sum()), (lambda t: t + 100)
    try:
        assert ds[3] == (int(ds.data[3].astype(np.int64).sum()), target + 100)
    finally:
        ds.transform = ds.target_transform = None
    rgb = ClutteredFashionMNIST(idx_root, 'validation', image_mode='RGB')[3][0]
    assert rgb.mode == 'RGB' and np.array_equal(np.asarray(rgb)[..., 1], ds.data[3])
    # labels are Fashion-MNIST's, in order
    assert np.array_equal(ds.targets, load_fashion_mnist(idx_root, 'test')[1])
    assert ds.name == NAME + ':canvas=64,scale=0.8-1.2,fragments=8,fragment_size=6-10,seed=0'


def test_same_parameters_same_bytes(test_split, test_images, idx_root):
    images, _ = test_images
    cfg = ClutterConfig()
    a, boxes_a = render_cluttered(images, cfg, 'test', count=40)
    b, boxes_b = render_cluttered(images, ClutterConfig(**vars(cfg)), 'test', count=40)
    assert a.tobytes() == b.tobytes() and np.array_equal(boxes_a, boxes_b)
    # a subset is the head of the full build, and the dataset (from its cache) holds the full build
    assert a.tobytes() == np.asarray(test_split.data[:40]).tobytes()
    again = ClutteredFashionMNIST(idx_root, 'test')
    assert isinstance(again.data, np.memmap) and again.cache_dir == test_split.cache_dir
    assert again.data.tobytes() == test_split.data.tobytes() and np.array_equal(again.boxes, test_split.boxes)
    fresh = ClutteredFashionMNIST(idx_root, 'test', cache=False)
    assert fresh.cache_dir is None and fresh.data.tobytes() == test_split.data.tobytes()
    # pinned bytes: CLUTTER_VERSION promises them (a change here needs a new version: caches and banks key on it)
    assert CLUTTER_VERSION == 1 and boxes_a[:2].tolist() == [[17, 9, 33, 33], [26, 6, 23, 23]]
    assert hashlib.sha256(a.tobytes()).hexdigest() == '276f419bc5fe5b1b7559af913944e6f1d5c016fad15c4555a17438a24d786ac0'


@pytest.mark.parametrize('change', [dict(canvas=72), dict(scale=(0.9, 1.1)), dict(fragments=4),
                                    dict(fragment_size=(4, 8)), dict(seed=1)])
def test_parameters_change_the_bytes(test_images, change):
    images, _ = test_images
    base, _ = render_cluttered(images, ClutterConfig(), 'test', count=16)
    other, _ = render_cluttered(images, ClutterConfig(**change), 'test', count=16)
    assert base.tobytes() != other.tobytes()
    assert ClutterConfig().cache_key() != ClutterConfig(**change).cache_key()


def test_splits_draw_differently(test_images):
    images, _ = test_images
    _, test_boxes = render_cluttered(images, ClutterConfig(), 'test', count=64)
    _, train_boxes = render_cluttered(images, ClutterConfig(), 'train', count=64)
    assert not np.array_equal(test_boxes, train_boxes)


def test_object_lies_in_the_canvas_and_is_the_resized_source(test_split, test_images):
    images, _ = test_images
    cfg, n = ClutterConfig(), 200
    boxes = test_split.boxes
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 64).all()
    assert (h == w).all() and h.min() >= round(28 * 0.8) and h.max() <= round(28 * 1.2)
    assert len(np.unique(h)) > 5  # the scale range is used
    obj, obj_boxes = render_cluttered(images, cfg, 'test', count=n, layers='object')
    clutter, _ = render_cluttered(images, cfg, 'test', count=n, layers='clutter')
    assert np.array_equal(obj_boxes, boxes[:n])
    full = np.asarray(test_split.data[:n])
    shown = []
    # max blending: the canvas is the brighter layer everywhere, so the object shows wherever it beats the clutter
    assert np.array_equal(full, np.maximum(obj, clutter))
    for i in range(n):
        t, l, s, _ = boxes[i]
        expected = resize_bilinear(images[i:i + 1], int(s))[0]
        assert np.array_equal(obj[i, t:t + s, l:l + s], expected)
        outside = obj[i].copy()
        outside[t:t + s, l:l + s] = 0
        assert not outside.any()
        patch = full[i, t:t + s, l:l + s]
        assert (patch >= expected).all()
        visible = expected >= clutter[i, t:t + s, l:l + s]
        assert np.array_equal(patch[visible], expected[visible])
        shown.append(visible[expected > 0].mean())
    assert np.mean(shown) > 0.9 and np.min(shown) > 0.5  # clutter hides little of the garment
    # at scale 1 the object is the Fashion-MNIST image itself, pixel for pixel
    exact, exact_boxes = render_cluttered(images, ClutterConfig(scale=(1.0, 1.0), fragments=0), 'test', count=5)
    for i, (t, l, s, _) in enumerate(exact_boxes):
        assert s == 28 and np.array_equal(exact[i, t:t + 28, l:l + 28], images[i])
        assert int(exact[i].astype(np.int64).sum()) == int(images[i].astype(np.int64).sum())


def test_resize_bilinear_values():
    # source columns 0 and 255: output centres fall at -0.25, 0.25, 0.75, 1.25 source pixels (edges clamped)
    image = np.array([[[0, 255], [0, 255]]], dtype=np.uint8)
    assert resize_bilinear(image, 4)[0].tolist() == [[0, 64, 191, 255]] * 4
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    ours = resize_bilinear(source, 34).astype(int)
    pil = np.stack([np.asarray(Image.fromarray(s).resize((34, 34), Image.Resampling.BILINEAR)) for s in source])
    assert np.abs(ours - pil.astype(int)).max() <= 1  # upscaling: PIL's bilinear, up to rounding


def test_fragment_count_and_size():
    # constant source images (image j has value j + 1): a fragment is a square of one other image's value
    n = 50
    images = np.repeat(np.arange(1, n + 1, dtype=np.uint8), 28 * 28).reshape(n, 28, 28)
    one, _ = render_cluttered(images, ClutterConfig(fragments=1, fragment_size=(5, 9), canvas=40), 'test',
                              layers='clutter')
    sides = []
    for i in range(n):
        rows, cols = np.nonzero(one[i])
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        values = np.unique(one[i][one[i] > 0])
        assert h == w and 5 <= h <= 9 and len(rows) == h * w
        assert len(values) == 1 and values[0] != i + 1  # from another image
        sides.append(h)
    assert set(sides) == set(range(5, 10))
    for k in (0, 3, 6):
        many, _ = render_cluttered(images, ClutterConfig(fragments=k, fragment_size=(5, 9), canvas=40), 'test',
                                   layers='clutter')
        counts = (many > 0).reshape(n, -1).sum(axis=1)
        assert (counts <= k * 81).all() and (counts >= min(k, 1) * 25).all()
        if k:
            assert counts.max() > 81  # several fragments, not one
            # slots are independent draws: adding fragments keeps the earlier ones
            assert (many >= one).all()


def test_no_download_with_only_idx_files(idx_root, tmp_path, monkeypatch):
    import timm_ferkd.data.fashion_mnist as fm
    monkeypatch.setattr(fm, 'ensure_fashion_mnist', lambda root, download=False: pytest.fail('tried to download'))
    ds = create_cluttered_dataset(NAME + ':fragments=2', str(idx_root), 'test')
    assert len(ds) == 10000 and not (idx_root / 'FashionMNIST' / 'processed').exists()
    with pytest.raises(ConfigError, match='--dataset-download'):
        create_cluttered_dataset(NAME, str(tmp_path), 'test')


@pytest.mark.parametrize('name, params', [
    (NAME, {}),
    ('FERKD-Cluttered/Fashion_MNIST', {}),
    (NAME + ':canvas=80,fragments=8,seed=1', dict(canvas=80, fragments=8, seed=1)),
    (NAME + ':scale=0.8-1.2,fragment_size=6-10', dict(scale=(0.8, 1.2), fragment_size=(6, 10))),
    (NAME + ':scale=1,fragment_size=7', dict(scale=(1.0, 1.0), fragment_size=(7, 7))),
    (NAME + ': canvas = 70 ,scale=.9-1.', dict(canvas=70, scale=(0.9, 1.0))),
])
def test_parse_good_names(name, params):
    assert parse_cluttered_name(name) == ('fashion_mnist', params)
    ClutterConfig(**params)


@pytest.mark.parametrize('name, message', [
    (NAME + ':canvs=80', "unknown parameter 'canvs'"),
    (NAME + ':canvas=8O', 'non-negative integer'),
    (NAME + ':canvas=', 'needs a value'),
    (NAME + ':canvas', 'needs a value'),
    (NAME + ':', 'nothing after'),
    (NAME + ':seed=1,seed=2', 'given twice'),
    (NAME + ':seed=-1', 'non-negative integer'),
    (NAME + ':scale=0.8-', 'range low-high'),
    (NAME + ':scale=1e-1', 'range low-high'),
    (NAME + ':fragment_size=6.5-10', 'integers'),
    (NAME + ':scale=1.2-0.8', 'out of order'),
    (NAME + ':canvas=30', 'canvas=30 is smaller than the largest object'),
    (NAME + ':fragments=300', 'fragments=300'),
    (NAME + ':fragment_size=0-4', 'fragment_size=0-4'),
    (NAME + ':scale=0', 'scale=0.0-0.0'),
    ('ferkd-cluttered/mnist', "unknown base 'mnist'"),
])
def test_bad_names_are_one_line_errors(name, message):
    with pytest.raises(ConfigError, match=message) as info:
        ClutterConfig(**parse_cluttered_name(name)[1])
    assert '\n' not in str(info.value)


def test_canonical_name_round_trips():
    cfg = ClutterConfig(canvas=80, scale=(0.75, 1.25), fragments=3, fragment_size=(4, 9), seed=12)
    assert ClutterConfig(**parse_cluttered_name(NAME + ':' + cfg.canonical())[1]) == cfg
    assert FERKD_CLUTTERED_PREFIX == CLUTTERED_PREFIX


def test_registration_and_kwargs(idx_root, test_split):
    assert not is_registered()
    # the package's own dispatcher needs no patching
    assert len(create_dataset(NAME, root=str(idx_root), split='test')) == 10000
    register_with_timm()
    try:
        # the arguments timm's train script passes: seed, is_training, class_map, input_img_mode, download
        ds = timm.data.create_dataset(NAME, root=str(idx_root), split='validation', is_training=True, class_map='',
                                      download=False, batch_size=8, seed=3, repeats=0, input_img_mode='L')
        assert isinstance(ds, ClutteredFashionMNIST) and ds.split == 'test'
        assert ds.data.tobytes() == test_split.data.tobytes()  # timm's seed does not change the dataset
        assert timm.data.create_dataset(NAME, root=str(idx_root)).split == 'test'  # timm's default 'validation'
        by_kwargs = timm.data.create_dataset(NAME, root=str(idx_root), split='val', canvas=72, clutter_seed=2,
                                             fragments=3, scale=(0.9, 1.1), fragment_size=(5, 7))
        by_name = timm.data.create_dataset(NAME + ':canvas=72,seed=2,fragments=3,scale=0.9-1.1,fragment_size=5-7',
                                           root=str(idx_root), split='test')
        assert by_kwargs.name == by_name.name and by_kwargs.data.shape == (10000, 72, 72)
        assert by_kwargs.cache_dir == by_name.cache_dir
        with pytest.raises(ConfigError, match='given both'):
            timm.data.create_dataset(NAME + ':canvas=72', root=str(idx_root), split='test', canvas=80)
        with pytest.raises(ConfigError, match="unknown argument 'canvs'"):
            timm.data.create_dataset(NAME, root=str(idx_root), split='test', canvs=80)
        with pytest.raises(ConfigError, match='unknown split'):
            timm.data.create_dataset(NAME, root=str(idx_root), split='holdout')
        with pytest.raises(ConfigError, match='class_map'):
            timm.data.create_dataset(NAME, root=str(idx_root), split='test', class_map={'a': 0})
        # timm's own names are untouched
        assert type(timm.data.create_dataset('torch/fashion_mnist', root=str(idx_root), split='test')).__name__ \
            == 'FashionMNIST'
    finally:
        unregister_from_timm()


def test_identity_includes_the_parameters(test_split, idx_root):
    ident = dataset_identity(test_split, test_split.name, 'test')
    assert ident.fingerprint_kind == 'params+targets' and ident.num_images == 10000
    other = create_cluttered_dataset(NAME + ':fragments=2', str(idx_root), 'test')
    assert dataset_identity(other, other.name, 'test').fingerprint != ident.fingerprint
    plain = timm.data.dataset_factory.create_dataset('torch/fashion_mnist', root=str(idx_root), split='test')
    assert dataset_identity(plain, 'torch/fashion_mnist', 'test').fingerprint != ident.fingerprint
    same = create_cluttered_dataset(NAME + ':canvas=64,seed=0', str(idx_root), 'test')
    assert dataset_identity(same, NAME, 'test').fingerprint == ident.fingerprint


def test_corrupt_cache_is_rebuilt(idx_root, test_images, caplog):
    cfg = ClutterConfig(fragments=1)
    first = ClutteredFashionMNIST(idx_root, 'test', cfg)
    expected = np.array(first.data)
    folder = first.cache_dir
    meta = json.loads((folder / 'test.json').read_text())
    assert meta['version'] == CLUTTER_VERSION and meta['params'] == cfg.canonical()
    images_file = folder / 'test-images.npy'
    data = bytearray(images_file.read_bytes())
    data[-100] ^= 0xFF
    images_file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        rebuilt = ClutteredFashionMNIST(idx_root, 'test', cfg)
    assert 'sha256' in caplog.text and np.array_equal(rebuilt.data, expected)
    images_file.write_bytes(bytes(data[:1000]))  # truncated
    assert np.array_equal(ClutteredFashionMNIST(idx_root, 'test', cfg).data, expected)
    (folder / 'test.json').write_text('{not json')
    assert np.array_equal(ClutteredFashionMNIST(idx_root, 'test', cfg).data, expected)
    assert not list(folder.glob('.*.tmp'))


def test_pickle_reopens_the_cache(test_split):
    state = pickle.dumps(test_split)
    assert len(state) < 100_000  # not the 41 MB of images
    back = pickle.loads(state)
    assert len(back) == 10000 and back[7][1] == test_split[7][1]
    assert np.array_equal(np.asarray(back[7][0]), np.asarray(test_split[7][0]))


def test_sample_picture(test_split, tmp_path):
    from timm_ferkd.data.cluttered import main
    out = tmp_path / 'samples.png'
    assert main(['--data-dir', test_split.root, '--dataset', NAME + ':fragments=2', '--splits', 'test',
                 '--plot', str(out), '--num', '4']) == 0
    assert out.read_bytes()[:4] == b'\x89PNG'


# ------------------------------------------------------------------------------------------- gallery

def test_gallery_categories_hand_computed(tmp_path, capsys):
    from timm_ferkd.data.region_gallery import plot_region_gallery, select_gallery_regions
    source = folder_source(make_image_folder(tmp_path / 'images', num_images=6, num_classes=3))
    m = np.tile(np.array([0.25, 0.375, 0.5, 0.75, 0.875]), (6, 1))  # per region, every image
    bank = write_bank(tmp_path / 'bank', source, peaked_probs(m, 5, 2), 5, 5)
    calibration = CalibrationConfig(low=0.3, mid=0.6, top=0.8)
    gallery = select_gallery_regions(bank, calibration, per_category=4, seed=1)
    # discard: m=0.25 and 0.875; hard: 0.375 and 0.5; soft: 0.75
    assert gallery.counts == {CATEGORY_DISCARD: 12, CATEGORY_HARD: 12, CATEGORY_SOFT: 6}
    assert [r.max_prob for r in gallery.regions[CATEGORY_SOFT]] == [0.75] * 4
    hard = gallery.regions[CATEGORY_HARD]
    assert {r.max_prob for r in hard} <= {0.375, 0.5} and [r.max_prob for r in hard] == sorted(r.max_prob for r in hard)
    assert all(r.predicted == 2 and r.region in (1, 2) for r in hard)
    assert all(r.box == tuple(bank.regions(r.image, [r.region]).boxes[0]) for r in hard)
    out = tmp_path / 'gallery.png'
    plot_region_gallery(bank, source, calibration, 4, out)
    assert out.read_bytes()[:4] == b'\x89PNG'
    # with the default thresholds every region is kept with its teacher label: two empty rows
    default = select_gallery_regions(bank, CalibrationConfig(), per_category=2)
    assert default.counts == {CATEGORY_DISCARD: 0, CATEGORY_HARD: 0, CATEGORY_SOFT: 30}
    plot_region_gallery(bank, source, CalibrationConfig(), 2, out)
    # the command line, in this process
    from timm_ferkd.cli import main
    out.unlink()
    assert main(['inspect', str(bank.path), '--show-regions', '2', '--plot', str(out), '--data-dir',
                 str(tmp_path / 'images'), '--calib-low', '0.3', '--calib-mid', '0.6', '--calib-top', '0.8']) == 0
    text = capsys.readouterr().out
    assert 'low 0.3, mid 0.6, top 0.8: discard 12, hard 12, soft 6 regions' in text and 'region gallery' in text
    assert out.read_bytes()[:4] == b'\x89PNG'
    assert main(['inspect', str(bank.path), '--show-regions', '2', '--plot', str(out), '--data-dir',
                 str(tmp_path / 'images'), '--calib-low', '0.9', '--calib-mid', '0.5']) == 2
    assert 'out of order' in capsys.readouterr().err
    assert main(['inspect', str(bank.path), '--show-regions', '2']) == 2
    assert '--show-regions needs --plot' in capsys.readouterr().err


# --------------------------------------------------------------------------------------- integration

def test_generate_verify_inspect_on_cluttered(idx_root, teacher_checkpoint, tmp_path, capsys):
    name = NAME + ':fragments=6,seed=3'
    bank = tmp_path / 'bank'
    result = cli_in_process(
        capsys, 'generate', '--model', 'test_resnet', '--checkpoint', teacher_checkpoint, '--num-classes', '10',
        '--in-chans', '1', '--dataset', name, '--data-dir', idx_root, '--split', 'test',
        '--num-images', 6, '--regions', 8, '--input-size', '1', '32', '32', '-b', '64', '-j', '0',
        '--images-per-shard', 3, '--no-progress', '--output', bank)
    assert '6 images x 8 regions' in result.stdout
    manifest = json.loads((bank / 'manifest.json').read_text())
    assert manifest['dataset']['name'] == name and manifest['dataset']['num_images'] == 10000
    assert manifest['dataset']['fingerprint_kind'] == 'params+targets'
    ok = cli_in_process(capsys, 'verify', bank, '--data-dir', idx_root)
    assert 'matches dataset ' + name in ok.stdout
    other = cli_in_process(capsys, 'verify', bank, '--data-dir', idx_root, '--dataset', NAME + ':fragments=6,seed=4',
                           check=False)
    assert other.returncode == 2 and 'fingerprint' in other.stderr
    plot = tmp_path / 'regions.png'
    shown = cli_in_process(capsys, 'inspect', bank, '--show-regions', 3, '--plot', plot, '--data-dir', idx_root,
                           '--calib-quantile', '--calib-low', 0.2, '--calib-mid', 0.5, '--calib-top', 0.9, '--json')
    gallery = json.loads(shown.stdout)['region_gallery']
    # quantiles of the 48 regions' confidences: about 20% discarded low, 10% high, 30% hard, 40% soft
    counts = gallery['counts']
    assert sum(counts.values()) == 48 and 12 <= counts['discard'] <= 16 and 13 <= counts['hard'] <= 16
    assert plot.read_bytes()[:4] == b'\x89PNG'
    # a student's region dataset over the bank, through the ferkd/ prefix
    from timm_ferkd.data.dataset import create_region_dataset
    regions = create_region_dataset(name, root=str(idx_root), split='test', soft_labels=str(bank), num_crops=2,
                                    input_size=(1, 32, 32))
    crops, target = regions[4]
    assert tuple(crops.shape) == (2, 1, 32, 32)
