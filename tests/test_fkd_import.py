"""Import of official FKD / FerKD label files: every value checked, and no pickled code ever run.

The label files are written here the way the reference generator (``FKD_SLG/generate_soft_label.py``)
writes them: torchvision RandomResizedCrop parameters normalised by the image size, a flip bit,
the reference ``label_quantization`` of a softmax, ``torch.save([coords, flip, quantized])``, and
``np.float16`` on coords and labels with ``--use_fp16``.
"""
import io
import os
import shlex
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from timm_ferkd.labelling.fkd_import import (
    REPORT_NAME, FKDImportConfig, UnsafeLabelFileError, convert_fkd_labels, fkd_label_keys, import_fkd,
    load_fkd_file)
from timm_ferkd.bank.format import EXPLICIT_SAMPLER, BankManifest
from timm_ferkd.bank.reader import SoftLabelBank
from timm_ferkd.bank.regions import replay_region
from timm_ferkd.cli import main as cli_main
from timm_ferkd.errors import BankError, ConfigError, FerKDError

CLASSES = 12  # the teacher's classes; the image folder has 3 of them
REGIONS = 6
# relative path, (height, width), PIL mode, format
IMAGES = [
    ('cat/c1.png', (30, 40), 'RGB', 'PNG'),
    ('cat/c2.v2.jpg', (47, 33), 'RGB', 'JPEG'),
    ('dog/d1.png', (48, 64), 'L', 'PNG'),
    ('dog/d2.JPEG', (25, 61), 'RGB', 'JPEG'),
    ('fish/f1.png', (57, 57), 'RGBA', 'PNG'),
    ('fish/f_2.png', (19, 23), 'RGB', 'PNG'),
]
LABEL_TYPES = ['hard', 'smoothing', 'marginal_smoothing_k5', 'marginal_smoothing_k10', 'marginal_renorm']


# ---------------------------------------------------------------------------------------------- reference files

def reference_quantize(probs: torch.Tensor, label_type: str) -> np.ndarray:
    """What the reference ``label_quantization`` stores for each label type."""
    rows = []
    for p in probs:
        if label_type == 'hard':
            rows.append(torch.argmax(p))
        elif label_type == 'smoothing':
            top = torch.argmax(p)
            rows.append(torch.stack([top, p[top]], dim=0))
        else:  # marginal_smoothing_k5 / marginal_renorm (generated as marginal_renorm_k5) / marginal_smoothing_k10
            k = 10 if label_type.endswith('k10') else 5
            order = torch.argsort(p, descending=True)
            rows.append(torch.stack([order[:k], p[order[:k]]], dim=0))
    return torch.stack(rows, dim=0).numpy()


def write_reference_file(path: Path, image: Image.Image, label_type: str, fp16: bool, generator: torch.Generator):
    """One FKD label file for ``image``, as the reference generator writes it; returns what it stored."""
    from torchvision.transforms import RandomResizedCrop
    coords, flips = [], []
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=generator)))
    for _ in range(REGIONS):
        i, j, h, w = RandomResizedCrop.get_params(image, scale=(0.08, 0.936), ratio=(3 / 4, 4 / 3))
        coords.append(torch.FloatTensor((i / image.size[1], j / image.size[0], h / image.size[1], w / image.size[0])))
        flips.append(bool(torch.rand(1) < 0.5))
    coords = torch.stack(coords).numpy()
    flip = torch.tensor(flips).numpy()
    probs = torch.softmax(torch.randn(REGIONS, CLASSES, generator=generator) * 3, dim=1)
    quantized = reference_quantize(probs, label_type)
    state = [np.float16(coords), flip, np.float16(quantized)] if fp16 else [coords, flip, quantized]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def reference_dense(quantized: np.ndarray, label_type: str) -> torch.Tensor:
    """The reference ``Recover_soft_label`` of stored labels."""
    label = torch.from_numpy(np.asarray(quantized, dtype=np.float32))
    n = label.shape[0]
    if label_type == 'hard':
        return torch.zeros(n, CLASSES).scatter_(1, label.long().view(-1, 1), 1)
    if label_type == 'smoothing':
        index, value = label[:, 0].long(), label[:, 1]
        minor = ((1 - value) / (CLASSES - 1)).view(-1, 1).repeat(1, CLASSES)
        return minor.scatter_(1, index.view(-1, 1), value.view(-1, 1))
    index, value = label[:, 0, :].long(), label[:, 1, :]
    if label_type == 'marginal_renorm':
        soft = torch.zeros(n, CLASSES).scatter_(1, index, value)
        return soft / soft.sum(dim=1, keepdim=True)
    k = index.shape[1]
    minor = ((1 - value.sum(dim=1, keepdim=True)) / (CLASSES - k)).repeat(1, CLASSES)
    return minor.scatter_(1, index, value)


