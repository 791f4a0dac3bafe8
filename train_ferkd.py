#!/usr/bin/env python3
""" timm-ferkd training script: plain, online-KD and offline (FKD / FerKD) training of timm models.

A timm ``train.py``-style script: ``--soft-labels BANK`` distills offline from a soft-label bank (no
teacher runs), ``--kd-model-name NAME --kd-checkpoint FILE`` online with the teacher in the loop, and
neither trains plainly, as timm's ``train.py``.

One epoch decodes every training image once (with ``--num-crops K``: K crops each, K times the steps
of a plain epoch); offline, the LR schedule, warmup and EMA warmup advance per optimizer update.

Launch with ``torchrun --nproc_per_node=N train_ferkd.py ...`` for distributed training (multi-node with
torchrun's own ``--nnodes``/``--rdzv-*`` arguments); CPU runs use the gloo backend.
"""
import argparse
import inspect
import logging
import math
import os
import signal
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from datetime import datetime
from typing import Any, Dict, Optional, Tuple

import torch
import timm.data
import timm.loss
import torch.nn as nn
import yaml

from timm.data import create_loader, resolve_data_config, Mixup
from timm.models import create_model, get_pretrained_cfg, is_model, load_checkpoint, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask, evaluation_sample_limit, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import (
    AverageMeter, CheckpointSaver, NativeScaler, ParseKwargs, dispatch_clip_grad, get_outdir, init_distributed_device,
    random_seed, setup_default_logging, update_summary)

from timm_ferkd.bank.hub import HF_HUB_PREFIX, open_bank, pull_bank
from timm_ferkd.bank.identity import bank_fingerprint
from timm_ferkd.data.calibration import CalibrationConfig
from timm_ferkd.data.loader import create_region_loader
from timm_ferkd.data.mixing import create_selfmix
from timm_ferkd.data.source import stats_for_chans
from timm_ferkd.data.splits import parse_split
from timm_ferkd.errors import ConfigError, FerKDError
from timm_ferkd.losses import DISTILL_LOSS_CLASSES, DISTILL_LOSS_TYPES
from timm_ferkd.registration import register_with_timm
from timm_ferkd.task import FerKDTask, create_task

_logger = logging.getLogger('train_ferkd')

# The first parser reads only --config: a YAML file of defaults for the main parser (as timm's train.py)
config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file specifying default arguments')

parser = argparse.ArgumentParser(
    description='timm-ferkd training: plain, online KD, or offline FKD/FerKD from a soft-label bank. '
                'One epoch decodes every training image once; with --num-crops K that is K crops per image '
                '(the FKD reference counts it as K epochs).')

group = parser.add_argument_group('Dataset parameters')
group.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
group.add_argument('--dataset', '-d', metavar='NAME', default='',
                   help='dataset type + name ("<type>/<name>") (default: ImageFolder or ImageTar if empty)')
group.add_argument('--train-split', metavar='NAME', default='train',
                   help='dataset train split (default: train); NAME[START:STOP] takes a range of its images')
group.add_argument('--val-split', metavar='NAME', default='validation',
                   help='dataset validation split (default: validation); NAME[START:STOP] takes a range of its '
                        'images, e.g. train[55000:] to validate on training images held out from the bank')
group.add_argument('--dataset-download', action='store_true', default=False,
                   help='Allow download of dataset for torch/ datasets that support it.')
group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                   help='path to class to idx mapping file (default: "")')
group.add_argument('--train-subset', type=int, default=None, metavar='N',
                   help='train on the first N images only (offline runs use the images their bank covers)')
group.add_argument('--val-subset', type=int, default=None, metavar='N', help='validate on the first N images only')
group.add_argument('--val-interval', type=int, default=1, metavar='N',
                   help='validate (and write summary.csv and checkpoints) every N epochs and after the last '
                        '(default: 1)')

group = parser.add_argument_group('Model parameters')
group.add_argument('--model', default='resnet50', type=str, metavar='MODEL',
                   help='Name of model to train (default: "resnet50")')
group.add_argument('--pretrained', action='store_true', default=False,
                   help='Start with pretrained version of specified network (if avail)')
group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                   help='Load this checkpoint into model after initialization (default: none)')
group.add_argument('--resume', default='', type=str, metavar='PATH',
                   help='Resume full model and optimizer state from checkpoint (default: none)')
group.add_argument('--no-resume-opt', action='store_true', default=False,
                   help='prevent resume of optimizer state when resuming model')
group.add_argument('--num-classes', type=int, default=None, metavar='N',
                   help='number of label classes (Model default if None)')
group.add_argument('--in-chans', type=int, default=None, metavar='N',
                   help='Image input channels (default: None => 3, or the first value of --input-size)')
group.add_argument('--img-size', type=int, default=None, metavar='N',
                   help='Image size (default: None => model default)')
group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N',
                   help='Input all image dimensions (d h w, e.g. --input-size 3 224 224), uses model default if empty')
