r"""timm backbones: creation, data configs, warm-up, and a BN-safe freezing / optimizer toolkit.

timm is imported only here (and in :mod:`reweight.staging` through this module), so
``import reweight`` stays light.

**Creation.** :func:`create_backbone` builds any timm model by name, with ``num_classes=0`` giving
the pooled-feature mode. Weights come from a local checkpoint file through timm's own loader
(``pretrained_cfg_overlay=dict(file=...)``; the checkpoint is validated against the architecture
first, so a mismatch is a clear error instead of a silent partial load), from the hub
(``pretrained=True``, needs a network), or from random initialisation.
:func:`backbone_data_config` / :func:`backbone_transform` expose the model's own preprocessing
(``timm.data.resolve_data_config`` / ``create_transform``).

**Freezing** (DESIGN section 3: "freeze is not eval"). Parameters are selected by *selectors*:

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
optimizer holds exactly the trainable parameters.

**Optimizer hygiene.** :func:`param_groups` builds groups from per-selector lr multipliers
(``lr = base_lr * mult``; a multiplier of 0 means *frozen and excluded*, never ``lr = 0``), applies
weight decay only where configured (none on biases / norm weights -- every parameter with
``ndim <= 1`` -- unless asked), and :func:`build_optimizer` / :func:`build_scheduler` create fresh
objects (rebuilt at every stage switch, so no momentum is carried over).

References:
    Wightman, "PyTorch Image Models (timm)", https://github.com/huggingface/pytorch-image-models, 2019.
    Howard & Ruder, "Universal Language Model Fine-tuning for Text Classification" (discriminative
    learning rates, gradual unfreezing), ACL 2018.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from .errors import CarrotError, ConfigError
from .seeding import torch_generator

__all__ = [
    "FreezeError",
    "FreezeReport",
    "backbone_data_config",
    "backbone_transform",
    "block_groups",
    "build_optimizer",
    "build_scheduler",
    "check_checkpoint",
    "check_no_frozen_grads",
    "create_backbone",
    "freeze",
    "freeze_all",
    "freeze_all_but_last",
    "freeze_report",
    "frozen_bn_names",
    "head_parameter_names",
    "param_groups",
    "resolve_selectors",
    "set_trainable",
    "trainable_names",
    "unfreeze",
    "warmup",
    "zero_mult_names",
]

log = logging.getLogger(__name__)


class FreezeError(CarrotError, RuntimeError):
    """A gradient reached a frozen parameter, or the optimizer does not hold exactly the trainable ones."""


# ----------------------------------------------------------------------------------------------
# creation and preprocessing
# ----------------------------------------------------------------------------------------------


def _check_model_name(name: str) -> None:
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(str(name), timm.list_models(), n=8, cutoff=0.6)
        raise ConfigError(f"The 'name' parameter of create_backbone must be a timm model name. Got {name!r} instead. "
                          f"Close matches: {', '.join(close) or '(none)'}; see timm.list_models().")


def _meta_model(name: str, num_classes: int, in_chans: int, **kwargs) -> torch.nn.Module:
    """The architecture without allocating weights (meta device; CPU fallback)."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except Exception:  # some models initialise with ops the meta device lacks
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def check_checkpoint(name: str, state_dict: Mapping[str, torch.Tensor], num_classes: int, in_chans: int = 3,
                     **kwargs) -> Dict[str, Any]:
    """Compare a checkpoint's tensors with the architecture of timm model ``name``.

    The classifier may differ in its number of classes (timm drops it and re-initialises) and the
    first convolution in its input channels (timm adapts it); everything else must match exactly.

    Args:
        name: timm model name.
        state_dict: the checkpoint's tensors.
        num_classes, in_chans: of the model to be built.

    Returns:
        ``{"num_classes": ..., "in_chans": ...}`` of the checkpoint (None where it does not say), for
        the ``pretrained_cfg`` overlay.

    Raises:
        ConfigError: listing the missing keys, unexpected keys and shape mismatches (expected vs got).
    """
    model = _meta_model(name, num_classes, in_chans, **kwargs)
    cfg = model.pretrained_cfg
    classifiers = cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    first = cfg.get("first_conv") or ()
    first = (first,) if isinstance(first, str) else tuple(first)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    got = {k: tuple(v.shape) for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and not k.endswith("num_batches_tracked")}

    def is_cls(k: str) -> bool:
        return any(k in (c + ".weight", c + ".bias") for c in classifiers)

    missing = [k for k in expected if k not in got and not is_cls(k)]
    unexpected = [k for k in got if k not in expected and not is_cls(k)]
    shape = []
    for k in expected:
        if k in got and got[k] != expected[k] and not is_cls(k):
            if any(k == c + ".weight" for c in first) and got[k][:1] + got[k][2:] == expected[k][:1] + expected[k][2:]:
                continue  # input channels differ: timm adapts the first convolution
            shape.append(f"{k}: expected {expected[k]}, got {got[k]}")
    if missing or unexpected or shape:
        def head(xs: List[str]) -> str:
            return ", ".join(xs[:8]) + (f" ... (+{len(xs) - 8} more)" if len(xs) > 8 else "") if xs else "none"

        raise ConfigError(
            f"The checkpoint does not match the architecture {name!r} ({len(expected)} tensors expected, "
            f"{len(got)} found). Missing keys: {head(missing)}. Unexpected keys: {head(unexpected)}. "
            f"Shape mismatches: {head(shape)}. Pass the model name the checkpoint was saved from."
        )
    out: Dict[str, Any] = {"num_classes": None, "in_chans": None}
    for c in classifiers:
        w = state_dict.get(c + ".weight")
        if isinstance(w, torch.Tensor) and w.ndim >= 1:
            out["num_classes"] = int(w.shape[0])
    for c in first:
        w = state_dict.get(c + ".weight")
        if isinstance(w, torch.Tensor) and w.ndim == 4:
            groups = getattr(model.get_submodule(c), "groups", 1)
            out["in_chans"] = int(w.shape[1] * groups)
    return out


