"""Hypergradient accuracy vs cost: every rung of the ladder against the exact hypergradient.

One command::

    carrot hypergrad_accuracy            # MNIST-5k and digits
    carrot hypergrad_accuracy --quick    # digits only, short sweeps

For each dataset, on real features (:func:`reweight.pipeline.features` of ``base`` with the dataset
set, seed ``seed``) and the head of :func:`reweight.pipeline.head_problem`, in float64:

1. a fixed non-uniform ``s``: ``warm_steps`` outer steps of the bilevel loop (CG hypergradient)
   from uniform weights;
2. the inner optimum ``W*`` at that ``s`` (Newton to ``||grad F|| <= inner_tol``);
3. the exact hypergradient (dense Cholesky of the ``(K·D)^2`` Hessian, 970 x 970 for D = 97, K = 10);
4. each method over a sweep of its budget (CG iterations, Neumann order, unroll length ``T`` with
   and without truncation, one-step look-ahead, first order): cosine similarity and relative
   error of ``dJ/ds`` to the exact one, Spearman rank correlation of the per-sample components of
   ``dL_val/dalpha``, HVPs, inner steps, wall time (the minimum over ``repeats`` calls).

``cost`` = HVPs + inner steps (one inner gradient step costs about one HVP: two ``n·K·D``
products; the power iteration that sets the default Neumann / look-ahead step is included).
Timings use ``base.threads`` torch threads (default 1, so they are comparable). Writes ``<out_dir>/<name>/``
with ``results.csv``, ``results.md``, ``cosine_vs_cost.pdf``/``.png``, summary.json, DONE.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from reweight.config import RunConfig
from reweight.config import help_field as _f
from reweight.errors import ConfigError

from .study import Context, Study, shim

__all__ = ["HypergradAccuracyConfig", "STUDY", "markdown", "plot", "run_study", "sweep"]

log = logging.getLogger(__name__)


def _default_base() -> RunConfig:
    from reweight.config import HeadConfig

    return RunConfig(threads=1, head=HeadConfig(dtype="float64"))


@dataclass(frozen=True)
class HypergradAccuracyConfig:
    """The accuracy-vs-cost study of the hypergradient ladder."""

    name: str = _f("hypergrad_accuracy", "study name: results go to <out_dir>/<name>/")
    out_dir: str = _f("runs", "parent directory")
    datasets: List[str] = _f(["mnist5k", "digits"], "embedded datasets (features from build_features)")
    seed: int = _f(0, "root seed of splits, noise and backbone warm-up")
    base: RunConfig = field(default_factory=_default_base, metadata={
        "help": "data, backbone, features and head of the problem (float64 head; base.threads: torch threads, "
                "default 1; base.seed and base.data.dataset are set by seed and datasets)"})
    warm_steps: int = _f(5, "outer CG steps from uniform weights that define the fixed non-uniform s")
    inner_tol: float = _f(1e-10, "Newton tolerance ||grad F|| of the inner optimum W*")
    repeats: int = _f(3, "timing repeats per point (the minimum is reported)")
    cg_iters: List[int] = _f([1, 2, 5, 10, 20, 50, 100, 200], "CG iteration budgets (tol 1e-14 so the budget binds)")
    neumann_orders: List[int] = _f([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], "Neumann orders")
    unroll_steps: List[int] = _f([1, 2, 5, 10, 20, 50, 100, 200], "unroll lengths T (full back-propagation)")
    unroll_truncated: List[int] = _f([200], "unroll lengths T run with truncated back-propagation")
    truncate: int = _f(20, "steps back-propagated in the truncated runs")

    def __post_init__(self) -> None:
        if self.warm_steps < 0 or self.repeats < 1 or not self.inner_tol > 0:
            raise ConfigError(f"The 'warm_steps' (>= 0), 'repeats' (>= 1) and 'inner_tol' (> 0) parameters are "
                              f"out of range. Got {self.warm_steps!r}, {self.repeats!r}, {self.inner_tol!r} instead.")
        for key in ("cg_iters", "neumann_orders", "unroll_steps", "unroll_truncated"):
            if any(int(b) < 1 for b in getattr(self, key)):
                raise ConfigError(f"The '{key}' parameter must hold budgets >= 1. Got {getattr(self, key)!r} instead.")


QUICK = ["datasets=[digits]", "cg_iters=[1, 5, 20, 100]", "neumann_orders=[1, 10, 100]",
         "unroll_steps=[1, 10, 50]", "unroll_truncated=[50]", "repeats=1", "name=hypergrad_accuracy_quick"]


def sweep(cfg: HypergradAccuracyConfig) -> List[Tuple[str, str, Dict[str, Any], int]]:
    """The (method, variant, options, budget) points of the study."""
    pts: List[Tuple[str, str, Dict[str, Any], int]] = []
    pts += [("cg", "cg", {"rtol": 1e-14, "max_iter": int(k), "warm_start": False}, int(k)) for k in cfg.cg_iters]
    pts += [("neumann", "neumann", {"order": int(k), "rtol": 1e-14}, int(k)) for k in cfg.neumann_orders]
    pts += [("unrolled", "unrolled", {"steps": int(T)}, int(T)) for T in cfg.unroll_steps]
    pts += [("unrolled", f"unrolled (last {min(cfg.truncate, int(T))} steps)",
             {"steps": int(T), "truncate": min(cfg.truncate, int(T))}, int(T)) for T in cfg.unroll_truncated]
    pts += [("one_step", "one_step", {}, 1), ("first_order", "first_order", {}, 0)]
    return pts


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _dataset_rows(cfg: HypergradAccuracyConfig, dataset: str, progress: bool) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    from scipy.stats import spearmanr

    from reweight.bilevel import run_bilevel
    from reweight.head import solve_head
    from reweight.hypergrad import hypergradient, make_method
    from reweight.pipeline import features, head_problem

    rc = dataclasses.replace(cfg.base, seed=cfg.seed, data=dataclasses.replace(cfg.base.data, dataset=dataset))
    problem = head_problem(rc, features(rc, progress=progress)).problem
    out = run_bilevel(problem, make_method("cg", {"rtol": 1e-8}), cfg.warm_steps, rc.outer.lr, grad_tol=cfg.inner_tol,
                      max_iter=200)
    s = out.s
    alpha = problem.weights.alpha(s)
    sol = solve_head(problem.inner, alpha, W0=out.W, grad_tol=cfg.inner_tol, max_iter=200)
    W = sol.W
    exact_name = "exact"
    exact = hypergradient(make_method(exact_name), problem, s, W, name=exact_name)
    t_exact = min(hypergradient(make_method(exact_name), problem, s, W).seconds for _ in range(cfg.repeats))
    info = {"dataset": dataset, "n_train": problem.inner.n, "K": problem.inner.K, "D": int(problem.inner.X.shape[1]),
            "inner_grad_norm": sol.grad_norm, "exact_seconds": t_exact,
            "alpha_min": float(alpha.min()), "alpha_max": float(alpha.max()),
            "exact_rel_residual": exact.rel_residual}
    rows = []
    for method, variant, options, budget in sweep(cfg):
        m = make_method(method, options)
        res = hypergradient(m, problem, s, W, name=method)
        secs = min([res.seconds] + [hypergradient(m, problem, s, W).seconds for _ in range(cfg.repeats - 1)])
        rho = spearmanr(res.grad_alpha.cpu().numpy(), exact.grad_alpha.cpu().numpy()).statistic
        rows.append({
            "dataset": dataset, "method": method, "variant": variant, "budget": budget,
            "cost": res.hvps + res.inner_steps, "hvps": res.hvps, "inner_steps": res.inner_steps,
            "cosine": _cos(res.grad_s, exact.grad_s), "rel_error": _rel(res.grad_s, exact.grad_s),
            "cosine_alpha": _cos(res.grad_alpha, exact.grad_alpha), "spearman_alpha": float(rho),
            "rel_residual": res.rel_residual, "converged": bool(res.converged), "seconds": secs,
        })
        if progress:
            r = rows[-1]
            print(f"{dataset:8s} {variant:26s} budget {budget:5d} cost {r['cost']:5d} cos {r['cosine']:.6f} "
                  f"rel {r['rel_error']:.3e} spearman {r['spearman_alpha']:.4f} {secs * 1e3:8.1f} ms", flush=True)
    rows.append({"dataset": dataset, "method": "exact", "variant": "exact (dense Cholesky)", "budget": 0, "cost": 0,
                 "hvps": 0, "inner_steps": 0, "cosine": 1.0, "rel_error": 0.0, "cosine_alpha": 1.0,
                 "spearman_alpha": 1.0, "rel_residual": exact.rel_residual, "converged": True, "seconds": t_exact})
    return rows, info


def plot(df, path_stem: Path) -> None:
    """Cosine (top) and relative error (bottom) vs cost, log x-axis, one column per dataset; PDF + PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(df["dataset"]))
    fig, axes = plt.subplots(2, len(datasets), figsize=(6.0 * len(datasets), 8.0), squeeze=False)
    styles = {"cg": ("C0", "o"), "neumann": ("C1", "s"), "unrolled": ("C2", "^"), "one_step": ("C3", "D"),
              "first_order": ("C4", "v")}
    for j, ds in enumerate(datasets):
        sub = df[(df.dataset == ds) & (df.method != "exact")]
        for variant in dict.fromkeys(sub["variant"]):
            v = sub[sub.variant == variant].sort_values("cost")
            color, marker = styles.get(v.method.iloc[0], ("k", "x"))
            ls = "--" if "last" in variant else "-"
            x = v.cost.clip(lower=0.5)  # first_order costs 0: drawn at 0.5 on the log axis
            ms = 9 if v.method.iloc[0] in ("one_step", "first_order") else 6
            kw = dict(color=color, marker=marker, markersize=ms, label=variant, mfc="none" if ls == "--" else color)
            axes[0, j].plot(x, v.cosine, ls, **kw)
            axes[1, j].plot(x, v.rel_error, ls, **kw)
        ex = df[(df.dataset == ds) & (df.method == "exact")]
        t_ex = float(ex.seconds.iloc[0]) * 1e3 if len(ex) else float("nan")
        axes[0, j].set_title(f"{ds}: hypergradient vs exact (exact dense solve {t_ex:.0f} ms)", fontsize=12)
        axes[0, j].set_ylabel("cosine similarity of dJ/ds", fontsize=11)
        axes[1, j].set_ylabel("relative error of dJ/ds", fontsize=11)
        axes[1, j].set_yscale("log")
        for i in range(2):
            axes[i, j].set_xscale("log")
            axes[i, j].set_xlabel("cost (HVPs + inner steps; first_order drawn at 0.5)", fontsize=11)
            axes[i, j].grid(True, which="both", alpha=0.3)
            axes[i, j].tick_params(labelsize=10)
        axes[0, j].set_ylim(max(-1.0, float(sub.cosine.min()) - 0.05), 1.02)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3 * len(datasets), 6), fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(str(path_stem) + ".pdf")
    fig.savefig(str(path_stem) + ".png", dpi=130)
    plt.close(fig)


