"""Bank validation and bad input (issue 11): every case is a clean read or one line and exit 2, never a traceback.

Each test names the case of the issue it covers (1-9). Commands run in-process through their real entry
points (``timm_ferkd.cli.main``, ``train_ferkd.main``) where that is enough; training runs as a subprocess
where a real run (checkpoints, DataLoader workers) is the point.
"""
import errno
import hashlib
import json
import os
import shutil
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, call_main, train_in_process
from timm_ferkd.bank.format import (
    EXPLICIT_SAMPLER, MANIFEST_NAME, BankManifest, DatasetIdentity, TeacherInfo, read_safetensors_header)
from timm_ferkd.labelling.generate import BYTE_NEUTRAL_OPTIONS, GenerateConfig, generate_bank, resume_settings
from timm_ferkd.bank.reader import SoftLabelBank
from timm_ferkd.bank.validate import check_safetensors_header, sample_rows, shard_metadata, validate_manifest
from timm_ferkd.bank.writer import atomic_write_bytes, write_shard
from timm_ferkd.cli import main as cli_main
from timm_ferkd.errors import BankError, ConfigError, FerKDError

CLASSES = 10


# ---------------------------------------------------------------------------------------------- helpers

def make_bank(root: Path, num_images=6, regions=4, k=3, per_shard=4, label_type='marginal_smoothing', seed=0,
              corrupt=None, explicit=False) -> Path:
    """A small valid bank written like the writer does (settings in every shard header).

    ``explicit`` stores boxes and flips (sampler 'explicit', as imported FKD banks do).

    ``corrupt(tensors, shard_index)`` may edit the arrays before they are written, so the manifest's
    sha256 matches the bad content and only the value checks can find it.
    """
    rng = np.random.default_rng(seed)
    k = CLASSES if label_type == 'full' else k
    manifest = BankManifest(
        num_classes=CLASSES, regions_per_image=regions, topk=k, label_type=label_type, temperature=1.0,
        num_images=num_images, images_per_shard=per_shard, seed=seed, scale=(0.08, 1.0), ratio=(0.75, 4 / 3),
        teacher=TeacherInfo(model='synthetic', input_size=(1, 28, 28)), index_dtype=None if label_type == 'full' else 'uint8',
        dataset=DatasetIdentity(name='synthetic', split='train', num_images=num_images, fingerprint='sha256:0',
                                fingerprint_kind='targets'))
    if explicit:
        manifest.sampler = EXPLICIT_SAMPLER
    root.mkdir(parents=True, exist_ok=True)
    for s in range(manifest.num_shards):
        first, n = manifest.shard_range(s)
        probs = rng.dirichlet(np.ones(CLASSES), size=(n, regions)).astype(np.float32)
        order = np.argsort(-probs, axis=2, kind='stable')
        tensors = {
            'image_sizes': np.tile(np.array([[28, 30]], dtype=np.int32), (n, 1)),
            'targets': (np.arange(first, first + n) % CLASSES).astype(np.int32),
        }
        if label_type == 'full':
            tensors['topk_values'] = probs.astype(np.float16)
        else:
            tensors['topk_values'] = np.take_along_axis(probs, order, axis=2)[..., :k].astype(np.float16)
            tensors['topk_indices'] = order[..., :k].astype(np.uint8)
        if explicit:
            top_left = rng.uniform(0, 0.5, (n, regions, 2))
            tensors['boxes'] = np.concatenate([top_left, rng.uniform(0.1, 0.5, (n, regions, 2))], axis=2).astype(np.float32)
            tensors['flips'] = rng.integers(0, 2, (n, regions)).astype(np.uint8)
        if corrupt is not None:
            corrupt(tensors, s)
        manifest.shards.append(write_shard(root, s, first, tensors, metadata=shard_metadata(manifest, s)))
    atomic_write_bytes(root / MANIFEST_NAME, manifest.to_json().encode())
    return root


def edit_manifest(root: Path, edit) -> None:
    data = json.loads((root / MANIFEST_NAME).read_text())
    edit(data)
    (root / MANIFEST_NAME).write_text(json.dumps(data))


def replace_shard(root: Path, shard_index: int, data: bytes) -> None:
    """Swap a shard's bytes and record them in the manifest, as a crafted (not a damaged) bank would."""
    name = f'shard-{shard_index:05d}.safetensors'
    (root / name).write_bytes(data)

    def edit(m):
        m['shards'][shard_index].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    edit_manifest(root, edit)


