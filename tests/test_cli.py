"""timm-ferkd inspect / verify / plot through the command line: one fresh interpreter, the rest in-process."""
import json
from pathlib import Path

import pytest

from conftest import call_main, cli_in_process, run_cli


@pytest.fixture(scope='module')
def small_bank(fmnist_root, teacher_checkpoint, tmp_path_factory) -> Path:
    from timm_ferkd.cli import main
    out = tmp_path_factory.mktemp('cli') / 'bank'
    assert call_main(main, [
        'generate', '--model', 'test_resnet', '--checkpoint', teacher_checkpoint, '--num-classes', '10',
        '--in-chans', '1', '--dataset', 'torch/fashion_mnist', '--data-dir', fmnist_root, '--num-images', 20,
        '--regions', 6, '--input-size', '1', '28', '28', '-j', '0', '--images-per-shard', 10, '--no-progress',
        '--output', out]) == 0
    return out


def test_inspect_json_and_plot(small_bank, tmp_path, capsys):
    plot = tmp_path / 'hist.png'
    result = run_cli('inspect', small_bank, '--json', '--plot', plot)
    summary = json.loads(result.stdout)
    for key in ('num_images', 'regions_per_image', 'topk', 'num_classes', 'bytes_on_disk', 'bytes_per_region',
                'max_prob_histogram', 'argmax_correct_fraction'):
        assert key in summary
    assert (summary['num_images'], summary['regions_per_image'], summary['topk'], summary['num_classes']) == (20, 6, 5, 10)
    assert sum(summary['max_prob_histogram']['counts']) == 120
    files = [small_bank / 'manifest.json', *small_bank.glob('shard-*.safetensors')]
    assert summary['bytes_on_disk'] == sum(f.stat().st_size for f in files)
    assert summary['bytes_per_region'] == pytest.approx(summary['bytes_on_disk'] / 120)
    assert 0 <= summary['argmax_correct_fraction'] <= 1
    assert plot.read_bytes()[:4] == b'\x89PNG'
    text = cli_in_process(capsys, 'inspect', small_bank).stdout
    assert 'B/region' in text and 'max probability histogram' in text


def test_verify_ok_mismatch_and_corruption(small_bank, fmnist_root, tmp_path, capsys):
    ok = cli_in_process(capsys, 'verify', small_bank, '--data-dir', fmnist_root)
    assert 'checksums and schema OK' in ok.stdout and 'matches dataset' in ok.stdout
    other = cli_in_process(capsys, 'verify', small_bank, '--data-dir', fmnist_root, '--split', 'validation',
                           check=False)
    assert other.returncode == 2 and 'bank was generated on 60000 images' in other.stderr
    typo = cli_in_process(capsys, 'verify', small_bank, '--data-dir', fmnist_root, '--split', 'tset', check=False)
    assert typo.returncode == 2 and 'timm would read it as the test split' in typo.stderr
    import shutil
    broken = tmp_path / 'broken'
    shutil.copytree(small_bank, broken)
    shard = broken / 'shard-00001.safetensors'
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x55
    shard.write_bytes(bytes(data))
    bad = cli_in_process(capsys, 'verify', broken, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith('timm-ferkd verify: error: shard')
    assert 'sha256' in bad.stderr


def test_plot_runs(tmp_path, capsys):
    for name, rows in (('a', [(0, 2.0, 50.0), (1, 1.5, 60.0)]), ('b', [(0, 1.8, 55.0)])):
        run = tmp_path / name
        run.mkdir()
        lines = ['epoch,train_loss,eval_loss,eval_top1,eval_top5,lr']
        lines += [f'{e},{loss},1.0,{top1},90.0,0.1' for e, loss, top1 in rows]
        (run / 'summary.csv').write_text('\n'.join(lines) + '\n')
    (tmp_path / 'b' / 'args.yaml').write_text('soft_labels: bank\nnum_crops: 4\n')
    out = tmp_path / 'plot.png'
    result = cli_in_process(capsys, 'plot', tmp_path / 'a', tmp_path / 'b', '--output', out, '--x', 'crops')
    assert out.read_bytes()[:4] == b'\x89PNG'
    assert 'a' in result.stdout and '60.00' in result.stdout and '55.00' in result.stdout
    missing = cli_in_process(capsys, 'plot', tmp_path, '--output', out, check=False)
    assert missing.returncode == 2 and 'no summary.csv' in missing.stderr