def fkd_replay_box(coords: np.ndarray, size):
    """The pixel box FKD's training replay cuts: PIL crop of (j, i, j + w, i + h), which rounds each corner."""
    height, width = size
    i, j = coords[0].item() * height, coords[1].item() * width
    h, w = coords[2].item() * height, coords[3].item() * width
    top, left, bottom, right = round(i), round(j), round(i + h), round(j + w)
    return top, left, bottom - top, right - left


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('fkd-data')
    rng = np.random.default_rng(0)
    for rel, (h, w), mode, fmt in IMAGES:
        path = root / 'train' / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        channels = {'RGB': 3, 'RGBA': 4, 'L': 1}[mode]
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(path, format=fmt)
    return root


def fkd_path(src: Path, rel: str) -> Path:
    folder, name = rel.rsplit('/', 1)
    return src / 'train' / folder / (name.split('.')[0] + '.tar')  # the reference's naming


def write_label_folder(src: Path, image_folder: Path, label_type: str, fp16: bool, skip=()) -> dict:
    generator = torch.Generator().manual_seed(LABEL_TYPES.index(label_type) * 2 + int(fp16))
    stored = {}
    for rel, *_ in IMAGES:
        if rel in skip:
            continue
        with Image.open(image_folder / 'train' / rel) as image:
            stored[rel] = write_reference_file(fkd_path(src, rel), image.convert('RGB'), label_type, fp16, generator)
    return stored


def run_import(src, image_folder, out, label_type, **kwargs):
    cfg = FKDImportConfig(src=str(src), output=str(out), dataset='', data_dir=str(image_folder), split='train',
                          label_type=label_type, workers=0, progress=False, **{'num_classes': CLASSES, **kwargs})
    return import_fkd(cfg)


def dataset_order(image_folder):
    from timm_ferkd.data.source import create_image_source
    source = create_image_source('', str(image_folder), 'train')
    reader = source.dataset.reader
    return [reader.filename(i) for i in range(len(source))], [t for _, t in reader.samples], source


# ---------------------------------------------------------------------------------------------- import

@pytest.mark.parametrize('fp16', [False, True], ids=['fp32', 'fp16'])
@pytest.mark.parametrize('label_type', LABEL_TYPES)
def test_import_every_value(image_folder, tmp_path, label_type, fp16):
    src, out = tmp_path / 'fkd', tmp_path / 'bank'
    stored = write_label_folder(src, image_folder, label_type, fp16)
    report = run_import(src, image_folder, out, label_type)
    assert report.matched == len(IMAGES) and not report.missing and not report.extra and report.filled == 0
    assert (out / REPORT_NAME).is_file()

    manifest = BankManifest.load(out)
    k = {'hard': 1, 'smoothing': 1, 'marginal_smoothing_k10': 10}.get(label_type, 5)
    assert manifest.sampler == EXPLICIT_SAMPLER
    assert manifest.label_type == {'marginal_smoothing_k5': 'marginal_smoothing',
                                   'marginal_smoothing_k10': 'marginal_smoothing'}.get(label_type, label_type)
    assert (manifest.topk, manifest.regions_per_image, manifest.num_classes) == (k, REGIONS, CLASSES)
    rel_paths, targets, source = dataset_order(image_folder)
    assert manifest.dataset == source.identity and manifest.num_images == len(IMAGES)

    # every stored value, read straight from the shard files
    shards = [load_file(str(out / r.file)) for r in manifest.shards]
    arrays = {key: np.concatenate([s[key] for s in shards]) for key in shards[0]}
    assert arrays['topk_indices'].dtype == np.uint8 and arrays['topk_values'].dtype == np.float16
    assert arrays['boxes'].dtype == np.float32 and arrays['flips'].dtype == np.uint8
    sizes = {rel: size for rel, size, *_ in IMAGES}
    for i, rel in enumerate(rel_paths):
        coords, flip, quantized = stored[rel]
        assert tuple(arrays['image_sizes'][i]) == sizes[rel]
        assert arrays['targets'][i] == targets[i]
        np.testing.assert_array_equal(arrays['boxes'][i], coords.astype(np.float32))
        np.testing.assert_array_equal(arrays['flips'][i], flip.astype(np.uint8))
        q = np.asarray(quantized, dtype=np.float64)
        if label_type == 'hard':
            indices, values = q[:, None], np.ones((REGIONS, 1))
        elif label_type == 'smoothing':
            indices, values = q[:, :1], q[:, 1:]
        else:
            indices, values = q[:, 0, :], q[:, 1, :]
        np.testing.assert_array_equal(arrays['topk_indices'][i], indices.astype(np.int64))
        np.testing.assert_array_equal(arrays['topk_values'][i], values.astype(np.float16))

    # the same through the reader: FKD's replay boxes, its dense targets
    bank = SoftLabelBank(out, validate=True)
    bank.verify_checksums()
    for i, rel in enumerate(rel_paths):
        coords, flip, quantized = stored[rel]
        regions = bank.regions(i)
        assert regions.image_size == sizes[rel]
        expected = np.array([fkd_replay_box(c, sizes[rel]) for c in coords])
        np.testing.assert_array_equal(regions.boxes, expected)
        np.testing.assert_array_equal(regions.flips, flip.astype(bool))
        fp16_labels = np.asarray(quantized).astype(np.float16) if label_type != 'hard' else quantized
        torch.testing.assert_close(bank.dense_targets(i), reference_dense(fp16_labels, label_type),
                                   atol=2e-3, rtol=0)