def with_header(path: Path, edit) -> bytes:
    """The shard's bytes with its JSON header edited (its data section unchanged)."""
    header, start = read_safetensors_header(path)
    edit(header)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, 'little') + raw + path.read_bytes()[start:]


def cli(capsys, *argv):
    """Run ``timm-ferkd`` in-process: (exit status, last stderr line, all stderr)."""
    rc = call_main(cli_main, argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    return rc, (lines[-1] if lines else ''), err


def assert_one_line(capsys, command, *argv, expect):
    rc, last, err = cli(capsys, command, *argv)
    assert rc == 2, err
    assert 'Traceback' not in err, err
    assert last.startswith(f'timm-ferkd {command}: error:') and expect in last, last
    return last


def train_main(*argv):
    import train_ferkd
    return call_main(train_ferkd.main, argv)


def gen_argv(fmnist_root, checkpoint, output, *extra):
    return ['--model', 'test_resnet', '--checkpoint', checkpoint, '--num-classes', CLASSES, '--in-chans', 1,
            '--dataset', 'torch/fashion_mnist', '--data-dir', fmnist_root, '--num-images', 8, '--regions', 4,
            '--input-size', 1, 28, 28, '-b', 16, '-j', 0, '--images-per-shard', 4, '--no-progress', '--device', 'cpu',
            '--output', output, *extra]


@pytest.fixture(scope='module')
def nan_checkpoint(tmp_path_factory) -> Path:
    """test_resnet weights with one NaN: the teacher outputs NaN for every input."""
    import timm
    torch.manual_seed(0)
    state = timm.create_model('test_resnet', num_classes=CLASSES, in_chans=1).state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point() and k.endswith('weight'))
    state[key].view(-1)[0] = float('nan')
    path = tmp_path_factory.mktemp('nan') / 'nan.pth'
    torch.save(state, path)
    return path


# ---------------------------------------------------------------------------------------------- 1: non-finite banks

def test_1_generate_refuses_nan_teacher_outputs_and_leaves_nothing(fmnist_root, nan_checkpoint, tmp_path, capsys):
    out = tmp_path / 'bank'
    assert_one_line(capsys, 'generate', *gen_argv(fmnist_root, nan_checkpoint, out),
                    expect='non-finite outputs (NaN or inf) for image 0')
    assert not out.exists()  # case 9: no generation.json, no directory


@pytest.mark.parametrize('flag,value,expect', [
    ('--std', '0', '--std'), ('--temperature', 'nan', '--temperature'), ('--mean', 'nan', '--mean'),
    ('--ratio', ['1', 'inf'], '--ratio'), ('--fnkd-tau', 'inf', '--fnkd-tau'),
])
def test_1_generate_refuses_flags_that_make_nan_banks(fmnist_root, teacher_checkpoint, tmp_path, capsys, flag, value, expect):
    values = value if isinstance(value, list) else [value]
    out = tmp_path / 'bank'
    assert_one_line(capsys, 'generate', *gen_argv(fmnist_root, teacher_checkpoint, out, flag, *values), expect=expect)
    assert not out.exists()


def test_1_amp_overflow_names_image_and_amp():
    from timm_ferkd.labelling.generate import _check_finite
    cfg = GenerateConfig(model='m', output='o', regions=2, amp=True, device='cpu')
    probs = torch.full((6, 3), 1 / 3)
    probs[3, 1] = float('inf')
    meta = [(10, 0, 1, 1), (11, 0, 1, 1), (12, 0, 1, 1)]
    with pytest.raises(ConfigError, match=r'image 11 \(region 1\).*drop --amp'):
        _check_finite(probs, meta, cfg)


def _set(name, index, value):
    def corrupt(tensors, shard):
        if shard == 1:
            tensors[name][index] = value
    return corrupt


