"""Training tasks (timm ``TrainingTask``) for offline (:class:`FerKDTask`) and online (:class:`OnlineDistillTask`)
distillation, and :func:`create_task`, which picks one of them or timm's ``LogitDistillationTask``.

A loss that needs pre-logit features gets the student wrapped in :class:`StudentFeatureModule`, so that DDP
wraps the whole trainable forward, while ``get_eval_model`` still returns the bare student (checkpoints load
straight into ``timm.create_model(name)``).
"""
import logging
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from timm.task import DistillationTeacher, LogitDistillationTask, TrainingTask
from timm.task.distillation import FeatureDistillationTrainableModule
from timm.utils import unwrap_model

from timm_ferkd.errors import ConfigError
from timm_ferkd.losses import ONLINE_DISTILL_LOSS_TYPES, TimmCriterion, create_distill_loss, make_target

__all__ = ['StudentFeatureModule', 'FerKDTask', 'OnlineDistillTask', 'create_task']

_logger = logging.getLogger(__name__)


def _check_feature_support(model: nn.Module, role: str) -> None:
    """Raise if a model cannot produce pre-logit features the timm way."""
    model = unwrap_model(model)
    missing = [a for a in ('forward_features', 'forward_head', 'get_classifier') if not hasattr(model, a)]
    if missing:
        raise ConfigError(
            f'The loss needs {role} pre-logit features, but {type(model).__name__} has no '
            f'{", ".join(missing)}. Use a timm model or a loss without features (soft_ce, ferkd, kd, dtd).')
    if not isinstance(model.get_classifier(), nn.Module):
        raise ConfigError(
            f'{type(model).__name__}.get_classifier() is not a single module (e.g. a distilled '
            'two-head model); the loss needs logits = classifier(pre_logits).')


def _resolve_loss(
        loss: Union[str, nn.Module],
        loss_kwargs: Optional[Dict[str, Any]],
        device: torch.device,
        **defaults: Any,
) -> nn.Module:
    """A loss module from a name (+ kwargs) or an explicit module (not both).

    A :class:`~timm_ferkd.losses.TimmCriterion` (what timm's ``create_classification_loss`` returns for
    this package's names once registered) is unwrapped: the tasks need the loss's dict of terms.
    """
    if isinstance(loss, TimmCriterion):
        loss = loss.loss
    if isinstance(loss, str):
        loss = create_distill_loss(loss, **{**defaults, **(loss_kwargs or {})})
    elif loss_kwargs:
        raise ConfigError(f'Pass either a loss module or loss_kwargs, not both: {sorted(loss_kwargs)}')
    if not isinstance(loss, nn.Module):
        raise TypeError(f'loss must be a name or an nn.Module, got {type(loss).__name__}.')
    return loss.to(device=device)


