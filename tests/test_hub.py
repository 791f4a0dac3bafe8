"""Label zoo: hf-hub: names, pull, push and the dataset card, through huggingface_hub's real HTTP code.

Nothing here touches the network: a loopback fake Hub (``tests/hub_server.py``) answers the Hub API,
and offline mode is exercised both in-process (``huggingface_hub.constants.HF_HUB_OFFLINE``) and
through the real command line in a subprocess (``HF_HUB_OFFLINE=1``).
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hub_server import FakeHub
from timm_ferkd.bank.format import MANIFEST_NAME, BankManifest, DatasetIdentity, TeacherInfo
from timm_ferkd.bank.hub import HubBank, parse_hub_name, pull_bank, push_bank, resolve_bank, resolved_revision
from timm_ferkd.bank.hub import open_bank
from timm_ferkd.bank.reader import SoftLabelBank
from timm_ferkd.bank.writer import atomic_write_bytes, write_shard
from timm_ferkd.cli import main as cli_main
from timm_ferkd.errors import BankError, HubError

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- helpers

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bank_files(bank_dir: Path) -> dict:
    """sha256 of the files a published bank consists of (manifest and shards)."""
    manifest = BankManifest.load(bank_dir)
    names = [MANIFEST_NAME] + [r.file for r in manifest.shards]
    return {n: _sha256(bank_dir / n) for n in names}


def make_bank(path: Path, num_images: int = 5, images_per_shard: int = 2, seed: int = 0) -> Path:
    """A small synthetic bank written with the real shard writer (distinct content per seed)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    regions, k, classes = 3, 2, 10
    manifest = BankManifest(
        num_classes=classes, regions_per_image=regions, topk=k, label_type='marginal_smoothing', temperature=1.0,
        num_images=num_images, images_per_shard=images_per_shard, seed=seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
        teacher=TeacherInfo(model=f'synthetic-{seed}'),
        dataset=DatasetIdentity(name='torch/fashion_mnist', split='train', num_images=num_images,
                                fingerprint=f'sha256:{seed:064x}', fingerprint_kind='targets'))
    for s in range(manifest.num_shards):
        first, n = manifest.shard_range(s)
        values = -np.sort(-rng.random((n, regions, k)), axis=2) / k
        manifest.shards.append(write_shard(path, s, first, {
            'image_sizes': np.full((n, 2), 28, np.int32),
            'targets': rng.integers(0, classes, n).astype(np.int32),
            'topk_values': values.astype(np.float16),
            'topk_indices': np.argsort(rng.random((n, regions, classes)), axis=2)[..., :k].astype(np.uint8),
        }))
    atomic_write_bytes(path / MANIFEST_NAME, manifest.to_json().encode())
    return path


def _free_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return f'http://127.0.0.1:{s.getsockname()[1]}'


