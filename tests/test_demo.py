"""``timm-ferkd demo`` end to end at tiny sizes: teacher, bank, inspect, three students, table and plot."""
from conftest import cli_in_process


def test_demo_runs_every_step_and_writes_table_and_plot(fmnist_root, tmp_path, capsys):
    out = tmp_path / 'demo'
    result = cli_in_process(
        capsys, 'demo', '--no-apt', '--output', out, '--data-dir', fmnist_root, '--images', 128, '--val-images', 256,
        '--teacher-images', 512, '--teacher-epochs', 1, '--epochs', 1, '--regions', 4, '--num-crops', 2,
        '--batch-size', 64, '--workers', 0)
    for step in ('1/5 train the teacher', '2/5 label regions', '3/5 train the student: plain', '5/5 train the student: ferkd'):
        assert step in result.stdout
    table = (out / 'results.txt').read_text()
    assert 'trained on 512 images' in table and '2 crops seen per image' in table
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:5]}
    assert set(rows) == {'plain', 'fkd', 'ferkd'}
    assert all(0 <= float(row[1]) <= 100 for row in rows.values())
    for name in ('convergence.png', 'bank_max_prob.png', 'bank/manifest.json', 'runs/ferkd/summary.csv'):
        assert (out / name).is_file(), name
