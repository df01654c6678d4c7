"""Noise grid: implicit (CG) reweighting vs baselines under label noise and long-tail imbalance.

One command::

    carrot noise_grid            # full grid: 6 settings x 3 seeds
    carrot noise_grid --quick    # smoke run: 1 seed, 2 settings, short budgets

On MNIST-5k features of the frozen, warmed-up timm backbone (``reweight.features.build_features``,
cached per (setting, seed)), every method of ``methods`` is run on the same features, splits,
clean validation split and L2 head (:math:`\\lambda` from ``base.head.lam``):

* ``oracle``: the L2 head trained with uniform weights on the *true* training labels (reference);
* ``uniform``, ``class_balanced``, ``l2rw``, ``mwn``: :mod:`reweight.baselines` (L2RW/MWN get
  ``baseline_epochs`` epochs of mini-batch SGD, their SGD step chosen per run from ``sgd_lr_grid``
  by the clean-validation accuracy of their final head -- the same trusted split the bilevel
  method uses; their reported head is the exact L2 head trained with their final weights);
* ``bilevel_cg``: :func:`reweight.bilevel.run_bilevel` with the ``cg`` hypergradient
  (``base.outer.steps`` Adam steps on ``s``, class masses ``base.weights.class_mass``);
* ``bilevel_cg_balanced``: the same with ``class_mass=balanced`` (run on imbalance settings only);
* ``bilevel_one_step``, ``bilevel_first_order``: the bilevel loop with the cruder hypergradients.

Each (method, setting, seed) writes ``<out_dir>/<name>/<setting>/seed<k>/<method>/`` (config.yaml,
env.json, summary.json, weights.pt for methods with weights, DONE); finished runs are skipped on
a rerun. The tables ``runs.csv`` (one row per run), ``table.csv`` (mean and std over seeds),
``paired.csv`` (per-seed paired differences of the bilevel method against the baselines) and
``table.md`` go to ``<out_dir>/<name>/``. Every column except ``seconds`` is reproduced byte for
byte by a fresh rerun on the same machine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from reweight.config import RunConfig
from reweight.config import help_field as _f
from reweight.data import NOISE_SETTINGS
from reweight.errors import ConfigError, NonFiniteError
from reweight.pipeline import head_problem

from .study import Context, Study, shim

__all__ = ["SETTINGS", "GridRunConfig", "NoiseGridConfig", "aggregate", "markdown", "paired", "run_grid"]

log = logging.getLogger(__name__)

SETTINGS = NOISE_SETTINGS  # name -> (noise, noise_rate, imbalance_factor)
METHODS = ("oracle", "uniform", "class_balanced", "l2rw", "mwn", "bilevel_cg", "bilevel_cg_balanced",
           "bilevel_one_step", "bilevel_first_order")
BILEVEL = {"bilevel_cg": "cg", "bilevel_cg_balanced": "cg", "bilevel_one_step": "one_step",
           "bilevel_first_order": "first_order"}


@dataclass(frozen=True)
class NoiseGridConfig:
    """The noise-grid study: which settings, seeds and methods, and the shared budgets."""

    name: str = _f("noise_grid", "study name: tables and run directories go to <out_dir>/<name>/")
    out_dir: str = _f("runs", "parent directory")
    base: RunConfig = field(default_factory=RunConfig)
    settings: List[str] = _f(list(SETTINGS), f"settings to run, from {', '.join(SETTINGS)}")
    seeds: List[int] = _f([0, 1, 2], "root seeds (splits, noise, backbone warm-up, SGD order)")
    methods: List[str] = _f(list(METHODS), f"methods to run, from {', '.join(METHODS)}")
    baseline_epochs: int = _f(60, "epochs of mini-batch SGD for l2rw and mwn (60 = the bilevel outer steps)")
    baseline_batch_size: int = _f(100, "mini-batch size of l2rw and mwn")
    sgd_lr_grid: List[float] = _f([0.001, 0.003, 0.01, 0.03, 0.1], "SGD steps tried for l2rw/mwn; the best clean-val accuracy wins")
    class_balanced_beta: float = _f(0.999, "beta of the class-balanced baseline")

    def __post_init__(self) -> None:
        for s in self.settings:
            if s not in SETTINGS:
                raise ConfigError(f"The 'settings' parameter must hold names from {', '.join(SETTINGS)}. Got {s!r} instead.")
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"The 'methods' parameter must hold names from {', '.join(METHODS)}. Got {m!r} instead.")
        if not self.seeds:
            raise ConfigError("The 'seeds' parameter must hold at least one seed. Got [] instead.")
        if self.baseline_epochs < 1 or self.baseline_batch_size < 1:
            raise ConfigError(f"The 'baseline_epochs' and 'baseline_batch_size' parameters must be >= 1. "
                              f"Got {self.baseline_epochs!r} and {self.baseline_batch_size!r} instead.")
        if not self.sgd_lr_grid or any(not lr > 0 for lr in self.sgd_lr_grid):
            raise ConfigError(f"The 'sgd_lr_grid' parameter must be a non-empty list of steps > 0. "
                              f"Got {self.sgd_lr_grid!r} instead.")


@dataclass(frozen=True)
class GridRunConfig:
    """The resolved config of one (method, setting, seed) run (its hash guards the run directory)."""

    run: RunConfig
    method: str
    setting: str
    options: Dict[str, Any] = field(default_factory=dict)


DEFAULT_CONFIG = Path(__file__).parent / "configs" / "noise_grid.yaml"

QUICK = ["settings=[sym40, lt50]", "seeds=[0]", "base.outer.steps=20", "baseline_epochs=20",
         "sgd_lr_grid=[0.01]", "name=noise_grid_quick"]


def _setting_config(grid: NoiseGridConfig, setting: str, seed: int) -> RunConfig:
    noise, rate, imb = SETTINGS[setting]
    data = dataclasses.replace(grid.base.data, noise=noise, noise_rate=rate, imbalance_factor=imb)
    return dataclasses.replace(grid.base, data=data, seed=seed, name=setting)


def _ess_ratio_min(alpha: torch.Tensor, labels: torch.Tensor, K: int) -> float:
    from reweight.weights import ess_per_class

    labels = labels.to(alpha.device)
    counts = torch.bincount(labels, minlength=K).to(alpha.dtype)
    ess = ess_per_class(alpha, labels, K)
    present = counts > 0
    return float((ess[present] / counts[present]).min())


def _run_one(grid: NoiseGridConfig, cfg: RunConfig, method: str, setting: str, fs, root: Path,
             overwrite: bool) -> Dict[str, Any]:
    from reweight.baselines import make_baseline
    from reweight.bilevel import run_bilevel, weight_auroc
    from reweight.head import HeadObjective, accuracy, solve_head
    from reweight.hypergrad import make_method
    from reweight.runs import RunDir, save_checked

    options: Dict[str, Any] = {}
    run_cfg = cfg
    if method == "bilevel_cg_balanced":
        run_cfg = dataclasses.replace(cfg, weights=dataclasses.replace(cfg.weights, class_mass="balanced"))
    if method in BILEVEL:
        options = {"hypergrad": BILEVEL[method], **(cfg.hypergrad.options if BILEVEL[method] == cfg.hypergrad.method else {})}
    elif method in ("l2rw", "mwn"):
        options = {"epochs": grid.baseline_epochs, "batch_size": grid.baseline_batch_size,
                   "lr_grid": list(grid.sgd_lr_grid)}
    elif method == "class_balanced":
        options = {"beta": grid.class_balanced_beta}
    gcfg = GridRunConfig(run=run_cfg, method=method, setting=setting, options=options)
    run = RunDir(root / setting / f"seed{cfg.seed}" / method, gcfg, overwrite=overwrite)
    if run.done:
        return json.loads(run.file("summary.json").read_text())
    run.write_env(cfg.seed, cfg.device)
    try:
        setup = head_problem(run_cfg, fs)
        problem, evals = setup.problem, setup.evals
        t0 = time.perf_counter()
        alpha: Optional[torch.Tensor] = None
        extra: Dict[str, Any] = {}
        if method == "oracle":
            inner = HeadObjective(problem.inner.X, fs.y_train_clean.to(problem.inner.X.device), fs.num_classes, cfg.head.lam)
            ones = torch.ones(inner.n, dtype=inner.X.dtype, device=inner.X.device)
            W = solve_head(inner, ones, grad_tol=cfg.head.grad_tol, max_iter=cfg.head.max_iter).W
            ess_min = 1.0
        elif method in BILEVEL:
            hg = make_method(BILEVEL[method], options_for(cfg, BILEVEL[method]))
            out = run_bilevel(problem, hg, cfg.outer.steps, cfg.outer.lr, grad_tol=cfg.head.grad_tol, max_iter=cfg.head.max_iter,
                              checkpoint_every=cfg.outer.checkpoint_every, run=run, evals=evals, corrupted=fs.corrupted,
                              method_name=BILEVEL[method])
            alpha, W = out.alpha, out.W
            extra = {"outer_steps": len(out.metrics), "class_mass": run_cfg.weights.class_mass,
                     "hypergrad_converged_all": bool(all(r.get("hypergrad_converged", True) for r in out.metrics)),
                     "hvps_total": int(sum(r.get("hvps", 0) for r in out.metrics))}
            weights_extra = {"s": out.s.cpu()}
        else:
            base_opts = {k: v for k, v in options.items() if k != "lr_grid"}
            grid_lrs = options.get("lr_grid", [None])
            best = None
            tried = []
            for lr in grid_lrs:
                opts = dict(base_opts, head_grad_tol=cfg.head.grad_tol, head_max_iter=cfg.head.max_iter)
                if lr is not None:
                    opts["lr"] = lr
                try:
                    res = make_baseline(method, opts).fit(problem, seed=cfg.seed)
                except NonFiniteError as e:  # this step is too large: record it, try the others
                    tried.append({"lr": lr, "diverged": str(e)})
                    continue
                key = (accuracy(res.W, *evals["val"]), -float(problem.val_loss(res.W)))
                tried.append({"lr": lr, "val_acc": key[0], "val_loss": -key[1], "seconds": res.seconds})
                if best is None or key > best[0]:
                    best = (key, lr, res)
            if best is None:
                raise NonFiniteError(f"{method}: SGD diverged for every step in {grid_lrs}.")
            _, lr_sel, res = best
            alpha, W = res.alpha, res.W
            extra = {"lr_selected": lr_sel, "lr_search": tried}
            if res.W_sgd is not None:
                extra["sgd_test_acc"] = accuracy(res.W_sgd, *evals["test"])
        seconds = time.perf_counter() - t0
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            run.fail(f"{type(e).__name__}: {e}")
        raise
    if alpha is not None:
        ess_min = _ess_ratio_min(alpha.detach(), fs.y_train, fs.num_classes)
        payload = {"alpha": alpha.detach().cpu(), "corrupted": fs.corrupted.cpu(), "labels": fs.y_train.cpu(),
                   "clean_labels": fs.y_train_clean.cpu(), "train_index": fs.train_index.cpu()}
        if method in BILEVEL:
            payload.update(weights_extra)
        save_checked(run.file("weights.pt"), payload)
    auroc = weight_auroc(alpha, fs.corrupted) if alpha is not None else float("nan")
    summary = {
        "method": method, "setting": setting, "dataset": cfg.data.dataset, "noise": cfg.data.noise,
        "noise_rate": cfg.data.noise_rate, "imbalance_factor": cfg.data.imbalance_factor, "seed": cfg.seed,
        "test_acc": accuracy(W, *evals["test"]), "val_acc": accuracy(W, *evals["val"]),
        "auroc": auroc if math.isfinite(auroc) else None, "ess_ratio_min": ess_min, "seconds": seconds,
        "n_train": int(fs.X_train.shape[0]), "n_val": int(fs.X_val.shape[0]),
        "corruption_rate": float(fs.corrupted.float().mean()),
        "warmup_best_val_acc": max((h["val_acc"] for h in fs.meta["warmup_history"]), default=None),
        **extra,
    }
    run.finish(summary)
    return summary


def options_for(cfg: RunConfig, name: str) -> Dict[str, Any]:
    """Hypergradient options: the base config's options when it names the same method, else defaults."""
    return dict(cfg.hypergrad.options) if cfg.hypergrad.method == name else {}