group.add_argument('--crop-pct', default=None, type=float, metavar='N',
                   help='Input image center crop percent (for validation only)')
group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                   help='Override mean pixel value of dataset')
group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                   help='Override std deviation of dataset')
group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                   help='Image resize interpolation type (overrides model)')
group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                   help='Input batch size for training, in crops: images x num-crops (default: 128)')
group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                   help='Validation batch size override (default: None)')
group.add_argument('--channels-last', action='store_true', default=False, help='Use channels_last memory layout')
group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='extra model arguments, e.g. --model-kwargs patch_size=4')
group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='Dropout rate (default: 0.)')
group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='Drop path rate (default: None)')

group = parser.add_argument_group('Device parameters')
group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str,
                   help='Device (accelerator) to use.')
group.add_argument('--amp', action='store_true', default=False,
                   help='use NVIDIA Apex AMP or Native AMP for mixed precision training')
group.add_argument('--amp-dtype', default='float16', type=str,
                   help='lower precision AMP dtype (default: float16)')
group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='Enable compilation w/ specified backend (default: inductor).')
group.add_argument('--dist-backend', default=None, type=str, help='torch.distributed backend (default: per device)')

group = parser.add_argument_group('Optimizer parameters')
group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='Optimizer (default: "sgd")')
group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='Optimizer Epsilon')
group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='Optimizer Betas')
group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='Optimizer momentum (default: 0.9)')
group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='Clip gradient norm')
group.add_argument('--clip-mode', type=str, default='norm', help='Gradient clipping mode ("norm", "value", "agc")')
group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay')

group = parser.add_argument_group('Learning rate schedule parameters')
group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER', help='LR scheduler (default: "cosine")')
group.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction, default=None,
                   help='Step the LR schedule (and warmup) per optimizer update instead of per epoch '
                        '(default: on with --soft-labels, whose epochs are num-crops times longer; off otherwise)')
group.add_argument('--lr', type=float, default=0.05, metavar='LR', help='learning rate (default: 0.05)')
group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warmup learning rate (default: 1e-5)')
group.add_argument('--min-lr', type=float, default=0, metavar='LR', help='lower lr bound for cyclic schedulers')
group.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs to train (default: 300)')
group.add_argument('--start-epoch', default=None, type=int, metavar='N', help='manual epoch number')
group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                   help='list of decay epoch indices for multistep lr. must be increasing')
group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
group.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='epochs to warmup LR (default: 5)')
group.add_argument('--warmup-prefix', action='store_true', default=False,
                   help='Exclude warmup period from decay schedule.')
group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='epochs to cooldown LR at min_lr')
group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate')

group = parser.add_argument_group('Augmentation and regularization parameters (plain and online KD)')
group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                   help='Random resize scale (default: 0.08 1.0); offline runs replay the bank\'s regions instead')
group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                   help='Random resize aspect ratio (default: 0.75 1.33)')
group.add_argument('--hflip', type=float, default=0.5, help='Horizontal flip training aug probability')
group.add_argument('--color-jitter', type=float, default=0.0, metavar='PCT',
                   help='Color jitter factor (default: 0; the only augmentation offline runs add to stored regions)')
group.add_argument('--smoothing', type=float, default=0.1, help='Label smoothing (default: 0.1, plain training)')
group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0. (default: 0.)')
group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, cutmix enabled if > 0. (default: 0.)')
group.add_argument('--mixup-prob', type=float, default=1.0,
                   help='Probability of performing mixup or cutmix when either/both is enabled')
group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                   help='Probability of switching to cutmix when both mixup and cutmix enabled')
group.add_argument('--mixup-mode', type=str, default='batch', help='Per "batch", "pair", or "elem"')
group.add_argument('--train-interpolation', type=str, default='random',
                   help='Training interpolation (random, bilinear, bicubic default: "random")')

group = parser.add_argument_group('Offline distillation (soft-label bank)')
group.add_argument('--soft-labels', default=None, metavar='PATH|hf-hub:ORG/NAME[@REV]',
                   help='soft-label bank made by `timm-ferkd generate`; enables offline distillation')
group.add_argument('--num-crops', type=int, default=4, metavar='K',
                   help='stored regions replayed per decoded image (default: 4); -b counts crops')
group.add_argument('--crop-layout', default='spread', choices=('spread', 'image'),
                   help='spread (default): the K crops of a decoded image go to K consecutive steps, so every '
                        'step holds -b different images; image: a step holds -b/K images x K crops (FKD reference)')
group.add_argument('--distill-loss', default='ferkd', choices=DISTILL_LOSS_TYPES,
                   help='objective on stored labels (default: ferkd = soft CE on calibrated labels)')
group.add_argument('--distill-temperature', type=float, default=None, metavar='T',
                   help='temperature of the distillation loss (default: the loss default)')
group.add_argument('--distill-task-weight', type=float, default=None, metavar='W',
                   help='weight of the ground-truth CE term of kd/dtd/fnkd (default: the loss default)')
