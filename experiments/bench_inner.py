"""Benchmark: warm-started vs cold inner solves along a real outer trajectory (JSON output).

For every outer step of the main job's bilevel run (``base``: MNIST-5k features by default, the
problem of :func:`reweight.pipeline.head_problem`), the inner head is solved twice at that step's
weights: from zeros (cold) and from the previous step's optimum (warm, as the outer loop does).
Reports Newton iterations, HVPs and seconds (medians), and the gradient norm reached.

    carrot bench_inner [out=bench_out/inner.json] [base.outer.steps=20 ...]
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict

import torch

from reweight.config import RunConfig
from reweight.config import help_field as _f

from .study import Study, shim

__all__ = ["BenchInnerConfig", "STUDY", "run_bench"]

#: the main job's sections, formerly top-level keys of this benchmark's config
_SECTIONS = ("seed", "device", "threads", "data", "backbone", "features", "head", "weights", "hypergrad", "outer")


@dataclass(frozen=True)
class BenchInnerConfig:
    """The cold-vs-warm inner-solve benchmark."""

    out: str = _f("bench_out/inner.json", "JSON file written")
    base: RunConfig = field(default_factory=RunConfig, metadata={
        "help": "the main job whose outer trajectory is replayed (base.outer.steps steps, base.head.grad_tol)"})

    # the benchmark used to take the main job's overrides at top level (outer.steps=5): read them under base
    LEGACY_KEYS: ClassVar[Dict[str, str]] = {k: f"base.{k}" for k in _SECTIONS}


def run_bench(cfg: BenchInnerConfig, progress: bool = False) -> Dict[str, Any]:
    """Replay the outer trajectory of ``cfg.base``; write and return the JSON-able result."""
    from reweight.head import solve_head
    from reweight.hypergrad import hypergradient, make_method
    from reweight.pipeline import features, head_problem
    from reweight.runs import atomic_write_json, environment_info
    from reweight.weights import initial_s

    rc = cfg.base
    if rc.threads:
        torch.set_num_threads(rc.threads)
    problem = head_problem(rc, features(rc, progress=progress)).problem
    method = make_method(rc.hypergrad.method, rc.hypergrad.options)
    s = initial_s(problem.inner.n, problem.inner.X.dtype).requires_grad_(True)
    opt = torch.optim.Adam([s], lr=rc.outer.lr)
    W_prev, v, rows = None, None, []
    for step in range(rc.outer.steps):
        alpha = problem.weights.alpha(s.detach())
        t0 = time.perf_counter()
        cold = solve_head(problem.inner, alpha, grad_tol=rc.head.grad_tol, max_iter=rc.head.max_iter)
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = solve_head(problem.inner, alpha, W0=W_prev, grad_tol=rc.head.grad_tol, max_iter=rc.head.max_iter)
        t_warm = time.perf_counter() - t0
        rows.append({"step": step, "cold_iters": cold.iters, "warm_iters": warm.iters, "cold_hvps": cold.hvps,
                     "warm_hvps": warm.hvps, "cold_seconds": t_cold, "warm_seconds": t_warm,
                     "cold_grad_norm": cold.grad_norm, "warm_grad_norm": warm.grad_norm,
                     "converged": cold.converged and warm.converged})
        hg = hypergradient(method, problem, s.detach(), warm.W, v0=v)
        s.grad = hg.grad_s
        opt.step()
        W_prev, v = warm.W, hg.v
    later = rows[1:] or rows  # step 0 has no previous optimum: both solves are cold
    med = lambda k: statistics.median(r[k] for r in later)
    result = {
        "what": "inner Newton solve, cold (from zeros) vs warm (from the previous outer step's optimum)",
        "n": problem.inner.n, "K": problem.inner.K, "D": problem.inner.X.shape[1], "grad_tol": rc.head.grad_tol,
        "steps": len(rows), "median_cold_iters": med("cold_iters"), "median_warm_iters": med("warm_iters"),
        "median_cold_hvps": med("cold_hvps"), "median_warm_hvps": med("warm_hvps"),
        "median_cold_seconds": med("cold_seconds"), "median_warm_seconds": med("warm_seconds"),
        "all_converged": all(r["converged"] for r in rows),
        "max_grad_norm": max(max(r["cold_grad_norm"], r["warm_grad_norm"]) for r in rows),
        "rows": rows, "env": environment_info(rc.seed, rc.device),
    }
    atomic_write_json(cfg.out, result)
    return {**result, "out": cfg.out}


def _report(res: Dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in res.items() if k not in ("rows", "env")}, indent=1)


STUDY = Study(name="bench_inner", summary="warm-started vs cold inner solves along a real outer trajectory",
              config=BenchInnerConfig, run=lambda cfg, ctx: run_bench(cfg, progress=ctx.progress), report=_report,
              quick=("base.data.dataset=digits", "base.backbone.epochs=2", "base.outer.steps=5"),
              threads_key="base.threads", legacy_flags={"--out": "out"}, description=__doc__ or "")

if __name__ == "__main__":
    shim("bench_inner")