def create_backbone(name: str, num_classes: int, in_chans: int = 3, pretrained_file: Optional[str] = None,
                    pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """Create timm model ``name`` with a ``num_classes`` classifier (0 = pooled-feature mode).

    Weights: ``pretrained_file`` loads a local checkpoint through timm's own loader
    (``pretrained_cfg_overlay=dict(file=...)``) after :func:`check_checkpoint` has validated it
    against the architecture; the overlay declares the checkpoint's own classifier size and input
    channels, so a checkpoint saved from the same configuration loads completely (classifier
    included) and a different ``num_classes``/``in_chans`` is adapted by timm. ``pretrained=True``
    without a file uses the hub (needs a network); otherwise random initialisation.

    Args:
        name: any name in ``timm.list_models()``.
        num_classes: classifier outputs; 0 removes the classifier (``model(x)`` returns pooled features).
        in_chans: input channels.
        pretrained_file: a local ``.pth``/``.safetensors`` checkpoint (a state dict, possibly nested
            under ``state_dict``/``model``).
        pretrained: fetch the hub weights when no file is given.
        **kwargs: passed to ``timm.create_model`` (e.g. ``drop_rate``).

    Raises:
        ConfigError: for an unknown model name (with close matches), a missing or unreadable weights
            file, a checkpoint of another architecture, or hub weights that cannot be fetched.
    """
    import timm

    _check_model_name(name)
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ConfigError(f"The 'num_classes' parameter of create_backbone must be an int >= 0. Got {num_classes!r} instead.")
    if pretrained_file is not None:
        if not os.path.isfile(pretrained_file):
            raise ConfigError(f"The 'pretrained_file' parameter of create_backbone must be an existing file. "
                              f"Got {pretrained_file!r} instead.")
        from timm.models import load_state_dict

        try:
            sd = load_state_dict(pretrained_file)
        except Exception as e:  # noqa: BLE001 - any unreadable file
            raise ConfigError(f"Could not read backbone weights file {pretrained_file!r}: {type(e).__name__}: {e}") from e
        meta = check_checkpoint(name, sd, num_classes, in_chans, **kwargs)
        overlay: Dict[str, Any] = {"file": os.path.abspath(pretrained_file)}
        base = timm.models.get_pretrained_cfg(name) if hasattr(timm.models, "get_pretrained_cfg") else None
        if meta["num_classes"] is not None:
            overlay["num_classes"] = meta["num_classes"]
        if meta["in_chans"] is not None:
            size = tuple(getattr(base, "input_size", None) or (3, 224, 224)) if base is not None else (3, 224, 224)
            overlay["input_size"] = (meta["in_chans"],) + tuple(size[1:])
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes,
                                 in_chans=in_chans, **kwargs)
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans, **kwargs)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"Could not fetch hub weights for {name!r} ({type(e).__name__}: {e}). Without a network, "
                              f"pass pretrained_file=<local checkpoint> instead.") from e
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def _in_chans(model: torch.nn.Module) -> int:
    first = model.pretrained_cfg.get("first_conv") if hasattr(model, "pretrained_cfg") else None
    if isinstance(first, (list, tuple)):
        first = first[0]
    if first:
        try:
            return int(model.get_submodule(first).in_channels)
        except AttributeError:
            pass
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            return int(m.in_channels)
    return 3