# bad stored content (the sha256 matches it): case -> (corrupt, bank options, what the message says)
MS = {'label_type': 'marginal_smoothing'}
BAD_VALUES = {
    'nan': (_set('topk_values', (1, 2, 0), np.nan), MS, 'non-finite'),
    'inf': (_set('topk_values', (1, 2, 0), np.inf), MS, 'non-finite'),
    'negative': (_set('topk_values', (1, 2, 2), -0.25), MS, 'outside [0, 1]'),
    'above_one': (_set('topk_values', (1, 2, 0), 1.5), MS, 'outside [0, 1]'),
    'mass': (_set('topk_values', (1, 2), [0.75, 0.5, 0.25]), MS, 'more than 1'),
    'unsorted': (_set('topk_values', (1, 2), [0.25, 0.5, 0.125]), MS, 'descending'),
    'index': (_set('topk_indices', (1, 2, 1), CLASSES), MS, 'class index outside'),
    'duplicate': (_set('topk_indices', (1, 2), [3, 3, 1]), MS, 'listed twice'),
    'target': (_set('targets', 1, CLASSES + 3), MS, 'target 13'),
    'size': (_set('image_sizes', 1, [0, 30]), MS, 'size [0, 30]'),
    'full_nan': (_set('topk_values', (1, 2, 4), np.nan), {'label_type': 'full'}, 'non-finite'),
    'full_mass': (_set('topk_values', (1, 2), np.zeros(CLASSES)), {'label_type': 'full'}, 'do not sum to 1'),
    'box': (_set('boxes', (1, 2), [0.75, 0.0, 0.5, 0.5]), {'explicit': True}, 'box outside the image'),
    'box_nan': (_set('boxes', (1, 2, 3), np.nan), {'explicit': True}, 'box outside the image'),
    'flip': (_set('flips', (1, 2), 3), {'explicit': True}, 'flip 3'),
}


@pytest.mark.parametrize('case', sorted(BAD_VALUES))
def test_1_4_bad_values_fail_verify_and_reads(tmp_path, capsys, case):
    corrupt, options, expect = BAD_VALUES[case]
    root = make_bank(tmp_path / 'bank', corrupt=corrupt, **options)
    last = assert_one_line(capsys, 'verify', root, expect=expect)
    assert 'shard-00001' in last and 'image 5' in last  # shard 1 row 1 is image 5
    bank = SoftLabelBank(root)
    with pytest.raises(BankError, match='image 5'):
        for i in range(len(bank)):  # what training reads
            bank.regions(i)
            bank.target(i)
            bank.dense_targets(i)


@pytest.mark.parametrize('case', ['nan', 'negative', 'inf'])
def test_1_4_bad_max_probabilities_fail_inspect_and_calibration(tmp_path, capsys, case):
    corrupt = {'nan': _set('topk_values', (1, 2, 0), np.nan), 'inf': _set('topk_values', (1, 2, 0), np.inf),
               'negative': _set('topk_values', (1, 2), [-0.5, -0.5, -0.5])}[case]
    root = make_bank(tmp_path / 'bank', corrupt=corrupt)
    assert_one_line(capsys, 'inspect', root, expect='image 5 region 2')
    with pytest.raises(BankError, match='image 5 region 2 has max probability'):
        SoftLabelBank(root).all_max_probs()  # what calibration reads: not "calibration discards every region"


def test_1_6_push_refuses_invalid_banks_before_uploading(tmp_path, monkeypatch):
    import timm_ferkd.bank.hub as hub
    monkeypatch.setattr(hub, '_api', lambda: pytest.fail('push contacted the Hub with an invalid bank'))
    root = make_bank(tmp_path / 'nan', corrupt=_set('topk_values', (1, 2, 0), np.nan))
    with pytest.raises(BankError, match='non-finite'):
        hub.push_bank(root, 'org/nan')
    root = make_bank(tmp_path / 'escape')
    os.rename(root / 'shard-00001.safetensors', tmp_path / 'shard-00001.safetensors')
    edit_manifest(root, lambda m: m['shards'][1].update(file='../shard-00001.safetensors'))
    with pytest.raises(BankError, match=r"shards\[1\] is '../shard-00001.safetensors'"):
        hub.push_bank(root, 'org/escape')


# ---------------------------------------------------------------------------------------------- 2: resume settings

def base_config(fmnist_root, output, **kw) -> GenerateConfig:
    base = dict(model='test_resnet', checkpoint=None, num_classes=CLASSES, in_chans=1, dataset='torch/fashion_mnist',
                data_dir=str(fmnist_root), num_images=8, regions=4, input_size=(1, 28, 28), batch_size=16, workers=0,
                images_per_shard=4, seed=7, progress=False, output=str(output), device='cpu')
    base.update(kw)
    return GenerateConfig(**base)


def shard_hashes(bank_dir: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(bank_dir).glob('shard-*.safetensors'))}


