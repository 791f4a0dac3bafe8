"""Distillation losses against hand-computed values and float64 reference formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_ferkd.losses import (
    DISTILL_LOSS_TYPES,
    DTDLoss,
    FerKDLoss,
    FNKDLoss,
    KDLoss,
    SoftRegionCrossEntropy,
    create_distill_loss,
    make_target,
    probability_shift,
    retemper,
)

B, C, D = 6, 5, 8


def _batch(seed: int = 0, weight=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    teacher_logits = torch.randn(B, C, generator=g, dtype=torch.float64) * 3
    features = torch.randn(B, D, generator=g, dtype=torch.float64) * 4
    teacher_features = torch.randn(B, D + 2, generator=g, dtype=torch.float64) * 4
    label = torch.randint(0, C, (B,), generator=g)
    soft = teacher_logits.softmax(-1)
    if weight is None:
        weight = torch.ones(B, dtype=torch.float64)
    target = {'soft': soft, 'label': label, 'weight': torch.as_tensor(weight, dtype=torch.float64)}
    return logits, target, features, teacher_logits, teacher_features


def _weighted_mean(v, w):
    return (v * w).sum() / w.sum()


def _kl(p, q):
    """sum_c p log(p / q) with 0 log 0 = 0 (float64)."""
    return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.log()), torch.zeros_like(p)).sum(-1)


def _call(loss, logits, target, features, teacher_logits, teacher_features):
    kwargs = {}
    if loss.needs_features:
        kwargs['features'] = features
    if loss.needs_teacher:
        kwargs['teacher_logits'] = teacher_logits
    if loss.needs_teacher_features:
        kwargs['teacher_features'] = teacher_features
    return loss(logits, target, **kwargs)


ALL_LOSSES = [
    ('soft_ce', {}),
    ('soft_ce', {'temperature': 2.0}),
    ('ferkd', {}),
    ('kd', {'temperature': 4.0, 'task_loss_weight': 0.5}),
    ('kd', {'temperature': 2.0, 'probability_shift': True, 'online': True}),
    ('dtd', {'weighting': 'similarity', 'task_loss_weight': 0.3}),
    ('dtd', {'weighting': 'confidence', 'probability_shift': True, 'online': True}),
    ('fnkd', {}),
    ('fnkd', {'online': True}),
]


# --- soft CE / FerKD ---------------------------------------------------------------------------

def test_soft_ce_hand_values():
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([0, ln 3] / 2) = [1, sqrt 3] / (1 + sqrt 3)
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    soft = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    target = {'soft': soft, 'weight': torch.tensor([1.0, 0.5])}

    row0 = 0.5 * math.log(4) + 0.5 * math.log(4 / 3)  # = 0.5 ln(16/3) = 0.83698...
    row1 = math.log(4 / 3)  # = 0.28768...
    out = SoftRegionCrossEntropy()(logits, target)
    # FKD reference reduction: batch mean of the weighted rows
    assert out['loss'].item() == pytest.approx((row0 + 0.5 * row1) / 2, abs=1e-6)
    assert out['loss'].item() == pytest.approx(0.49041, abs=1e-5)
    assert set(out) == {'loss', 'soft_ce'}

    s3 = math.sqrt(3.0)
    row0_t2 = 0.5 * math.log(1 + s3) + 0.5 * math.log((1 + s3) / s3)
    row1_t2 = math.log((1 + s3) / s3)
    out = SoftRegionCrossEntropy(temperature=2.0)(logits, target)
    assert out['loss'].item() == pytest.approx((row0_t2 + 0.5 * row1_t2) / 2, abs=1e-6)


def test_ferkd_hand_values_weight_sum_mean():
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, -5.0], [0.0, math.log(3.0)]])
    soft = torch.tensor([[0.5, 0.5], [0.0, 1.0], [0.0, 1.0]])
    out = FerKDLoss()(logits, {'soft': soft, 'weight': torch.tensor([1.0, 0.0, 1.0])})
    # the discarded middle crop neither contributes nor counts in the mean
    expected = (0.5 * math.log(16 / 3) + math.log(4 / 3)) / 2
    assert out['loss'].item() == pytest.approx(expected, abs=1e-6)
    assert out['kept'].item() == pytest.approx(2 / 3)


def test_ferkd_all_discarded_is_zero_not_nan():
    logits = torch.randn(4, C, requires_grad=True)
    target = make_target(torch.randint(0, C, (4,)), C)
    target['weight'] = torch.zeros(4)
    out = FerKDLoss()(logits, target)
    out['loss'].backward()
    assert out['loss'].item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_soft_ce_matches_timm_without_weights():
    from timm.loss import SoftTargetCrossEntropy as TimmSoftTargetCrossEntropy
    logits, target, *_ = _batch()
    ours = SoftRegionCrossEntropy()(logits, target)['loss']
    assert torch.allclose(ours, TimmSoftTargetCrossEntropy()(logits, target['soft']))
    assert torch.allclose(ours, FerKDLoss()(logits, target)['loss'])


# --- KD -----------------------------------------------------------------------------------------

def test_kd_stored_labels_with_zeros_float64_reference():
    logits, target, *_ = _batch(weight=[1, 1, 0, 1, 0.5, 1])
    # a top-2 "marginal_renorm" style label: exact zeros elsewhere
    top = target['soft'].topk(2, dim=-1)
    soft = torch.zeros_like(target['soft']).scatter(-1, top.indices, top.values)
    soft = soft / soft.sum(-1, keepdim=True)
    target['soft'] = soft
    t = 4.0
    out = KDLoss(temperature=t, task_loss_weight=0.5)(logits, target)

    # teacher at temperature T from stored probabilities: q^(1/T), renormalised; zeros stay zero
    p_t = soft.pow(1 / t)
    p_t = p_t / p_t.sum(-1, keepdim=True)
    p_s = (logits / t).softmax(-1)
    kd = _weighted_mean(_kl(p_t, p_s), target['weight']) * t * t
    ce = _weighted_mean(F.cross_entropy(logits, target['label'], reduction='none'), target['weight'])
    assert out['kd'].item() == pytest.approx(kd.item(), rel=1e-5)
    assert out['ce'].item() == pytest.approx(ce.item(), rel=1e-6)
    assert out['loss'].item() == pytest.approx(kd.item() + 0.5 * ce.item(), rel=1e-5)


def test_retemper_keeps_zeros_exactly_zero():
    soft = torch.zeros(1, 1000)
    soft[0, :2] = torch.tensor([0.6, 0.4])
    for t in (4.0, 20.0):  # a float32-tiny floor would give the 998 zeros ~0.9 of the mass at T = 20
        p = retemper(soft, t)
        assert p[0, 2:].sum().item() == 0
        assert p[0, 0].item() == pytest.approx(0.6 ** (1 / t) / (0.6 ** (1 / t) + 0.4 ** (1 / t)), rel=1e-6)
    assert retemper(soft, 1.0) is soft


def test_kd_online_equals_stored_softmax():
    logits, target, _, teacher_logits, _ = _batch()
    stored = KDLoss(temperature=3.0)(logits, target)
    online = KDLoss(temperature=3.0, online=True)(logits, target, teacher_logits=teacher_logits)
    assert torch.allclose(stored['loss'], online['loss'], rtol=1e-6)
    assert 'ce' not in stored


def test_kd_mode_mismatch_raises():
    logits, target, _, teacher_logits, _ = _batch()
    with pytest.raises(ValueError, match='online=True'):
        KDLoss(online=True)(logits, target)
    with pytest.raises(ValueError, match='stored labels'):
        KDLoss()(logits, target, teacher_logits=teacher_logits)


# --- probability shift --------------------------------------------------------------------------

def test_probability_shift_hand_values():
    probs = torch.tensor([
        [0.1, 0.7, 0.2],   # wrong (argmax 1, label 2): swap 0.7 <-> 0.2
        [0.6, 0.3, 0.1],   # correct: unchanged
        [0.25, 0.15, 0.6],  # wrong (argmax 2, label 1)
    ])
    label = torch.tensor([2, 0, 1])
    out = probability_shift(probs, label)
    expected = torch.tensor([
        [0.1, 0.2, 0.7],
        [0.6, 0.3, 0.1],
        [0.25, 0.6, 0.15],
    ])
    assert torch.equal(out, expected)
    assert torch.equal(probs[0], torch.tensor([0.1, 0.7, 0.2]))  # input untouched
    assert torch.equal(out.argmax(-1), label)


def test_probability_shift_logits_equals_probs():
    logits, target, *_ = _batch()
    label = target['label']
    assert torch.allclose(probability_shift(logits, label).softmax(-1), probability_shift(logits.softmax(-1), label))
    correct = logits.argmax(-1) == label
    shifted = probability_shift(logits, label)
    assert torch.equal(shifted[correct], logits[correct])
    assert torch.equal(shifted.argmax(-1), label)
    # each row is a permutation of the original: same values
    assert torch.equal(shifted.sort(-1).values, logits.sort(-1).values)


def test_kd_probability_shift_uses_shifted_teacher():
    logits, target, _, teacher_logits, _ = _batch()
    label = target['label']
    ps = KDLoss(temperature=2.0, probability_shift=True, online=True)(logits, target, teacher_logits=teacher_logits)
    ref = KDLoss(temperature=2.0, online=True)(logits, target, teacher_logits=probability_shift(teacher_logits, label))
    assert torch.allclose(ps['loss'], ref['loss'])


# --- DTD ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('weighting', ['similarity', 'confidence'])
@pytest.mark.parametrize('center', [True, False])
def test_dtd_float64_reference(weighting, center):
    logits, target, _, teacher_logits, _ = _batch(weight=[1, 1, 0, 1, 1, 1])
    tau0, beta, gamma, ce_w = 4.0, 1.5, 2.0, 0.3
    loss = DTDLoss(
        temperature=tau0, beta=beta, gamma=gamma, weighting=weighting,
        center_logits=center, task_loss_weight=ce_w, online=True)
    out = loss(logits, target, teacher_logits=teacher_logits)

    w8 = target['weight']
    if weighting == 'similarity':
        zs, zt = logits, teacher_logits
        if center:
            zs, zt = zs - zs.mean(-1, keepdim=True), zt - zt.mean(-1, keepdim=True)
        cos = (zs * zt).sum(-1) / (zs.norm(dim=-1) * zt.norm(dim=-1))
        w = (1 - cos) ** gamma
    else:
        w = 1 / logits.softmax(-1).max(-1).values
    tau = (tau0 - beta * (w - _weighted_mean(w, w8))).clamp_min(0.1)
    p_t = (teacher_logits / tau[:, None]).softmax(-1)
    p_s = (logits / tau[:, None]).softmax(-1)
    dtd = _weighted_mean(tau ** 2 * _kl(p_t, p_s), w8)
    ce = _weighted_mean(F.cross_entropy(logits, target['label'], reduction='none'), w8)

    assert torch.allclose(loss.temperatures(logits, teacher_logits, w8), tau)
    assert out['dtd'].item() == pytest.approx(dtd.item(), rel=1e-6)
    assert out['loss'].item() == pytest.approx(dtd.item() + ce_w * ce.item(), rel=1e-6)
    assert out['tau_min'].item() == pytest.approx(tau.min().item())


def test_dtd_harder_samples_get_lower_temperature():
    teacher = torch.tensor([[4.0, 0.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    # similarity: sample 0 agrees with the teacher, sample 1 disagrees
    student = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
    tau = DTDLoss(temperature=4.0, weighting='similarity', online=True).temperatures(student, teacher)
    assert tau[1] < 4.0 < tau[0]
    assert tau.mean().item() == pytest.approx(4.0)  # batch-centred
    # confidence: sample 0 confident, sample 1 uncertain
    student = torch.tensor([[6.0, 0.0, 0.0, 0.0], [0.2, 0.0, 0.1, 0.0]])
    tau = DTDLoss(temperature=4.0, weighting='confidence', online=True).temperatures(student, teacher)
    assert tau[1] < 4.0 < tau[0]


def test_dtd_temperature_floor_and_no_grad():
    student = torch.tensor([[8.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.zeros(2, 3)
    loss = DTDLoss(temperature=0.5, beta=10.0, weighting='confidence', min_temperature=0.2, online=True)
    tau = loss.temperatures(student, teacher)
    assert tau.min().item() == pytest.approx(0.2)
    assert not tau.requires_grad


def test_dtd_stored_labels_use_log_probs():
    logits, target, _, teacher_logits, _ = _batch()
    stored = DTDLoss(weighting='similarity')(logits, target)
    online = DTDLoss(weighting='similarity', online=True)(logits, target, teacher_logits=teacher_logits)
    # log softmax(z_T) differs from z_T by a per-row constant, which the centred cosine ignores
    assert torch.allclose(stored['loss'], online['loss'], rtol=1e-6)


# --- FNKD ---------------------------------------------------------------------------------------

def test_fnkd_float64_reference_online_and_stored():
    logits, target, features, teacher_logits, teacher_features = _batch(weight=[1, 1, 1, 0, 1, 1])
    tau, lam2 = 2.0, 9.0
    w8 = target['weight']
    p_t = (tau * teacher_logits / teacher_features.norm(dim=-1, keepdim=True)).softmax(-1)
    log_p_s = (tau * logits / features.norm(dim=-1, keepdim=True)).log_softmax(-1)
    fnkd = _weighted_mean(-(p_t * log_p_s).sum(-1), w8)
    ce = _weighted_mean(F.cross_entropy(logits, target['label'], reduction='none'), w8)

    online = FNKDLoss(tau=tau, lambda2=lam2, online=True)(
        logits, target, features=features, teacher_logits=teacher_logits, teacher_features=teacher_features)
    assert online['fnkd'].item() == pytest.approx(fnkd.item(), rel=1e-6)
    assert online['ce'].item() == pytest.approx(ce.item(), rel=1e-6)
    assert online['loss'].item() == pytest.approx(ce.item() + lam2 * fnkd.item(), rel=1e-6)

    # stored mode: the label is the teacher's already normalised distribution
    stored = FNKDLoss(tau=tau, lambda2=lam2)(logits, dict(target, soft=p_t), features=features)
    assert torch.allclose(stored['loss'], online['loss'])


def test_fnkd_needs_features():
    logits, target, *_ = _batch()
    loss = FNKDLoss()
    assert loss.needs_features and not loss.needs_teacher and not loss.needs_teacher_features
    with pytest.raises(ValueError, match='features'):
        loss(logits, target)


# --- shared behaviour ---------------------------------------------------------------------------

@pytest.mark.parametrize('name,kwargs', ALL_LOSSES)
def test_gradients_finite_and_zero_weight_crop_has_zero_grad(name, kwargs):
    logits, target, features, teacher_logits, teacher_features = _batch(weight=[1, 0, 1, 1, 0, 1])
    logits = logits.float().requires_grad_()
    features = features.float().requires_grad_()
    target = {k: (v.float() if v.is_floating_point() else v) for k, v in target.items()}
    loss = create_distill_loss(name, **kwargs)
    out = _call(loss, logits, target, features, teacher_logits.float(), teacher_features.float())
    assert out['loss'].ndim == 0 and torch.isfinite(out['loss'])
    assert all(v.ndim == 0 for v in out.values())
    out['loss'].backward()
    assert torch.isfinite(logits.grad).all()
    discarded = target['weight'] == 0
    assert torch.equal(logits.grad[discarded], torch.zeros_like(logits.grad[discarded]))
    assert logits.grad[~discarded].abs().sum() > 0
    if loss.needs_features:
        assert torch.equal(features.grad[discarded], torch.zeros_like(features.grad[discarded]))


def test_factory_names_and_attributes():
    assert DISTILL_LOSS_TYPES == ('soft_ce', 'ferkd', 'kd', 'dtd', 'fnkd')
    expected = {
        'soft_ce': SoftRegionCrossEntropy, 'ferkd': FerKDLoss, 'kd': KDLoss, 'dtd': DTDLoss, 'fnkd': FNKDLoss}
    for name in DISTILL_LOSS_TYPES:
        loss = create_distill_loss(name)
        assert type(loss) is expected[name]
        assert isinstance(loss.needs_features, bool) and isinstance(loss.needs_teacher, bool)
    assert isinstance(create_distill_loss('Soft-CE'), SoftRegionCrossEntropy)


def test_factory_errors():
    with pytest.raises(ValueError, match="soft_ce, ferkd, kd, dtd, fnkd"):
        create_distill_loss('hinton')
    for name in ('soft_ce', 'ferkd', 'kd', 'dtd'):
        for bad in (0.0, -1.0):
            with pytest.raises(ValueError, match='temperature must be > 0'):
                create_distill_loss(name, temperature=bad)
    with pytest.raises(ValueError, match='tau must be > 0'):
        create_distill_loss('fnkd', tau=-2.0)
    with pytest.raises(ValueError, match='min_temperature'):
        create_distill_loss('dtd', min_temperature=0.0)
    with pytest.raises(ValueError, match='weighting'):
        create_distill_loss('dtd', weighting='entropy')
    with pytest.raises(ValueError, match='Invalid arguments'):
        create_distill_loss('ferkd', online=True)
    with pytest.raises(ValueError, match="'label'"):
        FNKDLoss()(torch.randn(2, C), {'soft': torch.full((2, C), 1 / C)}, features=torch.randn(2, D))


def test_make_target():
    label = torch.tensor([2, 0])
    t = make_target(label, 3)
    assert torch.equal(t['soft'], torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(t['weight'], torch.ones(2)) and torch.equal(t['label'], label)
    dense = torch.tensor([[0.2, 0.8, 0.0]])
    t = make_target(dense, 3)
    assert torch.equal(t['soft'], dense) and 'label' not in t
    full = {'soft': dense, 'label': torch.tensor([1]), 'weight': torch.zeros(1)}
    assert make_target(full, 3)['weight'].item() == 0.0
    with pytest.raises(ValueError, match='classes'):
        make_target(dense, 4)