group.add_argument('--dtd-beta', type=float, default=None, help='DTD temperature spread beta (default 1)')
group.add_argument('--dtd-gamma', type=float, default=None, help='DTD similarity exponent gamma (default 2)')
group.add_argument('--dtd-weighting', default=None, choices=('similarity', 'confidence'),
                   help='DTD sample weighting (default similarity)')
group.add_argument('--fnkd-tau', type=float, default=None, help='FNKD feature-norm temperature tau (default 2)')
group.add_argument('--fnkd-lambda2', type=float, default=None, help='FNKD weight lambda^2 (default 9)')
group.add_argument('--calib-low', type=float, default=0.0, metavar='T_L',
                   help='FerKD: discard regions whose max probability is below T_L (default 0: keep all)')
group.add_argument('--calib-mid', type=float, default=None, metavar='T_M',
                   help='FerKD: regions in [T_L, T_M) get the softened ground-truth label (default T_L: none)')
group.add_argument('--calib-top', type=float, default=1.0, metavar='T_T',
                   help='FerKD: discard regions whose max probability is above T_T (default 1: keep all)')
group.add_argument('--calib-quantile', action='store_true', default=False,
                   help='read --calib-low/mid/top as quantiles of the bank\'s max-probability distribution')
group.add_argument('--calib-eps', type=float, default=0.1, metavar='EPS',
                   help='smoothing of the calibrated hard label: 1 - EPS on the ground truth (default 0.1)')
group.add_argument('--prob-shift', action='store_true', default=False,
                   help='probability shift: swap the teacher\'s argmax value with the ground-truth value')
group.add_argument('--label-temperature', type=float, default=1.0, metavar='T',
                   help='re-temper stored labels: softmax(log q / T) (default 1: unchanged)')
group.add_argument('--selfmix', type=float, default=0.0, metavar='ALPHA',
                   help='SelfMix (mix crops of the same image) Mixup alpha; enabled if > 0')
group.add_argument('--selfmix-cutmix', type=float, default=0.0, metavar='ALPHA',
                   help='SelfMix CutMix alpha; enabled if > 0')
group.add_argument('--selfmix-prob', type=float, default=0.5, help='probability of SelfMix per batch (default 0.5)')
group.add_argument('--selfmix-switch-prob', type=float, default=0.5,
                   help='probability of CutMix instead of Mixup when both SelfMix alphas are set')
group.add_argument('--verify-bank', nargs='?', default='auto', const='full', choices=('auto', 'quick', 'full'),
                   help='bank check at start-up: full = every shard\'s sha256 and every label value (about 0.6 GB/s), '
                        'quick = headers and a sample of images (every image is also checked when first read); '
                        'auto (default) = full up to 2 GB of shards, else quick; the bare flag means full')
group.add_argument('--resume-other-bank', action='store_true', default=False,
                   help='allow --resume with a checkpoint trained on another soft-label bank')

group = parser.add_argument_group('Online distillation (teacher in the loop)')
group.add_argument('--kd-model-name', default=None, type=str, help='teacher model name; enables online KD')
group.add_argument('--kd-checkpoint', default=None, type=str, metavar='FILE', help='teacher weights')
group.add_argument('--kd-loss', default='kd', choices=('kd', 'fnkd', 'dtd'),
                   help='online objective: kd = timm LogitDistillationTask (default), fnkd, dtd')
group.add_argument('--kd-temperature', type=float, default=1.0, help='online KD temperature (default 1)')
group.add_argument('--kd-task-weight', type=float, default=None,
                   help='weight of the ground-truth CE term in online KD (default: timm\'s)')
group.add_argument('--kd-prob-shift', action='store_true', default=False,
                   help='apply the probability shift to the online teacher')

group = parser.add_argument_group('Model exponential moving average parameters')
group.add_argument('--model-ema', action='store_true', default=False, help='Enable tracking moving average of weights.')
group.add_argument('--model-ema-decay', type=float, default=0.9998, help='Decay factor for model weights EMA')
group.add_argument('--model-ema-warmup', action='store_true', help='Enable warmup for model EMA decay.')

group = parser.add_argument_group('Miscellaneous parameters')
group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
group.add_argument('--log-interval', type=int, default=50, metavar='N', help='batches between log lines')
group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N', help='number of checkpoints to keep')
group.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loading workers per process')
group.add_argument('--pin-mem', action='store_true', default=False, help='Pin CPU memory in DataLoader')
group.add_argument('--output', default='', type=str, metavar='PATH', help='path to output folder (default: ./output)')
group.add_argument('--experiment', default='', type=str, metavar='NAME', help='name of train experiment')
group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC', help='Best metric')
group.add_argument('--log-wandb', action='store_true', default=False, help='log training and validation to wandb')


def _parse_args(argv=None) -> Tuple[argparse.Namespace, str]:
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        with open(args_config.config, 'r') as f:
            parser.set_defaults(**yaml.safe_load(f))
    args = parser.parse_args(remaining)
    args_text = yaml.safe_dump(args.__dict__, default_flow_style=False)
    return args, args_text


