"""Penultimate features of a frozen backbone, cached on disk under content hashes.

:func:`build_features` is the minimal path of the core engine: load the data (an embedded dataset, or
a user source of :mod:`reweight.sources`), split it and draw the trusted set, corrupt the training
labels, warm up a timm backbone with cross-entropy (early stopping on the trusted set; a warm-up that
stays at chance stops the run, see :func:`check_warmup`), freeze it, extract pooled pre-logit features
for every split, and cache them. Precomputed embeddings skip the backbone. The cache key hashes the
images, the labels, the split indices, the source's content fingerprint, every config field that
changes the features, the device type and the provenance (:func:`provenance`), so anything that
changes the result misses the cache and nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .config import EMBEDDED_DATASETS, BackboneConfig, DataConfig, FeatureConfig, to_dict
from .data import Splits, check_features, load_dataset, prepare_data
from .errors import RunDirError, WarmupError
from .runs import file_sha256, load_checked, save_checked

__all__ = ["FeatureCache", "FeatureSet", "build_features", "check_warmup", "extract_features", "file_sha256",
           "provenance", "run_identity", "standardize"]

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
    y_train_clean: Optional[torch.Tensor]
    corrupted: Optional[torch.Tensor]
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    train_index: torch.Tensor
    meta: Dict[str, Any] = field(default_factory=dict)
    meta_val: Optional[torch.Tensor] = None
    train_ids: Optional[List[str]] = None


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


def run_identity(data: DataConfig, backbone: BackboneConfig, source: Any = None) -> Dict[str, str]:
    """What a run's numbers depend on beyond its config: the content of its data and of its weights files.

    ``data.content_sha256`` (the source's fingerprint: sorted file list, sizes, streamed content hash) and
    ``data.labels_file_sha256`` for user sources (:attr:`reweight.sources.Source.fingerprint`), and
    ``backbone.weights_sha256`` when a backbone weights file is used. Empty for an embedded dataset with a
    randomly initialised backbone (its config says everything). :class:`reweight.runs.RunDir` refuses a run
    directory whose identity differs, naming the differing keys.
    """
    out: Dict[str, str] = dict(getattr(source, "fingerprint", None) or {})
    uses_backbone = data.dataset != "embeddings"
    if uses_backbone and backbone.pretrained_file:
        out["backbone.weights_sha256"] = file_sha256(backbone.pretrained_file)
    return out


@torch.no_grad()
def extract_features(model: torch.nn.Module, images: torch.Tensor | np.ndarray, batch_size: int = 512,
                     device: str | torch.device = "cpu", progress: bool = False) -> torch.Tensor:
    """Pooled pre-logit features ``(N, num_features)`` (float32, on the CPU) of a frozen model, in eval mode.

    The model is moved to ``device`` and so is each batch; ``progress`` shows a bar with rate and ETA.
    """
    from tqdm.auto import tqdm

    model.eval().to(device)
    x = torch.as_tensor(images)
    out = []
    with tqdm(total=int(x.shape[0]), desc="features", unit="img", disable=not progress) as bar:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(device)
            f = model.forward_head(model.forward_features(xb), pre_logits=True)
            out.append(f.float().cpu())
            bar.update(int(xb.shape[0]))
    return torch.cat(out)


def standardize(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6):
    """z-score every array with the training split's mean and std (constant columns keep std 1)."""
    mu = train.mean(0, keepdim=True)
    sd = train.std(0, keepdim=True)
    sd = torch.where(sd > eps, sd, torch.ones_like(sd))
    return tuple((t - mu) / sd for t in (train, *others))


def check_warmup(history: List[Dict[str, Any]], y_val: np.ndarray, num_classes: int, backbone: BackboneConfig,
                 data: DataConfig) -> Optional[str]:
    r"""Stop a warm-up that stayed at chance (unless ``backbone.allow_chance``); return a warning or None.

    Chance is the majority-class rate :math:`p` of the trusted set (``m`` samples): the warm-up stayed at
    chance when its best clean-validation accuracy is at most :math:`p + 2\sqrt{p(1-p)/m}` (two binomial
    standard deviations above what always predicting the largest class scores).

    Raises:
        WarmupError: naming the likely causes (learning rate, epochs, image size, transforms) and the flag
            that goes on anyway.
    """
    if not history:
        return None
    y_val = np.asarray(y_val)
    m = max(int(y_val.size), 1)
    p = float(np.bincount(y_val, minlength=num_classes).max()) / m
    limit = p + 2 * float(np.sqrt(p * (1 - p) / m))
    best = max(h["val_acc"] for h in history)
    if best > limit:
        return None
    size = f"data.image_size={data.image_size}" if data.dataset in ("imagefolder", "torchvision") else "the image size"
    msg = (f"The backbone warm-up stayed at chance: best clean-validation accuracy {best:.3f} in {len(history)} "
           f"epoch(s), against {p:.3f} for always predicting the largest class ({m} trusted samples). Likely causes: "
           f"the learning rate (backbone.lr={backbone.lr:g}), too few epochs (backbone.epochs={backbone.epochs}, "
           f"backbone.min_epochs={backbone.min_epochs}), an image size the backbone cannot use ({size}), or the "
           f"transforms (data.normalize with pretrained weights). Set backbone.allow_chance=true to go on anyway.")
    if not backbone.allow_chance:
        raise WarmupError(msg)
    log.warning("%s (going on: backbone.allow_chance=true)", msg)
    return msg


def _backbone_key(backbone: BackboneConfig) -> Dict[str, Any]:
    d = to_dict(backbone)
    d.pop("allow_chance", None)  # decides whether to go on, not what the features are
    return d


def _warm_and_extract(images: np.ndarray, sp: Splits, y_val: np.ndarray, num_classes: int, data: DataConfig,
                      backbone: BackboneConfig, feats: FeatureConfig, seed: int, device: str, progress: bool,
                      parts: Dict[str, Any]) -> Dict[str, Any]:
    """Warm up the backbone, freeze it, extract features of every sample; cached under ``parts``."""
    cache = FeatureCache(feats.cache_dir)
    key = cache.key(parts)
    hit = cache.load(key)
    if hit is not None:  # checked again: a cache built with allow_chance=true must not pass silently without it
        warning = check_warmup(hit["history"], y_val, num_classes, backbone, data)
        return {**hit, "warning": warning, "cache_key": key, "cache_hit": True}
    from .backbones import create_backbone, freeze_all, warmup

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = create_backbone(backbone.model, num_classes, in_chans=int(images.shape[1]),
                            pretrained_file=backbone.pretrained_file).to(device)
    history = warmup(model, backbone, (images[sp.train], sp.train_labels), (images[sp.val], y_val), seed=seed,
                     device=device, progress=progress).history
    warning = check_warmup(history, y_val, num_classes, backbone, data)
    freeze_all(model)
    allx = extract_features(model, images, feats.batch_size, device=device, progress=progress)
    hit = {"features": allx, "history": history, "warmup_seconds": time.perf_counter() - t0, "warning": warning}
    cache.save(key, hit)
    return {**hit, "cache_key": key, "cache_hit": False}


def build_features(data: DataConfig, backbone: BackboneConfig, feats: FeatureConfig, seed: int,
                   device: str | torch.device = "cpu", progress: bool = False, source: Any = None) -> FeatureSet:
    """Data -> splits/corruption -> warmed-up frozen timm backbone -> cached features (see module doc).

    Args:
        data, backbone, feats, seed: the config.
        device: where the warm-up and the extraction run (a resolved torch device: cpu, cuda, mps).
        progress: bars with ETA on the warm-up, image decoding and feature extraction.
        source: a :class:`reweight.sources.Source` already loaded (and checked) for ``data``; loaded here
            when None (user sources only).

    Raises:
        DataError: for bad data (see :func:`reweight.sources.load_source`).
        WarmupError: for a warm-up that stayed at chance (see :func:`check_warmup`).
    """
    dev = torch.device(device)
    prov = provenance(backbone)
    dev_key = {} if dev.type == "cpu" else {"device": dev.type}  # GPU kernels sum in another order
    if data.dataset in EMBEDDED_DATASETS:
        ds = load_dataset(data.dataset)
        sp: Splits = prepare_data(ds, data.val_fraction, data.test_fraction, data.noise, data.noise_rate,
                                  data.imbalance_factor, seed, trusted_size=data.trusted_size,
                                  meta_val_fraction=data.meta_val_fraction)
        kind, x, labels, K = "images", ds.images, ds.labels, ds.num_classes
        ids, id_root, fingerprint, description = [str(int(i)) for i in sp.train], data.dataset, {}, data.dataset
        parts = {
            "images": _digest(ds.images), "train": _digest(sp.train), "val": _digest(sp.val),
            "test": _digest(sp.test), "train_labels": _digest(sp.train_labels),
            "backbone": _backbone_key(backbone), "seed": seed, "format": 1, **prov, **dev_key,
        }
    else:
        from .sources import load_source, source_splits

        src = source if source is not None else load_source(data, backbone, progress=progress)
        sp = source_splits(src, data, seed)
        kind, x, labels, K = src.kind, src.x, src.labels, src.num_classes
        ids, id_root, fingerprint, description = [src.ids[int(i)] for i in sp.train], src.id_root, \
            dict(src.fingerprint), src.description
        parts = {
            "source": fingerprint, "images": _digest(x), "labels": _digest(labels), "train": _digest(sp.train),
            "val": _digest(sp.val), "test": _digest(sp.test), "train_labels": _digest(sp.train_labels),
            "backbone": _backbone_key(backbone), "seed": seed, "format": 2, **prov, **dev_key,
        }
    y_val = labels[sp.val]
    if kind == "features":
        got: Dict[str, Any] = {"features": torch.from_numpy(np.ascontiguousarray(x)), "history": [],
                               "warmup_seconds": None, "cache_key": None, "cache_hit": None, "warning": None}
        prov = {**prov, "backbone_weights_sha256": None}
    else:
        got = _warm_and_extract(x, sp, y_val, K, data, backbone, feats, seed, str(dev), progress, parts)
    allx = got["features"]
    check_features(allx, "extracted features")
    Xtr, Xva, Xte = allx[sp.train], allx[sp.val], allx[sp.test]
    if feats.standardize:
        Xtr, Xva, Xte = standardize(Xtr, Xva, Xte)

    def opt(a: Optional[np.ndarray]) -> Optional[torch.Tensor]:
        return None if a is None else torch.as_tensor(a)

    return FeatureSet(
        X_train=Xtr, y_train=torch.as_tensor(sp.train_labels), y_train_clean=opt(sp.train_clean_labels),
        corrupted=opt(sp.corrupted), X_val=Xva, y_val=torch.as_tensor(y_val),
        X_test=Xte, y_test=torch.as_tensor(labels[sp.test]), num_classes=K,
        train_index=torch.as_tensor(sp.train),
        meta={"cache_key": got["cache_key"], "cache_hit": got["cache_hit"], "warmup_history": got["history"],
              "warmup_seconds": got.get("warmup_seconds"), "warmup_warning": got.get("warning"),
              "feature_dim": int(allx.shape[1]), "source": description, "id_root": id_root,
              "data_fingerprint": fingerprint, "device": str(dev),
              "provenance": {k: prov[k] for k in ("build_threads", "torch", "timm", "backbone_weights_sha256")}},
        meta_val=None if sp.meta_val is None else torch.as_tensor(sp.meta_val),
        train_ids=ids,
    )