def backbone_data_config(model: torch.nn.Module, **overrides: Any) -> Dict[str, Any]:
    """The model's own preprocessing config (``timm.data.resolve_data_config``), fitted to its input channels.

    ``overrides`` (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct`` ...) win. For a
    one-channel model the 3-channel ``mean``/``std`` are averaged and ``input_size`` gets 1 channel.
    """
    from timm.data import resolve_data_config

    cfg = dict(resolve_data_config(dict(overrides), model=model))
    c = _in_chans(model)
    if c == 1:
        if len(cfg["mean"]) != 1 and "mean" not in overrides:
            cfg["mean"] = (float(np.mean(cfg["mean"])),)
        if len(cfg["std"]) != 1 and "std" not in overrides:
            cfg["std"] = (float(np.mean(cfg["std"])),)
        if "input_size" not in overrides:
            cfg["input_size"] = (1,) + tuple(cfg["input_size"][1:])
    return cfg


def backbone_transform(model: torch.nn.Module, is_training: bool = False, **overrides: Any):
    """``timm.data.create_transform`` of :func:`backbone_data_config` (eval transform by default)."""
    from timm.data import create_transform

    cfg = backbone_data_config(model, **overrides)
    return create_transform(**cfg, is_training=is_training)


# ----------------------------------------------------------------------------------------------
# selecting parameters
# ----------------------------------------------------------------------------------------------


def _canonicalize_bn(model: torch.nn.Module) -> None:
    """Turn every FrozenBatchNorm2d back into BatchNorm2d (parameters again; statistics kept)."""
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
    _canonicalize_bn(model)
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
    _canonicalize_bn(model)
    keep = current - set(resolve_selectors(model, selectors))
    return set_trainable(model, ["all"], bn=bn, exclude=[n for n, _ in model.named_parameters() if n not in keep])


def unfreeze(model: torch.nn.Module, selectors: Sequence[str], bn: str = "frozen") -> "FreezeReport":
    """Make the parameters selected by ``selectors`` trainable; the others keep their state.

    Raises:
        ConfigError: for a selector matching nothing.
    """
    current = set(trainable_names(model))
    _canonicalize_bn(model)
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


# ----------------------------------------------------------------------------------------------
# optimizer hygiene
# ----------------------------------------------------------------------------------------------