def test_2_resume_with_amp_is_refused(fmnist_root, tmp_path, monkeypatch):
    import timm_ferkd.labelling.generate as gen
    real_write = gen._write

    def crash_after_first(*args, **kwargs):
        if args[2] > 0:
            raise KeyboardInterrupt('killed')
        return real_write(*args, **kwargs)
    out = tmp_path / 'bank'
    monkeypatch.setattr(gen, '_write', crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        generate_bank(base_config(fmnist_root, out))
    monkeypatch.setattr(gen, '_write', real_write)
    assert [p.name for p in out.glob('shard-*.safetensors')] == ['shard-00000.safetensors']
    for kw, key in (({'amp': True}, 'execution.amp'), ({'amp': True, 'amp_dtype': 'float16'}, 'execution.amp')):
        with pytest.raises(ConfigError, match=rf'other settings \({key}'):
            generate_bank(base_config(fmnist_root, out, **kw))
    generate_bank(base_config(fmnist_root, out, workers=1))  # a byte-neutral option may change
    SoftLabelBank(out).validate(full=True)


# every GenerateConfig option that changes the shards' bytes, with another valid value and the setting
# that records it (options that only choose the teacher's execution are checked without running it below)
BYTE_OPTIONS = {
    'model': ('test_efficientnet', 'teacher'),
    'checkpoint': ('<teacher_checkpoint>', 'teacher'),
    'num_classes': (5, 'num_classes'),
    'in_chans': (3, 'teacher'),
    'num_images': (4, 'num_images'),
    'regions': (3, 'regions_per_image'),
    'topk': (3, 'topk'),
    'label_type': ('full', 'label_type'),
    'temperature': (2.0, 'temperature'),
    'fnkd_tau': (2.0, 'fnkd_tau'),
    'scale': ((0.3, 1.0), 'scale'),
    'ratio': ((0.5, 2.0), 'ratio'),
    'input_size': ((1, 24, 24), 'teacher'),
    'interpolation': ('nearest', 'teacher'),
    'mean': ((0.3,), 'teacher'),
    'std': ((0.4,), 'teacher'),
    'dataset': ('', 'dataset'),  # an image folder (needs its own --data-dir)
    'split': ('test', 'dataset'),
    'seed': (8, 'seed'),
    'images_per_shard': (2, 'images_per_shard'),
    'batch_size': (8, 'execution.batch_size'),
    'device': ('meta', 'execution.device'),
    'amp': (True, 'execution.amp'),
    'value_dtype': ('uint8', 'value_dtype'),
}
# options whose effect is checked on the settings themselves (no run needed, or none possible here)
SETTINGS_ONLY_OPTIONS = ('pretrained', 'amp_dtype', 'channels_last')


def test_2_every_option_that_changes_shard_bytes_guards_resume(fmnist_root, teacher_checkpoint, tmp_path):
    names = {f.name for f in fields(GenerateConfig)}
    assert names == set(BYTE_OPTIONS) | set(BYTE_NEUTRAL_OPTIONS) | set(SETTINGS_ONLY_OPTIONS), \
        'classify every new GenerateConfig option: in resume_settings (BYTE_OPTIONS) or BYTE_NEUTRAL_OPTIONS'
    out = tmp_path / 'bank'
    generate_bank(base_config(fmnist_root, out))
    from bank_factory import make_image_folder
    folder = make_image_folder(tmp_path / 'folder', num_images=8, mode='L')
    for name, (value, key) in BYTE_OPTIONS.items():
        value = str(teacher_checkpoint) if value == '<teacher_checkpoint>' else value
        extra = {'data_dir': str(folder)} if name == 'dataset' else {}
        with pytest.raises(ConfigError, match=rf'other settings \(.*{key}') as e:
            generate_bank(base_config(fmnist_root, out, **{name: value}, **extra))
        assert '\n' not in str(e.value)

    # settings-only: the recorded settings change exactly when the bytes can
    from timm_ferkd.labelling.generate import _teacher_info
    import timm
    manifest = BankManifest.load(out)
    model = timm.create_model('test_resnet', num_classes=CLASSES, in_chans=1)
    cfg = base_config(fmnist_root, out)
    assert _teacher_info(replace(cfg, pretrained=True), model).pretrained is True  # teacher.pretrained
    amp_bf16, amp_fp16 = replace(cfg, amp=True), replace(cfg, amp=True, amp_dtype='float16')
    assert resume_settings(amp_bf16, manifest) != resume_settings(amp_fp16, manifest)
    assert resume_settings(cfg, manifest) == resume_settings(replace(cfg, amp_dtype='float16'), manifest)  # amp off
    cuda = replace(cfg, device='cuda')
    assert resume_settings(cuda, manifest) != resume_settings(replace(cuda, channels_last=True), manifest)
    assert resume_settings(cfg, manifest) == resume_settings(replace(cfg, channels_last=True), manifest)  # CPU: unused

    # byte-neutral options: the same shards, byte for byte
    reference = shard_hashes(out)
    data_link = tmp_path / 'data-link'
    data_link.symlink_to(fmnist_root, target_is_directory=True)
    neutral = {'output': {}, 'data_dir': {'data_dir': str(data_link)}, 'download': {'download': True},
               'workers': {'workers': 1}, 'progress': {'progress': True}, 'extra_dataset_kwargs': {}}
    assert set(neutral) == set(BYTE_NEUTRAL_OPTIONS)
    for name, kw in neutral.items():
        other = tmp_path / f'neutral-{name}'
        generate_bank(base_config(fmnist_root, other, **kw))
        assert shard_hashes(other) == reference, name


# ---------------------------------------------------------------------------------------------- 3: shards, manifest ranges

def _header_case(name):
    def edit(h):
        if name == 'negative_offsets':
            h['targets']['data_offsets'] = [-8, h['targets']['data_offsets'][1] - 8]
        elif name == 'overlapping_offsets':
            a, b = h['targets']['data_offsets']
            h['image_sizes']['data_offsets'] = [a, a + (b - a)]
            h['image_sizes']['shape'] = [b - a]
            h['image_sizes']['dtype'] = 'U8'
        elif name == 'entry_not_object':
            h['targets'] = 5
        elif name == 'unknown_dtype':
            h['targets']['dtype'] = 'X32'
        elif name == 'shape_mismatch':
            h['targets']['shape'] = [h['targets']['shape'][0] + 1]
        elif name == 'metadata_not_strings':
            h['__metadata__'] = {'timm_ferkd': 5}
        elif name == 'header_is_list':
            h.clear()
    return edit


@pytest.mark.parametrize('case', ['negative_offsets', 'overlapping_offsets', 'entry_not_object', 'unknown_dtype',
                                  'shape_mismatch', 'metadata_not_strings', 'trailing_bytes', 'header_is_list'])
def test_3_8_safetensors_headers_are_checked_like_the_library(tmp_path, capsys, case):
    from safetensors import safe_open
    root = make_bank(tmp_path / 'bank')
    shard = root / 'shard-00000.safetensors'
    if case == 'trailing_bytes':
        data = shard.read_bytes() + b'\0' * 8
    elif case == 'header_is_list':
        raw = b'[1, 2]'
        data = len(raw).to_bytes(8, 'little') + raw + shard.read_bytes()[read_safetensors_header(shard)[1]:]
    else:
        data = with_header(shard, _header_case(case))
    replace_shard(root, 0, data)
    with pytest.raises(Exception):  # the safetensors library refuses it too
        with safe_open(str(shard), 'np') as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(BankError, match='corrupt safetensors header'):
        SoftLabelBank(root).labels(0)
    assert_one_line(capsys, 'verify', root, expect='corrupt safetensors header')


@pytest.mark.parametrize('case,edit,expect', [
    ('ratio_zero', lambda m: m.update(ratio=[0, 0]), 'ratio must be'),
    ('scale_zero', lambda m: m.update(scale=[0.0, 1.0]), 'scale must be'),
    ('scale_order', lambda m: m.update(scale=[0.9, 0.1]), 'LO <= HI'),
    ('parent_name', lambda m: m['shards'][1].update(file='../shard-00001.safetensors'), "shards[1] is '../shard-00001"),
    ('absolute_name', lambda m: m['shards'][1].update(file='/etc/passwd'), "shards[1] is '/etc/passwd'"),
    ('duplicate_record', lambda m: m['shards'].__setitem__(1, dict(m['shards'][0])), "shards[1] is 'shard-00000"),
    ('swapped_records', lambda m: m['shards'].reverse(), "shards[0] is 'shard-00001"),
    ('wrong_first_image', lambda m: m['shards'][1].update(first_image=3), 'images [3, 5)'),
    ('too_many_shards', lambda m: m['shards'].append(dict(m['shards'][1])), 'lists 3 shards'),
    ('images_per_shard_0', lambda m: m.update(images_per_shard=0), 'images_per_shard must be an integer >= 1'),
    ('num_images_string', lambda m: m.update(num_images='8'), 'num_images must be an integer'),
    ('file_int', lambda m: m['shards'][0].update(file=5), 'shards[0].file must be a string'),
    ('index_dtype_int64', lambda m: m.update(index_dtype='int64'), 'index_dtype must be one of'),
    ('unknown_value_dtype', lambda m: m.update(value_dtype='bfloat16'), 'value_dtype must be one of'),
    ('topk_gt_classes', lambda m: m.update(topk=11), 'topk 11 does not fit'),
    ('flip_prob', lambda m: m.update(flip_prob=2), 'flip_prob must be'),
    ('temperature_nan', lambda m: m.update(temperature=float('nan')), 'temperature must be a finite number'),
    ('bool_count', lambda m: m.update(num_classes=True), 'num_classes must be an integer'),
    ('teacher_not_object', lambda m: m.update(teacher=[1]), 'teacher must be a JSON object'),
    ('std_zero', lambda m: m['teacher'].update(std=[0]), 'teacher.std'),
    ('unknown_field', lambda m: m.update(extra=1), 'unknown field extra'),
    ('missing_field', lambda m: m.pop('num_classes'), 'field num_classes is missing'),
    ('bad_sha256', lambda m: m['shards'][0].update(sha256='xyz'), 'shards[0].sha256 must match'),
    ('seed_edited', lambda m: m.update(seed=5), 'other settings than its manifest (seed differ)'),
    ('dataset_edited', lambda m: m['dataset'].update(fingerprint='sha256:1'), 'dataset differ'),
])
def test_3_8_manifest_schema(tmp_path, capsys, case, edit, expect):
    root = make_bank(tmp_path / 'bank')
    edit_manifest(root, edit)
    with pytest.raises(BankError) as e:
        SoftLabelBank(root).labels(0)
    assert expect in str(e.value) and '\n' not in str(e.value)
    assert_one_line(capsys, 'verify', root, expect=expect)


def test_3_manifest_schema_covers_every_field():
    from timm_ferkd.bank import validate
    assert set(validate._MANIFEST_FIELDS) == {f.name for f in fields(BankManifest)}
    assert set(validate._TEACHER_FIELDS) == {f.name for f in fields(TeacherInfo)}
    assert set(validate._DATASET_FIELDS) == {f.name for f in fields(DatasetIdentity)}


def test_3_valid_manifest_and_header_pass():
    root_manifest = json.loads(BankManifest(
        num_classes=3, regions_per_image=2, topk=2, label_type='marginal_renorm', temperature=1.0, num_images=3,
        images_per_shard=2, seed=0, scale=(0.08, 1.0), ratio=(0.75, 4 / 3), teacher=TeacherInfo(model='t'),
        dataset=DatasetIdentity(name='d', split='train', num_images=3, fingerprint='f', fingerprint_kind='targets'),
    ).to_json())
    validate_manifest(root_manifest, 'm')
    check_safetensors_header({'__metadata__': {'a': 'b'}, 'x': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]},
                              'e': {'dtype': 'U8', 'shape': [0], 'data_offsets': [8, 8]}}, 8, 's')
    assert sample_rows(3) == [0, 1, 2] and sample_rows(1000)[0] == 0 and sample_rows(1000)[-1] == 999


