"""CARROT vs other influence libraries on one head problem: time and agreement with exact leave-one-out.

::

    python -m experiments.bench_libraries            # MNIST-5k features of the main job (cached), 300 LOO samples
    python -m experiments.bench_libraries --quick    # digits features, 60 LOO samples

The head problem is the main job's (``experiments.main_job.build_problem``: frozen ``test_resnet``
features with a bias column, L2 softmax head, uniform weights), in float64. Every method scores
all ``n`` training samples for their effect on the mean validation loss, on the DESIGN sign
convention (positive: removing the sample would raise the validation loss):

.. math::

    \\hat\\Delta_i = \\frac{1}{n}\\,\\nabla L_{val}(W^*)^\\top H^{-1} \\nabla \\ell_i(W^*),
    \\qquad \\Delta_i = L_{val}(W^*_{-i}) - L_{val}(W^*) \\text{ (exact LOO, ground truth)}.

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

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

__all__ = ["BenchLibrariesConfig", "exact_loo_deltas", "main"]


@dataclass(frozen=True)
class BenchLibrariesConfig:
    """What the comparison ran (config.yaml of the run directory)."""

    name: str = field(default="default", metadata={"help": "run name"})
    out_dir: str = field(default="runs/bench_libraries", metadata={"help": "parent directory"})
    dataset: str = field(default="mnist5k", metadata={"help": "mnist5k or digits"})
    loo_samples: int = field(default=300, metadata={"help": "training samples with exact LOO ground truth"})
    repeats: int = field(default=3, metadata={"help": "timed repeats of CARROT's methods (median); other libraries run once"})
    seed: int = field(default=0, metadata={"help": "seed (features, LOO subset)"})


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


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_libraries", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="digits features, 60 LOO samples, 1 repeat")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out-dir", default="runs/bench_libraries")
    ap.add_argument("--loo-samples", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = BenchLibrariesConfig(name=args.name or ("quick" if args.quick else "default"), out_dir=args.out_dir,
                               dataset="digits" if args.quick else "mnist5k",
                               loo_samples=args.loo_samples or (60 if args.quick else 300),
                               repeats=args.repeats or (1 if args.quick else 3), seed=args.seed)

    import pandas as pd
    from scipy.stats import pearsonr, spearmanr

    from experiments.main_job import build_problem
    from reweight.config import load_config
    from reweight.features import build_features
    from reweight.head import solve_head
    from reweight.runs import RunDir
    from reweight.seeding import numpy_rng
    from reweight.streaming import auto_threads, influence_on_val_loss

    run = RunDir(Path(cfg.out_dir) / cfg.name, cfg, overwrite=True)
    run.write_env(cfg.seed, "cpu")
    rc = load_config(None, [f"seed={cfg.seed}", f"data.dataset={cfg.dataset}", "head.dtype=float64"])
    fs = build_features(rc.data, rc.backbone, rc.features, rc.seed)
    problem, _ = build_problem(rc, fs)
    inner, Xv, yv, lam = problem.inner, problem.X_val, problem.y_val, rc.head.lam
    n, D = inner.X.shape
    alpha = torch.ones(n, dtype=torch.float64)
    W = solve_head(inner, alpha, grad_tol=1e-11).W
    threads = auto_threads(4.0 * n * D * inner.K)  # one HVP's FLOPs; every method runs with this count
    torch.set_num_threads(threads)
    subset = torch.as_tensor(np.sort(numpy_rng(cfg.seed, "loo_subset").choice(n, size=min(n, cfg.loo_samples),
                                                                               replace=False)))
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
    df = pd.DataFrame(rows)
    ref = scores.get("carrot_dense")
    if ref is not None:
        df["max_rel_diff_vs_carrot_dense"] = [float((scores[m] - ref).abs().max() / ref.abs().max()) for m in df.method]
    ours = df[df.method.str.startswith("carrot")]
    others = df[~df.method.str.startswith("carrot")]
    summary: Dict[str, Any] = {"n": n, "D": D, "K": inner.K, "lam": lam, "dataset": cfg.dataset,
                               "loo_samples": len(subset), "exact_loo_seconds": t_loo, "skipped": skipped,
                               "threads": torch.get_num_threads()}
    if len(ours) and len(others):
        best_ours = ours.sort_values("seconds").iloc[0]
        fastest = others.sort_values("seconds").iloc[0]
        summary.update(fastest_carrot=best_ours.method, fastest_other=fastest.method,
                       speedup_vs_fastest_other=float(fastest.seconds / best_ours.seconds),
                       carrot_pearson=float(best_ours.pearson_vs_loo), other_pearson=float(fastest.pearson_vs_loo))
    run.write_text("results.csv", df.to_csv(index=False, float_format="%.6g"))
    run.finish(summary)
    print(df.to_markdown(index=False, floatfmt=".4g") if hasattr(df, "to_markdown") else df.to_string(index=False))
    print(json.dumps(summary, indent=2, sort_keys=True))
    print(f"run directory: {run.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
