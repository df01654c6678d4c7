r"""The one training loop of a backbone: a stage of a schedule (the warm-up is a one-stage schedule).

A stage (:class:`reweight.config.StageConfig`) names its trainable set, optimizer, lr schedule, loss
and early-stopping rule. :func:`configure_stage` freezes the model for it (BN-safe, see
:mod:`reweight.backbones.freeze`) and builds a **fresh** optimizer and scheduler;
:func:`train_stage` runs its epochs. Epoch :math:`e`:

1. optional per-sample weights :math:`\alpha` for the epoch (``sample_weights``; the staged runner's
   reweighted stages learn them with the bilevel engine);
2. a random permutation of the training set drawn from ``generator``, then minibatch steps on

   .. math::
       L_B(\theta) = \frac1B\sum_{i\in B}\alpha_i\,\ell(f_\theta(x_i), y_i)
                     + \frac{\lambda_h}{2}\|\theta_{head}\|^2,

   with :math:`\ell` the cross-entropy, :math:`\alpha_i = 1` without weights (then the plain mean
   cross-entropy, ``F.cross_entropy``) and :math:`\lambda_h` = ``stage.head_l2``;
3. one scheduler step, then validation (and, if given, test) accuracy;
4. early stopping: with ``stage.patience`` set, the stage stops after ``patience`` epochs without a
   new best validation accuracy, never before ``stage.min_epochs`` epochs.

With ``stage.restore_best`` the weights of the best validation epoch are restored at the end.

The core engine's warm-up, :func:`warmup`, runs :meth:`reweight.config.BackboneConfig.warmup_stage`
through this loop with the random streams it has always used (``torch_generator(seed, "warmup")``
for the permutations, the global torch seed drawn from it), so its weights are bit-identical to
those of the former dedicated warm-up loop.

References:
    Prechelt, "Early Stopping -- But When?", Neural Networks: Tricks of the Trade, 1998.
    Howard & Ruder, "Universal Language Model Fine-tuning for Text Classification", ACL 2018.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import BackboneConfig, StageConfig
from ..errors import ConfigError
from ..seeding import torch_generator
from .freeze import FreezeReport, canonicalize_bn, check_no_frozen_grads, head_parameter_names, set_trainable
from .optim import build_optimizer, build_scheduler, param_groups, zero_mult_names

__all__ = [
    "StageResult",
    "StageSetup",
    "configure_stage",
    "model_accuracy",
    "train_stage",
    "warmup",
    "weighted_ce",
]

log = logging.getLogger(__name__)

Split = Tuple[Union[torch.Tensor, np.ndarray], Union[torch.Tensor, np.ndarray]]
"""``(images (N, C, H, W), labels (N,))`` of one split."""

WeightsFn = Callable[[int], Tuple[Optional[torch.Tensor], Dict[str, Any]]]
"""Called at the start of every epoch with the epoch index; returns the epoch's per-sample weights
``(n_train,)`` (None = uniform) and extra fields for the epoch's history row."""


@dataclass
class StageSetup:
    """What :func:`configure_stage` built: freeze report, parameter groups, optimizer, scheduler."""

    report: FreezeReport
    groups: List[Dict[str, Any]]
    optimizer: torch.optim.Optimizer
    scheduler: Any


@dataclass
class StageResult:
    """What :func:`train_stage` did.

    ``history`` holds one row per epoch run: ``epoch``, ``lr`` (per group, at the epoch's start),
    the fields returned by ``sample_weights``, ``train_loss`` (sample mean of the batch losses),
    ``val_acc``, ``test_acc`` (when a test split was given) and ``seconds``.
    """

    history: List[Dict[str, Any]]
    best_epoch: Optional[int]
    best_val_acc: float
    stopped_early: bool
    setup: StageSetup


