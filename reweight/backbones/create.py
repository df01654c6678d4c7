r"""timm model creation, checkpoint checks and the model's own preprocessing.

:func:`create_backbone` builds any timm model by name, with ``num_classes=0`` giving the
pooled-feature mode. Weights come from a local checkpoint file through timm's own loader
(``pretrained_cfg_overlay=dict(file=...)``; the checkpoint is validated against the architecture
first by :func:`check_checkpoint`, so a mismatch is a clear error instead of a silent partial
load), from the hub (``pretrained=True``, needs a network), or from random initialisation.
:func:`backbone_data_config` / :func:`backbone_transform` expose the model's own preprocessing
(``timm.data.resolve_data_config`` / ``create_transform``).

timm is imported inside the functions, so importing this module stays light.

References:
    Wightman, "PyTorch Image Models (timm)", https://github.com/huggingface/pytorch-image-models, 2019.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from ..errors import ConfigError

__all__ = [
    "backbone_data_config",
    "backbone_transform",
    "check_checkpoint",
    "check_model_name",
    "create_backbone",
    "model_data_config",
    "model_in_chans",
    "model_transform",
]


def check_model_name(name: str, key: str = "'name' parameter of create_backbone") -> None:
    """Check that ``name`` is a timm model name (``timm.is_model``); ``key`` names the setting in the message.

    Raises:
        ConfigError: for an unknown name, listing close matches from ``timm.list_models()``.
    """
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=8, cutoff=0.6)
        raise ConfigError(f"The {key} must be a timm model name. Got {name!r} instead. "
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

    check_model_name(name)
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


def model_in_chans(model: torch.nn.Module) -> int:
    """Input channels of ``model``: its ``pretrained_cfg['first_conv']``, else its first ``Conv2d`` (default 3)."""
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
    c = model_in_chans(model)
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


def model_data_config(name: str, in_chans: int = 3, **overrides: Any) -> Dict[str, Any]:
    """:func:`backbone_data_config` of timm model ``name`` without allocating its weights (meta device).

    For preprocessing user images before the backbone exists (the data is checked before any work).
    """
    return backbone_data_config(_meta_model(name, 0, in_chans), **overrides)


def model_transform(name: str, in_chans: int = 3, is_training: bool = False, **overrides: Any):
    """``timm.data.create_transform`` of :func:`model_data_config` (eval transform by default)."""
    from timm.data import create_transform

    return create_transform(**model_data_config(name, in_chans, **overrides), is_training=is_training)
