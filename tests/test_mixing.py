"""SelfMix and soft-label Mixup/CutMix: pairing, lam, label mixing, determinism, bad input."""
import pytest
import torch

from timm_ferkd.data.mixing import SelfMix, create_selfmix
from timm_ferkd.errors import ConfigError

K = 4          # crops per image
G = 6          # images per batch
B = K * G
NC = 7
H, W = 12, 10


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    # each row a distinct constant image plus noise, so pasted pixels are recognisable
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1) * 10 + torch.rand(B, 3, H, W, generator=g)
    soft = torch.softmax(torch.randn(B, NC, generator=g) * 2, dim=1)
    image = torch.arange(G).repeat_interleave(K)
    target = {'soft': soft, 'label': image % NC, 'image': image, 'weight': torch.ones(B)}
    return x, target


def _check_same_image_partners(target):
    partner = target['partner']
    assert torch.equal(target['image'][partner], target['image'])
    assert (partner != torch.arange(B)).all()


@pytest.mark.parametrize('mode', ['batch', 'pair'])
def test_selfmix_mixup_pairs_crops_of_the_same_image(mode):
    mix = SelfMix(K, mixup_alpha=1.0, mode=mode, seed=1)
    for step in range(5):
        x, target = _batch(step)
        mixed, out = mix(x, target)
        _check_same_image_partners(out)
        lam, p = out['lam'], out['partner']
        expected_x = x * lam.view(B, 1, 1, 1) + x[p] * (1 - lam.view(B, 1, 1, 1))
        assert torch.allclose(mixed, expected_x)
        expected_soft = lam[:, None] * target['soft'] + (1 - lam[:, None]) * target['soft'][p]
        assert torch.allclose(out['soft'], expected_soft)
        assert torch.allclose(out['soft'].sum(1), torch.ones(B))
        assert torch.equal(out['label'], target['label'])     # same image: ground truth unchanged
        assert ((lam > 0) & (lam < 1)).all()
        if mode == 'batch':
            assert (lam == lam[0]).all()
    if mode == 'pair':
        assert len(set(lam.tolist())) == B                      # one lam per crop


@pytest.mark.parametrize('mode', ['batch', 'pair'])
def test_selfmix_cutmix_lam_is_the_exact_area(mode):
    mix = SelfMix(K, mixup_alpha=0.0, cutmix_alpha=1.0, mode=mode, seed=2)
    for step in range(5):
        x, target = _batch(step)
        mixed, out = mix(x, target)
        _check_same_image_partners(out)
        p, lam = out['partner'], out['lam']
        pasted = (mixed == x[p]).all(dim=1)                      # [B, H, W]
        kept = (mixed == x).all(dim=1)
        assert (pasted ^ kept).all()                              # every pixel from exactly one crop
        area = pasted.flatten(1).sum(1).double() / (H * W)
        assert torch.allclose(lam.double(), 1 - area, atol=1e-7)
        # the pasted region is one rectangle
        for r in range(B):
            rows, cols = pasted[r].any(1), pasted[r].any(0)
            assert pasted[r].sum() == rows.sum() * cols.sum()
        expected_soft = lam[:, None] * target['soft'] + (1 - lam[:, None]) * target['soft'][p]
        assert torch.allclose(out['soft'], expected_soft)
        assert torch.allclose(out['soft'].sum(1), torch.ones(B))


def test_switch_uses_both_and_is_deterministic_per_epoch():
    mix = create_selfmix(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5, mode='pair', num_crops=K, seed=5)
    assert isinstance(mix, SelfMix) and mix.method == 'switch'
    x, target = _batch()
    kinds = set()
    runs = []
    for epoch in (0, 1, 0):
        mix.set_epoch(epoch)
        mixed, out = mix(x, target)
        runs.append((mixed, out['lam'], out['partner']))
        cut = (mixed == x).all(dim=1).flatten(1).any(1)          # rows with untouched pixels are CutMix
        kinds.update(cut.tolist())
    assert kinds == {True, False}
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))
    assert not torch.equal(runs[0][1], runs[1][1])


def test_prob_and_disabled_mixing():
    x, target = _batch()
    mix = SelfMix(K, mixup_alpha=1.0, prob=0.5, mode='pair', seed=0)
    mixed, out = mix(x, target)
    unmixed = out['lam'] == 1
    assert 0 < unmixed.sum() < B
    assert torch.equal(mixed[unmixed], x[unmixed]) and torch.equal(out['soft'][unmixed], target['soft'][unmixed])
    assert torch.equal(out['partner'][unmixed], torch.arange(B)[unmixed])
    mix.mix_enabled = False
    mixed, out = mix(x, target)
    assert mixed is x and (out['lam'] == 1).all()
    assert create_selfmix(mixup_alpha=0.0, cutmix_alpha=0.0) is None
    assert create_selfmix(prob=0.0) is None


def test_input_target_not_modified():
    x, target = _batch()
    x0, soft0 = x.clone(), target['soft'].clone()
    SelfMix(K, cutmix_alpha=1.0, mixup_alpha=1.0, seed=0)(x, target)
    assert torch.equal(x, x0) and torch.equal(target['soft'], soft0) and 'lam' not in target


@pytest.mark.parametrize('kwargs, words', [
    (dict(num_crops=1), 'num_crops >= 2'),
    (dict(num_crops=K, mode='mixup'), 'granularity'),
    (dict(num_crops=K, mixup_alpha=0.0, cutmix_alpha=0.0), 'alpha'),
    (dict(num_crops=K, mixup_alpha=-1.0), '>= 0'),
    (dict(num_crops=K, prob=1.5), 'prob'),
    (dict(num_crops=K, method='cutmix', cutmix_alpha=0.0), 'cutmix'),
    (dict(num_crops=K, method='blend'), 'method'),
])
def test_bad_arguments(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        SelfMix(**kwargs)


def test_batch_not_a_multiple_of_num_crops():
    x, target = _batch()
    with pytest.raises(ConfigError, match='multiple'):
        SelfMix(5, mixup_alpha=1.0)(x, target)
