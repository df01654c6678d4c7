"""Benchmark: warm-started exact leave-one-out vs from-scratch refits, and the cost of every estimator.

One command::

    carrot bench_loo                          # m=100 samples, lam=0.1, 1 thread
    carrot bench_loo --quick                  # m=20
    carrot bench_loo m=200 lam=0.01 --threads 2

On the features of ``base`` (default MNIST-5k; :func:`reweight.pipeline.features`) and the float64
head with a bias column at ``lam`` (:func:`reweight.pipeline.attribution_problem`, as the sanity
study), it solves the leave-one-out problem of the same ``m`` training samples
(:func:`reweight.pipeline.draw_subset`, stream ``bench_subset`` of ``seed``) four ways with
:func:`reweight.attribution.exact_loo` (:data:`STARTS`) -- ``newton_step`` (default: the quasi-Newton chord
iteration with the exact leave-one-out Hessian at ``W*``, a rank-K Woodbury downdate, batched over blocks of 100
samples; Newton only as a fallback), ``newton_step_sequential`` (the same iteration one sample at a time,
``block_size=1``), ``optimum`` (``solve_head`` from ``W*``) and ``none`` (``solve_head`` from zeros, the
from-scratch refit) -- all to
the same gradient-norm tolerance ``grad_tol``, checks they agree, and reports per-sample medians
and speed-ups. It then times ``fit`` + ``scores`` (mean validation loss target, all ``n`` training
samples) of every registered attribution method. Writes ``<out>/bench.json`` (and a run directory
with ``summary.json``); ``out`` defaults to ``runs/bench_loo/m<m>_lam<lam>``.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

import torch

from reweight.attribution import ATTRIBUTION, exact_loo, make_attribution
from reweight.config import RunConfig
from reweight.config import help_field as _f
from reweight.errors import ConfigError
from reweight.pipeline import attribution_problem, draw_subset, features
from reweight.runs import RunDir, atomic_write_json

from .study import Context, Study, shim

__all__ = ["BenchConfig", "STARTS", "STUDY", "out_path", "run_bench"]


@dataclass(frozen=True)
class BenchConfig:
    """The exact-LOO benchmark (saved as the run's config)."""

    m: int = _f(100, "number of left-out samples")
    lam: float = _f(0.1, "lambda of the head (> 0); base.head.lam is not used")
    grad_tol: float = _f(1e-10, "gradient-norm tolerance of every solve (formerly tol)")
    seed: int = _f(0, "seed of the left-out subset")
    methods: List[str] = _f([], "attribution methods timed (empty = every registered one)")
    out: Optional[str] = _f(None, "output directory (default runs/bench_loo/m<m>_lam<lam>)")
    base: RunConfig = field(default_factory=lambda: RunConfig(threads=1), metadata={
        "help": "data, backbone and features (base.seed: the features' root seed; base.threads: torch "
                "threads, default 1 for stable timings)"})

    LEGACY_KEYS: ClassVar[Dict[str, str]] = {"tol": "grad_tol", "threads": "base.threads"}

    def __post_init__(self) -> None:
        if self.m < 1 or not self.lam > 0 or not self.grad_tol > 0:
            raise ConfigError(f"The 'm' (>= 1), 'lam' (> 0) and 'grad_tol' (> 0) parameters of BenchConfig are out of "
                              f"range. Got {self.m!r}, {self.lam!r}, {self.grad_tol!r} instead.")
        for m in self.methods:
            ATTRIBUTION.get(m)  # unknown name -> ConfigError listing the valid ones


#: the starts compared (row name -> :func:`reweight.attribution.exact_loo` options): the Woodbury chord iteration batched
#: over blocks of 100 left-out samples (the default) and one sample at a time, Newton from ``W*``, and from scratch
STARTS: Dict[str, Dict[str, Any]] = {
    "newton_step": {"warm_start": "newton_step"},
    "newton_step_sequential": {"warm_start": "newton_step", "block_size": 1},
    "optimum": {"warm_start": "optimum"},
    "none": {"warm_start": "none"},
}


def out_path(cfg: BenchConfig) -> Path:
    """The output directory of ``cfg``: ``out``, else ``runs/bench_loo/m<m>_lam<lam>``."""
    return Path(cfg.out) if cfg.out else Path("runs") / "bench_loo" / f"m{cfg.m}_lam{cfg.lam:g}"


def run_bench(cfg: BenchConfig, overwrite: bool = False, progress: bool = False) -> Dict[str, Any]:
    """Run the benchmark of ``cfg`` into :func:`out_path` (``bench.json``); returns the JSON-able result."""
    if cfg.base.threads:
        torch.set_num_threads(cfg.base.threads)
    out = out_path(cfg)
    run = RunDir(out, cfg, overwrite=overwrite)
    run.write_env(cfg.seed, cfg.base.device)
    t0 = time.perf_counter()
    fs = features(cfg.base, progress=progress)
    t_features = time.perf_counter() - t0
    pr, sp = attribution_problem(cfg.base, fs, lam=cfg.lam, grad_tol=cfg.grad_tol)
    t_fit = time.perf_counter() - t0 - t_features
    subset = draw_subset(pr.n, cfg.m, cfg.seed, "bench_subset")
    res: Dict[str, Any] = {"n_train": pr.n, "K": pr.K, "D": pr.D, "lam": cfg.lam, "m": int(subset.numel()),
                           "grad_tol": cfg.grad_tol, "threads": torch.get_num_threads(),
                           "platform": platform.processor() or platform.machine(),
                           "full_fit_seconds": t_fit, "load_average_start": list(os.getloadavg()), "loo": {}}
    loo = {}
    for ws, opts in STARTS.items():
        r = exact_loo(pr, subset, sp["X_val"], sp["y_val"], grad_tol=cfg.grad_tol, **opts)
        loo[ws] = r
        res["loo"][ws] = {"median_ms_per_sample": float(r.seconds.median()) * 1e3,
                          "mean_ms_per_sample": float(r.seconds.mean()) * 1e3,
                          "setup_seconds": r.setup_seconds, "total_seconds": r.total_seconds,
                          "median_newton_iters": float(r.iters.double().median()),
                          "all_converged": bool(r.converged.all()), "max_grad_norm": float(r.grad_norm.max())}
    scratch = res["loo"]["none"]
    for ws in STARTS:
        if ws == "none":
            continue
        d = loo[ws]
        res["loo"][ws]["speedup_median"] = scratch["median_ms_per_sample"] / res["loo"][ws]["median_ms_per_sample"]
        res["loo"][ws]["speedup_total"] = scratch["total_seconds"] / res["loo"][ws]["total_seconds"]
        res["loo"][ws]["max_abs_diff_delta_val_vs_scratch"] = float((d.delta_val - loo["none"].delta_val).abs().max())
    res["max_abs_delta_val"] = float(loo["none"].delta_val.abs().max())
    res["estimators"] = {}
    names = list(cfg.methods) or ATTRIBUTION.names()
    for name in names:
        m = make_attribution(name)
        t1 = time.perf_counter()
        m.fit(pr)
        s = m.scores(sp["X_val"], sp["y_val"], reduce="mean")
        total = time.perf_counter() - t1
        res["estimators"][name] = {"fit_seconds": m.fit_seconds, "score_seconds": m.last_score_seconds,
                                   "total_seconds": total, "n_scored": int(s.numel())}
    res["seconds"] = time.perf_counter() - t0
    res["features_seconds"] = t_features
    res["load_average_end"] = list(os.getloadavg())  # the machine is shared: record how busy it was
    atomic_write_json(Path(out) / "bench.json", res)
    run.finish({k: v for k, v in res.items() if k != "estimators"})
    return {**res, "out": str(out)}


def _run(cfg: BenchConfig, ctx: Context) -> Dict[str, Any]:
    return run_bench(cfg, overwrite=ctx.overwrite, progress=ctx.progress)


def report(res: Dict[str, Any]) -> str:
    """The LOO timings and speed-ups, then the estimators' times."""
    L = res["loo"]
    lines = [f"exact LOO of m={res['m']} samples (n={res['n_train']}, K*D={res['K'] * res['D']}, lam={res['lam']:g}, "
             f"grad_tol={res['grad_tol']:g}, {res['threads']} thread(s))"]
    for ws in STARTS:
        extra = (f"  speed-up median {L[ws]['speedup_median']:.1f}x, total {L[ws]['speedup_total']:.1f}x, "
                 f"max |diff| {L[ws]['max_abs_diff_delta_val_vs_scratch']:.1e}") if ws != "none" else ""
        lines.append(f"  {ws:22s} median {L[ws]['median_ms_per_sample']:8.2f} ms/sample, setup "
                     f"{L[ws]['setup_seconds']:.2f}s, total {L[ws]['total_seconds']:.2f}s{extra}")
    lines.append("time to score all training samples (fit + score, val-loss target):")
    lines += [f"  {k:20s} {v['total_seconds']:8.3f}s" for k, v in res["estimators"].items()]
    lines.append(f"written: {Path(res['out']) / 'bench.json'}")
    return "\n".join(lines)


STUDY = Study(name="bench_loo", summary="warm-started exact leave-one-out vs refits; cost of every estimator",
              config=BenchConfig, run=_run, report=report, quick=("m=20",), threads_key="base.threads",
              legacy_flags={"--m": "m", "--lam": "lam", "--tol": "grad_tol", "--seed": "seed", "--out": "out"},
              description=__doc__ or "")

if __name__ == "__main__":
    shim("bench_loo")
