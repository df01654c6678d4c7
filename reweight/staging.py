r"""Staged training of a timm backbone: warm-up -> freeze -> focus, and gradual unfreezing.

A run is a list of :class:`StageConfig` (YAML). Each stage names its trainable set (selectors of
:mod:`reweight.backbones`: ``all``, ``head``, ``last:N``, ``group:I``, ``stage:I``, ``re:...``, globs),
its learning rate and per-selector lr multipliers, epochs, BatchNorm mode and loss:

* ``ce``: plain cross-entropy :math:`\frac1B\sum_{i\in B}\ell(f_\theta(x_i), y_i)`;
* ``reweighted`` (the *focus* stage): the weights :math:`\alpha` are learned by the bilevel engine
  (:func:`reweight.bilevel.run_bilevel`, implicit hypergradients of DESIGN section 2) on features
  extracted from the **current** backbone, and the trainable blocks + classifier minimise
  :math:`\frac1B\sum_{i\in B}\alpha_i\,\ell(f_\theta(x_i), y_i)` (mean weight 1, so the scale matches CE).

Both losses may add a strict L2 term :math:`\frac{\lambda_h}2\|\theta_{head}\|^2` on the classifier
(``head_l2``), separate from the optimizer's weight decay (DESIGN section 2: strict L2 and decay
inside an adaptive optimizer are not the same thing).

**Strategy B** (DESIGN section 3): when blocks stay trainable in a reweighted stage, features and
weights are recomputed every ``recompute_every`` epochs, logging the feature drift since the last
recomputation -- mean relative change :math:`\frac1n\sum_i\|h_i'-h_i\|/\|h_i\|` and linear CKA
(Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019).

At every stage switch :func:`configure_stage` re-freezes the model (BN-safe), rebuilds the parameter
groups, the optimizer and the scheduler (no stale momentum) and checks that the optimizer holds
exactly the trainable parameters; a freeze report is logged. At the end of every stage a checkpoint
(model, optimizer, scheduler, RNG states, stage index, epoch, metrics) is written atomically with
:func:`reweight.runs.save_checked`; :func:`run_staged` resumes from the newest (or any chosen) stage
checkpoint and, since every stage is a deterministic function of that state, ends at the same
weights as an uninterrupted run (CPU).

References:
    Howard & Ruder, "Universal Language Model Fine-tuning for Text Classification", ACL 2018
    (gradual unfreezing, discriminative learning rates).
    Ren et al., "Learning to Reweight Examples for Robust Deep Learning", ICML 2018.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import numpy as np
import torch

from .config import DataConfig, HeadConfig, HypergradConfig, OuterConfig, WeightsConfig, _check, _f
from .errors import ConfigError, RunDirError
from .runs import RunDir, load_checked, save_checked
from .seeding import stream_seed, torch_generator

__all__ = [
    "StageConfig",
    "StageSetup",
    "StagedData",
    "StagedOutcome",
    "StagedRunConfig",
    "configure_stage",
    "feature_drift",
    "learn_weights",
    "linear_cka",
    "run_staged",
    "staged_data",
    "weighted_ce",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageConfig:
    """One training stage: what trains, how fast, with which loss and BatchNorm mode."""

    name: str = _f("stage", "stage name (unique within a run)")
    trainable: List[str] = _f(["all"], "selectors of trainable parameters: all, head, last:N, group:I, stage:I, re:P, globs")
    frozen: List[str] = _f([], "selectors removed from the trainable set")
    lr: float = _f(1e-3, "base learning rate")
    lr_mult: Dict[str, float] = _f({}, "selector -> lr multiplier (first match wins; 0 = frozen and excluded)")
    epochs: int = _f(1, "epochs of this stage")
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
        for k, v in self.lr_mult.items():
            _check(not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 0, w, f"lr_mult[{k}]", v,
                   "a number >= 0")


def _default_stages() -> List[StageConfig]:
    return [
        StageConfig(name="warmup", trainable=["all"], lr=2e-3, epochs=2),
        StageConfig(name="freeze", trainable=["head", "last:1"], lr=2e-3, lr_mult={"last:1": 0.2}, epochs=1),
        StageConfig(name="focus", trainable=["head", "last:1"], lr=1e-3, lr_mult={"last:1": 0.2}, epochs=2,
                    loss="reweighted"),
    ]


@dataclass(frozen=True)
class StagedRunConfig:
    """A staged run: data -> timm backbone -> stages (-> bilevel weights in reweighted stages)."""

    name: str = _f("staged", "run name (the run directory is <out_dir>/<name>)")
    seed: int = _f(0, "root seed; every random stream is derived from it by name")
    out_dir: str = _f("runs/staged", "parent directory of run directories")
    device: str = _f("cpu", "torch device")
    data: DataConfig = field(default_factory=DataConfig)
    model: str = _f("test_resnet", "timm model name")
    pretrained_file: Optional[str] = _f(None, "local checkpoint with backbone weights (None = random init)")
    batch_size: int = _f(128, "training batch size")
    eval_batch_size: int = _f(512, "evaluation / feature-extraction batch size")
    standardize: bool = _f(True, "z-score features (training statistics) before the bilevel head")
    head: HeadConfig = field(default_factory=HeadConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    hypergrad: HypergradConfig = field(default_factory=HypergradConfig)
    outer: OuterConfig = field(default_factory=lambda: OuterConfig(steps=30))
    stages: List[StageConfig] = field(default_factory=_default_stages, metadata={"help": "the stages, in order"})

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "staged", "batch_size", self.batch_size, ">= 1")
        _check(self.eval_batch_size >= 1, "staged", "eval_batch_size", self.eval_batch_size, ">= 1")
        _check(len(self.stages) >= 1, "staged", "stages", self.stages, "a non-empty list")
        names = [s.name for s in self.stages]
        _check(len(set(names)) == len(names), "staged", "stages", names, "a list of stages with unique names")


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


@dataclass
class StagedData:
    """Image tensors ``(N, C, H, W)`` of every split, observed/clean training labels and the noise mask."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    y_train_clean: torch.Tensor
    corrupted: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def staged_data(data: DataConfig, seed: int, dataset: Any = None) -> StagedData:
    """Split and corrupt ``dataset`` (default: the embedded ``data.dataset``) as the core engine does.

    ``dataset`` may be any :class:`reweight.data.Dataset`, e.g. from
    :func:`reweight.imagefolder.load_imagefolder`.
    """
    from .data import load_dataset, prepare_data

    ds = dataset if dataset is not None else load_dataset(data.dataset)
    sp = prepare_data(ds, data.val_fraction, data.test_fraction, data.noise, data.noise_rate,
                      data.imbalance_factor, seed)
    x = torch.as_tensor(ds.images)
    y = torch.as_tensor(ds.labels)
    return StagedData(x_train=x[sp.train], y_train=torch.as_tensor(sp.train_labels),
                      y_train_clean=torch.as_tensor(sp.train_clean_labels), corrupted=torch.as_tensor(sp.corrupted),
                      x_val=x[sp.val], y_val=y[sp.val], x_test=x[sp.test], y_test=y[sp.test],
                      num_classes=ds.num_classes)