def configure_stage(model: torch.nn.Module, stage: StageConfig) -> StageSetup:
    """Freeze/unfreeze ``model`` for ``stage`` and build a **fresh** optimizer and scheduler.

    Trainable = ``trainable`` minus ``frozen`` minus parameters whose lr multiplier is 0; frozen
    BatchNorm layers follow ``stage.bn`` (see :func:`reweight.backbones.set_trainable`). Group ``g``
    gets lr ``stage.lr * mult_g``. Every gradient is cleared, and the optimizer is checked to hold
    exactly the trainable parameters.

    Raises:
        ConfigError: for a selector matching nothing or a stage that leaves nothing trainable.
        FreezeError: if the optimizer does not hold exactly the trainable parameters (a bug).
    """
    canonicalize_bn(model)
    zero = zero_mult_names(model, stage.lr_mult)
    try:
        report = set_trainable(model, stage.trainable, stage.frozen, bn=stage.bn, exclude=zero)
    except ConfigError as e:
        raise ConfigError(f"Stage {stage.name!r}: {e}") from None
    groups = param_groups(model, stage.lr, stage.lr_mult, stage.weight_decay, stage.decay_norm_bias)
    opt = build_optimizer(groups, stage.optimizer, stage.momentum)
    sched = build_scheduler(opt, stage.schedule, stage.epochs)
    for p in model.parameters():
        p.grad = None  # gradients of the previous stage must not leak into this one
    check_no_frozen_grads(model, opt)
    log.info("Stage %r: %d trainable / %d frozen parameters\n%s", stage.name, report.trainable, report.frozen,
             report.format())
    return StageSetup(report=report, groups=groups, optimizer=opt, scheduler=sched)