def run_study(cfg: HypergradAccuracyConfig, overwrite: bool = False, progress: bool = True):
    """Run the study of ``cfg``; returns the results table (pandas)."""
    import pandas as pd

    from reweight.runs import RunDir

    if cfg.base.threads:
        torch.set_num_threads(cfg.base.threads)
    run = RunDir(Path(cfg.out_dir) / cfg.name, cfg, overwrite=overwrite)
    run.write_env(cfg.seed, cfg.base.device)
    try:
        rows: List[Dict[str, Any]] = []
        infos = []
        for ds in cfg.datasets:
            r, info = _dataset_rows(cfg, ds, progress)
            rows += r
            infos.append(info)
        df = pd.DataFrame(rows)
        # wall time varies between runs: everything else in results.csv is reproducible byte for byte
        run.write_text("results.csv", df.to_csv(index=False, float_format="%.6g"))
        run.write_text("results.md", markdown(df))
        plot(df, run.file("cosine_vs_cost"))
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            run.fail(f"{type(e).__name__}: {e}")
        raise
    run.finish({"datasets": infos, "points": len(rows)})
    return df


def markdown(df) -> str:
    """A compact Markdown table of the results (one row per point)."""
    lines = ["| dataset | method | budget | cost | cosine | rel. error | Spearman (dL/dα) | ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        lines.append(f"| {r.dataset} | {r.variant} | {r.budget} | {r.cost} | {r.cosine:.6f} | {r.rel_error:.2e} | "
                     f"{r.spearman_alpha:.4f} | {r.seconds * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def _run(cfg: HypergradAccuracyConfig, ctx: Context) -> Dict[str, Any]:
    df = run_study(cfg, overwrite=ctx.overwrite, progress=ctx.progress)
    return {"table": df, "root": Path(cfg.out_dir) / cfg.name}


def _report(res: Dict[str, Any]) -> str:
    root = res["root"]
    return markdown(res["table"]) + f"results: {root / 'results.csv'}, figure: {root / 'cosine_vs_cost.pdf'} (.png)"


STUDY = Study(name="hypergrad_accuracy", summary="every hypergradient method against the exact one: accuracy vs cost",
              config=HypergradAccuracyConfig, run=_run, report=_report, quick=QUICK, threads_key="base.threads",
              description=__doc__ or "")

if __name__ == "__main__":
    shim("hypergrad_accuracy")
