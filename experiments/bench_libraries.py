"""CARROT vs other influence libraries on one head problem: time and agreement with exact leave-one-out.

::

    carrot bench_libraries            # MNIST-5k features of the main job (cached), 300 LOO samples
    carrot bench_libraries --quick    # digits features, 60 LOO samples

The head problem is the main job's (:func:`reweight.pipeline.head_problem` of ``base``: frozen
``test_resnet`` features with a bias column, L2 softmax head, uniform weights), in float64. Every method scores
all ``n`` training samples for their effect on the mean validation loss, on the DESIGN sign
convention (positive: removing the sample would raise the validation loss):

.. math::

    \\hat\\Delta_i = \\frac{1}{n}\\,\\nabla L_{val}(W^*)^\\top H^{-1} \\nabla \\ell_i(W^*),
    \\qquad \\Delta_i = L_{val}(W^*_{-i}) - L_{val}(W^*) \\text{ (exact LOO, ground truth)}.

TorchOpt (``custom_root`` + ``solve_cg``, the ``bench`` extra) runs on the identical objective, interleaved with
CARROT at one thread each: solve-only rows (W* given, rtol 1e-10) and end-to-end rows (its ``torch.optim.LBFGS``
fit vs CARROT's Newton fit, both to ``||grad F|| <= 1e-8``), median CPU seconds and the median paired ratio
(``torchopt.csv``).

Methods: CARROT's :func:`reweight.streaming.influence_on_val_loss` (dense Cholesky and CG), Captum's
``NaiveInfluenceFunction`` (explicit autograd Hessian; with ``hessian_reg = n·lambda`` and full rank it
is the same estimator, since Captum sums the per-sample Hessians) and ``ArnoldiInfluenceFunction``
(low-rank Arnoldi approximation, its defaults except the same regulariser). pyDVL is skipped when it
is not installed (its current release pins ``numpy<2`` and would downgrade this environment).
Time excludes the shared inner solve; each library's time is its own fit + scores (CARROT: median
of ``repeats``; other libraries once, their run times dwarf the timing noise).
Agreement with exact LOO on a random subset: Pearson and Spearman correlation. Every method runs
with the same intra-op thread count, :func:`reweight.streaming.auto_threads` of one HVP's FLOPs.
Writes ``runs/bench_libraries/<name>/results.csv`` and ``summary.json``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List

import numpy as np
import torch

from reweight.config import HeadConfig, RunConfig
from reweight.config import help_field as _f
from reweight.errors import ConfigError

from .contenders import interleaved, lbfgs_fit, torchopt_influence
from .study import Study, frame_markdown, shim

__all__ = ["BenchLibrariesConfig", "STUDY", "exact_loo_deltas", "lbfgs_fit", "run_bench", "torchopt_influence"]


@dataclass(frozen=True)
class BenchLibrariesConfig:
    """What the comparison ran (config.yaml of the run directory)."""

    name: str = _f("default", "run name")
    out_dir: str = _f("runs/bench_libraries", "parent directory")
    loo_samples: int = _f(300, "training samples with exact LOO ground truth")
    repeats: int = _f(3, "timed repeats of CARROT's methods (median); other libraries run once")
    base: RunConfig = field(default_factory=lambda: RunConfig(head=HeadConfig(dtype="float64")), metadata={
        "help": "the main job's head problem (base.data.dataset: mnist5k or digits; base.seed: features and the "
                "LOO subset; base.head.dtype float64)"})

    LEGACY_KEYS: ClassVar[Dict[str, str]] = {"dataset": "base.data.dataset", "seed": "base.seed"}

    def __post_init__(self) -> None:
        if self.loo_samples < 2 or self.repeats < 1:
            raise ConfigError(f"The 'loo_samples' (>= 2) and 'repeats' (>= 1) parameters are out of range. "
                              f"Got {self.loo_samples!r} and {self.repeats!r} instead.")


def exact_loo_deltas(inner, W, alpha, Xv, yv, subset: torch.Tensor) -> np.ndarray:
    """:math:`\\Delta_i` on the mean validation loss for ``subset``: :func:`reweight.attribution.exact_loo`
    when available, else warm-started Newton (:func:`reweight.head.solve_head`) per left-out sample."""
    from reweight.head import mean_ce, solve_head

    try:
        from reweight.attribution import AttributionProblem, exact_loo
    except ImportError:
        base = float(mean_ce(W, Xv, yv))
        out = []
        for i in subset.tolist():
            a = alpha.clone()
            a[i] = 0.0
            out.append(float(mean_ce(solve_head(inner, a, W0=W, grad_tol=1e-10).W, Xv, yv)) - base)
        return np.asarray(out)
    prob = AttributionProblem(inner=inner, alpha=alpha, W=W)
    return exact_loo(prob, subset, X_val=Xv, y_val=yv, grad_tol=1e-10).delta_val.numpy()


def _median_time(f, repeats):
    out, ts = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = f()
        ts.append(time.perf_counter() - t)
    return out, float(np.median(ts))


def _captum_methods(inner, W, Xv, yv, lam: float, tmp: Path) -> Dict[str, Any]:
    """Captum influence scorers on the head (a bias-free ``nn.Linear`` holding ``W*``; the bias is a feature)."""
    try:
        from captum.influence import NaiveInfluenceFunction
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
    except ImportError as e:
        return {"captum": f"skipped: captum not installed ({e})"}
    n, D = inner.X.shape
    K = inner.K
    model = torch.nn.Linear(D, K, bias=False).to(torch.float64)
    with torch.no_grad():
        model.weight.copy_(W)
    ckpt = tmp / "head.pt"
    torch.save(model.state_dict(), ckpt)
    ds = torch.utils.data.TensorDataset(inner.X, inner.y)
    loss = torch.nn.CrossEntropyLoss(reduction="none")

    def naive():
        m = NaiveInfluenceFunction(model, ds, str(ckpt), loss_fn=loss, batch_size=n, projection_dim=K * D,
                                   hessian_reg=n * lam, hessian_inverse_tol=1e-12)
        return m.influence((Xv, yv)).mean(0)  # Captum's H sums the n per-sample Hessians: the 1/n is inside

    def arnoldi():
        m = ArnoldiInfluenceFunction(model, ds, str(ckpt), loss_fn=loss, batch_size=n, hessian_reg=n * lam)
        return m.influence((Xv, yv)).mean(0)

    return {"captum_naive": naive, "captum_arnoldi": arnoldi}


def _torchopt_rows(inner, W, alpha, Xv, yv, lam: float, rounds: int) -> List[Dict[str, Any]]:
    """TorchOpt vs CARROT, interleaved, one thread each, median CPU seconds and paired ratios: solve only (W* given,
    rtol 1e-10) and end to end (fit to ||grad F|| <= 1e-8 included)."""
    import statistics

    from reweight.head import solve_head
    from reweight.streaming import influence_on_val_loss

    X, y, K = inner.X, inner.y, inner.K
    ref = influence_on_val_loss(inner, Xv, yv, W, alpha, method="dense")[0]

    def carrot_solve():
        s, hg = influence_on_val_loss(inner, Xv, yv, W, alpha, method="cg", rtol=1e-10, max_iter=5000)
        return s, hg.hvps

    def torchopt_solve():
        return torchopt_influence(X, y, Xv, yv, lam, W, alpha)

    def carrot_e2e():
        sol = solve_head(inner, alpha, grad_tol=1e-8)
        s, hg = influence_on_val_loss(inner, Xv, yv, sol.W, alpha, method="cg", rtol=1e-10, max_iter=5000)
        return s, hg.hvps

    def torchopt_e2e():
        return torchopt_influence(X, y, Xv, yv, lam, lbfgs_fit(X, y, K, lam, alpha, 1e-8), alpha)

    rows = []
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind, pair in (("solve", (carrot_solve, torchopt_solve)), ("end_to_end", (carrot_e2e, torchopt_e2e))):
            ts, last = interleaved(dict(zip(("carrot", "torchopt"), pair)), rounds)
            info = {name: (hvps, float((s - ref).abs().max() / ref.abs().max())) for name, (s, hvps) in last.items()}
            ratio = statistics.median(a / b for a, b in zip(ts["torchopt"], ts["carrot"]))
            for name in ("carrot", "torchopt"):
                rows.append({"kind": kind, "method": name, "cpu_seconds_median": statistics.median(ts[name]),
                             "hvps": info[name][0], "max_rel_diff_vs_dense": info[name][1],
                             "torchopt_over_carrot": ratio})
    finally:
        torch.set_num_threads(prev)
    return rows


def run_bench(cfg: BenchLibrariesConfig, progress: bool = False) -> Dict[str, Any]:
    """Run the comparison of ``cfg``; write ``<out_dir>/<name>/results.csv`` and the summary; return both."""
    import pandas as pd
    from scipy.stats import pearsonr, spearmanr

    from reweight.head import solve_head
    from reweight.pipeline import draw_subset, features, head_problem
    from reweight.runs import RunDir
    from reweight.streaming import auto_threads, influence_on_val_loss

    rc = cfg.base
    run = RunDir(Path(cfg.out_dir) / cfg.name, cfg, overwrite=True)
    run.write_env(rc.seed, rc.device)
    problem = head_problem(rc, features(rc, progress=progress)).problem
    inner, Xv, yv, lam = problem.inner, problem.X_val, problem.y_val, rc.head.lam
    n, D = inner.X.shape
    alpha = torch.ones(n, dtype=torch.float64)
    W = solve_head(inner, alpha, grad_tol=1e-11).W
    threads = auto_threads(4.0 * n * D * inner.K)  # one HVP's FLOPs; every method runs with this count
    torch.set_num_threads(threads)
    subset = draw_subset(n, cfg.loo_samples, rc.seed, "loo_subset")
    t = time.perf_counter()
    truth = exact_loo_deltas(inner, W, alpha, Xv, yv, subset)
    t_loo = time.perf_counter() - t
    print(f"[bench_libraries] n={n} D={D} K={inner.K} lam={lam}; exact LOO on {len(subset)} samples: {t_loo:.1f}s", flush=True)

    methods: Dict[str, Any] = {
        "carrot_dense": lambda: influence_on_val_loss(inner, Xv, yv, W, alpha, method="dense")[0],
        "carrot_cg": lambda: influence_on_val_loss(inner, Xv, yv, W, alpha, method="cg", rtol=1e-8)[0],
    }
    skipped = {}
    try:
        import pydvl  # noqa: F401
    except ImportError:
        skipped["pydvl"] = "not installed: pyDVL 0.10 requires numpy<2 and would downgrade numpy 2.4 in this venv"
    with tempfile.TemporaryDirectory() as tmp:
        for k, v in _captum_methods(inner, W, Xv, yv, lam, Path(tmp)).items():
            if isinstance(v, str):
                skipped[k] = v
            else:
                methods[k] = v
        rows, scores = [], {}
        for name, f in methods.items():
            print(f"[bench_libraries] {name} ...", flush=True)
            try:
                s, sec = _median_time(f, cfg.repeats if name.startswith("carrot") else 1)
            except Exception as e:  # report a library failure, keep the others
                skipped[name] = f"failed: {type(e).__name__}: {e}"
                continue
            s = s.detach().to(torch.float64).reshape(-1)
            scores[name] = s
            sub = s[subset].numpy()
            rows.append({"method": name, "seconds": sec, "pearson_vs_loo": float(pearsonr(sub, truth)[0]),
                         "spearman_vs_loo": float(spearmanr(sub, truth)[0]),
                         "sign_agreement": float(np.mean(np.sign(sub) == np.sign(truth)))})
    try:
        import torchopt  # noqa: F401

        vs_torchopt = pd.DataFrame(_torchopt_rows(inner, W, alpha, Xv, yv, lam, cfg.repeats))
        run.write_text("torchopt.csv", vs_torchopt.to_csv(index=False, float_format="%.6g"))
    except ImportError as e:
        vs_torchopt = None
        skipped["torchopt"] = f"not installed ({e}): pip install -e '.[bench]'"
    df = pd.DataFrame(rows)
    ref = scores.get("carrot_dense")
    if ref is not None:
        df["max_rel_diff_vs_carrot_dense"] = [float((scores[m] - ref).abs().max() / ref.abs().max()) for m in df.method]
    ours = df[df.method.str.startswith("carrot")]
    others = df[~df.method.str.startswith("carrot")]
    summary: Dict[str, Any] = {"n": n, "D": D, "K": inner.K, "lam": lam, "dataset": rc.data.dataset,
                               "loo_samples": len(subset), "exact_loo_seconds": t_loo, "skipped": skipped,
                               "threads": torch.get_num_threads()}
    if len(ours) and len(others):
        best_ours = ours.sort_values("seconds").iloc[0]
        fastest = others.sort_values("seconds").iloc[0]
        summary.update(fastest_carrot=best_ours.method, fastest_other=fastest.method,
                       speedup_vs_fastest_other=float(fastest.seconds / best_ours.seconds),
                       carrot_pearson=float(best_ours.pearson_vs_loo), other_pearson=float(fastest.pearson_vs_loo))
    if vs_torchopt is not None:
        summary["torchopt"] = {k: float(g["torchopt_over_carrot"].iloc[0]) for k, g in vs_torchopt.groupby("kind")}
    run.write_text("results.csv", df.to_csv(index=False, float_format="%.6g"))
    run.finish(summary)
    return {"table": df, "torchopt": vs_torchopt, "summary": summary, "run_dir": str(run.path)}


def _report(res: Dict[str, Any]) -> str:
    table = frame_markdown(res["table"])
    if res.get("torchopt") is not None:
        table += "\n\nvs TorchOpt (one thread, interleaved, median CPU seconds):\n" + res["torchopt"].to_string(index=False)
    return f"{table}\n{json.dumps(res['summary'], indent=2, sort_keys=True)}\nrun directory: {res['run_dir']}"


STUDY = Study(name="bench_libraries", summary="CARROT vs other influence libraries: time and agreement with exact LOO",
              config=BenchLibrariesConfig, run=lambda cfg, ctx: run_bench(cfg, progress=ctx.progress),
              report=_report, quick=("base.data.dataset=digits", "loo_samples=60", "repeats=1", "name=quick"),
              threads_key=None,
              legacy_flags={"--name": "name", "--out-dir": "out_dir", "--loo-samples": "loo_samples",
                            "--repeats": "repeats", "--seed": "base.seed"},
              description=__doc__ or "")

if __name__ == "__main__":
    shim("bench_libraries")
