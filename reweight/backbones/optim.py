r"""Optimizer hygiene: parameter groups with per-selector lr multipliers, fresh optimizers and schedulers.

:func:`param_groups` builds groups from per-selector lr multipliers (``lr = base_lr * mult``; a
multiplier of 0 means *frozen and excluded*, never ``lr = 0``) and applies weight decay only where
configured (none on biases / norm weights -- every parameter with ``ndim <= 1`` -- unless asked).
:func:`build_optimizer` / :func:`build_scheduler` create fresh objects (rebuilt at every stage
switch, so no momentum is carried over).

References:
    Howard & Ruder, "Universal Language Model Fine-tuning for Text Classification" (discriminative
    learning rates), ACL 2018.
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (AdamW), ICLR 2019.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..errors import ConfigError
from .freeze import resolve_selectors

__all__ = ["build_optimizer", "build_scheduler", "param_groups", "zero_mult_names"]


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
