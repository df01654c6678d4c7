"""Penultimate features of a frozen backbone, cached on disk under content hashes.

:func:`build_features` is the minimal path of the core engine: load an embedded dataset, split and
corrupt it, warm up a timm backbone with cross-entropy (early stopping on the clean validation
split), freeze it, extract pooled pre-logit features for every split, and cache them. The cache key
hashes the images, the observed training labels, the split indices and every config field that
changes the features, so anything that changes the result misses the cache and nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from .config import BackboneConfig, DataConfig, FeatureConfig, to_dict
from .data import Splits, check_features, load_dataset, prepare_data
from .errors import RunDirError
from .runs import load_checked, save_checked

__all__ = ["FeatureCache", "FeatureSet", "build_features", "extract_features", "file_sha256", "provenance",
           "standardize"]

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """Features of every split, labels, ground truth and provenance.

    ``X_*`` are float32 ``(n, d)``; ``y_train`` holds observed (possibly noisy) labels,
    ``y_train_clean`` the true ones and ``corrupted`` the ground-truth mask. ``X_val``/``y_val`` are the
    trusted set (clean); ``meta_val`` (bool over its rows, or None) marks its held-out meta-val part.
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    y_train_clean: torch.Tensor
    corrupted: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    train_index: torch.Tensor
    meta: Dict[str, Any] = field(default_factory=dict)
    meta_val: Optional[torch.Tensor] = None


class FeatureCache:
    """A directory of ``<key>.pt`` files (with ``.sha256`` sidecars), written atomically.

    A corrupted or truncated entry is detected by its checksum, reported with a warning and
    treated as a miss (then overwritten).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(parts: Dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> Optional[Dict[str, Any]]:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            return load_checked(p)
        except (RunDirError, RuntimeError, EOFError, ValueError) as e:
            log.warning("Feature cache entry %s is unusable (%s); recomputing.", p.name, e)
            return None

    def save(self, key: str, obj: Dict[str, Any]) -> None:
        save_checked(self.path(key), obj)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's content, streamed (a weights file replaced in place changes it; its path does not)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def provenance(backbone: BackboneConfig) -> Dict[str, Any]:
    """What extracted features depend on beyond the data and the config: the thread count of the build (a
    multi-threaded warm-up sums in another order), the torch and timm versions, and the content hash of
    the backbone weights file. Part of the feature-cache key and recorded in every run's summary."""
    from importlib import metadata

    def version(pkg: str) -> Optional[str]:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    weights = backbone.pretrained_file
    return {"build_threads": torch.get_num_threads(), "torch": version("torch"), "timm": version("timm"),
            "backbone_weights_sha256": file_sha256(weights) if weights else None}


@torch.no_grad()
def extract_features(model: torch.nn.Module, images: torch.Tensor | np.ndarray, batch_size: int = 512,
                     device: str = "cpu", progress: bool = False) -> torch.Tensor:
    """Pooled pre-logit features ``(N, num_features)`` (float32) of a frozen model, in eval mode."""
    from tqdm.auto import tqdm

    model.eval().to(device)
    x = torch.as_tensor(images)
    out = []
    for i in tqdm(range(0, x.shape[0], batch_size), desc="features", disable=not progress):
        xb = x[i:i + batch_size].to(device)
        f = model.forward_head(model.forward_features(xb), pre_logits=True)
        out.append(f.float().cpu())
    return torch.cat(out)


def standardize(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6):
    """z-score every array with the training split's mean and std (constant columns keep std 1)."""
    mu = train.mean(0, keepdim=True)
    sd = train.std(0, keepdim=True)
    sd = torch.where(sd > eps, sd, torch.ones_like(sd))
    return tuple((t - mu) / sd for t in (train, *others))


def build_features(data: DataConfig, backbone: BackboneConfig, feats: FeatureConfig, seed: int,
                   device: str = "cpu", progress: bool = False) -> FeatureSet:
    """Data -> splits/corruption -> warmed-up frozen timm backbone -> cached features (see module doc)."""
    ds = load_dataset(data.dataset)
    sp: Splits = prepare_data(ds, data.val_fraction, data.test_fraction, data.noise, data.noise_rate,
                              data.imbalance_factor, seed, trusted_size=data.trusted_size,
                              meta_val_fraction=data.meta_val_fraction)
    parts = {
        "images": _digest(ds.images), "train": _digest(sp.train), "val": _digest(sp.val),
        "test": _digest(sp.test), "train_labels": _digest(sp.train_labels),
        "backbone": to_dict(backbone), "seed": seed, "format": 1, **provenance(backbone),
    }
    cache = FeatureCache(feats.cache_dir)
    key = cache.key(parts)
    hit = cache.load(key)
    t0 = time.perf_counter()
    if hit is None:
        from .backbones import create_backbone, freeze_all, warmup

        torch.manual_seed(seed)
        model = create_backbone(backbone.model, ds.num_classes, in_chans=ds.images.shape[1],
                                pretrained_file=backbone.pretrained_file)
        history = warmup(model, backbone, (ds.images[sp.train], sp.train_labels),
                         (ds.images[sp.val], ds.labels[sp.val]), seed=seed, progress=progress).history
        best = max((h["val_acc"] for h in history), default=float("nan"))
        if history and best < 1.5 / ds.num_classes:
            log.warning("Backbone warm-up reached only %.3f clean-validation accuracy (chance is %.3f): the "
                        "features are barely better than random; raise backbone.epochs or backbone.min_epochs.",
                        best, 1 / ds.num_classes)
        freeze_all(model)
        allx = extract_features(model, ds.images, feats.batch_size, device=device, progress=progress)
        hit = {"features": allx, "history": history, "warmup_seconds": time.perf_counter() - t0}
        cache.save(key, hit)
        cached = False
    else:
        cached = True
    allx = hit["features"]
    check_features(allx, "extracted features")
    Xtr, Xva, Xte = allx[sp.train], allx[sp.val], allx[sp.test]
    if feats.standardize:
        Xtr, Xva, Xte = standardize(Xtr, Xva, Xte)
    return FeatureSet(
        X_train=Xtr, y_train=torch.as_tensor(sp.train_labels), y_train_clean=torch.as_tensor(sp.train_clean_labels),
        corrupted=torch.as_tensor(sp.corrupted), X_val=Xva, y_val=torch.as_tensor(ds.labels[sp.val]),
        X_test=Xte, y_test=torch.as_tensor(ds.labels[sp.test]), num_classes=ds.num_classes,
        train_index=torch.as_tensor(sp.train),
        meta={"cache_key": key, "cache_hit": cached, "warmup_history": hit["history"],
              "warmup_seconds": hit.get("warmup_seconds"), "feature_dim": int(allx.shape[1]),
              "provenance": {k: parts[k] for k in ("build_threads", "torch", "timm", "backbone_weights_sha256")}},
        meta_val=None if sp.meta_val is None else torch.as_tensor(sp.meta_val),
    )