def _check_args(args: argparse.Namespace) -> None:
    """Reject flag values that cannot work, before anything is created."""
    if args.data_dir is None:
        raise ConfigError('--data-dir is required')
    if not args.dataset.lower().startswith('hfds/') and not os.path.exists(args.data_dir):
        raise ConfigError(f'--data-dir {args.data_dir} does not exist')
    if args.batch_size < 1 or args.epochs < 1:
        raise ConfigError('-b/--batch-size and --epochs must be >= 1')
    for name in ('val_interval', 'num_crops', 'log_interval', 'checkpoint_hist'):
        if getattr(args, name) < 1:
            raise ConfigError(f'--{name.replace("_", "-")} {getattr(args, name)} must be >= 1')
    if args.soft_labels and args.crop_layout == 'image' and args.batch_size % args.num_crops:
        raise ConfigError(f'-b {args.batch_size} must be a multiple of --num-crops {args.num_crops} with '
                          f'--crop-layout image (a step holds images x crops)')
    if args.sched != 'none' and args.warmup_epochs > 0 and args.warmup_epochs >= args.epochs:
        raise ConfigError(f'--warmup-epochs {args.warmup_epochs} >= --epochs {args.epochs}: the LR would never '
                          f'leave warmup; set --warmup-epochs below --epochs (0 disables warmup)')
    if args.sched_on_updates is None:
        args.sched_on_updates = bool(args.soft_labels)
    if args.soft_labels and args.kd_model_name:
        raise ConfigError('choose offline (--soft-labels) or online (--kd-model-name) distillation, not both')
    for flag, path in (('--kd-checkpoint', args.kd_model_name and args.kd_checkpoint), ('--resume', args.resume),
                       ('--initial-checkpoint', args.initial_checkpoint)):
        if path and not os.path.isfile(path):
            raise ConfigError(f'{flag} {path} does not exist')
    for name in ('distill_temperature', 'kd_temperature', 'label_temperature'):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f'--{name.replace("_", "-")} {value} must be a finite number > 0')
    for name in ('lr', 'warmup_lr', 'min_lr', 'weight_decay'):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f'--{name.replace("_", "-")} {value} must be a finite number >= 0')
    if args.workers < 0:
        raise ConfigError(f'-j/--workers {args.workers} must be >= 0')
    if not 0 <= args.seed < 1 << 31:
        raise ConfigError(f'--seed {args.seed} must lie in [0, 2**31)')
    if (args.input_size is not None and min(args.input_size) < 1) or (args.img_size is not None and args.img_size < 1):
        raise ConfigError('--input-size and --img-size must be positive')
    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError):
        raise ConfigError(f'unknown --device {args.device!r}; use cpu, cuda or cuda:N') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'--device {args.device}: CUDA is not available here; use --device cpu')


def _create_model(args: argparse.Namespace) -> nn.Module:
    if args.in_chans is None:
        args.in_chans = args.input_size[0] if args.input_size is not None else 3
    size = args.input_size[1:] if args.input_size is not None else (
        (args.img_size, args.img_size) if args.img_size else None)
    factory_kwargs: Dict[str, Any] = dict(args.model_kwargs)
    if args.drop_path is not None:
        factory_kwargs['drop_path_rate'] = args.drop_path
    try:
        cfg = get_pretrained_cfg(args.model)
        fixed_size = bool(cfg and cfg.fixed_input_size)
    except (RuntimeError, ValueError):
        fixed_size = False
    if size is not None and fixed_size and 'img_size' not in factory_kwargs:
        # ViTs build their position embedding for one input size: build it for ours
        factory_kwargs['img_size'] = tuple(size)
    if ':' not in args.model and not is_model(args.model):  # 'hf-hub:...' and 'local-dir:...' go to timm
        raise ConfigError(f'unknown --model {args.model!r}; list names with timm.list_models()')
    model = create_model(
        args.model, pretrained=args.pretrained, in_chans=args.in_chans, num_classes=args.num_classes,
        drop_rate=args.drop, **factory_kwargs)
    patch = getattr(getattr(model, 'patch_embed', None), 'patch_size', None)
    if patch is not None and size is not None:
        if size[0] % patch[0] or size[1] % patch[1]:
            raise ConfigError(f'input size {tuple(size)} is not a multiple of {args.model}\'s patch size '
                              f'{tuple(patch)}; change --input-size or pass --model-kwargs patch_size=P')
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.initial_checkpoint:
        try:
            load_checkpoint(model, args.initial_checkpoint)
        except (RuntimeError, KeyError) as e:
            raise ConfigError(f'--initial-checkpoint {args.initial_checkpoint} does not fit {args.model}: '
                              f'{str(e).splitlines()[0]}') from None
    return model