@pytest.mark.parametrize('label_type', ['marginal_smoothing_k5', 'hard'])
def test_import_uint8_matches_fp16_import(image_folder, tmp_path, label_type):
    src = tmp_path / 'fkd'
    write_label_folder(src, image_folder, label_type, fp16=False)
    run_import(src, image_folder, tmp_path / 'fp16', label_type)
    run_import(src, image_folder, tmp_path / 'u8', label_type, value_dtype='uint8')
    fp16, u8 = SoftLabelBank(tmp_path / 'fp16'), SoftLabelBank(tmp_path / 'u8', validate=True)
    assert (u8.manifest.format_version, u8.manifest.value_dtype) == (2, 'uint8')
    for i in range(len(IMAGES)):
        np.testing.assert_array_equal(u8.regions(i).boxes, fp16.regions(i).boxes)
        np.testing.assert_array_equal(u8.labels(i)[0], fp16.labels(i)[0])
        assert np.abs(u8.labels(i)[1] - fp16.labels(i)[1].astype(np.float32)).max() <= 1 / 510 + 5e-4


def test_replayed_pixels_match_fkd(image_folder, tmp_path):
    """Crops cut from the imported boxes are the pixels FKD's RandomResizedCrop_FKD + flip produce."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as t_F
    src, out = tmp_path / 'fkd', tmp_path / 'bank'
    stored = write_label_folder(src, image_folder, 'marginal_smoothing_k5', fp16=True)
    run_import(src, image_folder, out, 'marginal_smoothing_k5')
    bank = SoftLabelBank(out)
    rel_paths, _, _ = dataset_order(image_folder)
    for i, rel in enumerate(rel_paths):
        coords, flip, _ = stored[rel]
        with Image.open(image_folder / 'train' / rel) as image:
            image = image.convert('RGB')
        regions = bank.regions(i)
        for r in range(REGIONS):
            size = image.size[1], image.size[0]
            top, left, h, w = (c.item() * s for c, s in zip(coords[r], (size[0], size[1], size[0], size[1])))
            fkd = t_F.resized_crop(image, top, left, h, w, [24, 24], InterpolationMode.BILINEAR)
            if flip[r]:
                fkd = t_F.hflip(fkd)
            ours = replay_region(image, regions.boxes[r], regions.flips[r], (24, 24), Image.Resampling.BILINEAR)
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(fkd))


def test_cli_import_then_verify(image_folder, tmp_path, capsys):
    src, out = tmp_path / 'fkd', tmp_path / 'bank'
    write_label_folder(src, image_folder, 'marginal_smoothing_k10', fp16=False)
    argv = ['import-fkd', str(src / 'train'), '--data-dir', str(image_folder), '--split', 'train',
            '--label-type', 'marginal_smoothing_k10', '--num-classes', str(CLASSES), '--teacher', 'effl2',
            '--images-per-shard', '4', '-j', '2', '--no-progress', '--output', str(out)]
    assert cli_main(argv) == 0
    assert f'{len(IMAGES)} of {len(IMAGES)} images matched' in capsys.readouterr().out
    manifest = BankManifest.load(out)
    assert manifest.teacher.model == 'effl2' and len(manifest.shards) == 2
    # rerunning resumes (finished shards are kept); other settings are refused
    before = load_file(str(out / manifest.shards[1].file))
    (out / manifest.shards[1].file).unlink()
    assert cli_main(argv) == 0
    resumed = BankManifest.load(out).shards
    assert resumed[0] == manifest.shards[0] and resumed[1].bytes == manifest.shards[1].bytes
    after = load_file(str(out / manifest.shards[1].file))
    assert all(np.array_equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert cli_main([a if a != 'effl2' else 'other' for a in argv]) == 2
    assert 'holds an FKD import with other settings (teacher.model differ;' in capsys.readouterr().err
    assert cli_main(['verify', str(out), '--data-dir', str(image_folder)]) == 0
    assert 'checksums and schema OK' in capsys.readouterr().out


def test_missing_and_extra_files(image_folder, tmp_path):
    src, out = tmp_path / 'fkd', tmp_path / 'bank'
    write_label_folder(src, image_folder, 'smoothing', fp16=False, skip=['dog/d2.JPEG'])
    stray = src / 'train' / 'dog' / 'gone.tar'
    stray.write_bytes((src / 'train' / 'dog' / 'd1.tar').read_bytes())
    with pytest.raises(BankError, match=r'1 of 6 images have no FKD label file .*dog/d2.JPEG.*--fill-missing'):
        run_import(src, image_folder, out, 'smoothing')

    report = run_import(src, image_folder, tmp_path / 'filled', 'smoothing', fill_missing=True)
    assert report.missing == ['dog/d2.JPEG'] and report.extra == ['dog/gone.tar'] and report.filled == 1
    rel_paths, targets, _ = dataset_order(image_folder)
    i = rel_paths.index('dog/d2.JPEG')
    bank = SoftLabelBank(tmp_path / 'filled')
    indices, values = bank.labels(i)
    assert (indices[:, 0] == targets[i]).all() and (values[:, 0] == 1).all()
    np.testing.assert_array_equal(bank.regions(i).boxes, [[0, 0, 25, 61]] * REGIONS)


def test_label_type_and_class_errors(image_folder, tmp_path):
    src = tmp_path / 'fkd'
    write_label_folder(src, image_folder, 'marginal_smoothing_k5', fp16=False)
    with pytest.raises(BankError, match=r'do not fit --label-type smoothing \(expected \[R, 2\]\)'):
        run_import(src, image_folder, tmp_path / 'a', 'smoothing')
    with pytest.raises(ConfigError, match='pass --num-classes'):
        run_import(src, image_folder, tmp_path / 'b', 'marginal_smoothing_k5', num_classes=None)
    with pytest.raises(ConfigError, match='unknown FKD --label-type'):
        run_import(src, image_folder, tmp_path / 'c', 'soft')
    with pytest.raises(ConfigError, match='no FKD label file'):
        run_import(tmp_path, image_folder, tmp_path / 'd', 'marginal_smoothing_k5')


def _label_folder_with_doubled_regions(src, image_folder):
    """An FKD label folder in which one image stores twice the regions of the others."""
    stored = write_label_folder(src, image_folder, 'hard', fp16=False)
    coords, flip, quantized = stored['fish/f1.png']
    torch.save([np.concatenate([coords, coords]), np.concatenate([flip, flip]), np.concatenate([quantized] * 2)],
               fkd_path(src, 'fish/f1.png'))
    return src


def test_regions_must_agree(image_folder, tmp_path):
    src = _label_folder_with_doubled_regions(tmp_path / 'fkd', image_folder)
    with pytest.raises(BankError, match='pass --regions N'):
        run_import(src, image_folder, tmp_path / 'a', 'hard')
    run_import(src, image_folder, tmp_path / 'b', 'hard', regions=REGIONS)
    assert BankManifest.load(tmp_path / 'b').regions_per_image == REGIONS


def test_failed_import_leaves_no_files(image_folder, tmp_path):
    src = _label_folder_with_doubled_regions(tmp_path / 'fkd', image_folder)
    out = tmp_path / 'bank'
    with pytest.raises(BankError, match='pass --regions N'):
        run_import(src, image_folder, out, 'hard')
    assert not out.exists()  # no import.json, no shard, no directory
    out.mkdir()
    with pytest.raises(BankError, match='pass --regions N'):
        run_import(src, image_folder, out, 'hard')
    assert not any(out.iterdir())
    run_import(src, image_folder, out, 'hard', regions=REGIONS)  # the corrected command is not refused
    SoftLabelBank(out).validate(full=True)


def test_label_keys():
    assert fkd_label_keys('n01/n01_1.JPEG') == ['n01/n01_1']
    assert fkd_label_keys('a/x.v2.png') == ['a/x', 'a/x.v2']
    assert fkd_label_keys('top.png') == ['top']


def test_convert_sorts_and_validates():
    q = np.array([[[3, 1, 7], [0.2, 0.5, 0.1]]], dtype=np.float32)
    indices, values = convert_fkd_labels(q, 'marginal_renorm')
    assert indices.tolist() == [[1, 3, 7]] and values[0].tolist() == pytest.approx([0.5, 0.2, 0.1])
    with pytest.raises(BankError, match='not non-negative integers'):
        convert_fkd_labels(np.array([[[1.5], [0.3]]], dtype=np.float32), 'marginal_renorm')


# ---------------------------------------------------------------------------------------------- safety

class _RunsShell:
    """Unpickling this runs a shell command (what a hostile label file would do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _RunsPython:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def test_malicious_file_is_refused_and_never_runs(image_folder, tmp_path, capsys):
    src = tmp_path / 'fkd'
    stored = write_label_folder(src, image_folder, 'marginal_smoothing_k5', fp16=False)
    marker = tmp_path / 'pwned'
    coords, flip, quantized = stored['dog/d1.png']
    hostile = fkd_path(src, 'dog/d1.png')
    torch.save([coords, flip, _RunsShell(f'touch {shlex.quote(str(marker))}')], hostile)

    with pytest.raises(UnsafeLabelFileError) as info:
        load_fkd_file(hostile)
    message = str(info.value)
    assert isinstance(info.value, FerKDError) and '\n' not in message
    assert 'refusing to load' in message and 'system' in message and str(hostile) in message
    with pytest.raises(UnsafeLabelFileError):
        run_import(src, image_folder, tmp_path / 'bank', 'marginal_smoothing_k5')
    assert cli_main(['import-fkd', str(src), '--data-dir', str(image_folder), '--label-type', 'marginal_smoothing_k5',
                     '--num-classes', str(CLASSES), '-j', '2', '--no-progress', '--output', str(tmp_path / 'b2')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'refusing to load' in err[0]
    assert not marker.exists()

    # python-level payloads are refused as well
    torch.save([coords, flip, _RunsPython(f'open({str(marker)!r}, "w").write("x")')], hostile)
    with pytest.raises(UnsafeLabelFileError, match='exec'):
        load_fkd_file(hostile)
    assert not marker.exists()

    # control: the payload is live, plain unpickling does run it
    torch.save([coords, flip, _RunsShell(f'touch {shlex.quote(str(marker))}')], hostile)
    torch.load(hostile, weights_only=False)
    assert marker.exists()


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / 'obj.tar'
    torch.save([np.zeros((2, 4), np.float32), np.zeros(2, bool), np.array([1, 'a'], dtype=object)], path)
    with pytest.raises(UnsafeLabelFileError, match='refusing to load') as info:
        load_fkd_file(path)
    assert '\n' not in str(info.value)


def _rewrite_pickle(path: Path, old: bytes, new: bytes) -> None:
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_STORED) as z:
        for info, data in entries:
            z.writestr(info, data.replace(old, new) if info.filename.endswith('data.pkl') else data)
    path.write_bytes(buffer.getvalue())


def test_numpy1_and_legacy_files_load(tmp_path):
    state = [np.random.rand(3, 4).astype(np.float32), np.array([True, False, True]),
             np.float16(np.random.rand(3, 2, 5))]
    numpy1 = tmp_path / 'numpy1.tar'
    torch.save(state, numpy1)
    _rewrite_pickle(numpy1, b'numpy._core.multiarray\n_reconstruct', b'numpy.core.multiarray\n_reconstruct')
    assert b'numpy.core.multiarray' in zipfile.ZipFile(numpy1).read(
        next(n for n in zipfile.ZipFile(numpy1).namelist() if n.endswith('data.pkl')))
    legacy = tmp_path / 'legacy.tar'
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    for path in (numpy1, legacy):
        loaded = load_fkd_file(path)
        for a, b in zip(loaded, state):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype


def test_corrupt_file_is_a_bank_error(tmp_path):
    path = tmp_path / 'cut.tar'
    buffer = io.BytesIO()
    torch.save([np.zeros((2, 4), np.float32)], buffer)
    path.write_bytes(buffer.getvalue()[:100])
    with pytest.raises(BankError, match='truncated or corrupt'):
        load_fkd_file(path)
    not_fkd = tmp_path / 'dict.tar'
    torch.save({'coords': np.zeros(3)}, not_fkd)
    with pytest.raises(FerKDError):
        load_fkd_file(not_fkd)

