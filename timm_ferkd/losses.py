"""Distillation objectives: FKD soft CE, FerKD, KD, DTD, FNKD and probability shift.

Every loss takes ``(logits, target, features=None, teacher_logits=None, teacher_features=None)``, with
``target`` the pipeline's dict (see :func:`make_target`), and returns a dict of ``'loss'`` and named
components for logging; the attributes of :class:`DistillLoss` tell a task what to compute first.

Reductions: FKD's soft CE averages over the batch (its reference code divides by B); every other loss
averages over the sum of crop weights, so a discarded crop neither contributes nor dilutes the mean.
Under DDP that equals the global weighted mean only when every rank has the same weight sum.
"""
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from timm_ferkd.errors import ConfigError

__all__ = [
    'DISTILL_LOSS_TYPES', 'DISTILL_LOSS_CLASSES', 'ONLINE_DISTILL_LOSS_TYPES', 'DistillLoss', 'SoftRegionCrossEntropy',
    'FerKDLoss', 'KDLoss', 'DTDLoss', 'FNKDLoss', 'TimmCriterion', 'create_distill_loss', 'make_target',
    'probability_shift', 'retemper',
    'feature_normalized_logits',
]

# Losses that can take their teacher from a teacher running in the loop.
ONLINE_DISTILL_LOSS_TYPES: Tuple[str, ...] = ('kd', 'dtd', 'fnkd')

# Smallest normal float32. Stored labels contain exact zeros (top-k labels); log(0) must become
# a finite logit whose re-tempered probability is still negligible. A "small" clamp such as
# 1e-8 is not: at T = 4 it becomes 1e-8 ** 0.25 = 1e-2 relative mass per zero class, which
# over ~1000 classes outweighs the real top-k mass.
_PROB_FLOOR = torch.finfo(torch.float32).tiny
# Guards a weight sum of zero (every crop of the batch discarded): the loss is then 0 with
# zero gradients instead of NaN.
_WEIGHT_SUM_FLOOR = 1e-12


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 to float32 (teacher scores, norms, logs); keep float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_positive(name: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f'{name} must be > 0, got {value!r}.')
    return float(value)


def _check_non_negative(name: str, value: float) -> float:
    if not value >= 0:
        raise ConfigError(f'{name} must be >= 0, got {value!r}.')
    return float(value)


def make_target(
        target: Union[torch.Tensor, Dict[str, torch.Tensor]],
        num_classes: int,
) -> Dict[str, torch.Tensor]:
    """Bring any training target into the loss dict convention.

    Args:
        target: The pipeline's dict (missing ``'weight'`` becomes all ones, missing ``'soft'``
            the one-hot of ``'label'``), a long tensor [B] of class indices (one-hot soft target,
            weight 1) or a dense float tensor [B, C] such as timm's Mixup output (no label).
        num_classes: Number of classes C, for one-hot encoding.

    Returns:
        Dict with ``'soft'`` and ``'weight'``, plus ``'label'`` when it is known.
    """
    if isinstance(target, torch.Tensor):
        if target.is_floating_point():
            if target.ndim != 2:
                raise ValueError(f'A dense float target must be [B, C], got shape {tuple(target.shape)}.')
            target = {'soft': target}
        else:
            target = {'label': target}
    elif isinstance(target, dict):
        target = dict(target)
    else:
        raise TypeError(f'target must be a Tensor or a dict of Tensors, got {type(target).__name__}.')

    if 'soft' not in target:
        if 'label' not in target:
            raise ValueError("target dict needs 'soft' or 'label'.")
        target['soft'] = F.one_hot(target['label'].long(), num_classes).float()
    soft = target['soft']
    if soft.shape[-1] != num_classes:
        raise ValueError(f"target 'soft' has {soft.shape[-1]} classes, the model has {num_classes}.")
    if 'weight' not in target:
        target['weight'] = torch.ones(soft.shape[0], device=soft.device, dtype=torch.float32)
    return target


def _get_label(target: Dict[str, torch.Tensor], loss_name: str) -> torch.Tensor:
    label = target.get('label', None)
    if label is None:
        raise ValueError(f"{loss_name} needs the ground-truth class: target dict has no 'label'.")
    return label.long()


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_i w_i v_i / sum_i w_i; 0 (still attached to the graph) when all weights are 0."""
    return (values * weight).sum() / weight.sum().clamp_min(_WEIGHT_SUM_FLOOR)


def _soft_cross_entropy(log_probs: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Per-row H(q, p) = -sum_c q_c log p_c."""
    return -(soft * log_probs).sum(dim=-1)