def _data_config(args: argparse.Namespace, model: nn.Module) -> Dict[str, Any]:
    data_config = resolve_data_config(vars(args), model=model)
    # a pretrained cfg's input size and statistics come with its channels, not necessarily the model's
    data_config['input_size'] = (args.in_chans,) + tuple(data_config['input_size'][1:])
    for key in ('mean', 'std'):
        data_config[key] = stats_for_chans(data_config[key], args.in_chans)
    return data_config


# banks up to this size are checked in full at start-up by default (about 3 s at 0.6 GB/s)
_FULL_CHECK_BYTES = 2 * 10 ** 9


def _open_bank(args: argparse.Namespace):
    name = args.soft_labels
    if name.startswith(HF_HUB_PREFIX):
        pulled = pull_bank(name)
        # record the exact commit so the run can be reproduced from args.yaml
        args.soft_labels_commit = pulled.commit
        name = str(pulled.path)
    bank = open_bank(name)
    size = bank.bytes_on_disk()
    full = args.verify_bank == 'full' or (args.verify_bank == 'auto' and size <= _FULL_CHECK_BYTES)
    start = time.perf_counter()
    bank.validate(full=full)  # the full check includes the quick one
    if full:
        _logger.info(f'bank {bank.path}: checksums and label values OK ({time.perf_counter() - start:.1f}s)')
    elif args.rank == 0:
        _logger.info(f'bank {bank.path} ({size / 1e9:.1f} GB): headers and a sample of images checked; '
                     f'--verify-bank full (or `timm-ferkd verify`) checks every shard\'s sha256 and value')
    # saved with args in every checkpoint: a resume with another bank is noticed
    args.soft_labels_fingerprint = bank_fingerprint(bank.manifest)
    return bank


def _load_state(path: str, **kwargs) -> Any:
    """A timm checkpoint, unpickling nothing but its ``args`` Namespace."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True, **kwargs)


def _check_resume_bank(args: argparse.Namespace) -> None:
    """Refuse to continue a run with another bank than the one its checkpoint was trained on."""
    try:
        state = _load_state(args.resume, mmap=True)
    except Exception:  # a checkpoint whose args cannot be read records no bank
        return
    saved_args = state.get('args') if isinstance(state, dict) else None
    saved = getattr(saved_args, 'soft_labels_fingerprint', None)
    current = getattr(args, 'soft_labels_fingerprint', None)
    if saved is not None and saved != current and not args.resume_other_bank:
        now = f'--soft-labels {args.soft_labels}' if args.soft_labels else 'no --soft-labels'
        raise ConfigError(
            f'--resume {args.resume} was trained on the soft-label bank {getattr(saved_args, "soft_labels", "?")} '
            f'({saved[:19]}...), not on {now}: resume with the same bank, or pass --resume-other-bank to continue '
            f'on this one on purpose')


class _ImageRange(torch.utils.data.Subset):
    """A ``Subset`` whose ``transform`` passes through to the dataset, so timm's loaders can set it."""

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value


def _image_dataset(args: argparse.Namespace, flag: str, split: str, first: Optional[int], is_training: bool):
    """The timm dataset of ``split`` (``NAME[START:STOP]`` taking a range of it), then its first ``first`` images."""
    split, split_range = parse_split(split, args.dataset, args.data_dir, flag)
    try:
        dataset = timm.data.create_dataset(
            args.dataset, root=args.data_dir, split=split, is_training=is_training, class_map=args.class_map,
            download=args.dataset_download, seed=args.seed, input_img_mode='L' if args.in_chans == 1 else 'RGB')
    except (AssertionError, RuntimeError, FileNotFoundError) as e:
        raise ConfigError(f'cannot open {flag} {split!r} of --dataset {args.dataset!r} in {args.data_dir}: {e}') from None
    start, stop = 0, len(dataset)
    if split_range is not None:
        start, stop, _ = split_range.indices(len(dataset))
        if stop <= start:
            raise ConfigError(f'{flag} selects no images: the split has {len(dataset)}')
    if first is not None:
        stop = min(stop, start + first)
    return dataset if (start, stop) == (0, len(dataset)) else _ImageRange(dataset, range(start, stop))