def aggregate(rows: Sequence[Dict[str, Any]]):
    """Per (setting, method): seeds, mean/std (ddof 1) of test accuracy and AUROC, mean min ESS ratio, time."""
    import pandas as pd

    df = pd.DataFrame(list(rows))
    df["auroc"] = pd.to_numeric(df["auroc"], errors="coerce")
    order_s = {s: i for i, s in enumerate(SETTINGS)}
    order_m = {m: i for i, m in enumerate(METHODS)}
    g = df.groupby(["setting", "method"], sort=False)
    out = g.agg(seeds=("seed", "count"), test_acc_mean=("test_acc", "mean"), test_acc_std=("test_acc", "std"),
                auroc_mean=("auroc", "mean"), auroc_std=("auroc", "std"),
                ess_ratio_min_mean=("ess_ratio_min", "mean"), seconds_mean=("seconds", "mean")).reset_index()
    out = out.sort_values(by=["setting", "method"], key=lambda c: c.map(order_s if c.name == "setting" else order_m))
    return out.reset_index(drop=True)


def paired(rows: Sequence[Dict[str, Any]], methods: Sequence[str] = ("bilevel_cg", "bilevel_cg_balanced"),
           against: Sequence[str] = ("l2rw", "mwn", "uniform")):
    """Per-seed paired test-accuracy differences ``method - other`` (same features, splits and noise):
    mean, min, max over seeds and how many seeds have a difference >= 0."""
    import pandas as pd

    df = pd.DataFrame(list(rows))
    piv = df.pivot_table(index=["setting", "seed"], columns="method", values="test_acc")
    out = []
    for setting in [s for s in SETTINGS if s in set(df.setting)]:
        sub = piv.loc[setting]
        for m in methods:
            for o in against:
                if m not in sub or o not in sub or sub[m].isna().all():
                    continue
                d = (sub[m] - sub[o]).dropna()
                out.append({"setting": setting, "method": m, "versus": o, "seeds": int(d.size),
                            "diff_mean": float(d.mean()), "diff_min": float(d.min()), "diff_max": float(d.max()),
                            "seeds_not_worse": int((d >= 0).sum())})
    return pd.DataFrame(out)


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    if mean != mean:  # NaN
        return "n/a"
    if std != std:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(table, pairs=None) -> str:
    """The aggregated table as Markdown: a long table, a test-accuracy pivot (methods x settings) and
    the paired differences of :func:`paired`."""
    lines = ["| setting | method | seeds | test acc | AUROC | min ESS/n_c | time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.setting} | {r.method} | {r.seeds} | {_fmt(r.test_acc_mean, r.test_acc_std)} | "
                     f"{_fmt(r.auroc_mean, r.auroc_std)} | {r.ess_ratio_min_mean:.3f} | {r.seconds_mean:.1f} |")
    settings = list(dict.fromkeys(table["setting"]))
    methods = list(dict.fromkeys(table.sort_values("method", key=lambda c: c.map({m: i for i, m in enumerate(METHODS)}))["method"]))
    lines += ["", "Test accuracy (mean ± std over seeds):", "",
              "| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for m in methods:
        cells = []
        for s in settings:
            sel = table[(table.setting == s) & (table.method == m)]
            cells.append(_fmt(float(sel.test_acc_mean.iloc[0]), float(sel.test_acc_std.iloc[0])) if len(sel) else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if pairs is not None and len(pairs):
        lines += ["", "Paired test-accuracy difference per seed (method − versus; same features, splits, noise):", "",
                  "| setting | method | versus | mean | min | max | seeds not worse |", "|---|---|---|---|---|---|---|"]
        for r in pairs.itertuples():
            lines.append(f"| {r.setting} | {r.method} | {r.versus} | {r.diff_mean:+.4f} | {r.diff_min:+.4f} | "
                         f"{r.diff_max:+.4f} | {r.seeds_not_worse}/{r.seeds} |")
    return "\n".join(lines) + "\n"


def run_grid(grid: NoiseGridConfig, overwrite: bool = False, progress: bool = True) -> List[Dict[str, Any]]:
    """Run (or resume) every (setting, seed, method) of ``grid``; write the tables; return the run rows."""
    import pandas as pd
    from tqdm.auto import tqdm

    from reweight.features import build_features
    from reweight.runs import atomic_write_text

    root = Path(grid.out_dir) / grid.name
    rows: List[Dict[str, Any]] = []
    imbalanced = {s for s in grid.settings if _setting_config(grid, s, grid.seeds[0]).data.imbalance_factor > 1}
    total = sum(1 for s in grid.settings for _ in grid.seeds for m in grid.methods
                if m != "bilevel_cg_balanced" or s in imbalanced)
    bar = tqdm(total=total, desc="noise grid", unit="run", disable=not progress or bool(os.environ.get("CI")))
    for setting in grid.settings:
        for seed in grid.seeds:
            cfg = _setting_config(grid, setting, seed)
            fs = build_features(cfg.data, cfg.backbone, cfg.features, seed)
            for method in grid.methods:
                if method == "bilevel_cg_balanced" and cfg.data.imbalance_factor <= 1:
                    continue  # class-balanced masses matter only under imbalance
                t0 = time.perf_counter()
                summary = _run_one(grid, cfg, method, setting, fs, root, overwrite)
                rows.append(summary)
                bar.update(1)
                if progress:
                    bar.write(f"{setting:7s} seed {seed} {method:20s} test {summary['test_acc']:.4f} "
                              f"auroc {summary['auroc'] if summary['auroc'] is not None else float('nan'):.4f} "
                              f"ess_min {summary['ess_ratio_min']:.3f} ({time.perf_counter() - t0:.1f}s)")
    bar.close()
    cols = ["setting", "method", "seed", "dataset", "noise", "noise_rate", "imbalance_factor", "test_acc", "val_acc",
            "auroc", "ess_ratio_min", "seconds", "n_train", "corruption_rate", "warmup_best_val_acc"]
    per_run = pd.DataFrame(rows)[cols]
    atomic_write_text(root / "runs.csv", per_run.to_csv(index=False, float_format="%.6g"))
    table = aggregate(rows)
    atomic_write_text(root / "table.csv", table.to_csv(index=False, float_format="%.6g"))
    pairs = paired(rows)
    atomic_write_text(root / "paired.csv", pairs.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(root / "table.md", markdown(table, pairs))
    return rows


def _run(grid: NoiseGridConfig, ctx: Context) -> Dict[str, Any]:
    run_grid(grid, overwrite=ctx.overwrite, progress=ctx.progress)
    return {"root": Path(grid.out_dir) / grid.name}


def _report(res: Dict[str, Any]) -> str:
    root = res["root"]
    return (root / "table.md").read_text() + f"tables: {root / 'table.csv'}, {root / 'table.md'}, {root / 'runs.csv'}"


STUDY = Study(name="noise_grid", summary="bilevel reweighting vs baselines under label noise and long-tail imbalance",
              config=NoiseGridConfig, run=_run, report=_report, quick=QUICK, default_config=DEFAULT_CONFIG,
              threads_key="base.threads", description=__doc__ or "")

if __name__ == "__main__":
    shim("noise_grid")
