r"""Selecting, freezing and unfreezing parameters of a timm model, BatchNorm-safely.

DESIGN section 3: "freeze is not eval". Parameters are selected by *selectors*:

==================  ==============================================================================
``all``             every parameter
``head``            the classifier (``model.get_classifier()``)
``last:N``          the last ``N`` blocks (timm's fine ``group_matcher`` groups, head excluded)
``group:I``         fine group ``I`` (stem = 0; negative indices count from the last block)
``stage:I``         coarse group ``I`` (timm ``group_matcher(coarse=True)``: stem, stages ...)
``re:PATTERN``      parameters whose name matches the regular expression (``re.search``)
anything else       a glob (``fnmatch``) on the parameter name or on a module name prefix
                    (``layer4`` selects ``layer4.0.conv1.weight``)
==================  ==============================================================================

A selector that matches no parameter is an error listing what exists. :func:`set_trainable` sets
``requires_grad`` from selectors and converts every BatchNorm whose parameters are all frozen into
timm's ``FrozenBatchNorm2d`` (``timm.utils.model.freeze(..., include_bn_running_stats=True)``):
it always normalises with its running statistics and has no training mode, so ``model.train()``
cannot re-enable running-stat updates. BatchNorm layers that stay trainable can additionally be
locked in eval mode (``bn="eval"``: a forward pre-hook resets ``training=False`` before every
call). :func:`freeze_report` gives trainable/frozen counts per top-level module;
:func:`check_no_frozen_grads` verifies that no gradient reached a frozen parameter and that the
optimizer holds exactly the trainable parameters; :func:`restore_freeze_state` re-applies a saved
freezing (frozen BatchNorm modules and trainable names) to a fresh model.

timm is imported inside the functions, so importing this module stays light.

References:
    Wightman, "PyTorch Image Models (timm)", https://github.com/huggingface/pytorch-image-models, 2019.
    Howard & Ruder, "Universal Language Model Fine-tuning for Text Classification" (gradual
    unfreezing), ACL 2018.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from ..errors import CarrotError, ConfigError

__all__ = [
    "FreezeError",
    "FreezeReport",
    "block_groups",
    "canonicalize_bn",
    "check_no_frozen_grads",
    "freeze",
    "freeze_all",
    "freeze_all_but_last",
    "freeze_report",
    "frozen_bn_names",
    "head_parameter_names",
    "resolve_selectors",
    "restore_freeze_state",
    "set_trainable",
    "trainable_names",
    "unfreeze",
]

log = logging.getLogger(__name__)


class FreezeError(CarrotError, RuntimeError):
    """A gradient reached a frozen parameter, or the optimizer does not hold exactly the trainable ones."""


# ----------------------------------------------------------------------------------------------
# selecting parameters
# ----------------------------------------------------------------------------------------------


def canonicalize_bn(model: torch.nn.Module) -> None:
    """Turn every FrozenBatchNorm2d back into BatchNorm2d (parameters again; statistics kept).

    Uses ``timm.layers.unfreeze_batch_norm_2d``; a model without frozen BatchNorm is left untouched.
    """
    from timm.layers import unfreeze_batch_norm_2d

    unfreeze_batch_norm_2d(model)


def _frozen_bn_types() -> Tuple[type, ...]:
    from torchvision.ops.misc import FrozenBatchNorm2d

    types: List[type] = [FrozenBatchNorm2d]
    try:
        from timm.layers import FrozenBatchNormAct2d

        types.append(FrozenBatchNormAct2d)
    except ImportError:  # pragma: no cover - older timm
        pass
    return tuple(types)


def frozen_bn_names(model: torch.nn.Module) -> List[str]:
    """Names of the modules that are frozen BatchNorm layers (``FrozenBatchNorm2d``)."""
    types = _frozen_bn_types()
    return [n for n, m in model.named_modules() if isinstance(m, types)]


def head_parameter_names(model: torch.nn.Module) -> List[str]:
    """Names of the classifier's parameters (empty in ``num_classes=0`` feature mode)."""
    try:
        clf = model.get_classifier()
    except AttributeError:
        return []
    if isinstance(clf, (tuple, list)):
        mods = list(clf)
    else:
        mods = [clf]
    ids = {id(p) for m in mods if isinstance(m, torch.nn.Module) for p in m.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def block_groups(model: torch.nn.Module, coarse: bool = False) -> List[List[str]]:
    """Parameter names per block, in forward order, from timm's ``group_matcher`` (head excluded).

    ``coarse=False``: the finest groups timm defines (stem, then each block); ``coarse=True``: stem,
    then each stage. Uses ``timm.models.group_parameters``.

    Raises:
        ConfigError: if the model defines no ``group_matcher``.
    """
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        raise ConfigError(f"Model {type(model).__name__} defines no group_matcher; select parameters by name patterns.")
    head = set(head_parameter_names(model))
    grouped = group_parameters(model, model.group_matcher(coarse=coarse))
    out = []
    for gid in sorted(grouped):
        names = [n for n in grouped[gid] if n not in head]
        if names:
            out.append(names)
    return out


def _selector_help(model: torch.nn.Module) -> str:
    tops = sorted({n.split(".")[0] for n, _ in model.named_parameters()})
    try:
        nb = len(block_groups(model))
    except ConfigError:
        nb = 0
    return (f"Valid selectors: all, head, last:N, group:I (0..{max(nb - 1, 0)}), stage:I, re:PATTERN, or a glob "
            f"on parameter/module names; top-level modules with parameters: {', '.join(tops)}.")


def _resolve_one(model: torch.nn.Module, sel: str, names: List[str]) -> List[str]:
    if not isinstance(sel, str) or not sel:
        raise ConfigError(f"The 'selector' parameter must be a non-empty string. Got {sel!r} instead. "
                          + _selector_help(model))
    if sel == "all":
        return list(names)
    if sel == "head":
        return head_parameter_names(model)
    kind, _, arg = sel.partition(":")
    if kind in ("last", "group", "stage") and arg:
        try:
            k = int(arg)
        except ValueError:
            raise ConfigError(f"The 'selector' parameter must be {kind}:<int>. Got {sel!r} instead.") from None
        groups = block_groups(model, coarse=(kind == "stage"))
        if kind == "last":
            if not 1 <= k <= len(groups):
                raise ConfigError(f"The 'selector' parameter {sel!r} must ask for 1..{len(groups)} blocks "
                                  f"(this model has {len(groups)} block groups). Got {k} instead.")
            return [n for g in groups[-k:] for n in g]
        if not -len(groups) <= k < len(groups):
            raise ConfigError(f"The 'selector' parameter {sel!r} must index one of {len(groups)} "
                              f"{'stage' if kind == 'stage' else 'block'} groups (0..{len(groups) - 1} or negative). "
                              f"Got {k} instead.")
        return list(groups[k])
    if kind == "re" and arg:
        try:
            rx = re.compile(arg)
        except re.error as e:
            raise ConfigError(f"The 'selector' parameter {sel!r} is not a valid regular expression: {e}.") from None
        return [n for n in names if rx.search(n)]
    return [n for n in names if fnmatch.fnmatchcase(n, sel) or fnmatch.fnmatchcase(n, sel + ".*")]


def resolve_selectors(model: torch.nn.Module, selectors: Iterable[str]) -> List[str]:
    """Parameter names selected by ``selectors`` (union, in ``named_parameters`` order).

    Raises:
        ConfigError: for a selector that matches no parameter (the message lists the valid selectors
            and the model's top-level modules) or a malformed selector.
    """
    if isinstance(selectors, str):
        selectors = [selectors]
    names = [n for n, _ in model.named_parameters()]
    chosen: Set[str] = set()
    for sel in selectors:
        got = _resolve_one(model, sel, names)
        if not got:
            raise ConfigError(f"Selector {sel!r} matches no parameter of {type(model).__name__}. " + _selector_help(model))
        chosen.update(got)
    return [n for n in names if n in chosen]


# ----------------------------------------------------------------------------------------------
# freezing
# ----------------------------------------------------------------------------------------------


def _force_eval(module: torch.nn.Module, _inputs: Any) -> None:
    module.training = False


def _bn_types() -> Tuple[type, ...]:
    return (torch.nn.modules.batchnorm._BatchNorm,)


def set_trainable(model: torch.nn.Module, trainable: Sequence[str] = ("all",), frozen: Sequence[str] = (),
                  bn: str = "frozen", exclude: Iterable[str] = ()) -> "FreezeReport":
    """Make exactly the parameters selected by ``trainable`` minus ``frozen`` (minus ``exclude``) trainable.

    BatchNorm handling (``bn``):

    * ``frozen`` (default): every BatchNorm whose parameters are all frozen becomes timm's
      ``FrozenBatchNorm2d`` (running statistics fixed and used, whatever ``model.train()`` says);
      trainable BatchNorm layers behave normally.
    * ``eval``: as ``frozen``, and trainable BatchNorm layers are also locked in eval mode (their
      affine parameters train, their statistics stay fixed).
    * ``train``: no BatchNorm handling (frozen BN layers still update running statistics in train
      mode -- the failure mode of DESIGN section 3; for ablations only).

    Any previous freezing is undone first, so the result depends only on the arguments.

    Args:
        model: a timm model.
        trainable, frozen: selectors (see the module docstring).
        bn: ``frozen``, ``eval`` or ``train``.
        exclude: parameter names to freeze in addition (e.g. those with lr multiplier 0).

    Returns:
        :class:`FreezeReport` of the result.

    Raises:
        ConfigError: for a selector matching nothing, an unknown ``bn`` mode, or when nothing is
            left trainable.
    """
    if bn not in ("frozen", "eval", "train"):
        raise ConfigError(f"The 'bn' parameter of set_trainable must be one of 'eval', 'frozen', 'train'. Got {bn!r} instead.")
    canonicalize_bn(model)
    for h in getattr(model, "_carrot_bn_hooks", []):
        h.remove()
    model._carrot_bn_hooks = []
    on = set(resolve_selectors(model, trainable))
    off = set(resolve_selectors(model, frozen)) if frozen else set()
    keep = on - off - set(exclude)
    if not keep:
        raise ConfigError(f"The stage leaves nothing trainable: trainable={list(trainable)!r} frozen={list(frozen)!r} "
                          f"excluded={sorted(set(exclude))[:5]!r}. Expected at least one trainable parameter. "
                          + _selector_help(model))
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
        if n not in keep:
            p.grad = None
    if bn != "train":
        from timm.utils.model import freeze as timm_freeze

        to_freeze, trainable_bn = [], []
        for n, m in model.named_modules():
            if isinstance(m, _bn_types()):
                ps = list(m.parameters(recurse=False))
                if ps and all(not p.requires_grad for p in ps):
                    to_freeze.append(n)
                elif not ps and not m.affine:
                    to_freeze.append(n)
                else:
                    if ps and not all(p.requires_grad for p in ps):
                        log.warning("BatchNorm %s is partially trainable; it keeps updating its statistics.", n)
                    trainable_bn.append(m)
        if to_freeze:
            timm_freeze(model, to_freeze, include_bn_running_stats=True)
        if bn == "eval":
            for m in trainable_bn:
                model._carrot_bn_hooks.append(m.register_forward_pre_hook(_force_eval))
                m.eval()
    return freeze_report(model)


def trainable_names(model: torch.nn.Module) -> List[str]:
    """Names of the parameters with ``requires_grad=True``."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def freeze(model: torch.nn.Module, selectors: Sequence[str], bn: str = "frozen") -> "FreezeReport":
    """Freeze the parameters selected by ``selectors``; the others keep their state (BN as in :func:`set_trainable`).

    Raises:
        ConfigError: for a selector matching nothing, or when nothing is left trainable.
    """
    current = set(trainable_names(model))
    canonicalize_bn(model)
    keep = current - set(resolve_selectors(model, selectors))
    return set_trainable(model, ["all"], bn=bn, exclude=[n for n, _ in model.named_parameters() if n not in keep])


def unfreeze(model: torch.nn.Module, selectors: Sequence[str], bn: str = "frozen") -> "FreezeReport":
    """Make the parameters selected by ``selectors`` trainable; the others keep their state.

    Raises:
        ConfigError: for a selector matching nothing.
    """
    current = set(trainable_names(model))
    canonicalize_bn(model)
    on = current | set(resolve_selectors(model, selectors))
    return set_trainable(model, ["all"], bn=bn, exclude=[n for n, _ in model.named_parameters() if n not in on])


def freeze_all_but_last(model: torch.nn.Module, n_blocks: int, head: bool = True, bn: str = "frozen") -> "FreezeReport":
    """Freeze everything except the last ``n_blocks`` blocks (timm groups) and, with ``head``, the classifier."""
    sel = ([f"last:{n_blocks}"] if n_blocks > 0 else []) + (["head"] if head else [])
    if not sel:
        raise ConfigError("The stage leaves nothing trainable: n_blocks=0 and head=False. Expected at least one.")
    return set_trainable(model, sel, bn=bn)


def freeze_all(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze every parameter and put the model in eval mode (BatchNorm statistics fixed)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@dataclass
class FreezeReport:
    """Trainable / frozen parameter counts per top-level module.

    ``rows``: one dict per top-level module with ``module``, ``trainable``, ``frozen`` (frozen
    parameters plus the affine buffers of frozen BatchNorm layers) and ``frozen_bn`` (count).
    """

    rows: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(r["trainable"] for r in self.rows)

    @property
    def frozen(self) -> int:
        return sum(r["frozen"] for r in self.rows)

    def format(self) -> str:
        lines = [f"{'module':16s} {'trainable':>10s} {'frozen':>10s} {'frozen BN':>9s}"]
        for r in self.rows:
            lines.append(f"{r['module']:16s} {r['trainable']:10d} {r['frozen']:10d} {r['frozen_bn']:9d}")
        lines.append(f"{'total':16s} {self.trainable:10d} {self.frozen:10d}")
        return "\n".join(lines)


def freeze_report(model: torch.nn.Module) -> FreezeReport:
    """Count trainable and frozen parameters per top-level module (see :class:`FreezeReport`)."""
    types = _frozen_bn_types()
    rows: Dict[str, Dict[str, Any]] = {}

    def row(name: str) -> Dict[str, Any]:
        top = name.split(".")[0] if name else "(root)"
        return rows.setdefault(top, {"module": top, "trainable": 0, "frozen": 0, "frozen_bn": 0})

    for n, p in model.named_parameters():
        row(n)["trainable" if p.requires_grad else "frozen"] += p.numel()
    for n, m in model.named_modules():
        if isinstance(m, types):
            r = row(n)
            r["frozen_bn"] += 1
            r["frozen"] += int(m.weight.numel() + m.bias.numel()) if getattr(m, "weight", None) is not None else 0
    order = [n.split(".")[0] for n, _ in model.named_children()]
    out = [rows[k] for k in order if k in rows] + [v for k, v in rows.items() if k not in order]
    return FreezeReport(out)


def check_no_frozen_grads(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Verify that no frozen parameter holds a gradient and (with ``optimizer``) that the optimizer
    holds exactly the trainable parameters.

    Raises:
        FreezeError: naming the offending parameters.
    """
    leaked = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    if leaked:
        raise FreezeError(f"Gradient reached frozen parameter(s): {', '.join(leaked[:8])}.")
    if optimizer is not None:
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        names = {id(p): n for n, p in model.named_parameters()}
        train = {id(p) for p in model.parameters() if p.requires_grad}
        extra = [names.get(i, "<not in model>") for i in in_opt - train]
        missing = [names[i] for i in train - in_opt]
        if extra or missing:
            raise FreezeError(f"The optimizer does not hold exactly the trainable parameters: extra (frozen or "
                              f"foreign) {extra[:8]}, missing {missing[:8]}. Rebuild it after changing requires_grad.")


def restore_freeze_state(model: torch.nn.Module, frozen_bn: Sequence[str], trainable: Iterable[str]) -> None:
    """Re-apply a saved freezing to ``model``: the ``frozen_bn`` modules become ``FrozenBatchNorm2d``
    and exactly the ``trainable`` parameters require gradients.

    Call it on a freshly built model before loading a state dict saved from a frozen one (whose
    frozen BatchNorm layers hold their affine terms as buffers); ``frozen_bn`` and ``trainable``
    are :func:`frozen_bn_names` and :func:`trainable_names` of the saved model.

    Raises:
        ConfigError: if a module named in ``frozen_bn`` does not exist in ``model``.
    """
    from timm.utils.model import freeze as timm_freeze

    names = dict(model.named_modules())
    missing = [n for n in frozen_bn if n not in names]
    if missing:
        raise ConfigError(f"Frozen BatchNorm modules {missing[:5]} do not exist in {type(model).__name__}.")
    if frozen_bn:
        timm_freeze(model, list(frozen_bn), include_bn_running_stats=True)
    train = set(trainable)
    for n, p in model.named_parameters():
        p.requires_grad_(n in train)