class _Stop:
    """Turns SIGTERM into a flag checked between steps, so a recovery checkpoint can be written."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def main(argv=None) -> int:
    setup_default_logging()
    register_with_timm()  # timm's create_dataset now builds 'ferkd/...' region datasets and 'ferkd-cluttered/...'
    args, args_text = _parse_args(argv)
    try:
        return _train(args, args_text)
    except FerKDError as e:
        print(f'train_ferkd.py: error: {e}', file=sys.stderr)
        return 2


def _train(args: argparse.Namespace, args_text: str) -> int:
    _check_args(args)
    if args.device == 'cpu' and args.dist_backend is None:
        args.dist_backend = 'gloo'
    device = init_distributed_device(args)
    primary = args.rank == 0
    if args.distributed:
        _logger.info(f'Training in distributed mode with {args.world_size} processes, rank {args.rank}, {device}.')
    random_seed(args.seed, args.rank)

    model = _create_model(args)
    data_config = _data_config(args, model)
    mode = 'offline' if args.soft_labels else ('online' if args.kd_model_name else 'plain')

    bank = None
    if mode == 'offline':
        bank = _open_bank(args)  # the dataset checks the bank's classes against the model's
        if args.num_crops > bank.regions_per_image:
            raise ConfigError(f'--num-crops {args.num_crops} exceeds the bank\'s {bank.regions_per_image} '
                              f'regions per image')
    loader_train, mixup_fn = _create_train_loader(args, data_config, device, bank)
    loader_eval = _create_eval_loader(args, data_config, device)

    task = _create_task(args, model, mode, device)
    task.to(device)
    if args.channels_last:
        task.to(memory_format=torch.channels_last)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup, device=device)
    optimizer = create_optimizer_v2(task.get_trainable_module(), **optimizer_kwargs(cfg=args))

    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if args.amp else nullcontext
    loss_scaler = NativeScaler(device=device.type) if args.amp and amp_dtype == torch.float16 else None

    resume_epoch = None
    if args.resume:
        try:
            resume_epoch = resume_task_checkpoint(
                task, args.resume, optimizer=None if args.no_resume_opt else optimizer,
                loss_scaler=loss_scaler, log_info=primary)
            if task.has_ema():
                load_task_ema_checkpoint(task, args.resume)
        except Exception as e:  # corrupt or foreign files fail in many ways (pickle, keys, shapes)
            raise ConfigError(f'cannot resume from {args.resume}: {str(e).splitlines()[0][:200]} '
                              f'(use a last.pth.tar / recovery checkpoint of the same --model)') from None
        _check_resume_bank(args)

    if args.torchcompile:
        task.compile(backend=args.torchcompile)
    if args.distributed:
        task.prepare_distributed(device_ids=[args.local_rank] if device.type == 'cuda' else None)

    updates_per_epoch = len(loader_train)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch)
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    saver = None
    output_dir = None
    eval_metric = args.eval_metric
    if primary:
        exp_name = args.experiment or '-'.join([
            datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), mode])
        output_dir = get_outdir(args.output if args.output else './output/train', exp_name)
        saver = CheckpointSaver(
            model=task.get_trainable_module(), optimizer=optimizer, args=args, amp_scaler=loss_scaler,
            checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=eval_metric == 'loss',
            max_history=args.checkpoint_hist, task=task)
        if args.resume and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(output_dir):
            saver.load_state_dict_from_checkpoint(args.resume)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            f.write(yaml.safe_dump(vars(args), default_flow_style=False) if hasattr(args, 'soft_labels_commit')
                    else args_text)
        if args.log_wandb:
            try:
                import wandb
                wandb.init(project='timm-ferkd', name=exp_name, config=vars(args))
            except ImportError:
                _logger.warning('--log-wandb needs wandb: pip install "timm-ferkd[wandb]"; continuing without it')
                args.log_wandb = False
        images = len(loader_train.dataset)
        crops = args.num_crops if mode == 'offline' else 1
        _logger.info(
            f'{mode} training of {args.model} for {num_epochs} epochs. One epoch = {images} images decoded '
            f'once x {crops} crop(s) = {images * crops} crops, {updates_per_epoch} steps of {args.batch_size} crops '
            f'on each of {args.world_size} process(es). Output: {output_dir}')

    stop = _Stop()
    best_metric = None
    for epoch in range(start_epoch, num_epochs):
        if hasattr(loader_train.sampler, 'set_epoch'):  # timm's idiom; a region loader's selects the regions too
            loader_train.sampler.set_epoch(epoch)
        train_metrics = _train_one_epoch(
            epoch, task, loader_train, optimizer, args, device, autocast, loss_scaler, lr_scheduler,
            mixup_fn, stop, saver, updates_per_epoch)
        if stop.requested:
            return 143
        if (epoch + 1) % args.val_interval and epoch + 1 < num_epochs:
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1)
            continue
        eval_metrics = _validate(task, task.get_eval_model(), loader_eval, args, autocast)
        if task.has_ema():
            ema_metrics = _validate(task, task.get_eval_model(ema=True), loader_eval, args, autocast)
            eval_metrics.update({f'ema_{k}': v for k, v in ema_metrics.items()})
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, eval_metrics[eval_metric])
        if primary:
            lrs = [g['lr'] for g in optimizer.param_groups]
            update_summary(epoch, train_metrics, eval_metrics, filename=os.path.join(output_dir, 'summary.csv'),
                           lr=sum(lrs) / len(lrs), write_header=not os.path.exists(os.path.join(output_dir, 'summary.csv')),
                           log_wandb=args.log_wandb)
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=eval_metrics[eval_metric])
            _logger.info(f'epoch {epoch}: train loss {train_metrics["loss"]:.4f}, val top1 {eval_metrics["top1"]:.2f} '
                         f'(best {best_metric:.2f} at epoch {best_epoch})')
    if primary and best_metric is not None:
        _logger.info(f'*** Best metric: {best_metric:.4f} (epoch {best_epoch}); checkpoints in {output_dir}')
    if args.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def _create_train_loader(args, data_config, device, bank):
    interpolation = data_config['interpolation']
    if bank is not None:
        if parse_split(args.train_split, args.dataset, args.data_dir, '--train-split')[1] is not None:
            raise ConfigError(f'--train-split {args.train_split}: offline training uses the images its bank labels '
                              f'(generate --num-images N for the first N); pass the bank\'s split name')
        calibration = CalibrationConfig(
            low=args.calib_low, mid=args.calib_mid, top=args.calib_top, quantile=args.calib_quantile,
            eps=args.calib_eps)
        # the one construction path: timm's factory, which register_with_timm() taught the 'ferkd/' names
        dataset = timm.data.create_dataset(
            'ferkd/' + args.dataset, root=args.data_dir, split=args.train_split, soft_labels=bank, num_crops=args.num_crops,
            input_size=data_config['input_size'], interpolation=interpolation, in_chans=args.in_chans,
            calibration=calibration, prob_shift=args.prob_shift, label_temperature=args.label_temperature,
            color_jitter=args.color_jitter, seed=args.seed, num_classes=args.num_classes,
            download=args.dataset_download, **({'class_map': args.class_map} if args.class_map else {}))
        selfmix = create_selfmix(
            mixup_alpha=args.selfmix, cutmix_alpha=args.selfmix_cutmix, prob=args.selfmix_prob,
            switch_prob=args.selfmix_switch_prob, num_crops=args.num_crops, seed=args.seed, rank=args.rank)
        loader = create_region_loader(
            dataset, batch_size=args.batch_size, is_training=True, num_workers=args.workers,
            distributed=args.distributed, pin_memory=args.pin_mem, device=device,
            mean=data_config['mean'], std=data_config['std'], selfmix=selfmix, seed=args.seed,
            crop_layout=args.crop_layout)
        return loader, None
    dataset = _image_dataset(args, '--train-split', args.train_split, args.train_subset, is_training=True)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.num_classes)
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=False, scale=args.scale, ratio=args.ratio, hflip=args.hflip, color_jitter=args.color_jitter or None,
        interpolation=args.train_interpolation or interpolation, mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, distributed=args.distributed, pin_memory=args.pin_mem, device=device,
        use_prefetcher=True)
    return loader, mixup_fn


def _create_eval_loader(args, data_config, device):
    dataset = _image_dataset(args, '--val-split', args.val_split, args.val_subset, is_training=False)
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        crop_pct=data_config['crop_pct'], pin_memory=args.pin_mem, device=device, use_prefetcher=True)


# (flag, loss keyword): a loss gets the flags that are set and that its constructor takes
_DISTILL_FLAGS = (('distill_temperature', 'temperature'), ('distill_task_weight', 'task_loss_weight'),
                  ('dtd_beta', 'beta'), ('dtd_gamma', 'gamma'), ('dtd_weighting', 'weighting'),
                  ('fnkd_tau', 'tau'), ('fnkd_lambda2', 'lambda2'))
_ONLINE_FLAGS = (('kd_temperature', 'temperature'), ('kd_task_weight', 'task_loss_weight'),
                 ('kd_prob_shift', 'probability_shift'), ('fnkd_tau', 'tau'), ('fnkd_lambda2', 'lambda2'))


def _loss_kwargs(args, name: str, flags) -> Dict[str, Any]:
    accepted = inspect.signature(DISTILL_LOSS_CLASSES[name]).parameters
    values = ((key, getattr(args, flag)) for flag, key in flags if key in accepted)
    return {key: value for key, value in values if value is not None and value is not False}


def _create_task(args, model, mode, device):
    """Every criterion comes from timm's ``create_classification_loss`` (register_with_timm() taught it ours)."""
    verbose = args.rank == 0
    if mode == 'plain':
        return ClassificationTask(model, criterion_kwargs=dict(
            smoothing=args.smoothing, soft_targets=args.mixup > 0 or args.cutmix > 0), device=device, verbose=verbose)
    if mode == 'offline':
        criterion = timm.loss.create_classification_loss(
            loss_type=args.distill_loss, **_loss_kwargs(args, args.distill_loss, _DISTILL_FLAGS))
        return FerKDTask(model, loss=criterion, device=device, verbose=verbose)
    teacher = _create_teacher(args, model)
    loss_kwargs = _loss_kwargs(args, args.kd_loss, _ONLINE_FLAGS)
    if args.kd_loss == 'kd' and not loss_kwargs.get('probability_shift'):
        return create_task(model, loss='kd', loss_kwargs=loss_kwargs, teacher=teacher, device=device, verbose=verbose)
    criterion = timm.loss.create_classification_loss(loss_type=args.kd_loss, online=True, **loss_kwargs)
    return create_task(model, loss=criterion, teacher=teacher, device=device, verbose=verbose)