def weighted_ce(logits: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Batch loss :math:`\frac1B\sum_i w_i\,\ell(z_i, y_i)`; the plain mean cross-entropy when ``w`` is None.

    Without weights this is ``F.cross_entropy(logits, y)`` itself (mean reduction), not the mean of
    the per-sample losses: the two can differ in the last bit, and the warm-up's numbers depend on it.

    Args:
        logits: ``(B, K)``.
        y: ``(B,)`` labels.
        w: ``(B,)`` non-negative weights (the ``alpha`` of the batch's samples) or None.
    """
    if w is None:
        return torch.nn.functional.cross_entropy(logits, y)
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    return (w.to(ce.dtype) * ce).mean()


@torch.no_grad()
def model_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                   device: str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on images ``x`` ``(N, C, H, W)`` and labels ``y`` ``(N,)``, in eval mode
    and batches of ``batch_size`` (the model's train/eval mode is restored)."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i:i + batch_size].to(device)).argmax(1).cpu() == y[i:i + batch_size]).sum())
    model.train(was)
    return correct / max(1, x.shape[0])


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"The '{name}' parameter of train_stage must be an int >= 1. Got {value!r} instead.")


def train_stage(model: torch.nn.Module, stage: StageConfig, train: Split, val: Split, *,
                batch_size: int, eval_batch_size: int, generator: torch.Generator,
                test: Optional[Split] = None, device: str = "cpu", setup: Optional[StageSetup] = None,
                sample_weights: Union[None, torch.Tensor, WeightsFn] = None,
                on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None,
                progress: bool = False) -> StageResult:
    """Train ``model`` for one stage (see the module docstring for the loop and its loss).

    Args:
        model: a timm model (its classifier included).
        stage: what trains, how, for how many epochs, with which early-stopping rule.
        train, val: ``(images, labels)`` of the training split and the clean validation split
            (validation accuracy drives early stopping and ``restore_best``).
        batch_size: training batch size.
        eval_batch_size: batch size of the accuracy evaluations.
        generator: draws each epoch's permutation of the training set (its state advances).
        test: ``(images, labels)`` of a test split, reported per epoch (``test_acc``), or None.
        device: where batches are moved (the model must already be there).
        setup: :func:`configure_stage` of ``stage`` when the caller built it already (e.g. to log
            the freeze report first); built here otherwise.
        sample_weights: per-sample weights ``(n_train,)`` for every epoch, a :data:`WeightsFn` called
            at the start of every epoch, or None (plain cross-entropy).
        on_epoch: called with each epoch's history row, after its evaluation.
        progress: a tqdm bar over epochs.

    Returns:
        :class:`StageResult`; the model holds the final (or, with ``restore_best``, the best) weights.

    Raises:
        ConfigError: for a bad batch size, weights of the wrong shape, or a bad stage (see
            :func:`configure_stage`).
    """
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(eval_batch_size, "eval_batch_size")
    xt, yt = torch.as_tensor(train[0]), torch.as_tensor(train[1])
    xv, yv = torch.as_tensor(val[0]), torch.as_tensor(val[1])
    n = xt.shape[0]
    setup = setup if setup is not None else configure_stage(model, stage)
    opt, sched = setup.optimizer, setup.scheduler
    head_params: List[torch.nn.Parameter] = []
    if stage.head_l2 > 0:
        head = set(head_parameter_names(model))
        head_params = [p for name, p in model.named_parameters() if name in head and p.requires_grad]
    history: List[Dict[str, Any]] = []
    best_acc, best_epoch, best_state, bad, stopped = -1.0, None, None, 0, False
    for epoch in tqdm(range(stage.epochs), desc=f"stage {stage.name}", disable=not progress):
        t0 = time.perf_counter()
        row: Dict[str, Any] = {"epoch": epoch, "lr": [g["lr"] for g in opt.param_groups]}
        weights = sample_weights
        if callable(sample_weights):
            weights, extra = sample_weights(epoch)
            row.update(extra)
        if weights is not None and tuple(weights.shape) != (n,):
            raise ConfigError(f"The sample weights of stage {stage.name!r} must have shape ({n},). "
                              f"Got {tuple(weights.shape)} instead.")
        model.train()
        perm = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            w = weights[idx].to(device) if weights is not None else None
            loss = weighted_ce(model(xt[idx].to(device)), yt[idx].to(device), w)
            if head_params:
                loss = loss + 0.5 * stage.head_l2 * sum((p * p).sum() for p in head_params)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            check_no_frozen_grads(model)
            opt.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
        sched.step()
        row["train_loss"] = total / max(count, 1)
        row["val_acc"] = model_accuracy(model, xv, yv, eval_batch_size, device)
        if test is not None:
            row["test_acc"] = model_accuracy(model, torch.as_tensor(test[0]), torch.as_tensor(test[1]),
                                             eval_batch_size, device)
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        log.info("stage %s epoch %d: train loss %.4f, val acc %.4f%s", stage.name, epoch, row["train_loss"],
                 row["val_acc"], f", test acc {row['test_acc']:.4f}" if "test_acc" in row else "")
        if on_epoch is not None:
            on_epoch(row)
        if row["val_acc"] > best_acc:
            best_acc, best_epoch, bad = row["val_acc"], epoch, 0
            if stage.restore_best:
                best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if stage.patience is not None and bad >= stage.patience and epoch + 1 >= stage.min_epochs:
                stopped = True
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return StageResult(history=history, best_epoch=best_epoch, best_val_acc=best_acc, stopped_early=stopped,
                       setup=setup)


def warmup(model: torch.nn.Module, backbone: BackboneConfig, train: Split, val: Split, *, seed: int,
           device: str = "cpu", progress: bool = False) -> StageResult:
    """The core engine's warm-up: :meth:`BackboneConfig.warmup_stage` run through :func:`train_stage`.

    All parameters train with AdamW (``backbone.lr``, weight decay ``backbone.weight_decay`` on every
    parameter) on plain cross-entropy in batches of ``backbone.batch_size``; validation accuracy is
    evaluated in batches of ``4 * backbone.batch_size``; early stopping after ``backbone.patience``
    epochs without a new best, never before ``backbone.min_epochs``; the best epoch is restored.
    Early stopping lets a BatchNorm network that sits at chance level for a few epochs on a small
    or long-tailed training set still start to generalise.

    Random streams: the permutations come from ``torch_generator(seed, "warmup")``, and the global
    torch seed is set from its first draw.

    Returns:
        :class:`StageResult`; ``history`` rows hold ``epoch``, ``lr``, ``train_loss``, ``val_acc``, ``seconds``.
    """
    stage = backbone.warmup_stage()
    g = torch_generator(seed, "warmup")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    return train_stage(model, stage, train, val, batch_size=backbone.batch_size,
                       eval_batch_size=4 * backbone.batch_size, generator=g, device=device, progress=progress)