def test_3_shard_from_another_bank_is_refused(tmp_path):
    a, b = make_bank(tmp_path / 'a', seed=0), make_bank(tmp_path / 'b', seed=1)
    replace_shard(a, 1, (b / 'shard-00001.safetensors').read_bytes())  # sizes and sha256 updated too
    with pytest.raises(BankError, match='written with other settings than its manifest'):
        SoftLabelBank(a, validate=True)


def test_3_train_verify_bank_catches_a_flipped_value(tmp_path, fmnist_root, capsys):
    root = make_bank(tmp_path / 'bank')
    shard = root / 'shard-00000.safetensors'
    header, start = read_safetensors_header(shard)
    data = bytearray(shard.read_bytes())
    data[start + header['topk_values']['data_offsets'][0]] ^= 0x01  # lowest mantissa bit: still a valid value
    shard.write_bytes(bytes(data))
    SoftLabelBank(root, validate=True)  # the quick check cannot tell
    with pytest.raises(BankError, match='sha256'):
        SoftLabelBank(root).validate(full=True)
    for flag in (['--verify-bank'], []):  # a bank this small is checked in full by default too
        rc = train_main('--data-dir', fmnist_root, '--dataset', 'torch/fashion_mnist', '--model', 'test_resnet',
                        '--num-classes', CLASSES, '--soft-labels', root, '--output', tmp_path / 'run', '-j', 0, *flag)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert rc == 2 and last.startswith('train_ferkd.py: error: shard') and 'sha256' in last, last


