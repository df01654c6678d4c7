r"""The composition root: config -> data -> features -> weight model -> head objective -> bilevel problem.

Every study, figure and the staged runner builds its problems here, so a new data source, head option
or weighting knob lands in one place:

* :func:`features` -- data, splits and corruption, the warmed-up frozen backbone, cached features
  (:func:`reweight.features.build_features`);
* :func:`head_problem` -- the bilevel problem of a config on a feature set: the L2 head on the
  training rows (bias column, dtype, device), the weight model, the clean validation split, and
  named evaluation sets;
* :func:`attribution_problem` -- the trained head of an attribution study (float64, fitted to a tight
  gradient norm) with its validation and test splits;
* :func:`draw_subset` -- a seeded subset of rows (LOO subsets, test queries) from a named seed stream;
* :func:`learn_weights` -- the outer loop with the config's hypergradient method;
* :func:`run_main` -- the main job's body (uniform vs learned weights, a run directory, a summary);
  it prints nothing.

Nothing here parses arguments, prints or plots (STYLE: computing, orchestrating and reporting stay apart).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from .attribution.base import AttributionProblem
from .bilevel import BilevelOutcome, run_bilevel, weight_auroc
from .config import EMBEDDED_DATASETS, RunConfig
from .errors import ConfigError
from .features import FeatureSet, build_features, run_identity
from .guard import geometric_combine, heldout_losses, select_step
from .head import HeadObjective, accuracy, add_bias, mean_ce, solve_head
from .hypergrad import BilevelProblem, HypergradMethod, make_method
from .runs import RunDir, save_checked
from .seeding import numpy_rng
from .validate import check_int
from .weights import WeightModel, class_report

__all__ = [
    "Evals",
    "HeadSetup",
    "attribution_problem",
    "bilevel_problem",
    "draw_subset",
    "attribution_scores",
    "compare_methods",
    "detection_scores",
    "detection_table",
    "evaluate_head",
    "final_head",
    "features",
    "head_problem",
    "learn_weights",
    "preflight",
    "resolve_device",
    "run_main",
    "weight_model",
]

log = logging.getLogger(__name__)

#: named evaluation sets ``name -> (X, y)`` (bias column and dtype of the head).
Evals = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class HeadSetup:
    """The bilevel problem of a config on a feature set, with its evaluation sets and the features."""

    problem: BilevelProblem
    evals: Evals
    features: FeatureSet


def resolve_device(device: str) -> torch.device:
    """The torch device a config names (``auto``: CUDA if available, else MPS, else CPU).

    Raises:
        ConfigError: for a device this machine does not have (naming what it has).
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"The 'device' parameter is {device!r} but CUDA is not available on this machine. "
                              f"Use device=cpu (or device=auto).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"The 'device' parameter is {device!r} but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s).")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"The 'device' parameter is {device!r} but MPS is not available on this machine. "
                              f"Use device=cpu (or device=auto).")
    return dev