def _run_cli(args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'timm_ferkd', *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A running fake Hub that huggingface_hub talks to, with a private cache; ``hub.env`` is for subprocesses."""
    from huggingface_hub import constants
    hub = FakeHub()
    endpoint = hub.start()
    cache = tmp_path / 'hf-cache'
    monkeypatch.setattr(constants, 'ENDPOINT', endpoint)
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', endpoint + '/{repo_id}/resolve/{revision}/{filename}')
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    for var in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_HUB_OFFLINE'):
        monkeypatch.delenv(var, raising=False)
    hub.cache = cache
    hub.env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / 'hf-home'),
                   HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_PROGRESS_BARS='1',
                   PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get('PYTHONPATH', '')]))
    yield hub
    hub.stop()


@pytest.fixture(scope='module')
def fmnist_bank(tmp_path_factory):
    """A real bank: `timm-ferkd generate` with a tiny random test_resnet teacher on 12 Fashion-MNIST images."""
    from timm_ferkd.data.fashion_mnist import ensure_fashion_mnist
    root = tmp_path_factory.mktemp('hub-fmnist')
    try:
        data = ensure_fashion_mnist(root / 'data')
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f'Fashion-MNIST unavailable: {e}')
    out = root / 'bank'
    rc = cli_main(['generate', '--model', 'test_resnet', '--num-classes', '10', '--in-chans', '1',
                   '--input-size', '1', '32', '32', '--dataset', 'torch/fashion_mnist', '--data-dir', str(data),
                   '--num-images', '12', '--regions', '4', '--topk', '3', '--images-per-shard', '5',
                   '-j', '0', '--device', 'cpu', '--no-progress', '--output', str(out)])
    assert rc == 0
    return out


# ---------------------------------------------------------------------------------------------- names

@pytest.mark.parametrize('name, expected', [
    ('hf-hub:org/bank', ('org/bank', None)),
    ('hf-hub:org/bank@main', ('org/bank', 'main')),
    ('org/my.bank-2@v1.0', ('org/my.bank-2', 'v1.0')),
    ('hf-hub:org/bank@refs/pr/3', ('org/bank', 'refs/pr/3')),
    ('hf-hub:org/bank@' + 'a' * 40, ('org/bank', 'a' * 40)),
])
def test_parse_hub_name(name, expected):
    assert parse_hub_name(name) == expected


@pytest.mark.parametrize('name', ['hf-hub:bank', 'hf-hub:a/b/c', 'hf-hub:org/bank@', 'hf-hub:/bank', 'hf-hub:org/..'])
def test_parse_hub_name_rejects(name):
    with pytest.raises(HubError, match='not a Hub bank name'):
        parse_hub_name(name)


# ---------------------------------------------------------------------------------------------- push / pull

def test_push_then_pull_roundtrip(fake_hub, fmnist_bank, tmp_path, capsys):
    assert cli_main(['push', str(fmnist_bank), 'hf-hub:org/fmnist-test', '--license', 'mit']) == 0
    printed = capsys.readouterr().out
    repo = fake_hub.repo('org/fmnist-test')
    head = repo.branches['main']
    assert f'hf-hub:org/fmnist-test@{head}' in printed

    # exactly the bank files and the card: no generation bookkeeping
    remote = fake_hub.files('org/fmnist-test')
    local = _bank_files(fmnist_bank)
    assert set(remote) == set(local) | {'README.md', '.gitattributes'}
    for name, digest in local.items():
        assert hashlib.sha256(remote[name]).hexdigest() == digest
    # shards land before the manifest: the commit before the last has shards but no manifest
    commits = list(repo.commits)
    assert MANIFEST_NAME in repo.commits[commits[-1]] and MANIFEST_NAME not in repo.commits[commits[-2]]
    assert set(n for n in repo.commits[commits[-2]] if n.endswith('.safetensors')) == set(local) - {MANIFEST_NAME}

    # pull (CLI, sha256-verified) into a folder and into the cache: every file identical
    out = tmp_path / 'pulled'
    assert cli_main(['pull', 'org/fmnist-test', '--local-dir', str(out), '--no-progress', '--max-workers', '0']) == 2
    assert '--max-workers is 0' in capsys.readouterr().err
    assert cli_main(['pull', 'org/fmnist-test', '--local-dir', str(out), '--no-progress', '--max-workers', '2']) == 0
    assert head in capsys.readouterr().out
    assert _bank_files(out) == local
    hub_bank = pull_bank('hf-hub:org/fmnist-test', verify_checksums=True, progress=False)
    assert isinstance(hub_bank, HubBank) and hub_bank.commit == head and hub_bank.revision == 'main'
    assert hub_bank.pinned_name == f'hf-hub:org/fmnist-test@{head}'
    assert _bank_files(hub_bank.path) == local

    # open_bank with the name reads the same labels as the local bank
    local_bank, hub_opened = SoftLabelBank(fmnist_bank), open_bank('hf-hub:org/fmnist-test')
    assert hub_opened.path == hub_bank.path
    for i in range(len(local_bank)):
        np.testing.assert_array_equal(hub_opened.labels(i)[1], local_bank.labels(i)[1])
        np.testing.assert_array_equal(hub_opened.regions(i).boxes, local_bank.regions(i).boxes)


def test_dataset_card(fake_hub, fmnist_bank):
    from huggingface_hub import DatasetCard
    result = push_bank(fmnist_bank, 'org/card-test', license='cc-by-4.0')
    card = DatasetCard(fake_hub.files('org/card-test')['README.md'].decode())
    manifest = BankManifest.load(fmnist_bank)
    data = card.data.to_dict()
    assert data['license'] == 'cc-by-4.0'
    assert {'knowledge-distillation', 'timm', 'timm-ferkd', 'soft-labels'} <= set(data['tags'])
    assert data['teacher'] == 'test_resnet'
    assert data['dataset'] == 'torch/fashion_mnist'
    assert data['regions'] == manifest.regions_per_image == 4
    assert data['k'] == manifest.topk == 3
    assert data['size'].endswith('kB') and data['viewer'] is False
    assert ('torchrun --nproc_per_node=8 train_ferkd.py --dataset torch/fashion_mnist --data-dir /path/to/data '
            '--model resnet50 --num-classes 10 --soft-labels hf-hub:org/card-test --num-crops 4') in card.text
    assert 'timm-ferkd pull hf-hub:org/card-test' in card.text
    assert result.commit == fake_hub.repo('org/card-test').branches['main']


def test_push_private_branch_and_card_revision(fake_hub, tmp_path):
    bank = make_bank(tmp_path / 'bank')
    result = push_bank(bank, 'org/priv', private=True, revision='v1')
    repo = fake_hub.repo('org/priv')
    assert repo.private and result.revision == 'v1' and repo.branches['v1'] == result.commit
    assert MANIFEST_NAME not in fake_hub.files('org/priv', 'main')
    assert 'hf-hub:org/priv@v1' in fake_hub.files('org/priv', 'v1')['README.md'].decode()
    assert pull_bank('hf-hub:org/priv@v1', progress=False).commit == result.commit


def test_revision_pinning(fake_hub, tmp_path):
    bank_a = make_bank(tmp_path / 'a', num_images=5, images_per_shard=2, seed=1)  # 3 shards
    bank_b = make_bank(tmp_path / 'b', num_images=3, images_per_shard=2, seed=2)  # 2 shards
    commit_a = push_bank(bank_a, 'org/zoo').commit
    commit_b = push_bank(bank_b, 'org/zoo').commit
    commit_v1 = push_bank(bank_a, 'org/zoo', revision='v1').commit
    assert len({commit_a, commit_b, commit_v1}) == 3
    # the shard that bank b lacks was deleted in b's commit
    assert 'shard-00002.safetensors' not in fake_hub.files('org/zoo', 'main')

    assert resolved_revision('hf-hub:org/zoo') == commit_b
    assert resolved_revision('hf-hub:org/zoo@v1') == commit_v1
    assert resolved_revision(f'hf-hub:org/zoo@{commit_a}') == commit_a
    expected = {f'@{commit_a}': bank_a, '@main': bank_b, '': bank_b, '@v1': bank_a, f'@{commit_b}': bank_b}
    for suffix, bank in expected.items():
        path = resolve_bank(f'hf-hub:org/zoo{suffix}')
        assert _bank_files(path) == _bank_files(bank), suffix
    assert resolve_bank(f'hf-hub:org/zoo@{commit_a}') != resolve_bank('hf-hub:org/zoo@main')


def test_push_without_xet(fake_hub, tmp_path, monkeypatch):
    """huggingface_hub's single-commit upload path (hf_xet absent or HF_HUB_DISABLE_XET=1) works too."""
    from huggingface_hub import _upload_pipeline, constants
    monkeypatch.setattr(constants, 'HF_HUB_DISABLE_XET', True)
    monkeypatch.setattr(_upload_pipeline, 'pipelined_upload', None)  # would fail if the xet pipeline ran
    bank = make_bank(tmp_path / 'bank')
    result = push_bank(bank, 'org/no-xet')
    assert _bank_files(pull_bank(f'hf-hub:org/no-xet@{result.commit}', progress=False).path) == _bank_files(bank)


def test_pull_manifest_only_and_progress(fake_hub, tmp_path, capsys):
    push_bank(make_bank(tmp_path / 'bank'), 'org/lazy')
    hub_bank = pull_bank('hf-hub:org/lazy', download_shards=False)
    assert (hub_bank.path / MANIFEST_NAME).is_file()
    assert not list(hub_bank.path.glob('*.safetensors'))
    hub_bank = pull_bank('hf-hub:org/lazy', progress=True)
    assert '3/3' in capsys.readouterr().err  # huggingface_hub's bar over the three shards
    assert len(list(hub_bank.path.glob('*.safetensors'))) == 3
    seen = len(fake_hub.requests)
    pull_bank('hf-hub:org/lazy', progress=True)  # all cached: nothing downloaded again, the bar still completes
    assert '3/3' in capsys.readouterr().err
    assert not [r for r in fake_hub.requests[seen:] if r[0] == 'GET' and '/resolve/' in r[1]]
    pull_bank('hf-hub:org/lazy', progress=False)
    assert capsys.readouterr().err == ''


# ---------------------------------------------------------------------------------------------- offline

def test_offline_uses_cache_without_network(fake_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants
    bank = make_bank(tmp_path / 'bank')
    commit = push_bank(bank, 'org/offline').commit
    pulled = pull_bank('hf-hub:org/offline', progress=False).path
    push_bank(bank, 'org/manifest-only')
    pull_bank('hf-hub:org/manifest-only', download_shards=False)
    seen = len(fake_hub.requests)

    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    assert resolve_bank('hf-hub:org/offline') == pulled
    assert resolve_bank(f'hf-hub:org/offline@{commit}') == pulled
    assert resolved_revision('hf-hub:org/offline@main') == commit
    assert len(open_bank('hf-hub:org/offline', validate=True)) == 5
    assert len(fake_hub.requests) == seen  # not one request while offline

    # offline and not cached (or only the manifest): one line that says to go online or pull first
    for name in ('hf-hub:org/offline@v2', 'hf-hub:org/other', f'hf-hub:org/other@{"b" * 40}',
                 'hf-hub:org/manifest-only'):
        with pytest.raises(HubError) as info:
            open_bank(name)
        message = str(info.value)
        assert '\n' not in message and 'HF_HUB_OFFLINE' in message and f'timm-ferkd pull {name}' in message
    assert len(fake_hub.requests) == seen


def test_offline_cli_subprocess(fake_hub, tmp_path):
    """The real command line with HF_HUB_OFFLINE=1 in the environment (read by huggingface_hub at import)."""
    push_bank(make_bank(tmp_path / 'bank'), 'org/cli-offline')
    pull_bank('hf-hub:org/cli-offline', progress=False)
    seen = len(fake_hub.requests)
    env = dict(fake_hub.env, HF_HUB_OFFLINE='1')
    done = _run_cli(['verify', 'hf-hub:org/cli-offline'], env)
    assert done.returncode == 0, done.stderr
    assert 'checksums and schema OK' in done.stdout
    done = _run_cli(['verify', 'hf-hub:org/never-pulled'], env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and 'HF_HUB_OFFLINE' in lines[0] and 'timm-ferkd pull hf-hub:org/never-pulled' in lines[0]
    assert len(fake_hub.requests) == seen


def test_unreachable_hub_not_cached(fake_hub, monkeypatch):
    from huggingface_hub import constants
    endpoint = _free_port_endpoint()
    monkeypatch.setattr(constants, 'ENDPOINT', endpoint)
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', endpoint + '/{repo_id}/resolve/{revision}/{filename}')
    with pytest.raises(HubError, match='cannot be reached') as info:
        resolve_bank('hf-hub:org/nowhere')
    assert '\n' not in str(info.value)


# ---------------------------------------------------------------------------------------------- errors

def test_unknown_repo_and_revision(fake_hub, tmp_path):
    with pytest.raises(HubError, match='no dataset repo org/missing'):
        resolve_bank('hf-hub:org/missing')
    push_bank(make_bank(tmp_path / 'bank'), 'org/known')
    with pytest.raises(HubError, match="has no revision 'nope'"):
        resolve_bank('hf-hub:org/known@nope')
    with pytest.raises(HubError, match='has no revision'):
        resolve_bank('hf-hub:org/known@' + 'c' * 40)


def test_repo_that_is_not_a_bank(fake_hub):
    fake_hub.create_repo('org/plain')
    fake_hub.commit('org/plain', {'data.csv': b'a,b\n'})
    with pytest.raises(HubError, match='not a timm-ferkd bank'):
        open_bank('hf-hub:org/plain')


def test_newer_format_version(fake_hub, tmp_path):
    bank = make_bank(tmp_path / 'bank')
    data = json.loads((bank / MANIFEST_NAME).read_text())
    data['format_version'] = 99
    fake_hub.create_repo('org/future')
    fake_hub.commit('org/future', {MANIFEST_NAME: json.dumps(data).encode()})
    with pytest.raises(BankError, match=r'hf-hub:org/future.*newer.*pip install -U timm-ferkd'):
        resolve_bank('hf-hub:org/future')


def test_incomplete_and_corrupt_repos(fake_hub, tmp_path):
    bank = make_bank(tmp_path / 'bank')
    push_bank(bank, 'org/broken')
    fake_hub.commit('org/broken', {}, deletes=['shard-00001.safetensors'])
    with pytest.raises(HubError, match='lacks shard-00001.safetensors, which its manifest.json lists'):
        resolve_bank('hf-hub:org/broken')

    shard = (bank / 'shard-00001.safetensors').read_bytes()
    fake_hub.commit('org/broken', {'shard-00001.safetensors': shard + b'x'})  # size differs
    with pytest.raises(BankError, match='bytes, the manifest says'):
        resolve_bank('hf-hub:org/broken')

    flipped = bytearray(shard)
    flipped[-1] ^= 0xFF  # same size, other content
    fake_hub.commit('org/broken', {'shard-00001.safetensors': bytes(flipped)})
    resolve_bank('hf-hub:org/broken')  # sizes match: training would start (verify catches it)
    with pytest.raises(BankError, match='sha256'):
        pull_bank('hf-hub:org/broken', verify_checksums=True, progress=False)
    with pytest.raises(BankError, match='sha256'):
        cli_main_raise(['verify', 'hf-hub:org/broken'])


def cli_main_raise(argv):
    """Run a CLI command and raise its one-line error instead of returning 2."""
    import argparse
    from timm_ferkd.cli import build_parser
    args = build_parser().parse_args(argv)
    assert isinstance(args, argparse.Namespace)
    return args.func(args)


def test_push_errors(fake_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants
    bank = make_bank(tmp_path / 'bank')
    with pytest.raises(HubError, match='push to a branch name'):
        push_bank(bank, 'org/x', revision='d' * 40)
    with pytest.raises(HubError, match='two revisions'):
        push_bank(bank, 'org/x@a', revision='b')
    with monkeypatch.context() as m:
        m.setattr(constants, 'ENDPOINT', _free_port_endpoint())
        with pytest.raises(HubError, match='cannot push hf-hub:org/x: the Hub at .* cannot be reached'):
            push_bank(bank, 'org/x')
    (bank / 'shard-00000.safetensors').write_bytes(b'\0' * (bank / 'shard-00000.safetensors').stat().st_size)
    with pytest.raises(BankError):
        push_bank(bank, 'org/x')
    assert ('other', 'org/x') not in fake_hub.repos and ('dataset', 'org/x') not in fake_hub.repos