# ---------------------------------------------------------------------------------------------- 5, 8: training

def train_cmd(fmnist_root, output, *extra):
    import sys
    return [sys.executable, str(REPO / 'train_ferkd.py'), '--data-dir', str(fmnist_root), '--dataset',
            'torch/fashion_mnist', '--model', 'test_resnet', '--num-classes', str(CLASSES), '--input-size', '1', '28',
            '28', '--val-subset', '32', '-b', '16', '--num-crops', '4', '--epochs', '1', '--warmup-epochs', '0',
            '--output', str(output), '--log-interval', '1', '--seed', '3', *map(str, extra)]


def run_train(fmnist_root, output, *extra):
    import subprocess
    return subprocess.run(train_cmd(fmnist_root, output, *extra), capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope='module')
def two_banks(fmnist_root, teacher_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp('banks')
    banks = []
    for seed in (0, 1):
        out = root / f'bank{seed}'
        generate_bank(base_config(fmnist_root, out, checkpoint=str(teacher_checkpoint), num_images=32, regions=4,
                                  images_per_shard=16, seed=seed))
        banks.append(out)
    return banks


def test_5_resume_with_another_bank_is_refused(fmnist_root, two_banks, tmp_path, capsys):
    a, b = two_banks

    def run(*extra, check=True):
        return train_in_process(capsys, *train_cmd(fmnist_root, tmp_path, *extra)[2:], check=check)
    run('--soft-labels', a, '--experiment', 'a', '-j', '0')
    checkpoint = tmp_path / 'a' / 'last.pth.tar'
    other = run('--soft-labels', b, '--resume', checkpoint, '--experiment', 'b', '-j', '0', check=False)
    assert other.returncode == 2, other.stderr[-3000:]
    last = other.stderr.strip().splitlines()[-1]
    assert last.startswith('train_ferkd.py: error: --resume') and '--resume-other-bank' in last, last
    # on purpose: accepted (one epoch done already, so nothing left to train)
    run('--soft-labels', b, '--resume', checkpoint, '--experiment', 'c', '-j', '0', '--resume-other-bank')


def test_8_errors_in_dataloader_workers_are_one_line(fmnist_root, two_banks, tmp_path):
    a = two_banks[0]
    broken = tmp_path / 'broken'
    shutil.copytree(a, broken)
    rows = sample_rows(16)
    image = next(i for i in range(16) if i not in rows)  # an image the start-up check does not read
    shard = broken / 'shard-00000.safetensors'
    header, start = read_safetensors_header(shard)
    data = bytearray(shard.read_bytes())
    k = header['topk_indices']['shape'][2]
    data[start + header['topk_indices']['data_offsets'][0] + image * 4 * k + 1] = 200  # class 200 of 10
    replace_shard(broken, 0, bytes(data))
    SoftLabelBank(broken, validate=True)
    result = run_train(fmnist_root, tmp_path, '--soft-labels', broken, '--experiment', 'w', '-j', '1',
                       '--verify-bank', 'quick')
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('train_ferkd.py: error: shard') and f'image {image} region 0 has a class index outside' in last


def test_8_worker_errors_keep_their_one_line_message():
    from torch.utils.data import DataLoader, Dataset
    from timm_ferkd.labelling.fkd_import import UnsafeLabelFileError

    class Broken(Dataset):
        def __init__(self, error):
            self.error = error

        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise self.error
    for error in (BankError('shard x: image 3 is bad; regenerate it'), UnsafeLabelFileError('refusing to load y')):
        batches = iter(DataLoader(Broken(error), num_workers=1))
        try:
            with pytest.raises(type(error)) as e:
                list(batches)
        finally:
            # stop the worker now: left to garbage collection, an iterator that raised joins it 5 s later
            batches._shutdown_workers()
        assert str(e.value) == str(error) and 'Traceback' in e.value.worker_traceback


@pytest.mark.parametrize('flag,value,expect', [
    ('--lr', '-1', '--lr -1.0 must be'), ('--lr', 'nan', '--lr nan'), ('--log-interval', '0', '--log-interval 0'),
    ('--checkpoint-hist', '0', '--checkpoint-hist 0'), ('--seed', str(2 ** 70), '--seed'), ('--device', 'nope', '--device'),
    *([('--device', 'cuda', 'CUDA is not available')] if not torch.cuda.is_available() else []),
    ('--input-size', ['1', '0', '0'], '--input-size'), ('-j', '-1', '--workers'),
    ('--weight-decay', '-0.1', '--weight-decay'),
])
def test_8_train_flags_exit_2(fmnist_root, tmp_path, capsys, flag, value, expect):
    values = value if isinstance(value, list) else [value]
    rc = train_main('--data-dir', fmnist_root, '--dataset', 'torch/fashion_mnist', '--model', 'test_resnet',
                    '--output', tmp_path, flag, *values)
    err = capsys.readouterr().err
    assert rc == 2 and 'Traceback' not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith('train_ferkd.py: error:') and expect in last, last


def test_7_calib_low_alone():
    import train_ferkd
    from timm_ferkd.data.calibration import CalibrationConfig
    args, _ = train_ferkd._parse_args(['--data-dir', '.', '--calib-low', '0.05'])
    calibration = CalibrationConfig(low=args.calib_low, mid=args.calib_mid, top=args.calib_top)
    assert (calibration.low, calibration.mid, calibration.top) == (0.05, 0.05, 1.0)  # no calibrated band


# ---------------------------------------------------------------------------------------------- 8, 9: generate, inspect, pull

def test_8_9_generate_corrupt_settings_file(fmnist_root, teacher_checkpoint, tmp_path, capsys):
    out = tmp_path / 'bank'
    out.mkdir()
    (out / 'generation.json').write_text('{"num_classes": 10,')
    assert_one_line(capsys, 'generate', *gen_argv(fmnist_root, teacher_checkpoint, out),
                    expect='corrupt generation.json')


def test_8_generate_output_that_cannot_be_created(fmnist_root, teacher_checkpoint, tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    assert_one_line(capsys, 'generate', *gen_argv(fmnist_root, teacher_checkpoint, blocker / 'bank'),
                    expect='cannot create --output')
    assert_one_line(capsys, 'generate', *gen_argv(fmnist_root, teacher_checkpoint, blocker),
                    expect='exists and is not a directory')


@pytest.mark.parametrize('flag,value,expect', [
    ('--input-size', ['1', '0', '0'], '--input-size'), ('--seed', str(2 ** 70), '--seed'),
    ('--device', 'nope', "unknown --device 'nope'"), ('--num-classes', '-3', '--num-classes'),
])
def test_8_generate_flags_exit_2(fmnist_root, teacher_checkpoint, tmp_path, capsys, flag, value, expect):
    values = value if isinstance(value, list) else [value]
    argv = gen_argv(fmnist_root, teacher_checkpoint, tmp_path / 'bank')
    if flag in argv:
        i = argv.index(flag)
        del argv[i:i + 1 + len(values)]
    assert_one_line(capsys, 'generate', *argv, flag, *values, expect=expect)
    assert not (tmp_path / 'bank').exists()


def test_8_9_generate_full_disk(fmnist_root, teacher_checkpoint, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'fsync', full)
    out = tmp_path / 'bank'
    assert_one_line(capsys, 'generate', *gen_argv(fmnist_root, teacher_checkpoint, out), expect='No space left on device')
    assert not out.exists()
    monkeypatch.undo()
    rc, _, err = cli(capsys, 'generate', *gen_argv(fmnist_root, teacher_checkpoint, out, '--temperature', '2'))
    assert rc == 0, err  # the corrected command is not refused


def test_8_inspect_bins_and_plot(tmp_path, capsys):
    root = make_bank(tmp_path / 'bank')
    assert_one_line(capsys, 'inspect', root, '--bins', '0', expect='--bins 0 must be >= 1')
    assert_one_line(capsys, 'inspect', root, '--plot', tmp_path / 'missing' / 'h.png', expect='does not exist')


def test_8_pull_local_dir_is_a_file(tmp_path, capsys):
    target = tmp_path / 'file'
    target.write_text('x')
    assert_one_line(capsys, 'pull', 'org/bank', '--local-dir', target, expect='is not a directory')


def test_9_generate_error_in_an_existing_empty_directory_leaves_it_empty(fmnist_root, nan_checkpoint, tmp_path, capsys):
    out = tmp_path / 'bank'
    out.mkdir()
    assert_one_line(capsys, 'generate', *gen_argv(fmnist_root, nan_checkpoint, out), expect='non-finite')
    assert out.is_dir() and not any(out.iterdir())


def test_format_errors_are_ferkd_errors():
    with pytest.raises(FerKDError):
        validate_manifest([], 'm')
