"""timm backbones: creation (local weights file or hub), warm-up with early stopping, freezing.

timm is imported only here (and in ``staging``), so ``import reweight`` stays light.

The warm-up is plain cross-entropy on the (possibly noisy) training split with AdamW, stopped early
on clean-validation accuracy; the best epoch's weights are restored. After it the backbone is
frozen: ``requires_grad=False`` and eval mode (frozen BatchNorm must not update running stats).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from .errors import ConfigError
from .seeding import torch_generator

__all__ = ["create_backbone", "freeze_all", "warmup"]

log = logging.getLogger(__name__)


def create_backbone(name: str, num_classes: int, in_chans: int = 3, pretrained_file: Optional[str] = None,
                    pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """Create timm model ``name`` with a ``num_classes`` classifier (0 = pooled-feature mode).

    Weights: ``pretrained_file`` loads a local checkpoint through timm's own loader
    (``pretrained_cfg_overlay=dict(file=...)``); ``pretrained=True`` without a file uses the hub
    (needs a network); otherwise random initialisation.

    Raises:
        ConfigError: for an unknown model name (with close matches) or a missing weights file.
    """
    import timm

    if not timm.is_model(name):
        stem = name.split("_")[0]
        close = timm.list_models(f"*{stem}*")[:12]
        raise ConfigError(f"Unknown timm model {name!r}. Close matches: {', '.join(close) or '(none)'}; "
                          f"see timm.list_models().")
    if pretrained_file is not None:
        if not os.path.isfile(pretrained_file):
            raise ConfigError(f"Backbone weights file {pretrained_file!r} does not exist.")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=pretrained_file),
                                 num_classes=num_classes, in_chans=in_chans, **kwargs)
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)


def freeze_all(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze every parameter and put the model in eval mode (BatchNorm statistics fixed)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / max(1, x.shape[0])


def warmup(model: torch.nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
           y_val: np.ndarray, epochs: int, patience: int, batch_size: int, lr: float, weight_decay: float,
           seed: int, progress: bool = False) -> List[Dict[str, float]]:
    """Train ``model`` with cross-entropy; early-stop on validation accuracy; restore the best epoch.

    Returns one dict per epoch: ``epoch``, ``train_loss``, ``val_acc``, ``seconds``.
    """
    if epochs < 0 or patience < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError("warmup needs epochs >= 0, patience >= 1, batch_size >= 1 and lr > 0.")
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
            if bad >= patience:
                break
    model.load_state_dict(best_state)
    return history
