"""Split names: timm's names pass, NAME[START:STOP] is parsed strictly, typos that timm would read as another
split are refused (issue 19: `--split trian` used to label the test images)."""
import pytest

from timm_ferkd.data.splits import parse_split
from timm_ferkd.errors import ConfigError


@pytest.mark.parametrize('split, expected', [
    ('train', ('train', None)),
    ('test', ('test', None)),
    ('validation', ('validation', None)),
    ('train[55000:]', ('train', slice(55000, None))),
    ('train[:1000]', ('train', slice(None, 1000))),
    ('train[-5000:]', ('train', slice(-5000, None))),
    ('test[10:20]', ('test', slice(10, 20))),
])
def test_timm_names_and_ranges_pass(split, expected):
    assert parse_split(split, 'torch/fashion_mnist') == expected
    assert parse_split(split, 'ferkd-cluttered/fashion_mnist:canvas=40') == expected


@pytest.mark.parametrize('split, words', [
    ('trian', 'timm would read it as the test split'),
    ('tset', 'timm would read it as the test split'),
    ('Train', 'timm would read it as the test split'),  # timm's synonyms are case-sensitive
    ('train[abc:]', 'NAME[START:STOP]'),
    ('train[59000:', 'NAME[START:STOP]'),
    ('train[1:2:3]', 'NAME[START:STOP]'),
    ('train[-:]', 'NAME[START:STOP]'),
    ('', 'empty'),
])
def test_names_timm_would_misread_are_refused(split, words):
    with pytest.raises(ConfigError, match=words.replace('[', r'\[')):
        parse_split(split, 'torch/fashion_mnist', flag='--val-split')


def test_folders_need_the_named_sub_folder_or_a_timm_name(tmp_path):
    (tmp_path / 'holdout').mkdir()
    assert parse_split('holdout', '', str(tmp_path)) == ('holdout', None)
    assert parse_split('train', '', str(tmp_path)) == ('train', None)
    with pytest.raises(ConfigError, match="no folder 'trian'"):
        parse_split('trian', '', str(tmp_path))


def test_self_slicing_datasets_get_the_split_back_unparsed():
    assert parse_split('train[:10%]', 'hfds/org/name') == ('train[:10%]', None)
