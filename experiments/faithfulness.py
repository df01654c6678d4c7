"""Faithfulness curves: retrain without (or with only) each query's top-K supporters vs K random samples.

One command::

    carrot faithfulness                    # 20 test queries, K in {1,5,10,20,50}
    carrot faithfulness --quick            # 5 queries, 1 random draw
    carrot faithfulness lam=0.01 n_queries=40 base.data.dataset=digits

Same features and head as the sanity study (:func:`reweight.pipeline.features` of ``base``, default
MNIST-5k, and :func:`reweight.pipeline.attribution_problem`: float64, bias column, ``lam``; the
queries are :func:`reweight.pipeline.draw_subset` of the test split, stream ``sanity_queries``).
For every registered attribution method the per-query scores (target: the query's loss at its true
label) rank the training samples; :func:`reweight.attribution.faithfulness` then

* ``remove``: sets :math:`\\alpha_i = 0` on the top-K (others unchanged), retrains and records the
  query's confidence :math:`p_y(x)` and accuracy;
* ``keep``: trains a head (same :math:`\\lambda`) on the top-K only;

each against ``n_random`` draws of K random training samples. Writes
``runs/faithfulness/<name>/``: ``rows.csv`` (one row per query/method/mode/K/selection),
``curves.csv`` (means over queries), ``table.md``, ``summary.json``, ``DONE``; plot with
``carrot figure faithfulness RUN_DIR --out STEM``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List

import torch

from reweight.attribution import ATTRIBUTION, faithfulness, make_attribution
from reweight.config import RunConfig
from reweight.config import help_field as _f
from reweight.errors import ConfigError
from reweight.pipeline import attribution_problem, draw_subset, features
from reweight.runs import RunDir

from .study import Context, Study, shim, table_report

__all__ = ["FaithfulnessConfig", "STUDY", "run_faithfulness"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaithfulnessConfig:
    """The faithfulness study."""

    name: str = _f("main", "run name (directory <out_dir>/faithfulness/<name>)")
    out_dir: str = _f("runs", "parent directory of run directories")
    base: RunConfig = field(default_factory=RunConfig, metadata={
        "help": "data, backbone and features of the head (base.seed: the features' root seed; base.threads: "
                "torch threads); base.head.lam is not used (lam sets lambda)"})
    seed: int = _f(0, "seed of the queries, the random baselines and the stochastic estimators")
    lam: float = _f(0.1, "L2 strength lambda of the head (> 0)")
    n_queries: int = _f(20, "test queries")
    ks: List[int] = _f([1, 5, 10, 20, 50], "numbers of removed / kept samples")
    modes: List[str] = _f(["remove", "keep"], "remove and/or keep")
    n_random: int = _f(3, "random draws per (query, K) for the baseline")
    methods: List[str] = _f([], "attribution methods (empty = every registered one)")
    method_options: Dict[str, Any] = _f({}, "per-method options")
    # old keys -> their place (read with a deprecation message)
    LEGACY_KEYS: ClassVar[Dict[str, str]] = {
        "feature_seed": "base.seed", "threads": "base.threads", "data": "base.data", "backbone": "base.backbone",
        "features": "base.features"}

    def __post_init__(self) -> None:
        if not self.lam > 0:
            raise ConfigError(f"The 'lam' parameter of FaithfulnessConfig must be > 0. Got {self.lam!r} instead.")
        if self.n_queries < 1 or self.n_random < 1 or not self.ks:
            raise ConfigError("The 'n_queries' and 'n_random' parameters of FaithfulnessConfig must be >= 1 and "
                              f"'ks' non-empty. Got {self.n_queries!r}, {self.n_random!r}, {self.ks!r} instead.")
        for m in self.methods:
            ATTRIBUTION.get(m)


QUICK = ["n_queries=5", "n_random=1", "ks=[1,10,50]", "name=quick",
         "method_options={trak: {n_models: 2, proj_dim: 128}, tracin: {epochs: 5}}"]


def run_faithfulness(cfg: FaithfulnessConfig, overwrite: bool = False, progress: bool = False) -> Dict[str, Any]:
    """Run the study into ``<out_dir>/faithfulness/<name>``; returns the summary (with the table)."""
    import dataclasses

    import pandas as pd

    if cfg.base.threads:
        torch.set_num_threads(cfg.base.threads)
    run = RunDir(Path(cfg.out_dir) / "faithfulness" / cfg.name, cfg, overwrite=overwrite)
    run.write_env(cfg.seed, cfg.base.device)
    t0 = time.perf_counter()
    try:
        fs = features(cfg.base, progress=progress)
        pr, sp = attribution_problem(cfg.base, fs, lam=cfg.lam, grad_tol=1e-10)
        q = draw_subset(sp["X_test"].shape[0], cfg.n_queries, cfg.seed, "sanity_queries")
        Xq, yq = sp["X_test"][q], sp["y_test"][q]
        rows: List[Dict[str, Any]] = []
        for name in (list(cfg.methods) or ATTRIBUTION.names()):
            opts = dict(cfg.method_options.get(name, {}))
            cls = ATTRIBUTION.get(name)
            if dataclasses.is_dataclass(cls) and "seed" in [f.name for f in dataclasses.fields(cls)]:
                opts.setdefault("seed", cfg.seed)
            S = make_attribution(name, opts).fit(pr).scores(Xq, yq)
            t1 = time.perf_counter()
            r = faithfulness(pr, S, Xq, yq, ks=cfg.ks, modes=cfg.modes, n_random=cfg.n_random, seed=cfg.seed)
            rows += [{"method": name, "test_index": int(q[x["query"]]), **x} for x in r]
            log.info("%-20s %.1fs", name, time.perf_counter() - t1)
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            run.fail(f"{type(e).__name__}: {e}")
        raise
    df = pd.DataFrame(rows)
    curves = (df.groupby(["mode", "selection", "method", "k"], sort=True)[["conf", "acc", "d_conf"]]
              .agg(["mean", "std"]))
    curves.columns = [f"{a}_{b}" for a, b in curves.columns]
    curves = curves.reset_index()
    # every method draws the same random sets (same stream, same order), so its random rows are one shared baseline
    run.write_text("rows.csv", df.to_csv(index=False, float_format="%.6g"))
    run.write_text("curves.csv", curves.to_csv(index=False, float_format="%.6g"))
    table = _markdown(curves, cfg)
    run.write_text("table.md", table)
    out = {"lam": cfg.lam, "n_queries": int(q.numel()), "ks": list(cfg.ks), "methods": sorted(df["method"].unique()),
           "base_conf_mean": float(df.groupby("query")["conf_full"].first().mean()),
           "seconds": time.perf_counter() - t0}
    run.finish(out)
    return {**out, "table": table, "run_dir": str(run.path)}


def _markdown(curves, cfg: FaithfulnessConfig) -> str:
    lines = []
    for mode, what in (("remove", "mean change of the query's confidence p_y(x) after removing K samples"),
                       ("keep", "mean confidence p_y(x) of a head trained on K samples only")):
        sub = curves[curves["mode"] == mode]
        if sub.empty:
            continue
        col = "d_conf_mean" if mode == "remove" else "conf_mean"
        lines += [f"**{mode}**: {what} (top-K by the method vs K random; {cfg.n_queries} queries, lambda={cfg.lam:g})", "",
                  "| method | selection | " + " | ".join(f"K={k}" for k in cfg.ks) + " |",
                  "|---|---|" + "---:|" * len(cfg.ks)]
        for method, g in sub[sub["selection"] == "top"].groupby("method", sort=True):
            vals = {int(r["k"]): r[col] for _, r in g.iterrows()}
            lines.append(f"| {method} | top-K | " + " | ".join(f"{vals.get(k, float('nan')):+.3f}" for k in cfg.ks) + " |")
        rnd = sub[sub["selection"] == "random"].groupby("k")[col].mean()  # the same draws for every method
        lines.append(f"| (any) | {cfg.n_random} x K random | " +
                     " | ".join(f"{rnd.get(k, float('nan')):+.3f}" for k in cfg.ks) + " |")
        lines.append("")
    return "\n".join(lines)


def _run(cfg: FaithfulnessConfig, ctx: Context) -> Dict[str, Any]:
    return run_faithfulness(cfg, overwrite=ctx.overwrite, progress=ctx.progress)


STUDY = Study(name="faithfulness", summary="retrain without / with only each query's top-K supporters vs K random",
              config=FaithfulnessConfig, run=_run, report=table_report, quick=QUICK, threads_key="base.threads",
              description=__doc__ or "")

if __name__ == "__main__":
    shim("faithfulness")