def _writable_dir(path: str | Path, key: str) -> None:
    """Raise :class:`ConfigError` unless ``path`` is (or can be created as) a writable directory."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"The '{key}' parameter must be a directory. Got {str(p)!r}, which is a file.")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "is a file" if not probe.is_dir() else "is not writable"
        raise ConfigError(f"The '{key}' parameter must be a writable directory. Got {str(p)!r} ({str(probe)!r} {why}).")


def preflight(cfg: RunConfig, *, run_dir: bool = True) -> None:
    """Check everything a run of ``cfg`` needs from this machine BEFORE any work and before a run directory exists.

    The hypergradient method and its options, the device, the output and cache directories (writable
    directories, not files), the run directory (not a file), the backbone (a timm model name, with close
    matches on a typo; the weights file exists; not for precomputed embeddings), the data paths of a user
    source (:func:`reweight.sources.check_source_paths`; the content is checked by
    :func:`reweight.sources.load_source`, also before the run directory exists), TensorBoard when asked.
    Config values themselves are validated when the config is built (:mod:`reweight.config`).

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    make_method(cfg.hypergrad.method, cfg.hypergrad.options)
    if cfg.guard.mode != "off" and cfg.data.meta_val_fraction <= 0:
        raise _no_meta_val(cfg, f"data.meta_val_fraction={cfg.data.meta_val_fraction} holds out none")
    from .baselines import BASELINES

    for b in cfg.compare.baselines:
        BASELINES.get(b)  # unknown name -> the registered ones
    from .attribution import ATTRIBUTION

    for a in cfg.compare.attribution:
        ATTRIBUTION.get(a)
    resolve_device(cfg.device)
    _writable_dir(cfg.features.cache_dir, "features.cache_dir")
    if run_dir:
        _writable_dir(cfg.out_dir, "out_dir")
        target = Path(cfg.out_dir) / cfg.name
        if target.exists() and not target.is_dir():
            raise ConfigError(f"The 'name' parameter names a file: {str(target)!r} exists and is not a run directory.")
    if cfg.data.dataset not in EMBEDDED_DATASETS:
        from .sources import check_source_paths

        check_source_paths(cfg.data)
    from .backbones import check_model_name

    if cfg.data.dataset != "embeddings":  # precomputed features: no backbone
        check_model_name(cfg.backbone.model, "'backbone.model' parameter")
    if cfg.backbone.pretrained_file is not None and not Path(cfg.backbone.pretrained_file).is_file():
        raise ConfigError(f"The 'backbone.pretrained_file' parameter must be an existing file. "
                          f"Got {cfg.backbone.pretrained_file!r} instead.")
    if cfg.tensorboard:
        _tensorboard_writer_cls()


def features(cfg: RunConfig, progress: bool = False, source: Any = None) -> FeatureSet:
    """Data -> splits and corruption -> warmed-up frozen backbone -> cached features, for ``cfg``.

    The warm-up and the extraction run on ``cfg.device``; ``source`` is the user source already loaded by
    :func:`reweight.sources.load_source` (loaded here when None).
    """
    return build_features(cfg.data, cfg.backbone, cfg.features, cfg.seed, device=resolve_device(cfg.device),
                          progress=progress, source=source)


