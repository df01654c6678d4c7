"""Benchmark: warm-started exact leave-one-out vs from-scratch refits, and the cost of every estimator.

One command::

    .venv/bin/python -m experiments.bench_loo            # m=100 samples, lam=0.1, 1 thread
    .venv/bin/python -m experiments.bench_loo --quick    # m=20
    .venv/bin/python -m experiments.bench_loo --m 200 --lam 0.01 --threads 2

On the default MNIST-5k features (float64, bias column; see ``experiments/sanity.py``) it solves the
leave-one-out problem of the same ``m`` training samples three ways with
:func:`reweight.attribution.exact_loo` -- ``newton_step`` (default: Newton-step start from ``W*`` with
the full Hessian, vectorised simplified-Newton polish, certified by ``solve_head``), ``optimum``
(``solve_head`` from ``W*``) and ``none`` (``solve_head`` from zeros, the from-scratch refit) -- all to
the same tolerance, checks they agree, and reports per-sample medians and speed-ups. It then
times ``fit`` + ``scores`` (mean validation loss target, all ``n`` training samples) of every
registered attribution method. Writes ``<out>/bench.json`` (and a RunDir with ``summary.json``).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from reweight.attribution import ATTRIBUTION, exact_loo, make_attribution
from reweight.runs import RunDir, atomic_write_json
from reweight.seeding import numpy_rng

from .sanity import SanityConfig, load_problem

__all__ = ["BenchConfig", "main", "run_bench"]


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark ran (saved as the run's config)."""

    m: int = 100
    lam: float = 0.1
    tol: float = 1e-10
    seed: int = 0
    threads: int = 1
    methods: list = field(default_factory=list)


def run_bench(cfg: BenchConfig, out: Path, overwrite: bool = False) -> Dict[str, Any]:
    """Run the benchmark of ``cfg`` into directory ``out``; returns the JSON-able result."""
    torch.set_num_threads(cfg.threads)
    run = RunDir(out, cfg, overwrite=overwrite)
    run.write_env(cfg.seed, "cpu")
    scfg = SanityConfig(lams=[cfg.lam], loo_tol=cfg.tol)
    t0 = time.perf_counter()
    pr, fs, sp = load_problem(scfg, cfg.lam)
    t_fit = time.perf_counter() - t0
    subset = torch.from_numpy(np.sort(numpy_rng(cfg.seed, "bench_subset").choice(pr.n, size=cfg.m, replace=False)))
    res: Dict[str, Any] = {"n_train": pr.n, "K": pr.K, "D": pr.D, "lam": cfg.lam, "m": cfg.m, "tol": cfg.tol,
                           "threads": cfg.threads, "platform": platform.processor() or platform.machine(),
                           "full_fit_seconds": t_fit, "load_average_start": list(os.getloadavg()), "loo": {}}
    loo = {}
    for ws in ("newton_step", "optimum", "none"):
        r = exact_loo(pr, subset, sp["X_val"], sp["y_val"], grad_tol=cfg.tol, warm_start=ws)
        loo[ws] = r
        res["loo"][ws] = {"median_ms_per_sample": float(r.seconds.median()) * 1e3,
                          "mean_ms_per_sample": float(r.seconds.mean()) * 1e3,
                          "setup_seconds": r.setup_seconds, "total_seconds": r.total_seconds,
                          "median_newton_iters": float(r.iters.double().median()),
                          "all_converged": bool(r.converged.all()), "max_grad_norm": float(r.grad_norm.max())}
    scratch = res["loo"]["none"]
    for ws in ("newton_step", "optimum"):
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
    res["load_average_end"] = list(os.getloadavg())  # the machine is shared: record how busy it was
    atomic_write_json(Path(out) / "bench.json", res)
    run.finish({k: v for k, v in res.items() if k != "estimators"})
    return res


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_loo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=100, help="number of left-out samples (default %(default)s)")
    p.add_argument("--lam", type=float, default=0.1, help="lambda of the head (default %(default)s)")
    p.add_argument("--tol", type=float, default=1e-10, help="gradient-norm tolerance of every solve")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s: stable timings)")
    p.add_argument("--quick", action="store_true", help="m=20")
    p.add_argument("--out", default=None, help="output directory (default runs/bench_loo/<m>_<lam>)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    m = 20 if args.quick else args.m
    cfg = BenchConfig(m=m, lam=args.lam, tol=args.tol, seed=args.seed, threads=args.threads)
    out = Path(args.out) if args.out else Path("runs") / "bench_loo" / f"m{m}_lam{args.lam:g}"
    res = run_bench(cfg, out, overwrite=args.overwrite)
    L = res["loo"]
    print(f"exact LOO of m={m} samples (n={res['n_train']}, K*D={res['K'] * res['D']}, lam={args.lam:g}, "
          f"tol={args.tol:g}, {args.threads} thread(s))")
    for ws in ("newton_step", "optimum", "none"):
        extra = (f"  speed-up median {L[ws]['speedup_median']:.1f}x, total {L[ws]['speedup_total']:.1f}x, "
                 f"max |diff| {L[ws]['max_abs_diff_delta_val_vs_scratch']:.1e}") if ws != "none" else ""
        print(f"  {ws:12s} median {L[ws]['median_ms_per_sample']:8.2f} ms/sample, setup {L[ws]['setup_seconds']:.2f}s,"
              f" total {L[ws]['total_seconds']:.2f}s{extra}")
    print("time to score all training samples (fit + score, val-loss target):")
    for k, v in res["estimators"].items():
        print(f"  {k:20s} {v['total_seconds']:8.3f}s")
    print(f"written: {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
