"""Benchmark: warm-started vs cold inner solves along a real outer trajectory (JSON output).

For every outer step of the main job's bilevel run (MNIST-5k features by default), the inner head
is solved twice at that step's weights: from zeros (cold) and from the previous step's optimum (warm,
as the outer loop does). Reports Newton iterations, HVPs and seconds (medians), and the gradient norm
reached.

    python -m experiments.bench_inner [--out bench_out/inner.json] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from reweight.config import load_config
from reweight.features import build_features
from reweight.head import solve_head
from reweight.hypergrad import hypergradient, make_method
from reweight.runs import atomic_write_json, environment_info
from reweight.weights import initial_s

from .main_job import build_problem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).parent / "configs" / "main.yaml"))
    ap.add_argument("--out", default="bench_out/inner.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    fs = build_features(cfg.data, cfg.backbone, cfg.features, cfg.seed)
    problem, _ = build_problem(cfg, fs)
    method = make_method(cfg.hypergrad.method, cfg.hypergrad.options)
    s = initial_s(problem.inner.n, problem.inner.X.dtype).requires_grad_(True)
    opt = torch.optim.Adam([s], lr=cfg.outer.lr)
    W_prev, v, rows = None, None, []
    for step in range(cfg.outer.steps):
        alpha = problem.weights.alpha(s.detach())
        t0 = time.perf_counter()
        cold = solve_head(problem.inner, alpha, grad_tol=cfg.head.grad_tol, max_iter=cfg.head.max_iter)
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = solve_head(problem.inner, alpha, W0=W_prev, grad_tol=cfg.head.grad_tol, max_iter=cfg.head.max_iter)
        t_warm = time.perf_counter() - t0
        rows.append({"step": step, "cold_iters": cold.iters, "warm_iters": warm.iters, "cold_hvps": cold.hvps,
                     "warm_hvps": warm.hvps, "cold_seconds": t_cold, "warm_seconds": t_warm,
                     "cold_grad_norm": cold.grad_norm, "warm_grad_norm": warm.grad_norm,
                     "converged": cold.converged and warm.converged})
        hg = hypergradient(method, problem, s.detach(), warm.W, v0=v)
        s.grad = hg.grad_s
        opt.step()
        W_prev, v = warm.W, hg.v
    later = rows[1:]  # step 0 has no previous optimum: both solves are cold
    med = lambda k: statistics.median(r[k] for r in later)
    result = {
        "what": "inner Newton solve, cold (from zeros) vs warm (from the previous outer step's optimum)",
        "n": problem.inner.n, "K": problem.inner.K, "D": problem.inner.X.shape[1], "tol": cfg.head.grad_tol,
        "steps": len(rows), "median_cold_iters": med("cold_iters"), "median_warm_iters": med("warm_iters"),
        "median_cold_hvps": med("cold_hvps"), "median_warm_hvps": med("warm_hvps"),
        "median_cold_seconds": med("cold_seconds"), "median_warm_seconds": med("warm_seconds"),
        "all_converged": all(r["converged"] for r in rows), "max_grad_norm": max(max(r["cold_grad_norm"], r["warm_grad_norm"]) for r in rows),
        "rows": rows, "env": environment_info(cfg.seed, cfg.device),
    }
    atomic_write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "env")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