# ----------------------------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------------------------


@dataclass
class StageSetup:
    """What :func:`configure_stage` built: freeze report, parameter groups, optimizer, scheduler."""

    report: Any
    groups: List[Dict[str, Any]]
    optimizer: torch.optim.Optimizer
    scheduler: Any


def configure_stage(model: torch.nn.Module, stage: StageConfig) -> StageSetup:
    """Freeze/unfreeze ``model`` for ``stage`` and build a **fresh** optimizer and scheduler.

    Trainable = ``trainable`` minus ``frozen`` minus parameters whose lr multiplier is 0; frozen
    BatchNorm layers follow ``stage.bn`` (see :func:`reweight.backbones.set_trainable`). Group ``g``
    gets lr ``stage.lr * mult_g``.

    Raises:
        ConfigError: for a selector matching nothing or a stage that leaves nothing trainable.
        FreezeError: if the optimizer does not hold exactly the trainable parameters (a bug).
    """
    from .backbones import (_canonicalize_bn, build_optimizer, build_scheduler, check_no_frozen_grads,
                            param_groups, set_trainable, zero_mult_names)

    _canonicalize_bn(model)
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
    r"""Batch loss :math:`\frac1B\sum_i w_i\,\ell(z_i, y_i)` (plain mean CE when ``w`` is None).

    Args:
        logits: ``(B, K)``.
        y: ``(B,)`` labels.
        w: ``(B,)`` non-negative weights (the ``alpha`` of the batch's samples) or None.
    """
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    return ce.mean() if w is None else (w.to(ce.dtype) * ce).mean()


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    r"""Linear CKA :math:`\|Y_c^\top X_c\|_F^2 / (\|X_c^\top X_c\|_F\,\|Y_c^\top Y_c\|_F)` (columns centred).

    1 for identical representations (and under rotation / isotropic scaling), near 0 for unrelated
    ones. ``X`` ``(n, d1)``, ``Y`` ``(n, d2)``. Kornblith et al., ICML 2019.
    """
    X = X.double() - X.double().mean(0, keepdim=True)
    Y = Y.double() - Y.double().mean(0, keepdim=True)
    num = torch.linalg.matrix_norm(Y.T @ X) ** 2
    den = torch.linalg.matrix_norm(X.T @ X) * torch.linalg.matrix_norm(Y.T @ Y)
    return float(num / den.clamp_min(1e-300))