class StudentFeatureModule(FeatureDistillationTrainableModule):
    """timm's feature-distillation wrapper, with logits computed from the features they return.

    timm's module runs the head twice (logits, then pre-logits); here the logits are the classifier
    applied to the pre-logit features, so both share one forward (one dropout mask) and satisfy
    ``z = W f + b`` exactly, as FNKD assumes. ``no_weight_decay`` and ``group_matcher`` are timm's.

    Args:
        student_model: A timm model (``forward_features``, ``forward_head``, ``get_classifier``).
    """

    def forward(self, input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Forward the student.

        Args:
            input: Input batch [B, C, H, W].

        Returns:
            Tuple of logits [B, num_classes] and pre-logit features [B, D].
        """
        features = self.student.forward_head(self.student.forward_features(input), pre_logits=True)
        return self.student.get_classifier()(features), features


class _StudentDistillTask(TrainingTask):
    """Student-side plumbing shared by the offline and online tasks."""

    def _setup_student(self, model: nn.Module) -> None:
        # Loss modules outside timm_ferkd.losses may lack the attributes: assume logits only.
        self.needs_features = bool(getattr(self.criterion, 'needs_features', False))
        if self.needs_features:
            _check_feature_support(model, 'student')
            self.trainable_module = StudentFeatureModule(model)
        else:
            self.trainable_module = model

    def _forward_student(self, input: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.needs_features:
            return self.trainable_module(input)
        return self.trainable_module(input), None

    def _pack(self, logits: torch.Tensor, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {'loss': losses['loss'], 'output': logits, **{k: v for k, v in losses.items() if k != 'loss'}}

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> '_StudentDistillTask':
        """Wrap the trainable module (student, or student + feature wrapper) in DDP.

        Args:
            device_ids: Device ids for DDP (e.g. ``[local_rank]``), None on CPU.
            **ddp_kwargs: Passed to DistributedDataParallel.

        Returns:
            self
        """
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the trainable forward and the eval student (call before prepare_distributed).

        Returns:
            The compiled eval model (the bare student).
        """
        student = self.trainable_module.student if self.needs_features else None
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        # without the feature wrapper training and eval share the same forward
        self.eval_model = self.trainable_module if student is None else torch.compile(
            student, backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The bare student (through DDP, EMA and compile wrappers of the feature wrapper)."""
        resolved = super().get_eval_model(module=module, ema=ema)
        inner = None if resolved is None else unwrap_model(resolved)
        return inner.student if isinstance(inner, StudentFeatureModule) else resolved


class FerKDTask(_StudentDistillTask):
    """Offline distillation task: train against stored (FerKD-adapted) region labels.

    The target is the pipeline's dict (``'soft'`` [B, C], ``'label'`` [B], ``'weight'`` [B]); a
    plain LongTensor of labels (one-hot, weight 1) or a dense float [B, C] target also works, so
    the task runs on ordinary loaders too.

    Args:
        model: Student model (any timm model; needs ``forward_head`` when the loss needs features).
        loss: Loss module or name from :data:`timm_ferkd.losses.DISTILL_LOSS_TYPES`.
        loss_kwargs: Constructor arguments when ``loss`` is a name.
        device: Device for task tensors/buffers.
        dtype: Dtype for task tensors/buffers.
        verbose: Enable info logging.

    Examples:

        ```python
        task = FerKDTask(model, 'ferkd', device=device)
        if distributed:
            task.prepare_distributed(device_ids=[local_rank])
        result = task(input, {'soft': soft, 'label': label, 'weight': weight})
        result['loss'].backward()
        ```
    """

    def __init__(
            self,
            model: nn.Module,
            loss: Union[nn.Module, str] = 'ferkd',
            loss_kwargs: Optional[Dict[str, Any]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.criterion = _resolve_loss(loss, loss_kwargs, self.device)
        if getattr(self.criterion, 'needs_teacher', False):
            raise ConfigError(
                f'{type(self.criterion).__name__} was built for a teacher in the loop (online=True); '
                'FerKDTask trains from stored labels only, use OnlineDistillTask.')
        self._setup_student(model)
        if self.verbose:
            _logger.info(f'FerKDTask: loss={type(self.criterion).__name__}, '
                         f'features={self.needs_features}')

    def forward(
            self,
            input: torch.Tensor,
            target: Union[torch.Tensor, Dict[str, torch.Tensor]],
    ) -> Dict[str, torch.Tensor]:
        """Forward the student and compute the distillation loss.

        Args:
            input: Input batch [B, C, H, W].
            target: Target dict, class indices [B] or dense targets [B, C].

        Returns:
            Dict with ``'loss'``, ``'output'`` (student logits) and the loss components.
        """
        logits, features = self._forward_student(input)
        target = make_target(target, logits.shape[-1])
        return self._pack(logits, self.criterion(logits, target, features=features))


class OnlineDistillTask(_StudentDistillTask):
    """Online distillation with a frozen teacher in the loop: FNKD, DTD or (PS-adjusted) KD.

    The teacher is timm's ``DistillationTeacher`` (model creation, re-normalisation of the
    student's input to the teacher's mean/std); it stays in eval mode with frozen parameters and
    is never wrapped by DDP. For plain Hinton KD prefer timm's ``LogitDistillationTask``
    (:func:`create_task` returns it).

    Args:
        student_model: Student model to train.
        teacher_model: Teacher name, module or ``DistillationTeacher``.
        loss: Loss module built with ``online=True``, or a name from
            :data:`timm_ferkd.losses.ONLINE_DISTILL_LOSS_TYPES` (built with ``online=True``).
        loss_kwargs: Constructor arguments when ``loss`` is a name.
        teacher_pretrained_path: Teacher weights file (teacher given by name).
        teacher_pretrained_cfg_overlay: Teacher pretrained cfg overrides (teacher given by name).
        device: Device for task tensors/buffers.
        dtype: Dtype for task tensors/buffers.
        verbose: Enable info logging.
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: Union[str, nn.Module, DistillationTeacher],
            loss: Union[nn.Module, str] = 'dtd',
            loss_kwargs: Optional[Dict[str, Any]] = None,
            teacher_pretrained_path: Optional[str] = None,
            teacher_pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if isinstance(loss, str) and loss.lower().replace('-', '_') not in ONLINE_DISTILL_LOSS_TYPES:
            raise ConfigError(
                f'Loss {loss!r} cannot use a teacher in the loop; valid: {", ".join(ONLINE_DISTILL_LOSS_TYPES)}.')
        self.criterion = _resolve_loss(loss, loss_kwargs, self.device, online=True)
        if not getattr(self.criterion, 'needs_teacher', False):
            raise ConfigError(
                f'{type(self.criterion).__name__} was built for stored labels; build it with online=True.')

        student = unwrap_model(student_model)
        if isinstance(teacher_model, DistillationTeacher):
            teacher = teacher_model
        else:
            teacher = DistillationTeacher(
                teacher_model,
                num_classes=student.num_classes,
                in_chans=student.in_chans,
                pretrained_path=teacher_pretrained_path,
                pretrained_cfg_overlay=teacher_pretrained_cfg_overlay,
                device=self.device,
                dtype=self.dtype,
            )
        self.needs_teacher_features = bool(getattr(self.criterion, 'needs_teacher_features', False))
        if self.needs_teacher_features:
            _check_feature_support(teacher.model, 'teacher')
        teacher.requires_grad_(False)
        self.teacher = teacher.eval()
        self._setup_student(student_model)

        # Student normalisation, to re-normalise its input for the teacher (as timm's tasks do).
        # A student without a pretrained_cfg is taken to share the teacher's normalisation.
        student_cfg = getattr(student, 'pretrained_cfg', None) or {}
        for name in ('mean', 'std'):
            if name in student_cfg:
                value = torch.tensor(student_cfg[name], device=self.device, dtype=self.dtype).view(1, -1, 1, 1)
            else:
                value = getattr(teacher, f'{name}_kd').clone()
            self.register_buffer(f'student_{name}', value, persistent=False)

        if self.verbose:
            _logger.info(f'OnlineDistillTask: loss={type(self.criterion).__name__}, '
                         f'teacher={type(unwrap_model(teacher.model)).__name__}')

    def train(self, mode: bool = True) -> 'OnlineDistillTask':
        """Set training mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile student paths and the teacher path the loss uses."""
        eval_model = super().compile(backend=backend, mode=mode, **compile_kwargs)
        features = self.needs_teacher_features
        self.teacher.compile(
            backend=backend, mode=mode, compile_model=not features, compile_features=features, **compile_kwargs)
        return eval_model

    @torch.no_grad()
    def _forward_teacher(self, input: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        input_kd = self.teacher.normalize_input(input, self.student_mean, self.student_std).detach()
        if not self.needs_teacher_features:
            return self.teacher(input_kd), None
        # One teacher pass for both: its logits are its classifier applied to its pre-logits.
        features = self.teacher(input_kd, return_features=True)
        return self.teacher.model.get_classifier()(features), features

    def forward(
            self,
            input: torch.Tensor,
            target: Union[torch.Tensor, Dict[str, torch.Tensor]],
    ) -> Dict[str, torch.Tensor]:
        """Forward student and teacher and compute the loss.

        Args:
            input: Input batch [B, C, H, W], normalised for the student.
            target: Class indices [B] or the target dict.

        Returns:
            Dict with ``'loss'``, ``'output'`` (student logits) and the loss components.
        """
        logits, features = self._forward_student(input)
        teacher_logits, teacher_features = self._forward_teacher(input)
        target = make_target(target, logits.shape[-1])
        losses = self.criterion(
            logits, target, features=features, teacher_logits=teacher_logits, teacher_features=teacher_features)
        return self._pack(logits, losses)


def create_task(
        model: nn.Module,
        loss: Union[str, nn.Module] = 'ferkd',
        loss_kwargs: Optional[Dict[str, Any]] = None,
        teacher: Optional[Union[str, nn.Module, DistillationTeacher]] = None,
        **task_kwargs: Any,
) -> TrainingTask:
    """Create the training task for a loss, offline or with a teacher in the loop.

    * no teacher: :class:`FerKDTask` (stored labels);
    * teacher and ``loss='kd'``: timm's ``LogitDistillationTask``; ``loss_kwargs`` are its own
      arguments (``temperature``, ``task_loss_weight``, ``distill_loss_weight``, ``criterion``...).
      With ``probability_shift=True`` in ``loss_kwargs`` (not supported by timm's task) the
      PS-adjusted :class:`~timm_ferkd.losses.KDLoss` runs in :class:`OnlineDistillTask`;
    * teacher and any other loss: :class:`OnlineDistillTask`.

    Args:
        model: Student model.
        loss: Loss name or module.
        loss_kwargs: Loss (or, for timm's KD, task) arguments.
        teacher: Teacher name, module or ``DistillationTeacher``; None for offline training.
        **task_kwargs: Further task arguments (device, dtype, verbose, teacher_pretrained_path...).

    Returns:
        The task.
    """
    if teacher is None:
        return FerKDTask(model, loss, loss_kwargs=loss_kwargs, **task_kwargs)
    loss_kwargs = dict(loss_kwargs or {})
    if isinstance(loss, str) and loss.lower() == 'kd' and not loss_kwargs.get('probability_shift', False):
        loss_kwargs.pop('probability_shift', None)
        return LogitDistillationTask(student_model=model, teacher_model=teacher, **loss_kwargs, **task_kwargs)
    return OnlineDistillTask(model, teacher, loss=loss, loss_kwargs=loss_kwargs or None, **task_kwargs)