def _prep(cfg: RunConfig, x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    x = x.to(resolve_device(cfg.device), dtype or getattr(torch, cfg.head.dtype))
    return add_bias(x) if cfg.head.bias else x


def weight_model(cfg: RunConfig, labels: torch.Tensor, num_classes: int) -> WeightModel:
    r"""The :math:`\alpha` parameterisation of ``cfg.weights`` on the training labels."""
    w = cfg.weights
    return WeightModel(labels, num_classes, class_mass=w.class_mass, beta_entropy=w.beta_entropy, beta_ess=w.beta_ess,
                       ess_floor=w.ess_floor, ess_penalty=w.ess_penalty,
                       parameterization="exp" if cfg.outer.optimizer == "eg" else "softplus")


def bilevel_problem(cfg: RunConfig, X_train: torch.Tensor, y_train: torch.Tensor, X_val: torch.Tensor,
                    y_val: torch.Tensor, num_classes: int, meta_val: Optional[torch.Tensor] = None) -> BilevelProblem:
    r"""The bilevel problem of ``cfg`` on raw features: the L2 head of ``cfg.head`` (bias column, dtype, device)
    on the training rows, the weight model of ``cfg.weights``, and the trusted rows: those of ``meta_val``
    (a bool mask over them) are held out as meta-val, the others (meta-train) drive the hypergradients."""
    dev = resolve_device(cfg.device)
    inner = HeadObjective(_prep(cfg, X_train), y_train.to(dev), num_classes, cfg.head.lam)
    Xv, yv = _prep(cfg, X_val), y_val.to(dev)
    wm = weight_model(cfg, y_train.to(dev), num_classes)
    if meta_val is None or not bool(meta_val.any()):
        return BilevelProblem(inner, Xv, yv, wm)
    mv = meta_val.to(dev).bool()
    return BilevelProblem(inner, Xv[~mv], yv[~mv], wm, X_meta_val=Xv[mv], y_meta_val=yv[mv])


def _train_X(problem: BilevelProblem) -> torch.Tensor:
    """The training rows of an in-memory problem (the comparison and the trusted-in-head fit need them)."""
    from .rows import TensorRows

    rows = problem.inner.rows
    if not isinstance(rows, TensorRows):
        raise ConfigError(f"The comparison needs in-memory training features; got a {type(rows).__name__} source.")
    return rows.X


def _no_meta_val(cfg: RunConfig, why: str) -> ConfigError:
    """The one error for a guard without a held-out meta-val part of the trusted set (``why``: what left none)."""
    return ConfigError(f"The 'guard.mode' parameter is {cfg.guard.mode!r}, which needs a held-out meta-val part of the "
                       f"trusted set, but {why}. Set data.meta_val_fraction > 0 (e.g. 0.5) with a trusted set of >= 2 "
                       f"samples per class (data.trusted_size, data.val_fraction, data.trusted_dir/file), or "
                       f"guard.mode=off.")


def head_problem(cfg: RunConfig, fs: FeatureSet) -> HeadSetup:
    """The bilevel problem of ``cfg`` on features ``fs`` (bias column, dtype, device) and its evaluation sets.

    Evaluation sets: ``train`` (the observed, possibly noisy, training labels), ``val`` (meta-train: the
    trusted rows that drive the hypergradients; in-sample for the learned weights), ``meta_val`` (the
    held-out trusted rows, when ``data.meta_val_fraction > 0``) and ``test``.
    """
    dev = resolve_device(cfg.device)
    problem = bilevel_problem(cfg, fs.X_train, fs.y_train, fs.X_val, fs.y_val, fs.num_classes, fs.meta_val)
    evals: Evals = {"train": (_train_X(problem), problem.inner.y), "val": (problem.X_val, problem.y_val)}
    if problem.has_meta_val:
        assert problem.X_meta_val is not None and problem.y_meta_val is not None
        evals["meta_val"] = (problem.X_meta_val, problem.y_meta_val)
    evals["test"] = (_prep(cfg, fs.X_test), fs.y_test.to(dev))
    return HeadSetup(problem=problem, evals=evals, features=fs)


def attribution_problem(cfg: RunConfig, fs: FeatureSet, lam: Optional[float] = None, grad_tol: float = 1e-10,
                        alpha: Optional[torch.Tensor] = None) -> Tuple[AttributionProblem, Dict[str, torch.Tensor]]:
    r"""The trained head of an attribution study: float64 features (bias column of ``cfg.head.bias``),
    :math:`W^*` fitted to :math:`\|\nabla F\|\le` ``grad_tol`` at ``lam`` (default ``cfg.head.lam``).

    Returns:
        the :class:`~reweight.attribution.AttributionProblem` and its float64 ``X_val``, ``y_val``,
        ``X_test``, ``y_test``.
    """
    f64 = torch.float64
    X = _prep(cfg, fs.X_train, f64)
    splits = {"X_val": _prep(cfg, fs.X_val, f64), "y_val": fs.y_val.to(X.device),
              "X_test": _prep(cfg, fs.X_test, f64), "y_test": fs.y_test.to(X.device)}
    pr = AttributionProblem.from_data(X, fs.y_train.to(X.device), fs.num_classes, cfg.head.lam if lam is None else lam,
                                      alpha=alpha, grad_tol=grad_tol)
    return pr, splits


def draw_subset(n: int, k: int, seed: int, stream: str) -> torch.Tensor:
    """``min(k, n)`` distinct row indices of ``range(n)``, sorted, drawn from the seed stream ``stream`` of ``seed``.

    The same ``(n, k, seed, stream)`` always gives the same indices, and a new stream name never shifts
    the draws of another (:func:`reweight.seeding.numpy_rng`). Studies name their streams, e.g.
    ``sanity_subset`` (the rows with exact leave-one-out ground truth) and ``sanity_queries`` (test queries).

    Returns:
        ``(min(k, n),)`` int64 indices in increasing order.

    Raises:
        ConfigError: for ``n < 1`` or ``k < 1``.

    Example:
        >>> draw_subset(10, 3, seed=0, stream="doc").tolist() == draw_subset(10, 3, seed=0, stream="doc").tolist()
        True
    """
    import numpy as np

    n = int(check_int(n, "n", "draw_subset", minimum=1))  # type: ignore[arg-type]
    k = int(check_int(k, "k", "draw_subset", minimum=1))  # type: ignore[arg-type]
    idx = numpy_rng(seed, stream).choice(n, size=min(k, n), replace=False)
    return torch.from_numpy(np.sort(idx))


def evaluate_head(W: torch.Tensor, evals: Evals) -> Dict[str, float]:
    """``<set>_acc`` and ``<set>_loss`` (mean cross-entropy) of the head ``W`` on every evaluation set."""
    out = {f"{k}_acc": accuracy(W, X, y) for k, (X, y) in evals.items()}
    out.update({f"{k}_loss": float(mean_ce(W, X, y)) for k, (X, y) in evals.items()})
    return out


def _path(cfg: RunConfig, problem: BilevelProblem, method: HypergradMethod, *, evals: Optional[Evals],
          corrupted: Optional[torch.Tensor], run: Optional[RunDir], progress: bool, record_path: bool,
          on_step: Optional[Callable[[Dict[str, Any], torch.Tensor], None]], allow_unconverged: bool) -> BilevelOutcome:
    return run_bilevel(problem, method, cfg.outer.steps, cfg.outer.lr, grad_tol=cfg.head.grad_tol,
                       max_iter=cfg.head.max_iter, checkpoint_every=cfg.outer.checkpoint_every, run=run,
                       evals=evals, corrupted=corrupted, method_name=cfg.hypergrad.method, progress=progress,
                       on_step=on_step, allow_unconverged=allow_unconverged, optimizer=cfg.outer.optimizer,
                       schedule=cfg.outer.schedule, record_path=record_path)


def final_head(cfg: RunConfig, problem: BilevelProblem, alpha: torch.Tensor, W0: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    r"""The head of the final weights: :math:`\arg\min_W F(W,\alpha)` on the training rows or, with
    ``guard.trusted_in_inner``, on the training rows (weights ``alpha``) and the whole trusted set (weight 1)."""
    if not cfg.guard.trusted_in_inner:
        return solve_head(problem.inner, alpha, W0=W0, grad_tol=cfg.head.grad_tol, max_iter=cfg.head.max_iter).W
    Xt, yt = problem.trusted()
    obj = HeadObjective(torch.cat([_train_X(problem), Xt]), torch.cat([problem.inner.y, yt]), problem.inner.K,
                        problem.inner.lam)
    a = torch.cat([alpha, torch.ones(yt.numel(), dtype=alpha.dtype, device=alpha.device)])
    return solve_head(obj, a, W0=W0, grad_tol=cfg.head.grad_tol, max_iter=cfg.head.max_iter).W


def learn_weights(cfg: RunConfig, problem: BilevelProblem, *, evals: Optional[Evals] = None,
                  corrupted: Optional[torch.Tensor] = None, run: Optional[RunDir] = None, progress: bool = False,
                  method: Optional[HypergradMethod] = None,
                  on_step: Optional[Callable[[Dict[str, Any], torch.Tensor], None]] = None,
                  allow_unconverged: bool = False) -> BilevelOutcome:
    r"""The learned weights of ``cfg`` on ``problem``: the outer loop, then the meta-val guard (:mod:`reweight.guard`).

    ``guard.mode``:

    * ``off``: one path whose hypergradients use the whole trusted set; its last step is kept;
    * ``select``: one path on meta-train; the step (0 = uniform) is chosen on meta-val
      (:func:`reweight.guard.select_step`);
    * ``crossfit``: a second path swaps meta-train and meta-val; at every step the two paths' weights are
      combined by a class-normalised geometric mean, and the step is chosen on the held-out losses of both
      paths (each path's head on the half it did not see).

    The kept weights then train the final head (:func:`final_head`). ``outcome.guard`` records the choice;
    ``outcome.score`` is the learned ranking of the samples (the weights of the chosen step, or of step 1
    when the guard falls back to uniform weights) for noise detection. ``evals`` are logged each step,
    ``corrupted`` (ground truth, when known) gives the AUROC of the weights, ``run`` checkpoints and resumes.
    """
    method = method if method is not None else make_method(cfg.hypergrad.method, cfg.hypergrad.options)
    mode = cfg.guard.mode
    kw = dict(evals=evals, corrupted=corrupted, progress=progress, on_step=on_step,
              allow_unconverged=allow_unconverged)
    if mode == "off" or not problem.has_meta_val:
        if mode != "off":
            raise _no_meta_val(cfg, "the problem has no meta-val rows")
        Xt, yt = problem.trusted()
        whole = BilevelProblem(problem.inner, Xt, yt, problem.weights)
        out = _path(cfg, whole, method, run=run, record_path=False, **kw)  # type: ignore[arg-type]
        out.guard = {"mode": "off", "step": len(out.metrics)}
        out.score = out.alpha
        if cfg.guard.trusted_in_inner:
            out.W = final_head(cfg, problem, out.alpha, out.W)
        return out
    assert problem.X_meta_val is not None and problem.y_meta_val is not None
    a = _path(cfg, problem, method, run=run, record_path=True, **kw)  # type: ignore[arg-type]
    assert a.path_alpha is not None and a.path_W is not None
    L = heldout_losses(a.path_W, problem.X_meta_val, problem.y_meta_val, cfg.guard.criterion)
    alphas = a.path_alpha
    if mode == "crossfit":
        swapped = BilevelProblem(problem.inner, problem.X_meta_val, problem.y_meta_val, problem.weights,
                                 all_classes=False, X_meta_val=problem.X_val, y_meta_val=problem.y_val)
        b = _path(cfg, swapped, method, run=run.child("crossfit_b") if run is not None else None, record_path=True,
                  **{**kw, "on_step": None, "progress": False})  # type: ignore[arg-type]
        assert b.path_alpha is not None and b.path_W is not None
        L = torch.cat([L, heldout_losses(b.path_W, problem.X_val, problem.y_val, cfg.guard.criterion)], dim=1)
        wm = problem.weight_model("learn_weights")
        masses, labels = wm.masses.to(alphas.device, alphas.dtype), wm.labels.to(alphas.device)
        alphas = torch.stack([geometric_combine([x, y], labels, masses) for x, y in zip(a.path_alpha, b.path_alpha)])
        a.convergence = _merge_convergence(a.convergence, b.convergence)
    choice = select_step(L, cfg.guard.z)
    t = choice.step
    alpha = alphas[t]
    W = a.path_W[t] if mode == "select" and not cfg.guard.trusted_in_inner else final_head(cfg, problem, alpha,
                                                                                         a.path_W[t])
    a.alpha, a.W = alpha, W
    a.score = alphas[max(t, 1)] if alphas.shape[0] > 1 else alpha
    a.guard = {"mode": mode, "criterion": cfg.guard.criterion, "z": cfg.guard.z, "step": t,
               "best_step": choice.best_step, "gain": choice.gain, "se": choice.se, "fell_back": choice.fell_back,
               "heldout_loss": L.mean(1).tolist()}
    return a


def _merge_convergence(x: Dict[str, Any], y: Dict[str, Any]) -> Dict[str, Any]:
    def worst(k: str) -> Any:
        vals = [v for v in (x.get(k), y.get(k)) if v is not None]
        return max(vals) if vals else None

    return {**x, "converged": bool(x.get("converged", True) and y.get("converged", True)),
            "unconverged_steps": int(x.get("unconverged_steps", 0)) + int(y.get("unconverged_steps", 0)),
            "worst_rel_residual": worst("worst_rel_residual"), "worst_inner_grad_norm": worst("worst_inner_grad_norm")}


def _tensorboard_writer_cls() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # tensorboard is an optional extra
        raise ConfigError("tensorboard=true needs the 'tensorboard' package: pip install 'carrot-reweight[tensorboard]'.") from e
    return SummaryWriter


def _tb_logger(writer: Any) -> Callable[[Dict[str, Any], torch.Tensor], None]:
    """An ``on_step`` callback logging scalars, per-class ESS ratios and the weight histogram."""

    def log_step(row: Dict[str, Any], alpha: torch.Tensor) -> None:
        step = row["step"]
        for key in ("val_loss", "objective", "penalty", "val_acc", "test_acc", "auroc", "ess_ratio_min", "hvps",
                    "inner_iters"):
            if row.get(key) is not None:
                writer.add_scalar(key, row[key], step)
        for c, r in enumerate(row["ess_ratio"]):
            writer.add_scalar(f"ess_ratio/class_{c}", r, step)
        writer.add_histogram("alpha", alpha.detach().cpu(), step)

    return log_step


def detection_scores(problem: BilevelProblem, W_uniform: torch.Tensor, method: HypergradMethod,
                     learned: torch.Tensor, baselines: Dict[str, Any],
                     attribution: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    r"""How clean each training sample looks to each detector (higher = cleaner), ``name -> (n,)``.

    ``alpha`` (the learned ranking), ``uniform_loss`` (:math:`-\ell_i` under the uniform head),
    ``hypergrad_step0`` (:math:`-\partial L_{trusted}/\partial\alpha_i` at uniform weights, on the whole
    trusted set -- the data the learned weights saw: a sample whose up-weighting lowers the trusted loss
    looks clean), the scores of the baselines that have one (``clean_only``: the clean head's probability of
    the given label; ``knn``: neighbour agreement), and ``attribution`` scores (:func:`attribution_scores`).
    """
    ones = torch.ones(problem.inner.n, dtype=W_uniform.dtype, device=W_uniform.device)
    Xt, yt = problem.trusted()
    whole = BilevelProblem(problem.inner, Xt, yt, problem.weights)
    out = {"alpha": learned, "uniform_loss": -problem.inner.sample_losses(W_uniform),
           "hypergrad_step0": -method.val_alpha_grad(whole, W_uniform, ones).grad_alpha}
    names = {"clean_only": "clean_only", "knn_clean": "knn"}
    for b, name in names.items():
        if b in baselines and baselines[b].score is not None:
            out[name] = baselines[b].score
    out.update(attribution or {})
    return out


def attribution_scores(cfg: RunConfig, fs: FeatureSet, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    r"""Each attribution method's :math:`\Delta_i` on the mean loss of the whole trusted set, under the uniform head.

    :math:`\Delta_i = L_{trusted}(W^*_{-i}) - L_{trusted}(W^*)` (positive: sample ``i`` helps the trusted loss,
    so it looks clean); the head is fitted in float64 (:func:`attribution_problem`). Methods from
    :data:`reweight.attribution.ATTRIBUTION` (e.g. ``influence_cg``, ``representer``, ``tracin``, ``trak``).
    """
    from .attribution import make_attribution

    if not names:
        return {}
    pr, _ = attribution_problem(cfg, fs)
    Xt = _prep(cfg, fs.X_val, torch.float64)
    yt = fs.y_val.to(Xt.device)
    return {name: make_attribution(name, {}).fit(pr).scores(Xt, yt, reduce="mean") for name in names}


def detection_table(scores: Dict[str, torch.Tensor], corrupted: torch.Tensor) -> Dict[str, Dict[str, Optional[float]]]:
    """AUROC and average precision of each score at separating clean (positive) from corrupted samples, and its
    Spearman correlation with the learned ranking ``scores["alpha"]``."""
    from scipy.stats import spearmanr
    from sklearn.metrics import average_precision_score

    c = corrupted.bool().cpu().numpy()
    ref = scores["alpha"].detach().double().cpu().numpy()
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for name, sc in scores.items():
        v = sc.detach().double().cpu().numpy()
        both = bool(c.any() and (~c).any())
        out[name] = {"auroc": weight_auroc(sc, corrupted) if both else None,
                     "ap": float(average_precision_score(~c, v)) if both else None,
                     "spearman_with_alpha": float(spearmanr(v, ref).statistic)}
    return out


def compare_methods(cfg: RunConfig, setup: HeadSetup, W_uniform: torch.Tensor, learned: BilevelOutcome,
                    method: HypergradMethod) -> Tuple[Dict[str, Dict[str, Any]], Optional[Dict[str, Dict[str, Optional[float]]]]]:
    """Every method of the comparison on the same features and trusted set, and the detection table.

    Returns ``(methods, detection)``: ``methods[name]`` holds the accuracy and loss on every evaluation set
    (``val`` = meta-train is in-sample for the learned weights) plus the knob chosen on meta-val;
    ``detection`` is None when the corruption is unknown.
    """
    from .baselines import make_baseline

    problem, evals, fs = setup.problem, setup.evals, setup.features
    methods: Dict[str, Dict[str, Any]] = {"uniform": evaluate_head(W_uniform, evals),
                                          "carrot": {**evaluate_head(learned.W, evals), "guard": learned.guard}}
    fitted: Dict[str, Any] = {}
    for name in cfg.compare.baselines:
        res = make_baseline(name, {"head_grad_tol": cfg.head.grad_tol, "head_max_iter": cfg.head.max_iter}).fit(
            problem, seed=cfg.seed)
        fitted[name] = res
        knobs = {k: v for k, v in res.extra.items() if k.endswith("_selected")}
        methods[name] = {**evaluate_head(res.W, evals), **knobs, "seconds": res.seconds}
    if cfg.compare.oracle and fs.y_train_clean is not None and fs.corrupted is not None and bool(fs.corrupted.any()):
        inner = HeadObjective(_train_X(problem), fs.y_train_clean.to(problem.inner.y.device), problem.inner.K,
                              problem.inner.lam)
        ones = torch.ones(inner.n, dtype=W_uniform.dtype, device=W_uniform.device)
        methods["oracle"] = evaluate_head(solve_head(inner, ones, grad_tol=cfg.head.grad_tol,
                                                     max_iter=cfg.head.max_iter).W, evals)
    detection = None
    if cfg.compare.detection and fs.corrupted is not None:
        score = learned.score if learned.score is not None else learned.alpha
        attr = {k: v.to(score.device, score.dtype) for k, v in attribution_scores(cfg, fs, cfg.compare.attribution).items()}
        detection = detection_table(detection_scores(problem, W_uniform, method, score, fitted, attr), fs.corrupted)
    return methods, detection


def _check_splits(cfg: RunConfig, source: Any) -> None:
    """Draw the splits once (cheap: no warm-up) so that a trusted set larger than the pool, a class missing from a
    split, ... is one DataError before the run directory exists."""
    d = cfg.data
    if d.dataset in EMBEDDED_DATASETS:
        from .data import load_dataset, prepare_data

        sp = prepare_data(load_dataset(d.dataset), d.val_fraction, d.test_fraction, d.noise, d.noise_rate,
                          d.imbalance_factor, cfg.seed, trusted_size=d.trusted_size,
                          meta_val_fraction=d.meta_val_fraction)
    else:
        from .sources import source_splits

        sp = source_splits(source, d, cfg.seed)
    if cfg.guard.mode != "off" and (sp.meta_val is None or not bool(sp.meta_val.any())):
        raise _no_meta_val(cfg, f"its {len(sp.val)} samples leave none (a class needs >= 2 trusted samples to be split)")


def run_main(cfg: RunConfig, overwrite: bool = False, progress: bool = True,
             allow_unconverged: bool = False) -> Dict[str, Any]:
    """Run (or resume) the main job of ``cfg``: uniform vs learned weights on the frozen features.

    Writes the run directory ``<out_dir>/<name>`` (config, env, metrics, checkpoints, ``weights.pt``,
    ``per_class_ess.csv``, ``summary.json``, ``DONE``) and returns the summary. A step that misses its
    tolerances by far stops the run (:func:`reweight.bilevel.check_convergence`); with
    ``allow_unconverged`` it is marked instead (``summary["converged"]`` is False and analysis skips it
    unless asked).
    """
    import pandas as pd

    t_start = time.perf_counter()
    preflight(cfg)  # everything checkable is checked before any work and before the run directory exists
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    method = make_method(cfg.hypergrad.method, cfg.hypergrad.options)
    tb_writer_cls = _tensorboard_writer_cls() if cfg.tensorboard else None
    device = resolve_device(cfg.device)
    source = None
    if cfg.data.dataset not in EMBEDDED_DATASETS:  # bad data is one clear error before the run directory exists
        from .sources import load_source

        source = load_source(cfg.data, cfg.backbone, progress=progress)
    _check_splits(cfg, source)
    identity = run_identity(cfg.data, cfg.backbone, source)
    run = RunDir(Path(cfg.out_dir) / cfg.name, cfg, overwrite=overwrite, identity=identity)
    run.write_env(cfg.seed, str(device))
    writer = tb_writer_cls(str(run.file("tensorboard"))) if tb_writer_cls else None
    try:
        t0 = time.perf_counter()
        fs = features(cfg, progress=progress, source=source)
        t_features = time.perf_counter() - t0
        setup = head_problem(cfg, fs)
        problem = setup.problem
        n = problem.inner.n
        ones = torch.ones(n, dtype=problem.inner.rows.dtype, device=problem.inner.rows.device)
        t0 = time.perf_counter()
        uni = solve_head(problem.inner, ones, grad_tol=cfg.head.grad_tol, max_iter=cfg.head.max_iter)
        t_uniform = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = learn_weights(cfg, problem, evals=setup.evals, corrupted=fs.corrupted, run=run, progress=progress,
                            method=method, on_step=_tb_logger(writer) if writer else None,
                            allow_unconverged=allow_unconverged)
        t_learned = time.perf_counter() - t0
        t0 = time.perf_counter()
        methods, detection = compare_methods(cfg, setup, uni.W, out, method)
        t_compare = time.perf_counter() - t0
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            run.fail(f"{type(e).__name__}: {e}")
        raise
    finally:
        if writer is not None:
            writer.close()

    K = fs.num_classes
    before = pd.DataFrame(class_report(ones, fs.y_train, K, fs.corrupted)).assign(stage="uniform")
    after = pd.DataFrame(class_report(out.alpha, fs.y_train, K, fs.corrupted)).assign(stage="learned")
    table = pd.concat([before, after], ignore_index=True)
    run.write_text("per_class_ess.csv", table.to_csv(index=False, float_format="%.6g"))
    def cpu(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.cpu()

    save_checked(run.file("weights.pt"), {"s": out.s.cpu(), "alpha": out.alpha.cpu(), "labels": fs.y_train.cpu(),
                                          "clean_labels": cpu(fs.y_train_clean), "corrupted": cpu(fs.corrupted),
                                          "train_index": fs.train_index.cpu(), "ids": fs.train_ids,
                                          "id_root": fs.meta.get("id_root")})
    known = fs.corrupted is not None
    clean = ~fs.corrupted.bool() if fs.corrupted is not None else torch.ones_like(out.alpha, dtype=torch.bool)
    summary = {
        "dataset": cfg.data.dataset, "noise": cfg.data.noise, "noise_rate": cfg.data.noise_rate,
        "imbalance_factor": cfg.data.imbalance_factor, "method": cfg.hypergrad.method, "seed": cfg.seed,
        "n_train": n, "n_val": int(fs.X_val.shape[0]), "n_test": int(setup.evals["test"][0].shape[0]),
        "feature_dim": fs.meta["feature_dim"], "feature_cache_hit": fs.meta["cache_hit"],
        "warmup_best_val_acc": max((h["val_acc"] for h in fs.meta["warmup_history"]), default=None),
        "uniform": evaluate_head(uni.W, setup.evals), "learned": evaluate_head(out.W, setup.evals),
        "auroc": detection["alpha"]["auroc"] if detection else None,
        "methods": methods, "detection": detection, "guard": out.guard,
        "n_meta_train": int(problem.X_val.shape[0]),
        "n_meta_val": int(problem.X_meta_val.shape[0]) if problem.X_meta_val is not None else 0,
        "ess_ratio_min": float(after["ess_ratio"].min()),
        "mean_weight_clean": float(out.alpha[clean].mean()) if known and clean.any() else None,
        "mean_weight_corrupted": float(out.alpha[~clean].mean()) if known and (~clean).any() else None,
        "outer_steps": len(out.metrics), "resumed_from": out.resumed_from,
        "converged": bool(out.convergence.get("converged", True) and uni.converged),
        "convergence": {**out.convergence, "uniform_head_grad_norm": uni.grad_norm},
        "seconds": {"features": t_features, "uniform_head": t_uniform, "learned": t_learned,
                    "compare": t_compare, "total": time.perf_counter() - t_start},
        "config_hash": run.hash, "device": str(device), "source": fs.meta.get("source"), "identity": identity,
        "provenance": fs.meta.get("provenance"),
    }
    run.finish(summary)
    return summary