def feature_drift(before: torch.Tensor, after: torch.Tensor) -> Dict[str, float]:
    r"""How far features moved: ``rel_change`` :math:`\frac1n\sum_i\|h'_i-h_i\|/\|h_i\|` and ``cka`` (linear CKA)."""
    b, a = before.double(), after.double()
    rel = (torch.linalg.vector_norm(a - b, dim=1) / torch.linalg.vector_norm(b, dim=1).clamp_min(1e-12)).mean()
    return {"rel_change": float(rel), "cka": linear_cka(b, a)}


def learn_weights(model: torch.nn.Module, data: StagedData, cfg: StagedRunConfig,
                  progress: bool = False) -> Tuple[torch.Tensor, Dict[str, Any], torch.Tensor]:
    r"""Learn :math:`\alpha` by the bilevel engine on features of the **current** backbone.

    Extracts pooled pre-logit features of the training and validation images (eval mode),
    standardises them with training statistics, builds the L2 head problem of ``cfg.head`` /
    ``cfg.weights`` and runs ``cfg.outer.steps`` outer steps of ``cfg.hypergrad`` (exactly the core
    engine's :func:`reweight.bilevel.run_bilevel`). The model's train/eval mode is restored.

    Returns:
        ``(alpha (n,) float32, info, raw training features (n, d))``; ``info`` holds the weights'
        AUROC (clean vs corrupted), the minimum per-class ESS ratio, the bilevel head's validation
        accuracy and the seconds spent.
    """
    from .bilevel import run_bilevel, weight_auroc
    from .features import extract_features, standardize
    from .head import HeadObjective, accuracy, add_bias
    from .hypergrad import BilevelProblem, make_method
    from .weights import WeightModel, ess_per_class

    t0 = time.perf_counter()
    was_training = model.training
    Ftr = extract_features(model, data.x_train, cfg.eval_batch_size, device=cfg.device)
    Fva = extract_features(model, data.x_val, cfg.eval_batch_size, device=cfg.device)
    model.train(was_training)
    Xtr, Xva = standardize(Ftr, Fva) if cfg.standardize else (Ftr, Fva)
    dtype, dev = getattr(torch, cfg.head.dtype), torch.device(cfg.device)
    Xtr, Xva = Xtr.to(dev, dtype), Xva.to(dev, dtype)
    if cfg.head.bias:
        Xtr, Xva = add_bias(Xtr), add_bias(Xva)
    y, yv = data.y_train.to(dev), data.y_val.to(dev)
    inner = HeadObjective(Xtr, y, data.num_classes, cfg.head.lam)
    wm = WeightModel(y, data.num_classes, class_mass=cfg.weights.class_mass, beta_entropy=cfg.weights.beta_entropy,
                     beta_ess=cfg.weights.beta_ess, ess_floor=cfg.weights.ess_floor,
                     ess_penalty=cfg.weights.ess_penalty)
    problem = BilevelProblem(inner, Xva, yv, wm)
    method = make_method(cfg.hypergrad.method, cfg.hypergrad.options)
    out = run_bilevel(problem, method, cfg.outer.steps, cfg.outer.lr, tol=cfg.head.tol, max_iter=cfg.head.max_iter,
                      corrupted=data.corrupted, method_name=cfg.hypergrad.method, progress=progress)
    alpha = out.alpha.detach().float().cpu()
    ess = ess_per_class(out.alpha.double(), y, data.num_classes) / wm.counts.to(dev).clamp_min(1)
    info = {"weights_auroc": weight_auroc(alpha, data.corrupted), "ess_ratio_min": float(ess.min()),
            "bilevel_val_acc": accuracy(out.W, Xva, yv), "bilevel_seconds": time.perf_counter() - t0}
    return alpha, info, Ftr


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, device: str) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((model(x[i:i + batch].to(device)).argmax(1).cpu() == y[i:i + batch]).sum())
    model.train(was)
    return correct / max(1, x.shape[0])


