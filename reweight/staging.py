r"""Staged training of a timm backbone: warm-up -> freeze -> focus, and gradual unfreezing.

A staged run is a :class:`reweight.config.RunConfig` whose ``stages`` (a list of
:class:`reweight.config.StageConfig`, from YAML) is not empty. Each stage names its trainable set
(selectors of :mod:`reweight.backbones`: ``all``, ``head``, ``last:N``, ``group:I``, ``stage:I``,
``re:...``, globs), its learning rate and per-selector lr multipliers, epochs, early-stopping rule,
BatchNorm mode and loss:

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

Every stage runs through the one training loop of the backbone,
:func:`reweight.backbones.train_stage` (the loop of the main job's warm-up too). At every stage
switch :func:`configure_stage` re-freezes the model (BN-safe), rebuilds the parameter groups, the
optimizer and the scheduler (no stale momentum) and checks that the optimizer holds exactly the
trainable parameters; a freeze report is logged. At the end of every stage a checkpoint
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

import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import pipeline
from .backbones import (
    StageSetup,
    check_model_name,
    configure_stage,
    create_backbone,
    frozen_bn_names,
    model_accuracy,
    restore_freeze_state,
    train_stage,
    trainable_names,
    weighted_ce,
)
from .bilevel import weight_auroc
from .config import EMBEDDED_DATASETS, DataConfig, RunConfig, StageConfig
from .data import load_dataset, prepare_data
from .errors import ConfigError, RunDirError
from .features import extract_features, standardize
from .head import accuracy
from .hypergrad import make_method
from .runs import RunDir, load_checked, save_checked
from .seeding import stream_seed, torch_generator
from .weights import ess_per_class

# StageConfig (reweight.config) and StageSetup / configure_stage / weighted_ce (reweight.backbones) are
# re-exported: they lived here before issue 11.
__all__ = [
    "StageConfig",
    "StageSetup",
    "StagedData",
    "StagedOutcome",
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
    if dataset is None and data.dataset not in EMBEDDED_DATASETS:
        raise ConfigError(f"Staged runs read an embedded dataset (data.dataset=digits or mnist5k) or a Dataset passed "
                          f"in (reweight.imagefolder.load_imagefolder). Got data.dataset={data.dataset!r}; user sources "
                          f"run through `carrot run` (docs/bring_your_own_data.md).")
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
# weights of reweighted stages and feature drift
# ----------------------------------------------------------------------------------------------


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


def learn_weights(model: torch.nn.Module, data: StagedData, cfg: RunConfig,
                  progress: bool = False) -> Tuple[torch.Tensor, Dict[str, Any], torch.Tensor]:
    r"""Learn :math:`\alpha` by the bilevel engine on features of the **current** backbone.

    Extracts pooled pre-logit features of the training and validation images (eval mode, batches of
    ``cfg.features.batch_size``), standardises them with training statistics when
    ``cfg.features.standardize``, builds the L2 head problem of ``cfg.head`` / ``cfg.weights`` and
    runs ``cfg.outer.steps`` outer steps of ``cfg.hypergrad`` (exactly the core engine's
    :func:`reweight.bilevel.run_bilevel`). The model's train/eval mode is restored.

    Returns:
        ``(alpha (n,) float32, info, raw training features (n, d))``; ``info`` holds the weights'
        AUROC (clean vs corrupted), the minimum per-class ESS ratio, the bilevel head's validation
        accuracy and the seconds spent.
    """
    t0 = time.perf_counter()
    was_training = model.training
    Ftr = extract_features(model, data.x_train, cfg.features.batch_size, device=cfg.device)
    Fva = extract_features(model, data.x_val, cfg.features.batch_size, device=cfg.device)
    model.train(was_training)
    Xtr, Xva = standardize(Ftr, Fva) if cfg.features.standardize else (Ftr, Fva)
    meta_val = None
    if cfg.data.meta_val_fraction > 0:  # the same trusted-set protocol as the main job: a held-out meta-val part
        from .data import meta_split

        meta_val = torch.as_tensor(meta_split(data.y_val.cpu().numpy(), cfg.data.meta_val_fraction, cfg.seed))
    problem = pipeline.bilevel_problem(cfg, Xtr, data.y_train, Xva, data.y_val, data.num_classes, meta_val=meta_val)
    out = pipeline.learn_weights(cfg, problem, corrupted=data.corrupted, progress=progress)
    alpha = out.alpha.detach().float().cpu()
    y = problem.inner.y
    ess = ess_per_class(out.alpha.double(), y, data.num_classes) / problem.weights.counts.to(y.device).clamp_min(1)
    info = {"weights_auroc": weight_auroc(alpha, data.corrupted), "ess_ratio_min": float(ess.min()),
            "bilevel_val_acc": accuracy(out.W, problem.X_val, problem.y_val), "bilevel_seconds": time.perf_counter() - t0}
    return alpha, info, Ftr


class _StageWeights:
    """The weights of a reweighted stage, as a :data:`reweight.backbones.train.WeightsFn`.

    Learned by :func:`learn_weights` at the stage's first epoch and then every ``recompute_every``
    epochs (strategy B; 0 = once); each recomputation adds the weights' diagnostics and the feature
    drift since the previous one to the epoch's metrics row.
    """

    def __init__(self, model: torch.nn.Module, data: StagedData, cfg: RunConfig, stage: StageConfig):
        self.model, self.data, self.cfg, self.every = model, data, cfg, stage.recompute_every
        self.alpha: Optional[torch.Tensor] = None
        self._features: Optional[torch.Tensor] = None

    def __call__(self, epoch: int) -> Tuple[Optional[torch.Tensor], Dict[str, Any]]:
        row: Dict[str, Any] = {}
        if self.alpha is None or (self.every > 0 and epoch % self.every == 0):
            self.alpha, info, feats = learn_weights(self.model, self.data, self.cfg)
            row.update(info)
            row["recomputed"] = True
            if self._features is not None:
                d = feature_drift(self._features, feats)
                row["feature_rel_change"], row["feature_cka"] = d["rel_change"], d["cka"]
            self._features = feats
        return self.alpha, row


# ----------------------------------------------------------------------------------------------
# the runner: state, resume, one stage, summary
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


@dataclass
class _Progress:
    """What a staged run has done so far (restored from a stage checkpoint on resume)."""

    metrics: List[Dict[str, Any]] = field(default_factory=list)
    stages: List[Dict[str, Any]] = field(default_factory=list)
    freeze_rows: List[Dict[str, Any]] = field(default_factory=list)
    alpha: Optional[torch.Tensor] = None
    next_stage: int = 0
    resumed_from: Optional[int] = None

    @property
    def global_epoch(self) -> int:
        return len(self.metrics)


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


def _build_model(cfg: RunConfig, data: StagedData) -> torch.nn.Module:
    torch.manual_seed(stream_seed(cfg.seed, "staged-init"))
    return create_backbone(cfg.backbone.model, data.num_classes, in_chans=int(data.x_train.shape[1]),
                           pretrained_file=cfg.backbone.pretrained_file).to(cfg.device)


def _restore(model: torch.nn.Module, ck: Dict[str, Any], cfg: RunConfig, path: Path) -> None:
    """Give ``model`` the structure of the checkpoint (frozen BN, requires_grad) and load its weights."""
    name = cfg.backbone.model
    if ck.get("model_name") != name:
        raise ConfigError(f"Checkpoint {str(path)!r} holds architecture {ck.get('model_name')!r}, but the config "
                          f"expects {name!r}.")
    try:
        restore_freeze_state(model, ck["frozen_bn"], ck["trainable"])
    except ConfigError as e:
        raise ConfigError(f"Checkpoint {str(path)!r} does not match architecture {name!r}: {e}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ck["model"].items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k}: expected {expected[k]}, got {got[k]}" for k in expected if k in got and got[k] != expected[k]]
    if missing or unexpected or shapes:
        raise ConfigError(f"Checkpoint {str(path)!r} does not match architecture {name!r}: missing keys "
                          f"{missing[:5]}, unexpected keys {unexpected[:5]}, shape mismatches {shapes[:5]}.")
    model.load_state_dict(ck["model"], strict=True)


def _resume(model: torch.nn.Module, cfg: RunConfig, run: RunDir, loader: torch.Generator, resume: bool,
            resume_from: Optional[int]) -> _Progress:
    """Restore model, RNG states and progress from the newest valid stage checkpoint (or ``resume_from``'s)."""
    n = len(cfg.stages)
    if resume_from is not None:
        if not 0 <= resume_from < n:
            raise ConfigError(f"The 'resume_from' parameter of run_staged must be a stage index in "
                              f"0..{n - 1}. Got {resume_from!r} instead.")
        candidates = [resume_from]
    else:
        candidates = list(range(n - 1, -1, -1)) if resume else []
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
        log.info("Resuming after stage %d (%s).", ck["stage_index"], ck["stage_name"])
        k_done = int(ck["stage_index"])
        return _Progress(metrics=list(ck["metrics"]), stages=list(ck["stages"]), freeze_rows=list(ck["freeze_rows"]),
                         alpha=ck["alpha"], next_stage=k_done + 1, resumed_from=k_done + 1)
    if resume_from is not None:
        raise RunDirError(f"No valid checkpoint of stage {resume_from} in {run.ckpt_dir}.")
    return _Progress()


def _run_stage(k: int, model: torch.nn.Module, cfg: RunConfig, data: StagedData, run: RunDir,
               loader: torch.Generator, state: _Progress, progress: bool) -> None:
    """Configure and train stage ``k`` through the one training loop, then checkpoint it; updates ``state``."""
    st = cfg.stages[k]
    t_stage, c_stage = time.perf_counter(), time.process_time()
    setup = configure_stage(model, st)
    state.freeze_rows.extend({"stage": st.name, "stage_index": k, **r} for r in setup.report.rows)
    run.write_text("freeze_report.csv", _freeze_csv(state.freeze_rows))

    def record(row: Dict[str, Any]) -> None:
        state.metrics.append({"stage": st.name, "stage_index": k, "epoch": row["epoch"],
                              "global_epoch": state.global_epoch, "loss": st.loss, "lr": row["lr"],
                              "trainable_params": setup.report.trainable, "frozen_params": setup.report.frozen,
                              **row})
        run.write_metrics(state.metrics)

    weights = _StageWeights(model, data, cfg, st) if st.loss == "reweighted" else None
    result = train_stage(model, st, (data.x_train, data.y_train), (data.x_val, data.y_val),
                         test=(data.x_test, data.y_test), batch_size=cfg.backbone.batch_size,
                         eval_batch_size=cfg.features.batch_size, generator=loader, device=cfg.device, setup=setup,
                         sample_weights=weights, on_epoch=record, progress=progress)
    if weights is not None and weights.alpha is not None:
        state.alpha = weights.alpha
    eval_bs = cfg.features.batch_size
    srow = {"stage": st.name, "stage_index": k, "epochs": len(result.history), "loss": st.loss,
            "trainable_params": setup.report.trainable, "frozen_params": setup.report.frozen,
            "best_epoch": result.best_epoch if st.restore_best else None, "stopped_early": result.stopped_early,
            "val_acc": model_accuracy(model, data.x_val, data.y_val, eval_bs, cfg.device),
            "test_acc": model_accuracy(model, data.x_test, data.y_test, eval_bs, cfg.device),
            "seconds": time.perf_counter() - t_stage, "cpu_seconds": time.process_time() - c_stage}
    state.stages.append(srow)
    state.next_stage = k + 1
    save_checked(_ckpt_path(run, k), {
        "format": 1, "stage_index": k, "stage_name": st.name, "epoch": len(result.history),
        "model_name": cfg.backbone.model, "model": model.state_dict(), "frozen_bn": frozen_bn_names(model),
        "trainable": trainable_names(model), "optimizer": setup.optimizer.state_dict(),
        "scheduler": setup.scheduler.state_dict(), "rng": _rng_state(loader), "metrics": state.metrics,
        "stages": state.stages, "freeze_rows": state.freeze_rows, "alpha": state.alpha, "config_hash": run.hash,
    })
    log.info("Stage %r done: val acc %.4f, test acc %.4f (%.1fs).", st.name, srow["val_acc"], srow["test_acc"],
             srow["seconds"])


def _summary(model: torch.nn.Module, cfg: RunConfig, data: StagedData, run: RunDir, state: _Progress,
             t_start: float) -> Dict[str, Any]:
    rows = state.stages
    eval_bs = cfg.features.batch_size
    return {
        "model": cfg.backbone.model, "dataset": cfg.data.dataset, "noise": cfg.data.noise,
        "noise_rate": cfg.data.noise_rate, "seed": cfg.seed, "stages": rows,
        "final_val_acc": model_accuracy(model, data.x_val, data.y_val, eval_bs, cfg.device),
        "final_test_acc": model_accuracy(model, data.x_test, data.y_test, eval_bs, cfg.device),
        "best_val_acc": max((m["val_acc"] for m in state.metrics), default=None),
        "weights_auroc": weight_auroc(state.alpha, data.corrupted) if state.alpha is not None else None,
        "max_trainable_params": max((r["trainable_params"] for r in rows), default=0),
        "epochs": state.global_epoch, "resumed_from": state.resumed_from,
        "seconds_this_session": time.perf_counter() - t_start,
        "seconds_stages": sum(r["seconds"] for r in rows),
        "cpu_seconds_stages": sum(r["cpu_seconds"] for r in rows) if all("cpu_seconds" in r for r in rows) else None,
        "config_hash": run.hash,
    }


def run_staged(cfg: RunConfig, data: Optional[StagedData] = None, run: Optional[RunDir] = None, *,
               resume: bool = True, resume_from: Optional[int] = None, stop_after: Optional[int] = None,
               overwrite: bool = False, progress: bool = False) -> StagedOutcome:
    """Run (or resume) the stages of ``cfg``; write metrics, checkpoints and a summary to the run directory.

    Args:
        cfg: the run config; ``cfg.stages`` must not be empty (see :class:`reweight.config.RunConfig`
            for the fields a staged run reads).
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
        ConfigError: for a config without stages, a bad stage (selector matching nothing, nothing
            trainable), an unknown timm model, or a checkpoint of another architecture.
        RunDirError: if ``resume_from`` names a stage without a valid checkpoint.
    """
    t_start = time.perf_counter()
    if not cfg.stages:
        raise ConfigError("The 'stages' parameter of run_staged's config must be a non-empty list of stages. Got [] "
                          "instead. A config without stages is a head-only run (the main job).")
    make_method(cfg.hypergrad.method, cfg.hypergrad.options)  # fail on bad options before work
    check_model_name(cfg.backbone.model)
    if run is None:
        run = RunDir(Path(cfg.out_dir) / cfg.name, cfg, overwrite=overwrite)
    # every stage, extraction and head on the resolved device ('auto' -> cuda/mps/cpu); recorded in env.json
    cfg = dataclasses.replace(cfg, device=str(pipeline.resolve_device(cfg.device)))
    run.write_env(cfg.seed, cfg.device)
    data = data if data is not None else staged_data(cfg.data, cfg.seed)
    model = _build_model(cfg, data)
    loader = torch_generator(cfg.seed, "staged-loader")
    torch.manual_seed(stream_seed(cfg.seed, "staged-train"))
    state = _resume(model, cfg, run, loader, resume, resume_from)
    run.write_metrics(state.metrics)
    for k in range(state.next_stage, len(cfg.stages)):
        _run_stage(k, model, cfg, data, run, loader, state, progress)
        if stop_after is not None and k >= stop_after and k + 1 < len(cfg.stages):
            return StagedOutcome(model=model, metrics=state.metrics, stages=state.stages, alpha=state.alpha,
                                 summary={}, resumed_from=state.resumed_from, finished=False)
    summary = _summary(model, cfg, data, run, state, t_start)
    save_checked(run.file("final.pt"), {"model": model.state_dict(), "frozen_bn": frozen_bn_names(model),
                                        "alpha": state.alpha, "model_name": cfg.backbone.model})
    run.finish(summary)
    return StagedOutcome(model=model, metrics=state.metrics, stages=state.stages, alpha=state.alpha, summary=summary,
                         resumed_from=state.resumed_from, finished=True)


def _freeze_csv(rows: List[Dict[str, Any]]) -> str:
    cols = ["stage_index", "stage", "module", "trainable", "frozen", "frozen_bn"]
    lines = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]
    return "\n".join(lines) + "\n"