def retemper(soft: torch.Tensor, temperature: float) -> torch.Tensor:
    """A stored distribution re-tempered to another temperature: ``softmax(log q / T)``.

    A label stored as ``softmax(z / T0)`` becomes the teacher at ``T0 * T`` over the stored classes
    (exactly so for 'full' labels). Exact zeros (classes a top-k label dropped) stay exactly zero at
    any T: a floor such as the smallest float32 would give each of them ``floor ** (1 / T)`` relative
    mass, about 1e-2 at T = 20, which over ~1000 classes outweighs the stored top-k.

    Args:
        soft: Probabilities [B, C], rows summing to 1 (may contain exact zeros).
        temperature: T > 0; 1 is the identity, > 1 flattens, < 1 sharpens.

    Returns:
        Probabilities [B, C] in the dtype of ``soft`` (``soft`` itself when T = 1).
    """
    _check_positive('temperature', temperature)
    if temperature == 1.0:
        return soft
    # log(0) = -inf keeps zero classes at zero; every row has a positive entry since it sums to 1
    return torch.softmax(torch.log(soft.double()) / temperature, dim=-1).to(soft.dtype)


def probability_shift(probs_or_logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Probability shift (PS) knowledge adjustment from Preparing Lessons (Wen et al., 2021).

    In each row where the argmax is not the ground-truth class, the value at the argmax and the
    value at the ground-truth class are swapped, so the ground truth becomes the maximum while
    every other class keeps its value. Rows already predicting the ground truth are unchanged.
    Softmax commutes with permutations, so shifting logits or probabilities is equivalent; use
    it on stored labels (a label transform) or on online teacher logits.

    Args:
        probs_or_logits: Scores [B, C] (probabilities, log-probabilities or logits).
        label: Ground-truth classes [B].

    Returns:
        Adjusted scores [B, C] (a new tensor; the input is not modified).
    """
    if probs_or_logits.ndim != 2:
        raise ValueError(f'probability_shift expects [B, C] scores, got shape {tuple(probs_or_logits.shape)}.')
    label = label.long().view(-1, 1)
    pred = probs_or_logits.argmax(dim=-1, keepdim=True)
    value_pred = probs_or_logits.gather(-1, pred)
    value_label = probs_or_logits.gather(-1, label)
    # Where pred == label both scatters write the row's own value back: a no-op.
    return probs_or_logits.scatter(-1, pred, value_label).scatter(-1, label, value_pred)


def feature_normalized_logits(logits: torch.Tensor, features: torch.Tensor, tau: float) -> torch.Tensor:
    """FNKD's per-sample scaled logits ``tau * z / ||f||``.

    Args:
        logits: Logits z [B, C].
        features: Pre-logit features f [B, D] that produced the logits.
        tau: Scale (FNKD's temperature-like constant).

    Returns:
        Scaled logits [B, C].
    """
    norm = _at_least_float32(features).norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return tau * _at_least_float32(logits) / norm


class DistillLoss(nn.Module):
    """Base class: fixes the forward signature and the attributes tasks read; subclasses define ``_loss``.

    Attributes:
        needs_features: Student pre-logit features must be passed as ``features``.
        needs_teacher: Teacher logits from a teacher in the loop must be passed.
        needs_teacher_features: Teacher pre-logit features must be passed as well.
    """
    needs_features: bool = False
    needs_teacher: bool = False
    needs_teacher_features: bool = False

    def forward(
            self,
            logits: Tensor,
            target: Dict[str, Tensor],
            features: Optional[Tensor] = None,
            teacher_logits: Optional[Tensor] = None,
            teacher_features: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """Compute the loss.

        Args:
            logits: Student logits [B, C].
            target: Dict with ``'soft'`` (stored labels), ``'label'`` (for a loss that needs the ground
                truth) and optional ``'weight'`` [B] (see :func:`make_target`).
            features: Student pre-logit features [B, D] (losses with ``needs_features``).
            teacher_logits: Teacher logits [B, C] (losses built with ``online=True`` only).
            teacher_features: Teacher pre-logit features [B, D_T] (online FNKD only).

        Returns:
            Dict with ``'loss'`` and the components the loss's class docstring lists.
        """
        name = type(self).__name__
        if self.needs_features and features is None:
            raise ValueError(f'{name} needs the student pre-logit features (features=...).')
        if self.needs_teacher and teacher_logits is None:
            raise ValueError(f'{name} was built with online=True and needs teacher_logits.')
        if not self.needs_teacher and teacher_logits is not None:
            raise ValueError(
                f'{name} was built for stored labels (online=False) but got teacher_logits; '
                'build it with online=True to distill from a teacher in the loop.')
        if self.needs_teacher_features and teacher_features is None:
            raise ValueError(f'{name} was built with online=True and needs teacher_features.')
        weight = target.get('weight')
        weight = torch.ones(logits.shape[0], device=logits.device) if weight is None else weight.float()
        return self._loss(logits, target, weight, features, teacher_logits, teacher_features)

    def _loss(self, logits: Tensor, target: Dict[str, Tensor], weight: Tensor, features: Optional[Tensor],
              teacher_logits: Optional[Tensor], teacher_features: Optional[Tensor]) -> Dict[str, Tensor]:
        raise NotImplementedError


class SoftRegionCrossEntropy(DistillLoss):
    """FKD's soft-target cross-entropy with a student temperature and per-crop weights.

    ``L = 1/B sum_i w_i * (-sum_c q_ic log softmax(z_i / T)_c)``

    The batch mean follows the FKD reference code (timm's SoftTargetCrossEntropy times the
    weights); :class:`FerKDLoss` divides by the weight sum instead.

    Returns ``'loss'`` and ``'soft_ce'`` (the same value).

    Args:
        temperature: Student temperature T > 0 (the stored label is used as is).
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = _check_positive('temperature', temperature)

    def _per_crop(self, logits: torch.Tensor, target: Dict[str, torch.Tensor]) -> torch.Tensor:
        return _soft_cross_entropy(F.log_softmax(logits / self.temperature, dim=-1), target['soft'])

    def _loss(self, logits: Tensor, target: Dict[str, Tensor], weight: Tensor, features: Optional[Tensor],
              teacher_logits: Optional[Tensor], teacher_features: Optional[Tensor]) -> Dict[str, Tensor]:
        loss = (self._per_crop(logits, target) * weight).mean()
        return {'loss': loss, 'soft_ce': loss}


class FerKDLoss(SoftRegionCrossEntropy):
    """FerKD objective: soft CE against the adapted label, averaged over kept crops.

    ``L = sum_i w_i H(y_a,i, softmax(z_i / T)) / max(sum_i w_i, eps)``

    The adaptation itself happens in the data pipeline (:mod:`timm_ferkd.data.calibration`). A crop of
    weight 0 contributes nothing and gets an exactly zero gradient; a batch of such crops gives loss 0,
    not NaN. Returns ``'loss'``, ``'soft_ce'`` (the same value) and ``'kept'`` (mean crop weight, detached: the
    fraction of crops that count).

    Args:
        temperature: Student temperature T > 0 (1 in FerKD).
    """

    def _loss(self, logits: Tensor, target: Dict[str, Tensor], weight: Tensor, features: Optional[Tensor],
              teacher_logits: Optional[Tensor], teacher_features: Optional[Tensor]) -> Dict[str, Tensor]:
        loss = _weighted_mean(self._per_crop(logits, target), weight)
        return {'loss': loss, 'soft_ce': loss, 'kept': weight.mean().detach()}


class KDLoss(DistillLoss):
    """Hinton KD with temperature and the T^2 factor, from stored labels or an online teacher.

    ``L = a_kd * mean_w[T^2 KL(softmax(z_T / T) || softmax(z_S / T))] + a_ce * mean_w[CE(z_S, y)]``

    With stored labels the teacher logits are ``z_T = log q`` (q clamped to the smallest normal
    float32 first, so zeros stay negligible): ``softmax(log q / T)`` is the stored label
    re-tempered. ``mean_w`` is the crop-weighted mean. Returns ``'loss'``, ``'kd'`` (the T^2-scaled KL)
    and ``'ce'`` when task_loss_weight > 0.

    Args:
        temperature: T > 0.
        distill_loss_weight: a_kd.
        task_loss_weight: a_ce, weight of the ground-truth CE (0 disables it).
        probability_shift: Apply :func:`probability_shift` to the teacher before tempering.
        online: Take the teacher from ``teacher_logits`` (a teacher in the loop) instead of
            ``target['soft']``.
    """

    def __init__(
            self,
            temperature: float = 1.0,
            distill_loss_weight: float = 1.0,
            task_loss_weight: float = 0.0,
            probability_shift: bool = False,
            online: bool = False,
    ):
        super().__init__()
        self.temperature = _check_positive('temperature', temperature)
        self.distill_loss_weight = _check_non_negative('distill_loss_weight', distill_loss_weight)
        self.task_loss_weight = _check_non_negative('task_loss_weight', task_loss_weight)
        self.probability_shift = probability_shift
        self.needs_teacher = online

    def _teacher_logits(self, target: Dict[str, Tensor], teacher_logits: Optional[Tensor]) -> Tensor:
        if teacher_logits is not None:
            z_t = _at_least_float32(teacher_logits.detach())
        else:
            z_t = _at_least_float32(target['soft']).clamp_min(_PROB_FLOOR).log()  # softmax(log q) = q
        if self.probability_shift:
            z_t = probability_shift(z_t, _get_label(target, type(self).__name__))
        return z_t

    def _add_task_loss(self, out: Dict[str, Tensor], logits: Tensor, target: Dict[str, Tensor],
                       weight: Tensor) -> Dict[str, Tensor]:
        if self.task_loss_weight > 0:
            ce = F.cross_entropy(logits, _get_label(target, type(self).__name__), reduction='none')
            out['ce'] = _weighted_mean(ce, weight)
            out['loss'] = out['loss'] + self.task_loss_weight * out['ce']
        return out

    def _loss(self, logits: Tensor, target: Dict[str, Tensor], weight: Tensor, features: Optional[Tensor],
              teacher_logits: Optional[Tensor], teacher_features: Optional[Tensor]) -> Dict[str, Tensor]:
        t = self.temperature
        log_p_t = F.log_softmax(self._teacher_logits(target, teacher_logits) / t, dim=-1)
        log_p_s = F.log_softmax(logits / t, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction='none', log_target=True).sum(dim=-1)
        kd = _weighted_mean(kl, weight) * (t * t)
        out = {'loss': self.distill_loss_weight * kd, 'kd': kd}
        return self._add_task_loss(out, logits, target, weight)


class DTDLoss(KDLoss):
    """Dynamic temperature distillation (DTD) from Preparing Lessons (Wen et al., 2021).

    Per-sample temperatures ``tau_x = max(tau_0 - beta * (w_x - mean_w(w)), tau_min)`` with
    ``w`` computed without gradient by one of two weightings:

    * ``'similarity'``: ``w_x = (1 - cos(z_S, z_T))^gamma`` (student/teacher disagreement),
    * ``'confidence'``: ``w_x = 1 / max_c softmax(z_S)_c`` (student uncertainty).

    Harder samples get a larger w and so a lower temperature; the loss is :class:`KDLoss`'s with
    ``tau_x`` for T. The batch mean of w is crop-weighted, so discarded crops do not move the other
    crops' temperatures. Returns ``'loss'``, ``'dtd'`` (the tau^2-scaled KL), ``'tau_min'`` / ``'tau_max'``
    (detached batch extremes; per sample: :meth:`temperatures`) and ``'ce'`` when task_loss_weight > 0.

    Args:
        temperature: tau_0 > 0.
        beta: Temperature spread (TextBrewer: 1).
        gamma: Exponent of the similarity weighting (TextBrewer: 2).
        weighting: ``'similarity'`` or ``'confidence'``.
        min_temperature: tau_min > 0, keeps every temperature positive.
        center_logits: Subtract each row's mean before the cosine. Logits are defined only up
            to a per-row constant (softmax ignores it) and stored labels give ``log q``, whose
            large negative offset would otherwise dominate the cosine. False gives the
            paper's raw-logit cosine.
        distill_loss_weight: a_kd.
        task_loss_weight: a_ce (the paper's 1 - alpha); 0 disables the CE term.
        probability_shift: Apply A = :func:`probability_shift` to the teacher.
        online: Take the teacher from ``teacher_logits`` instead of ``target['soft']``.
    """
    weightings: Tuple[str, ...] = ('similarity', 'confidence')

    def __init__(
            self,
            temperature: float = 4.0,
            beta: float = 1.0,
            gamma: float = 2.0,
            weighting: str = 'similarity',
            min_temperature: float = 0.1,
            center_logits: bool = True,
            distill_loss_weight: float = 1.0,
            task_loss_weight: float = 0.0,
            probability_shift: bool = False,
            online: bool = False,
    ):
        super().__init__(
            temperature=temperature,
            distill_loss_weight=distill_loss_weight,
            task_loss_weight=task_loss_weight,
            probability_shift=probability_shift,
            online=online,
        )
        if weighting not in self.weightings:
            raise ConfigError(f'Unknown DTD weighting {weighting!r}; valid: {", ".join(self.weightings)}.')
        self.beta = float(beta)
        self.gamma = _check_non_negative('gamma', gamma)
        self.weighting = weighting
        self.min_temperature = _check_positive('min_temperature', min_temperature)
        self.center_logits = center_logits

    @torch.no_grad()
    def sample_weights(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Difficulty weights w [B] (no gradient)."""
        logits = _at_least_float32(logits)
        if self.weighting == 'confidence':
            return 1.0 / logits.softmax(dim=-1).amax(dim=-1)
        z_s, z_t = logits, _at_least_float32(teacher_logits)
        if self.center_logits:
            z_s = z_s - z_s.mean(dim=-1, keepdim=True)
            z_t = z_t - z_t.mean(dim=-1, keepdim=True)
        cos = F.cosine_similarity(z_s, z_t, dim=-1, eps=1e-12)
        return (1.0 - cos).clamp_min(0.).pow(self.gamma)

    @torch.no_grad()
    def temperatures(
            self,
            logits: torch.Tensor,
            teacher_logits: torch.Tensor,
            weight: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Per-sample temperatures tau_x [B] (no gradient).

        Args:
            logits: Student logits [B, C].
            teacher_logits: Teacher logits [B, C] (``log q`` for stored labels).
            weight: Crop weights [B]; the batch mean of w is taken over them.

        Returns:
            Temperatures [B], each >= min_temperature.
        """
        w = self.sample_weights(logits, teacher_logits)
        if weight is None:
            weight = torch.ones_like(w)
        w_mean = _weighted_mean(w, weight.float())
        tau = self.temperature - self.beta * (w - w_mean)
        return tau.clamp_min(self.min_temperature)

    def _loss(self, logits: Tensor, target: Dict[str, Tensor], weight: Tensor, features: Optional[Tensor],
              teacher_logits: Optional[Tensor], teacher_features: Optional[Tensor]) -> Dict[str, Tensor]:
        z_t = self._teacher_logits(target, teacher_logits)
        tau = self.temperatures(logits, z_t, weight).unsqueeze(-1)
        log_p_t = F.log_softmax(z_t / tau, dim=-1)
        log_p_s = F.log_softmax(logits / tau, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction='none', log_target=True).sum(dim=-1)
        dtd = _weighted_mean(kl * tau.squeeze(-1).pow(2), weight)
        out = {
            'loss': self.distill_loss_weight * dtd,
            'dtd': dtd,
            'tau_min': tau.min(),
            'tau_max': tau.max(),
        }
        return self._add_task_loss(out, logits, target, weight)


class FNKDLoss(DistillLoss):
    """Feature-normalised KD (FNKD, Xu et al., ECCV 2020).

    ``L = a_ce * CE(z_S, y) + lambda2 * H(softmax(tau z_T / ||f_T||), softmax(tau z_S / ||f_S||))``

    H is the cross-entropy and both terms are crop-weighted means. The student term always
    needs the student's pre-logit features f_S. The teacher distribution comes either from
    ``target['soft']`` (stored labels: store the teacher's already normalised distribution as
    the label) or, with ``online=True``, from the teacher's logits and pre-logit features.
    (The official code clips the norm instead, ``W (f / ||f|| * min(||f||, tau)) + b``: the same
    logits when the head has no bias and ``||f|| > tau``.) Returns ``'loss'``, ``'ce'`` and ``'fnkd'`` (the
    unweighted H term).

    Args:
        tau: Scale tau > 0 (official code: 2 on CIFAR-100).
        lambda2: Weight lambda^2 of the distillation term (official code: 9).
        task_loss_weight: a_ce, weight of the ground-truth CE.
        online: Teacher distribution from ``teacher_logits`` / ``teacher_features``.
    """
    needs_features = True

    def __init__(
            self,
            tau: float = 2.0,
            lambda2: float = 9.0,
            task_loss_weight: float = 1.0,
            online: bool = False,
    ):
        super().__init__()
        self.tau = _check_positive('tau', tau)
        self.lambda2 = _check_non_negative('lambda2', lambda2)
        self.task_loss_weight = _check_non_negative('task_loss_weight', task_loss_weight)
        self.needs_teacher = online
        self.needs_teacher_features = online

    def _loss(self, logits: Tensor, target: Dict[str, Tensor], weight: Tensor, features: Optional[Tensor],
              teacher_logits: Optional[Tensor], teacher_features: Optional[Tensor]) -> Dict[str, Tensor]:
        if teacher_logits is not None:
            with torch.no_grad():
                p_t = feature_normalized_logits(teacher_logits, teacher_features, self.tau).softmax(dim=-1)
        else:
            p_t = target['soft']
        log_p_s = F.log_softmax(feature_normalized_logits(logits, features, self.tau), dim=-1)
        fnkd = _weighted_mean(_soft_cross_entropy(log_p_s, p_t), weight)
        ce = _weighted_mean(
            F.cross_entropy(logits, _get_label(target, 'FNKDLoss'), reduction='none'), weight)
        loss = self.task_loss_weight * ce + self.lambda2 * fnkd
        return {'loss': loss, 'ce': ce, 'fnkd': fnkd}


# the one list of loss names: train_ferkd.py's --distill-loss, registration and create_distill_loss use it
DISTILL_LOSS_CLASSES: Dict[str, type] = {
    'soft_ce': SoftRegionCrossEntropy,
    'ferkd': FerKDLoss,
    'kd': KDLoss,
    'dtd': DTDLoss,
    'fnkd': FNKDLoss,
}
DISTILL_LOSS_TYPES: Tuple[str, ...] = tuple(DISTILL_LOSS_CLASSES)


def create_distill_loss(name: str, **kwargs) -> nn.Module:
    """Create a distillation loss by name.

    Args:
        name: One of :data:`DISTILL_LOSS_TYPES`: ``'soft_ce'`` (FKD), ``'ferkd'``, ``'kd'``,
            ``'dtd'``, ``'fnkd'`` (case-insensitive, ``-`` accepted for ``_``).
        **kwargs: Constructor arguments of the loss class.

    Returns:
        The loss module.

    Raises:
        ValueError: Unknown name, or an invalid argument value (e.g. a temperature <= 0).
    """
    key = name.lower().replace('-', '_')
    if key not in DISTILL_LOSS_CLASSES:
        raise ConfigError(f'Unknown distillation loss {name!r}; valid: {", ".join(DISTILL_LOSS_TYPES)}.')
    loss_cls = DISTILL_LOSS_CLASSES[key]
    try:
        return loss_cls(**kwargs)
    except TypeError as e:
        # Misspelled / foreign kwargs are a user configuration error, report them as such.
        raise ConfigError(f'Invalid arguments for distillation loss {key!r}: {e}') from e


class TimmCriterion(nn.Module):
    """A distillation loss as a timm criterion: ``criterion(output, target)`` returns the total loss tensor.

    timm's tasks take the criterion's result as the loss; the distillation losses return a dict of their
    terms, whose ``'loss'`` this returns. This package's tasks unwrap it and use ``loss`` directly, so a
    criterion from timm's ``create_classification_loss`` trains in :class:`~timm_ferkd.task.FerKDTask` too.

    Args:
        loss: A loss of :func:`create_distill_loss`.
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, output: torch.Tensor, target: Dict[str, torch.Tensor]) -> torch.Tensor:
        if getattr(self.loss, 'needs_features', False):
            raise ConfigError(
                f'{type(self.loss).__name__} needs the student\'s pre-logit features, which timm\'s ClassificationTask '
                f'does not pass: train it with timm_ferkd.FerKDTask (or OnlineDistillTask)')
        return self.loss(output, target)['loss']