def param_groups(model: torch.nn.Module, lr: float, lr_mult: Optional[Mapping[str, float]] = None,
                 weight_decay: float = 0.0, decay_norm_bias: bool = False) -> List[Dict[str, Any]]:
    r"""Optimizer parameter groups with per-selector learning-rate multipliers.

    Group ``g`` gets :math:`\mathrm{lr}_g = \mathrm{lr}\cdot m_g` where :math:`m_g` is the multiplier
    of the first selector in ``lr_mult`` (dict order) that matches the parameter (1 if none does).
    Parameters with multiplier 0 and frozen parameters are **excluded** (call :func:`set_trainable`
    with ``exclude=zero_mult_names`` first so they are frozen, not merely given lr 0). Weight decay
    ``weight_decay`` applies to parameters with ``ndim >= 2`` only, unless ``decay_norm_bias``.

    Returns:
        A list of dicts with ``params``, ``names``, ``lr``, ``lr_mult``, ``weight_decay`` (sorted by
        multiplier, then decay), ready for ``torch.optim``.

    Raises:
        ConfigError: for a negative lr or multiplier, a selector matching nothing, or no trainable parameter.
    """
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"The 'lr' parameter of param_groups must be > 0. Got {lr!r} instead.")
    if weight_decay < 0:
        raise ConfigError(f"The 'weight_decay' parameter of param_groups must be >= 0. Got {weight_decay!r} instead.")
    mult_of: Dict[str, float] = {}
    for sel, m in (lr_mult or {}).items():
        if isinstance(m, bool) or not isinstance(m, (int, float)) or m < 0 or not math.isfinite(m):
            raise ConfigError(f"The lr multiplier of {sel!r} must be a finite number >= 0. Got {m!r} instead.")
        for n in resolve_selectors(model, [sel]):
            mult_of.setdefault(n, float(m))
    buckets: Dict[Tuple[float, float], Dict[str, Any]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = mult_of.get(n, 1.0)
        if m == 0:
            continue
        wd = weight_decay if (p.ndim >= 2 or decay_norm_bias) else 0.0
        b = buckets.setdefault((m, wd), {"params": [], "names": [], "lr": lr * m, "lr_mult": m, "weight_decay": wd})
        b["params"].append(p)
        b["names"].append(n)
    if not buckets:
        raise ConfigError("The 'model' parameter of param_groups must have trainable parameters with a non-zero "
                          "multiplier. Got none instead.")
    return [buckets[k] for k in sorted(buckets, key=lambda k: (-k[0], -k[1]))]


def zero_mult_names(model: torch.nn.Module, lr_mult: Optional[Mapping[str, float]]) -> List[str]:
    """Names of parameters whose first matching multiplier in ``lr_mult`` is 0 (to be frozen)."""
    first: Dict[str, float] = {}
    for sel, m in (lr_mult or {}).items():
        for n in resolve_selectors(model, [sel]):
            first.setdefault(n, float(m))
    return [n for n, m in first.items() if m == 0]


def build_optimizer(groups: List[Dict[str, Any]], kind: str = "adamw", momentum: float = 0.9) -> torch.optim.Optimizer:
    """A fresh ``SGD`` (with ``momentum``) or ``AdamW`` on ``groups`` (their ``lr``/``weight_decay`` apply).

    Raises:
        ConfigError: for an unknown ``kind``.
    """
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if kind == "sgd":
        return torch.optim.SGD(clean, lr=clean[0]["lr"], momentum=momentum)
    if kind == "adamw":
        return torch.optim.AdamW(clean, lr=clean[0]["lr"])
    raise ConfigError(f"The 'kind' parameter of build_optimizer must be one of 'adamw', 'sgd'. Got {kind!r} instead.")


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str = "constant", epochs: int = 1):
    r"""Per-epoch ``LambdaLR``: ``constant`` (factor 1) or ``cosine`` (:math:`\tfrac12(1+\cos(\pi e/E))`).

    The factor multiplies every group's own initial lr, so the multipliers' ratios are kept.

    Raises:
        ConfigError: for an unknown ``kind``.
    """
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    if kind == "cosine":
        E = max(1, int(epochs))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1.0 + math.cos(math.pi * min(e, E) / E)))
    raise ConfigError(f"The 'kind' parameter of build_scheduler must be one of 'constant', 'cosine'. Got {kind!r} instead.")


# ----------------------------------------------------------------------------------------------
# warm-up (the core engine's path)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / max(1, x.shape[0])


def warmup(model: torch.nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
           y_val: np.ndarray, epochs: int, patience: int, batch_size: int, lr: float, weight_decay: float,
           seed: int, progress: bool = False, min_epochs: int = 0) -> List[Dict[str, float]]:
    """Train ``model`` with cross-entropy; early-stop on validation accuracy; restore the best epoch.

    Early stopping (``patience`` epochs without a new best validation accuracy) cannot fire before
    ``min_epochs`` epochs: on small or long-tailed training sets a BatchNorm network can sit at
    chance-level validation accuracy for a few epochs before it starts to generalise.

    Returns one dict per epoch: ``epoch``, ``train_loss``, ``val_acc``, ``seconds``.
    """
    if epochs < 0 or patience < 1 or batch_size < 1 or not lr > 0 or min_epochs < 0:
        raise ConfigError("warmup needs epochs >= 0, patience >= 1, batch_size >= 1, lr > 0 and min_epochs >= 0.")
    xt, yt = torch.as_tensor(x_train), torch.as_tensor(y_train)
    xv, yv = torch.as_tensor(x_val), torch.as_tensor(y_val)
    g = torch_generator(seed, "warmup")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    best_acc, best_state, bad, history = -1.0, copy.deepcopy(model.state_dict()), 0, []
    from tqdm.auto import tqdm

    for epoch in tqdm(range(epochs), desc="warm-up", disable=not progress):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(xt.shape[0], generator=g)
        total, count = 0.0, 0
        for i in range(0, xt.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
        acc = _accuracy(model, xv, yv, 4 * batch_size)
        history.append({"epoch": epoch, "train_loss": total / count, "val_acc": acc,
                        "seconds": time.perf_counter() - t0})
        log.info("warm-up epoch %d: train loss %.4f, val acc %.4f", epoch, total / count, acc)
        if acc > best_acc:
            best_acc, best_state, bad = acc, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= patience and epoch + 1 >= min_epochs:
                break
    model.load_state_dict(best_state)
    return history
