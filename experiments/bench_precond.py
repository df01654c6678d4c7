"""Benchmark: the routes of the all-train influence solve side by side -- every preconditioner, the exact dense
route and TorchOpt -- one thread each, interleaved.

::

    carrot bench_precond                                        # MNIST-5k features, lambda 1e-3
    carrot bench_precond base.head.lam=0.01 name=mnist_lam0.01
    carrot bench_precond base.data.dataset=digits name=digits
    carrot bench_precond dims=[5,8,16,24,32,40,48,64,96] routes=[exact,auto,kfac] name=dense_max   # DENSE_MAX
    carrot bench_precond --quick                                # digits, 2 rounds

The quantity is the one of ``bench_libraries``: the influence of every training sample on the mean validation
loss with :math:`W^*` given (the solve only, the ``n`` scores included),

.. math::

    \\hat\\Delta_i = \\frac{\\alpha_i}{n}\\, g_i^\\top H^{-1}\\nabla_W L_{val}(W^*)\\, h_i ,

on the main job's head problem (:func:`reweight.pipeline.head_problem` of ``base``: frozen features with the bias
column, float64, uniform weights, :math:`W^*` by :func:`reweight.head.solve_head` to ``||grad F|| <= 1e-11``).

Routes (``routes``):

* ``exact`` -- the float64 Cholesky of the dense Hessian (``HeadHessian.solve(method="dense")``, 0 HVPs);
* ``auto`` -- the default CG route: preconditioned CG with the preconditioner :func:`reweight.precond.choose_preconditioner`
  picks (what ``influence_cg`` and the ``cg`` hypergradient run);
* ``dense`` (assembled in :func:`reweight.precond.lowp_dtype`: bfloat16 on CPUs with AMX/AVX512-BF16),
  ``dense_f32`` (assembled in float32), ``kfac``, ``block_jacobi``, ``none`` -- PCG with that preconditioner;
* ``torchopt`` -- TorchOpt's ``custom_root`` + ``solve_cg`` on the identical objective
  (:func:`experiments.contenders.torchopt_influence`; skipped and recorded when TorchOpt is not installed).

Every CG route stops at relative residual ``rtol`` (default 1e-10). Timing: process CPU time at one thread,
``rounds`` interleaved rounds after a warm-up round (every route once per round, in the listed order), median;
``x_torchopt`` is the median of the per-round ratios TorchOpt / route. Accuracy: the largest difference from the
``exact`` scores relative to their largest magnitude, and ``converged`` (the route reached ``rtol``; empty for
TorchOpt, whose ``solve_cg`` does not report it).

``dims``: the sweep behind ``reweight.head.DENSE_MAX`` -- the features truncated to their first ``d`` columns plus
the bias column, ``W^*`` refitted for each ``d``; empty (default) = the full features only. The summary names, per
route, the smallest ``K·D`` at which its median beats ``exact``.

Writes ``runs/bench_precond/<name>/results.csv`` (one row per ``d`` and route) and ``summary.json``.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from reweight.config import HeadConfig, RunConfig
from reweight.config import help_field as _f
from reweight.errors import ConfigError
from reweight.validate import check_choice, check_int, check_number

from .contenders import interleaved
from .study import Context, Study, frame_markdown, shim

__all__ = ["BenchPrecondConfig", "ROUTES", "STUDY", "influence_route", "run_bench"]

#: the routes of the comparison (``routes``), in their default order
ROUTES = ("exact", "auto", "dense", "dense_f32", "kfac", "block_jacobi", "none", "torchopt")


@dataclass(frozen=True)
class BenchPrecondConfig:
    """What the comparison ran (config.yaml of the run directory)."""

    name: str = _f("default", "run name")
    out_dir: str = _f("runs/bench_precond", "parent directory")
    routes: List[str] = _f(list(ROUTES), f"routes timed, from {', '.join(ROUTES)}")
    rtol: float = _f(1e-10, "relative residual of every CG route")
    rounds: int = _f(5, "timed interleaved rounds (after one warm-up round); medians are reported")
    dims: List[int] = _f([], "feature columns kept before the bias (the DENSE_MAX sweep); empty = all")
    base: RunConfig = field(default_factory=lambda: RunConfig(head=HeadConfig(dtype="float64", lam=1e-3)), metadata={
        "help": "the main job's head problem (base.data.dataset: mnist5k or digits; base.head.lam; base.seed)"})

    def __post_init__(self) -> None:
        where = "bench_precond"
        if not isinstance(self.routes, (list, tuple)) or not self.routes:
            raise ConfigError(f"The 'routes' parameter of {where} must be a non-empty list of {', '.join(ROUTES)}. "
                              f"Got {self.routes!r} instead.")
        for r in self.routes:
            check_choice(r, "routes", where, ROUTES)
        if len(set(self.routes)) != len(self.routes):
            raise ConfigError(f"The 'routes' parameter of {where} lists a route twice. Got {self.routes!r} instead.")
        check_number(self.rtol, "rtol", where, low=0.0, low_open=True, high=1.0)
        check_int(self.rounds, "rounds", where, minimum=1)
        if not isinstance(self.dims, (list, tuple)):
            raise ConfigError(f"The 'dims' parameter of {where} must be a list of integers >= 1. Got {self.dims!r} instead.")
        for d in self.dims:
            check_int(d, "dims", where, minimum=1)
        if self.base.head.dtype != "float64":
            raise ConfigError(f"The 'base.head.dtype' parameter of {where} must be 'float64' (rtol down to 1e-10). "
                              f"Got {self.base.head.dtype!r} instead.")
        if not self.base.head.bias:
            raise ConfigError(f"The 'base.head.bias' parameter of {where} must be true (TorchOpt's objective and the "
                              f"dims sweep keep the constant-1 column). Got {self.base.head.bias!r} instead.")


def influence_route(route: str, inner: Any, Xv: torch.Tensor, yv: torch.Tensor, W: torch.Tensor,
                    alpha: torch.Tensor, rtol: float) -> Tuple[torch.Tensor, int, str, Optional[bool]]:
    r"""All-train influence on the mean validation loss by ``route`` (module docstring):
    ``(scores, hvps, precond, converged)`` (``converged`` is ``None`` for TorchOpt, whose ``solve_cg`` does not say).

    :math:`V = H^{-1}\nabla_W L_{val}(W^*)` by the route, then :math:`\hat\Delta_i = -\alpha_i\,\partial L_{val}/\partial\alpha_i
    = \frac{\alpha_i}{n}g_i^\top Vh_i` (:meth:`reweight.head.HeadObjective.alpha_grad_from_v`; Koh & Liang, ICML 2017).
    """
    from reweight.head import mean_ce_grad
    from reweight.precond import DensePreconditioner

    if route == "torchopt":
        from .contenders import torchopt_influence

        s, hvps = torchopt_influence(inner.X, inner.y, Xv, yv, inner.lam, W, alpha, rtol=rtol)
        return s.detach(), int(hvps), "-", None
    H = inner.hessian(W, alpha)
    g = mean_ce_grad(W, Xv, yv)
    if route == "exact":
        sol = H.solve(g, method="dense")
    else:
        precond: Any = DensePreconditioner(H, torch.float32) if route == "dense_f32" else route
        sol = H.solve(g, method="cg", rtol=rtol, max_iter=20000, precond=precond)
    return (-alpha * inner.alpha_grad_from_v(W, sol.x, P=H.P), sol.hvps, "-" if route == "exact" else sol.precond,
            bool(sol.converged))


def _truncate(X: torch.Tensor, d: int) -> torch.Tensor:
    """The first ``d`` feature columns and the bias (last) column."""
    return torch.cat([X[:, :d], X[:, -1:]], dim=1)


def _time_routes(cfg: BenchPrecondConfig, routes: List[str], inner: Any, Xv: torch.Tensor, yv: torch.Tensor,
                 W: torch.Tensor, alpha: torch.Tensor) -> List[Dict[str, Any]]:
    """Interleaved rounds of every route; one row per route."""
    ref = influence_route("exact", inner, Xv, yv, W, alpha, cfg.rtol)[0]
    scale = float(ref.abs().max()) or 1.0
    times, last = interleaved({r: functools.partial(influence_route, r, inner, Xv, yv, W, alpha, cfg.rtol)
                               for r in routes}, cfg.rounds)
    info = {r: (hvps, pc, float((s.to(ref.dtype) - ref).abs().max()) / scale, ok) for r, (s, hvps, pc, ok) in last.items()}
    D = inner.X.shape[1]
    rows = []
    for r in routes:
        row = {"D": D, "KD": inner.K * D, "route": r, "precond": info[r][1], "cpu_ms_median": 1e3 * statistics.median(times[r]),
               "cpu_ms_min": 1e3 * min(times[r]), "hvps": info[r][0], "max_rel_diff_vs_exact": info[r][2], "converged": info[r][3]}
        if "torchopt" in times and r != "torchopt":
            row["x_torchopt"] = statistics.median(a / b for a, b in zip(times["torchopt"], times[r]))
        rows.append(row)
    return rows


def run_bench(cfg: BenchPrecondConfig, progress: bool = False) -> Dict[str, Any]:
    """Run the comparison of ``cfg``; write ``<out_dir>/<name>/results.csv`` and the summary; return both."""
    import pandas as pd

    from reweight.head import HeadObjective, solve_head
    from reweight.pipeline import features, head_problem
    from reweight.runs import RunDir

    rc = cfg.base
    routes = list(cfg.routes)
    skipped: Dict[str, str] = {}
    if "torchopt" in routes:
        try:
            import torchopt  # noqa: F401
        except ImportError as e:
            routes.remove("torchopt")
            skipped["torchopt"] = f"not installed ({e}): pip install -e '.[bench]'"
    problem = head_problem(rc, features(rc, progress=progress)).problem
    inner0, Xv0, yv = problem.inner, problem.X_val, problem.y_val
    assert isinstance(inner0, HeadObjective)  # in-memory features: the main job's head
    d_full = inner0.X.shape[1] - 1
    for d in cfg.dims:
        if d > d_full:
            raise ConfigError(f"The 'dims' parameter of bench_precond lists {d}, more than the {d_full} feature columns "
                              f"of these features. Got {cfg.dims!r} instead.")
    run = RunDir(Path(cfg.out_dir) / cfg.name, cfg, overwrite=True)
    run.write_env(rc.seed, rc.device)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        for d in list(cfg.dims) or [d_full]:
            X, Xv = (inner0.X, Xv0) if d == d_full else (_truncate(inner0.X, d), _truncate(Xv0, d))
            inner = HeadObjective(X, inner0.y, inner0.K, inner0.lam)
            alpha = torch.ones(X.shape[0], dtype=X.dtype)
            W = solve_head(inner, alpha, grad_tol=1e-11).W
            rows += _time_routes(cfg, routes, inner, Xv, yv, W, alpha)
            if progress:
                print(f"[bench_precond] D={X.shape[1]}: " + ", ".join(f"{r['route']} {r['cpu_ms_median']:.1f} ms"
                                                                       for r in rows[-len(routes):]), flush=True)
    finally:
        torch.set_num_threads(prev)
    df = pd.DataFrame(rows)
    n = int(inner0.X.shape[0])
    summary: Dict[str, Any] = {"dataset": rc.data.dataset, "n": n, "K": int(inner0.K), "lam": float(inner0.lam),
                               "rtol": cfg.rtol, "rounds": cfg.rounds, "threads": 1, "skipped": skipped,
                               "torch": torch.__version__, "load_average_end": list(os.getloadavg()),
                               "seconds": time.perf_counter() - t0}
    full = df[df.D == df.D.max()].set_index("route")
    summary["cpu_ms_median"] = {r: float(v) for r, v in full.cpu_ms_median.items()}
    summary["hvps"] = {r: int(v) for r, v in full.hvps.items()}
    if "x_torchopt" in full:
        summary["x_torchopt"] = {r: float(v) for r, v in full.x_torchopt.dropna().items()}
    if "exact" in routes and len(cfg.dims) > 1:
        wide = df.pivot(index="KD", columns="route", values="cpu_ms_median")
        summary["first_KD_faster_than_exact"] = {
            r: (int(wide.index[(wide[r] < wide["exact"]).to_numpy()].min()) if (wide[r] < wide["exact"]).any() else None)
            for r in wide.columns if r != "exact"}
    run.write_text("results.csv", df.to_csv(index=False, float_format="%.6g"))
    run.finish(summary)
    return {"table": df, "summary": summary, "run_dir": str(run.path)}


def _report(res: Dict[str, Any]) -> str:
    table = frame_markdown(res["table"])
    return f"{table}\nrun directory: {res['run_dir']} ({res['summary']['seconds']:.1f}s)"


def _run(cfg: BenchPrecondConfig, ctx: Context) -> Dict[str, Any]:
    return run_bench(cfg, progress=ctx.progress)


STUDY = Study(name="bench_precond", summary="all-train influence: every preconditioner, the exact route and TorchOpt",
              config=BenchPrecondConfig, run=_run, report=_report,
              quick=("base.data.dataset=digits", "rounds=2", "name=quick"), threads_key=None,
              description=__doc__ or "")

if __name__ == "__main__":
    shim("bench_precond")