def _rng_state(loader: torch.Generator) -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "loader": loader.get_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def _set_rng_state(state: Dict[str, Any], loader: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    loader.set_state(state["loader"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _ckpt_path(run: RunDir, k: int) -> Path:
    return run.ckpt_dir / f"stage_{k:02d}.pt"


# ----------------------------------------------------------------------------------------------
# the runner
# ----------------------------------------------------------------------------------------------


@dataclass
class StagedOutcome:
    """Result of :func:`run_staged`."""

    model: torch.nn.Module
    metrics: List[Dict[str, Any]]
    stages: List[Dict[str, Any]]
    alpha: Optional[torch.Tensor]
    summary: Dict[str, Any]
    resumed_from: Optional[int]
    finished: bool


def _build_model(cfg: StagedRunConfig, data: StagedData) -> torch.nn.Module:
    from .backbones import create_backbone

    torch.manual_seed(stream_seed(cfg.seed, "staged-init"))
    return create_backbone(cfg.model, data.num_classes, in_chans=int(data.x_train.shape[1]),
                           pretrained_file=cfg.pretrained_file).to(cfg.device)


def _restore(model: torch.nn.Module, ck: Dict[str, Any], cfg: StagedRunConfig, path: Path) -> None:
    """Give ``model`` the structure of the checkpoint (frozen BN, requires_grad) and load its weights."""
    from timm.utils.model import freeze as timm_freeze

    if ck.get("model_name") != cfg.model:
        raise ConfigError(f"Checkpoint {str(path)!r} holds architecture {ck.get('model_name')!r}, but the config "
                          f"expects {cfg.model!r}.")
    names = dict(model.named_modules())
    missing = [n for n in ck["frozen_bn"] if n not in names]
    if missing:
        raise ConfigError(f"Checkpoint {str(path)!r} does not match architecture {cfg.model!r}: frozen BatchNorm "
                          f"modules {missing[:5]} do not exist in the model.")
    if ck["frozen_bn"]:
        timm_freeze(model, list(ck["frozen_bn"]), include_bn_running_stats=True)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ck["model"].items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k}: expected {expected[k]}, got {got[k]}" for k in expected if k in got and got[k] != expected[k]]
    if missing or unexpected or shapes:
        raise ConfigError(f"Checkpoint {str(path)!r} does not match architecture {cfg.model!r}: missing keys "
                          f"{missing[:5]}, unexpected keys {unexpected[:5]}, shape mismatches {shapes[:5]}.")
    model.load_state_dict(ck["model"], strict=True)
    train = set(ck["trainable"])
    for n, p in model.named_parameters():
        p.requires_grad_(n in train)


def run_staged(cfg: StagedRunConfig, data: Optional[StagedData] = None, run: Optional[RunDir] = None, *,
               resume: bool = True, resume_from: Optional[int] = None, stop_after: Optional[int] = None,
               overwrite: bool = False, progress: bool = False) -> StagedOutcome:
    """Run (or resume) the stages of ``cfg``; write metrics, checkpoints and a summary to the run directory.

    Args:
        cfg: the staged run config.
        data: images and labels (default: :func:`staged_data` of ``cfg.data``).
        run: the run directory (default ``<cfg.out_dir>/<cfg.name>``).
        resume: continue after the newest valid stage checkpoint in ``run``.
        resume_from: continue after the checkpoint of this stage index instead (later ones are redone).
        stop_after: stop (without finishing the run) after checkpointing this stage index -- an
            interruption for tests and for running a schedule piecewise.
        overwrite: reuse a run directory made by another config.
        progress: tqdm bars.

    Metrics (``metrics.jsonl``, one row per epoch): stage, epoch, global epoch, train loss,
    validation/test accuracy, learning rates per group, trainable/frozen parameter counts and, for
    reweighted stages at each recomputation, the weights' AUROC, minimum ESS ratio and the feature
    drift since the previous recomputation.

    Raises:
        ConfigError: for a bad stage (selector matching nothing, nothing trainable), an unknown timm
            model, or a checkpoint of another architecture.
        RunDirError: if ``resume_from`` names a stage without a valid checkpoint.
    """
    from tqdm.auto import tqdm

    from .backbones import check_no_frozen_grads, frozen_bn_names, head_parameter_names, trainable_names

    t_start = time.perf_counter()
    from .hypergrad import make_method

    make_method(cfg.hypergrad.method, cfg.hypergrad.options)  # fail on bad options before work
    from .backbones import _check_model_name

    _check_model_name(cfg.model)
    if run is None:
        run = RunDir(Path(cfg.out_dir) / cfg.name, cfg, overwrite=overwrite)
    run.write_env(cfg.seed, cfg.device)
    data = data if data is not None else staged_data(cfg.data, cfg.seed)
    model = _build_model(cfg, data)
    loader = torch_generator(cfg.seed, "staged-loader")
    torch.manual_seed(stream_seed(cfg.seed, "staged-train"))

    metrics: List[Dict[str, Any]] = []
    stage_rows: List[Dict[str, Any]] = []
    freeze_rows: List[Dict[str, Any]] = []
    alpha: Optional[torch.Tensor] = None
    start, resumed = 0, None
    if resume_from is not None:
        if not 0 <= resume_from < len(cfg.stages):
            raise ConfigError(f"The 'resume_from' parameter of run_staged must be a stage index in "
                              f"0..{len(cfg.stages) - 1}. Got {resume_from!r} instead.")
        candidates = [resume_from]
    elif resume:
        candidates = list(range(len(cfg.stages) - 1, -1, -1))
    else:
        candidates = []
    for k in candidates:
        p = _ckpt_path(run, k)
        if not p.exists():
            continue
        try:
            ck = load_checked(p)
        except (RunDirError, RuntimeError, EOFError, ValueError) as e:
            if resume_from is not None:
                raise
            log.warning("Skipping stage checkpoint %s: %s", p.name, e)
            continue
        _restore(model, ck, cfg, p)
        _set_rng_state(ck["rng"], loader)
        metrics, stage_rows, freeze_rows = list(ck["metrics"]), list(ck["stages"]), list(ck["freeze_rows"])
        alpha = ck["alpha"]
        start = resumed = int(ck["stage_index"]) + 1
        log.info("Resuming after stage %d (%s).", ck["stage_index"], ck["stage_name"])
        break
    else:
        if resume_from is not None:
            raise RunDirError(f"No valid checkpoint of stage {resume_from} in {run.ckpt_dir}.")
    run.write_metrics(metrics)

    global_epoch = sum(r["epochs"] for r in stage_rows)
    head_names = set(head_parameter_names(model))
    for k in range(start, len(cfg.stages)):
        st = cfg.stages[k]
        t_stage, c_stage = time.perf_counter(), time.process_time()
        setup = configure_stage(model, st)
        opt, sched = setup.optimizer, setup.scheduler
        freeze_rows.extend({"stage": st.name, "stage_index": k, **r} for r in setup.report.rows)
        run.write_text("freeze_report.csv", _freeze_csv(freeze_rows))
        head_params = [p for n, p in model.named_parameters() if n in head_names and p.requires_grad]
        prev_feats: Optional[torch.Tensor] = None
        best = (-1.0, -1, None)
        stage_alpha = None
        for e in tqdm(range(st.epochs), desc=f"stage {st.name}", disable=not progress):
            t0 = time.perf_counter()
            row: Dict[str, Any] = {"stage": st.name, "stage_index": k, "epoch": e, "global_epoch": global_epoch,
                                   "loss": st.loss, "lr": [g["lr"] for g in opt.param_groups],
                                   "trainable_params": setup.report.trainable, "frozen_params": setup.report.frozen}
            recompute = st.loss == "reweighted" and (stage_alpha is None or (st.recompute_every > 0
                                                                             and e % st.recompute_every == 0))
            if recompute:
                stage_alpha, info, feats = learn_weights(model, data, cfg)
                row.update(info)
                row["recomputed"] = True
                if prev_feats is not None:
                    d = feature_drift(prev_feats, feats)
                    row["feature_rel_change"], row["feature_cka"] = d["rel_change"], d["cka"]
                prev_feats = feats
            model.train()
            perm = torch.randperm(data.x_train.shape[0], generator=loader)
            total, count = 0.0, 0
            for i in range(0, perm.numel(), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                xb, yb = data.x_train[idx].to(cfg.device), data.y_train[idx].to(cfg.device)
                w = stage_alpha[idx].to(cfg.device) if st.loss == "reweighted" else None
                loss = weighted_ce(model(xb), yb, w)
                if st.head_l2 > 0 and head_params:
                    loss = loss + 0.5 * st.head_l2 * sum((p * p).sum() for p in head_params)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                check_no_frozen_grads(model)
                opt.step()
                total += float(loss.detach()) * idx.numel()
                count += idx.numel()
            sched.step()
            row["train_loss"] = total / max(count, 1)
            row["val_acc"] = _accuracy(model, data.x_val, data.y_val, cfg.eval_batch_size, cfg.device)
            row["test_acc"] = _accuracy(model, data.x_test, data.y_test, cfg.eval_batch_size, cfg.device)
            row["seconds"] = time.perf_counter() - t0
            metrics.append(row)
            run.write_metrics(metrics)
            log.info("stage %s epoch %d: train loss %.4f val acc %.4f test acc %.4f", st.name, e, row["train_loss"],
                     row["val_acc"], row["test_acc"])
            if st.restore_best and row["val_acc"] > best[0]:
                best = (row["val_acc"], e, copy.deepcopy(model.state_dict()))
            global_epoch += 1
        if st.restore_best and best[2] is not None:
            model.load_state_dict(best[2])
        if stage_alpha is not None:
            alpha = stage_alpha
        srow = {"stage": st.name, "stage_index": k, "epochs": st.epochs, "loss": st.loss,
                "trainable_params": setup.report.trainable, "frozen_params": setup.report.frozen,
                "best_epoch": best[1] if st.restore_best else None,
                "val_acc": _accuracy(model, data.x_val, data.y_val, cfg.eval_batch_size, cfg.device),
                "test_acc": _accuracy(model, data.x_test, data.y_test, cfg.eval_batch_size, cfg.device),
                "seconds": time.perf_counter() - t_stage, "cpu_seconds": time.process_time() - c_stage}
        stage_rows.append(srow)
        save_checked(_ckpt_path(run, k), {
            "format": 1, "stage_index": k, "stage_name": st.name, "epoch": st.epochs, "model_name": cfg.model,
            "model": model.state_dict(), "frozen_bn": frozen_bn_names(model), "trainable": trainable_names(model),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state(loader),
            "metrics": metrics, "stages": stage_rows, "freeze_rows": freeze_rows, "alpha": alpha,
            "config_hash": run.hash,
        })
        log.info("Stage %r done: val acc %.4f, test acc %.4f (%.1fs).", st.name, srow["val_acc"], srow["test_acc"],
                 srow["seconds"])
        if stop_after is not None and k >= stop_after and k + 1 < len(cfg.stages):
            return StagedOutcome(model=model, metrics=metrics, stages=stage_rows, alpha=alpha, summary={},
                                 resumed_from=resumed, finished=False)

    from .bilevel import weight_auroc

    final_val = _accuracy(model, data.x_val, data.y_val, cfg.eval_batch_size, cfg.device)
    final_test = _accuracy(model, data.x_test, data.y_test, cfg.eval_batch_size, cfg.device)
    summary = {
        "model": cfg.model, "dataset": cfg.data.dataset, "noise": cfg.data.noise, "noise_rate": cfg.data.noise_rate,
        "seed": cfg.seed, "stages": stage_rows, "final_val_acc": final_val, "final_test_acc": final_test,
        "best_val_acc": max((m["val_acc"] for m in metrics), default=None),
        "weights_auroc": weight_auroc(alpha, data.corrupted) if alpha is not None else None,
        "max_trainable_params": max((r["trainable_params"] for r in stage_rows), default=0),
        "epochs": global_epoch, "resumed_from": resumed, "seconds_this_session": time.perf_counter() - t_start,
        "seconds_stages": sum(r["seconds"] for r in stage_rows),
        "cpu_seconds_stages": sum(r["cpu_seconds"] for r in stage_rows) if all("cpu_seconds" in r for r in stage_rows) else None,
        "config_hash": run.hash,
    }
    save_checked(run.file("final.pt"), {"model": model.state_dict(), "frozen_bn": frozen_bn_names(model),
                                        "alpha": alpha, "model_name": cfg.model})
    run.finish(summary)
    return StagedOutcome(model=model, metrics=metrics, stages=stage_rows, alpha=alpha, summary=summary,
                         resumed_from=resumed, finished=True)


def _freeze_csv(rows: List[Dict[str, Any]]) -> str:
    cols = ["stage_index", "stage", "module", "trainable", "frozen", "frozen_bn"]
    lines = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]
    return "\n".join(lines) + "\n"
