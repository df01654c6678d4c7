"""The exact-LOO sanity suite: every attribution estimator against exact leave-one-out.

One command::

    carrot sanity                      # full study (3 lambdas x 3 seeds, m=200)
    carrot sanity --quick              # smoke run (1 lambda, 1 seed, m=60)
    carrot sanity lams=[0.01] subset_size=300 seeds=[0,1,2,3] base.data.dataset=digits

Features: :func:`reweight.pipeline.features` of ``base`` (default: MNIST-5k, 40% symmetric label
noise on the training split, frozen timm ``test_resnet``; the same cached features as the main job;
``base.seed`` is the features' root seed), bias column appended, float64
(:func:`reweight.pipeline.attribution_problem`). For every ``lam`` and ``seed``:

1. fit the head ``W*`` (uniform weights) to ``||grad F|| <= loo_tol``;
2. draw ``subset_size`` training samples and ``n_queries`` test queries
   (:func:`reweight.pipeline.draw_subset`, seed streams ``sanity_subset``/``sanity_queries``) and
   compute exact LOO on the subset (Newton from ``W*``): the change of the mean validation loss and
   of every query's loss;
3. fit and score every registered attribution method (all ``n`` training samples; targets: the
   mean validation loss and each query), timing both;
4. correlate scores with LOO on the subset (:func:`analysis.tables.rank_correlations`): Spearman,
   Kendall, Pearson and ``top_overlap`` (the 10% most helpful samples by LOO vs by the estimate),
   for the validation target and averaged over queries; LDS on ``lds_subsets`` random
   half-subsets (same targets).

The seed varies the subset, the queries, TracIn's SGD order, TRAK's subsets/projections and the
LDS subsets; the features (and hence ``W*``) are those of ``base.seed``. ``base.head.lam`` is not
used (``lams`` sets lambda).

Writes ``<out_dir>/sanity/<name>/``: ``config.yaml``, ``env.json``, ``per_seed.csv``, ``summary.csv``,
``timings.csv`` (wall times; everything else is byte-identical on a rerun), ``table.md``,
``loo_scores.csv`` (LOO and estimates on the subset, for ``carrot figure loo_scatter``),
``summary.json`` and ``DONE``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Tuple

import numpy as np
import torch

from reweight.attribution import ATTRIBUTION, AttributionProblem, exact_loo, lds, make_attribution, random_subsets, subset_outputs
from reweight.config import RunConfig
from reweight.config import help_field as _f
from reweight.errors import ConfigError
from reweight.features import FeatureSet
from reweight.pipeline import attribution_problem, draw_subset, features
from reweight.runs import RunDir

from .study import Context, Study, shim, table_report

__all__ = ["CORRELATIONS", "STUDY", "SanityConfig", "correlations", "markdown_table", "run_sanity", "summarize"]

log = logging.getLogger(__name__)

#: columns of ``per_seed.csv`` holding the agreement with exact LOO (``top_overlap``: top-10% overlap).
CORRELATIONS = ("spearman", "kendall", "pearson", "top_overlap")

#: old top-level keys of the sanity config -> their place (read with a deprecation message).
_LEGACY_KEYS: Dict[str, str] = {
    "feature_seed": "base.seed", "threads": "base.threads", "data": "base.data", "backbone": "base.backbone",
    "features": "base.features",
}


def _check(cond: bool, name: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"The '{name}' parameter of SanityConfig must be {expected}. Got {value!r} instead.")


@dataclass(frozen=True)
class SanityConfig:
    """The sanity study: which features, which lambdas/seeds, how big the LOO subset, which methods."""

    name: str = _f("main", "run name (directory <out_dir>/sanity/<name>)")
    out_dir: str = _f("runs", "parent directory of run directories")
    base: RunConfig = field(default_factory=RunConfig, metadata={
        "help": "data, backbone and features of the head (base.seed: the features' root seed; base.threads: "
                "torch threads); base.head.lam is not used"})
    seeds: List[int] = _f([0, 1, 2], "seeds of the subset, queries, stochastic estimators and LDS subsets")
    lams: List[float] = _f([0.001, 0.01, 0.1], "L2 strengths lambda of the head (each > 0)")
    subset_size: int = _f(200, "m: training samples with exact LOO ground truth")
    n_queries: int = _f(20, "test queries for per-query targets")
    lds_subsets: int = _f(32, "random half-subsets for the LDS")
    methods: List[str] = _f([], "attribution methods (empty = every registered one)")
    method_options: Dict[str, Any] = _f({}, "per-method options, e.g. {trak: {proj_dim: 128}}")
    loo_tol: float = _f(1e-10, "gradient-norm tolerance of W* and of every LOO solve (float64)")

    LEGACY_KEYS: ClassVar[Dict[str, str]] = _LEGACY_KEYS

    def __post_init__(self) -> None:
        _check(len(self.lams) >= 1 and all(x > 0 for x in self.lams), "lams", self.lams,
               "a non-empty list of numbers > 0")
        _check(len(self.seeds) >= 1, "seeds", self.seeds, "a non-empty list")
        _check(self.subset_size >= 10, "subset_size", self.subset_size, ">= 10")
        _check(self.n_queries >= 1, "n_queries", self.n_queries, ">= 1")
        _check(self.lds_subsets >= 2, "lds_subsets", self.lds_subsets, ">= 2")
        _check(self.loo_tol > 0, "loo_tol", self.loo_tol, "> 0")
        for m in self.methods:
            ATTRIBUTION.get(m)  # unknown name -> ConfigError listing the valid ones
        unknown = [m for m in self.method_options if m not in ATTRIBUTION]
        _check(not unknown, "method_options", unknown, "keyed by registered method names")


QUICK = ["lams=[0.1]", "seeds=[0]", "subset_size=60", "n_queries=5", "lds_subsets=8",
         "method_options={trak: {n_models: 2, proj_dim: 128}, tracin: {epochs: 5}}", "name=quick"]


def correlations(est: np.ndarray, truth: np.ndarray) -> Dict[str, float]:
    """:func:`analysis.tables.rank_correlations` of ``est`` vs ``truth`` (top 10%), all NaN when either is not finite."""
    from analysis.tables import rank_correlations

    if not (np.isfinite(est).all() and np.isfinite(truth).all()):
        return {k: math.nan for k in CORRELATIONS}
    return rank_correlations(est, truth, top_frac=0.1)


def _method_names(cfg: SanityConfig) -> List[str]:
    return list(cfg.methods) if cfg.methods else ATTRIBUTION.names()


def _one(cfg: SanityConfig, pr: AttributionProblem, fs: FeatureSet, splits: Dict[str, torch.Tensor], lam: float,
         seed: int, progress: bool) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """One (lam, seed) cell: LOO, every method, correlations, LDS. Returns (metric rows, score rows)."""
    n = pr.n
    subset = draw_subset(n, cfg.subset_size, seed, "sanity_subset")
    q = draw_subset(splits["X_test"].shape[0], cfg.n_queries, seed, "sanity_queries")
    Xq, yq = splits["X_test"][q], splits["y_test"][q]
    Xv, yv = splits["X_val"], splits["y_val"]
    loo = exact_loo(pr, subset, Xv, yv, Xq, yq, grad_tol=cfg.loo_tol, progress=progress)
    masks = random_subsets(n, cfg.lds_subsets, 0.5, seed=seed)
    outs = subset_outputs(pr, masks, Xv, yv, Xq, yq, grad_tol=1e-8)
    base = {"lam": lam, "seed": seed, "n_train": n, "m": int(subset.numel()), "n_queries": int(q.numel()),
            "corrupted_in_subset": int(fs.corrupted[subset].sum()), "val_acc": float(((Xv @ pr.W.T).argmax(1) == yv).double().mean())}
    rows: List[Dict[str, Any]] = [{**base, "method": "exact_loo", "target": "val", "seconds": loo.total_seconds,
                                   "loo_median_ms": float(loo.seconds.median()) * 1e3,
                                   "loo_converged": bool(loo.converged.all())}]
    score_rows: List[Dict[str, Any]] = []
    truth_v = loo.delta_val.numpy()
    for name in _method_names(cfg):
        opts = dict(cfg.method_options.get(name, {}))
        if "seed" in _fields(name):
            opts.setdefault("seed", seed)
        m = make_attribution(name, opts)
        t0 = time.perf_counter()
        m.fit(pr)
        t_fit = time.perf_counter() - t0
        s_val = m.scores(Xv, yv, reduce="mean")
        t_val = m.last_score_seconds
        s_q = m.scores(Xq, yq)
        t_q = m.last_score_seconds
        est_v = s_val[subset].numpy()
        r_val = correlations(est_v, truth_v)
        r_q = [correlations(s_q[j, subset].numpy(), loo.delta_query[:, j].numpy()) for j in range(q.numel())]
        lds_v = float(lds(s_val, masks, outs.val)[0])
        lds_q = lds(s_q, masks, outs.query)
        timing = {"fit_seconds": t_fit, "score_val_seconds": t_val, "score_query_seconds": t_q,
                  "seconds": t_fit + t_val}
        rows.append({**base, "method": name, "target": "val", **r_val, "lds": lds_v, **timing})
        qmean = {k: float(np.nanmean([r[k] for r in r_q])) for k in CORRELATIONS}
        rows.append({**base, "method": name, "target": "query", **qmean, "lds": float(torch.nanmean(lds_q)), **timing})
        for j, i in enumerate(subset.tolist()):
            score_rows.append({"lam": lam, "seed": seed, "method": name, "train_index": i,
                               "corrupted": bool(fs.corrupted[i]), "loo": float(truth_v[j]), "estimate": float(est_v[j])})
        log.info("lam=%g seed=%d %-20s val rho=%.3f query rho=%.3f lds=%.3f (%.2fs)", lam, seed, name,
                 r_val["spearman"], qmean["spearman"], lds_v, t_fit + t_val)
    return rows, score_rows


def _fields(name: str) -> List[str]:
    import dataclasses

    cls = ATTRIBUTION.get(name)
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def summarize(per_seed):
    """Mean and std over seeds per (target, lam, method) -> DataFrame."""

    df = per_seed[per_seed["method"] != "exact_loo"]
    cols = [*CORRELATIONS, "lds", "seconds"]
    g = df.groupby(["target", "lam", "method"], sort=True)[cols]
    mean, std = g.mean(), g.std(ddof=0)
    out = mean.add_suffix("_mean").join(std.add_suffix("_std")).reset_index()
    out["n_seeds"] = g.size().values
    return out


def markdown_table(summary, per_seed) -> str:
    """Markdown tables (one per target) of mean +- std over seeds."""
    lines = []
    loo = per_seed[per_seed["method"] == "exact_loo"].groupby("lam")["seconds"].mean()
    for target, title in (("val", "Target: mean validation loss"), ("query", "Target: per-query loss (mean over queries)")):
        lines += [f"**{title}** (mean ± std over {int(summary['n_seeds'].max())} seeds)", "",
                  "| lambda | method | Spearman | Kendall | Pearson | top-10% | LDS | seconds (fit+score, all n) |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for _, r in summary[summary["target"] == target].iterrows():
            cell = lambda k, d=3: f"{r[k + '_mean']:.{d}f} ± {r[k + '_std']:.{d}f}"
            lines.append(f"| {r['lam']:g} | {r['method']} | {cell('spearman')} | {cell('kendall')} | {cell('pearson')} | "
                         f"{cell('top_overlap', 2)} | {cell('lds')} | {r['seconds_mean']:.2f} |")
        lines.append("")
    lines.append("Exact LOO on the subset (all samples, warm-started Newton), seconds: " +
                 ", ".join(f"lambda={lam:g}: {s:.2f}" for lam, s in loo.items()))
    return "\n".join(lines) + "\n"


def run_sanity(cfg: SanityConfig, overwrite: bool = False, progress: bool = False) -> Dict[str, Any]:
    """Run the study of ``cfg`` into ``<out_dir>/sanity/<name>``; returns the summary dict."""
    import pandas as pd

    if cfg.base.threads:
        torch.set_num_threads(cfg.base.threads)
    run = RunDir(Path(cfg.out_dir) / "sanity" / cfg.name, cfg, overwrite=overwrite)
    run.write_env(cfg.base.seed, cfg.base.device)
    t0 = time.perf_counter()
    try:
        fs = features(cfg.base, progress=progress)
        rows: List[Dict[str, Any]] = []
        score_rows: List[Dict[str, Any]] = []
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cfg.lams) * len(cfg.seeds), desc="sanity (lambda, seed)",
                   disable=not progress or bool(os.environ.get("CI")))
        for lam in cfg.lams:
            pr, splits = attribution_problem(cfg.base, fs, lam=lam, grad_tol=cfg.loo_tol)
            for seed in cfg.seeds:
                r, s = _one(cfg, pr, fs, splits, lam, seed, progress)
                rows += r
                score_rows += s
                bar.update(1)
        bar.close()
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            run.fail(f"{type(e).__name__}: {e}")
        raise
    per_seed = pd.DataFrame(rows)
    summary = summarize(per_seed)
    # wall times vary from run to run: they live in timings.csv (and table.md) only, so that
    # per_seed.csv, summary.csv and loo_scores.csv are byte-identical when a run is repeated
    tcols = ["fit_seconds", "score_val_seconds", "score_query_seconds", "seconds", "loo_median_ms"]
    keys = ["lam", "seed", "method", "target"]
    run.write_text("per_seed.csv", per_seed.drop(columns=tcols).to_csv(index=False, float_format="%.6g"))
    run.write_text("timings.csv", per_seed[keys + tcols].to_csv(index=False, float_format="%.4g"))
    run.write_text("summary.csv", summary.drop(columns=["seconds_mean", "seconds_std"]).to_csv(
        index=False, float_format="%.6g"))
    run.write_text("loo_scores.csv", pd.DataFrame(score_rows).to_csv(index=False, float_format="%.9g"))
    table = markdown_table(summary, per_seed)
    run.write_text("table.md", table)
    out = {"load_average": list(os.getloadavg()), "n_train": int(fs.X_train.shape[0]),
           "feature_dim": int(fs.X_train.shape[1]), "lams": list(cfg.lams),
           "seeds": list(cfg.seeds), "methods": _method_names(cfg), "seconds": time.perf_counter() - t0,
           "feature_cache_hit": fs.meta["cache_hit"], "noise": cfg.base.data.noise,
           "noise_rate": cfg.base.data.noise_rate}
    run.finish(out)
    return {**out, "table": table, "run_dir": str(run.path)}


def _run(cfg: SanityConfig, ctx: Context) -> Dict[str, Any]:
    return run_sanity(cfg, overwrite=ctx.overwrite, progress=ctx.progress)


STUDY = Study(name="sanity", summary="every attribution estimator against exact leave-one-out",
              config=SanityConfig, run=_run, report=table_report, quick=QUICK, threads_key="base.threads",
              description=__doc__ or "")

if __name__ == "__main__":
    shim("sanity")