def _create_teacher(args, student: nn.Module) -> nn.Module:
    """The online teacher, with the student's classes and input channels, loaded from --kd-checkpoint."""
    if ':' not in args.kd_model_name and not is_model(args.kd_model_name):
        raise ConfigError(f'unknown --kd-model-name {args.kd_model_name!r}; list names with timm.list_models()')
    try:
        teacher = create_model(args.kd_model_name, pretrained=args.kd_checkpoint is None,
                               num_classes=student.num_classes, in_chans=args.in_chans)
    except RuntimeError as e:
        raise ConfigError(f'cannot create teacher {args.kd_model_name}: {str(e).splitlines()[0][:200]}') from None
    if args.kd_checkpoint:
        try:
            load_checkpoint(teacher, args.kd_checkpoint)
        except Exception as e:  # a foreign or corrupt file fails in many ways (pickle, keys, shapes)
            raise ConfigError(
                f'--kd-checkpoint {args.kd_checkpoint} is not a checkpoint of {args.kd_model_name} with '
                f'{student.num_classes} classes and {args.in_chans} input channels '
                f'({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else "unreadable"})') from None
    return teacher


def _train_one_epoch(epoch, task, loader, optimizer, args, device, autocast, loss_scaler, lr_scheduler,
                     mixup_fn, stop: _Stop, saver: Optional[CheckpointSaver], updates_per_epoch: int):
    task.train()
    # running sums stay on the device: reading them (a host sync) happens only when logging
    sums: Dict[str, torch.Tensor] = OrderedDict()
    seen = 0
    batch_time = AverageMeter()
    num_updates = epoch * updates_per_epoch
    end = time.time()
    last_idx = len(loader) - 1
    for batch_idx, (input, target) in enumerate(loader):
        if batch_idx == 0:
            # model randomness (dropout, drop-path) depends only on (seed, epoch, rank), so a resumed run
            # replays it; seeded after the loader started since starting workers draws from this RNG
            torch.manual_seed(args.seed + 1_000_003 * epoch + args.rank)
        if not isinstance(target, dict):
            input, target = input.to(device), target.to(device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with autocast():
            result = task(input, target)
        loss = result['loss']
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                        parameters=task.get_clip_parameters())
        else:
            loss.backward()
            if args.clip_grad is not None:
                dispatch_clip_grad(task.get_clip_parameters(), value=args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        task.update_ema(step=num_updates)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)

        n = input.shape[0]
        seen += n
        for key, value in result.items():
            if key != 'output' and torch.is_tensor(value) and value.numel() == 1:
                sums[key] = sums.get(key, 0) + value.detach().float() * n
        batch_time.update(time.time() - end)
        end = time.time()
        if batch_idx % args.log_interval == 0 or batch_idx == last_idx or stop.requested:
            means = {k: v.item() / seen for k, v in sums.items()}
            if not math.isfinite(means['loss']):
                raise FerKDError(f'the loss became {means["loss"]} in epoch {epoch} (by step {batch_idx}): '
                                 f'lower --lr, set --clip-grad or disable --amp')
            if args.rank == 0:
                lr = optimizer.param_groups[0]['lr']
                parts = '  '.join(f'{k} {v:.4f}' for k, v in means.items())
                _logger.info(f'train epoch {epoch} [{batch_idx + 1:>4d}/{len(loader)}]  {parts}  '
                             f'lr {lr:.3e}  {n * args.world_size / max(batch_time.val, 1e-9):.0f} crops/s')
        if stop.requested:
            if saver is not None:
                _save_recovery(saver, epoch, batch_idx)
            break
    return {k: v.item() / max(seen, 1) for k, v in sums.items()}


def _save_recovery(saver: CheckpointSaver, epoch: int, batch_idx: int) -> None:
    """Write a recovery checkpoint that ``--resume`` restarts at the beginning of the interrupted epoch."""
    saver.save_recovery(epoch, batch_idx=batch_idx)
    path = saver.curr_recovery_file
    state = _load_state(path)
    # timm resumes at checkpoint epoch + 1; the interrupted epoch is incomplete, so redo it
    state['epoch'] = epoch - 1
    tmp = path + '.tmp'
    torch.save(state, tmp)
    os.replace(tmp, path)
    _logger.info(f'SIGTERM: saved recovery checkpoint {path}; --resume it to restart epoch {epoch}')


@torch.no_grad()
def _validate(task, model, loader, args, autocast) -> Dict[str, float]:
    """Loss, top-1 and top-5 through the task's timm evaluator (padded distributed samples not counted)."""
    model.eval()
    evaluator = task.create_evaluator(max_samples=evaluation_sample_limit(loader))
    for input, target in loader:
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with autocast():
            output = model(input)
        evaluator.update(output, target)
    return evaluator.compute(distributed=args.distributed)


if __name__ == '__main__':
    sys.exit(main())
