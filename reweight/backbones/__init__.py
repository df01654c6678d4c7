r"""timm backbones: creation, BN-safe freezing, optimizer hygiene and the one training loop.

============================================  ====================================================
:mod:`~reweight.backbones.create`             timm creation by name, checkpoint checks, the
                                              model's own data config and transform
:mod:`~reweight.backbones.freeze`             selectors, ``set_trainable`` (frozen BatchNorm ->
                                              ``FrozenBatchNorm2d``), freeze reports and checks
:mod:`~reweight.backbones.optim`              parameter groups with lr multipliers, optimizers,
                                              schedulers
:mod:`~reweight.backbones.train`              ``configure_stage`` and ``train_stage``, THE training
                                              loop; the warm-up is a one-stage schedule through it
============================================  ====================================================

timm is imported only inside this package, and only inside functions, so ``import reweight`` (and
``import reweight.backbones``) stays light. Every public name is re-exported here:
``from reweight.backbones import create_backbone, set_trainable, train_stage`` works.

References:
    Wightman, "PyTorch Image Models (timm)", https://github.com/huggingface/pytorch-image-models, 2019.
"""

from __future__ import annotations

from .create import (
                     backbone_data_config,
                     backbone_transform,
                     check_checkpoint,
                     check_model_name,
                     create_backbone,
                     model_data_config,
                     model_in_chans,
                     model_transform,
)
from .freeze import (
                     FreezeError,
                     FreezeReport,
                     block_groups,
                     canonicalize_bn,
                     check_no_frozen_grads,
                     freeze,
                     freeze_all,
                     freeze_all_but_last,
                     freeze_report,
                     frozen_bn_names,
                     head_parameter_names,
                     resolve_selectors,
                     restore_freeze_state,
                     set_trainable,
                     trainable_names,
                     unfreeze,
)
from .optim import build_optimizer, build_scheduler, param_groups, zero_mult_names
from .train import StageResult, StageSetup, configure_stage, model_accuracy, train_stage, warmup, weighted_ce

# The former private name that reweight.imagefolder still imports (now public as model_in_chans).
_in_chans = model_in_chans

__all__ = [
    "FreezeError",
    "FreezeReport",
    "StageResult",
    "StageSetup",
    "backbone_data_config",
    "backbone_transform",
    "block_groups",
    "build_optimizer",
    "build_scheduler",
    "canonicalize_bn",
    "check_checkpoint",
    "check_model_name",
    "check_no_frozen_grads",
    "configure_stage",
    "create_backbone",
    "freeze",
    "freeze_all",
    "freeze_all_but_last",
    "freeze_report",
    "frozen_bn_names",
    "head_parameter_names",
    "model_accuracy",
    "model_data_config",
    "model_in_chans",
    "model_transform",
    "param_groups",
    "resolve_selectors",
    "restore_freeze_state",
    "set_trainable",
    "train_stage",
    "trainable_names",
    "unfreeze",
    "warmup",
    "weighted_ce",
    "zero_mult_names",
]
