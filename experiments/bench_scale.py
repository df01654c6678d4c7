"""Scaling benchmarks of the head kernels: wall time, peak memory and efficiency vs n, d and K.

::

    carrot bench_scale --quick            # a minute: small sizes, checks the pipeline
    carrot bench_scale                    # sweeps n (1e4..1e6), d (64..2048), K (10..1000), MNIST-5k
    carrot bench_scale sweeps=[n] name=n_only
    carrot bench_scale sweeps=[precond] lam=0.001 repeats=1 threads=1 name=precond   # HVPs with / without PCG, n = 1e6

Each configuration runs in its own subprocess (:func:`measure` in a fresh interpreter), so the peak resident memory (``ru_maxrss``) belongs
to that configuration alone. Per configuration, on synthetic float32 features (bias column
appended, ``D = d + 1``):

* ``matmul``: the plain torch products of the HVP's shapes, ``X @ U^T`` and ``Z^T @ X`` -- the
  throughput reference (``4 n D K`` FLOPs);
* ``hvp``: :meth:`reweight.head.HeadHessian.matvec` (``4 n D K`` useful FLOPs) and ``hvp_reference``,
  the pre-optimisation formula kept here for the before/after comparison;
* ``hvp_stream``: :class:`reweight.streaming.StreamingHessian` over in-memory chunks of 65,536 rows;
* ``grad``: :meth:`reweight.head.HeadObjective.grad` (``4 n D K``);
* ``cg``: one CG hypergradient :func:`reweight.streaming.val_alpha_grad` (``(hvps + 1)·4nDK``: the HVPs,
  the probabilities and ``X V^T``), which is
  also the influence of every training sample on the validation loss up to the factor ``-alpha``;
* ``store``: streaming HVP and CG hypergradient read from an on-disk feature store (memory-mapped
  shards of 65,536 rows; n = 1e6 in the full run) -- peak memory stays near one chunk;
* ``knn``: nearest-neighbour candidates (:mod:`reweight.neighbors`): time and recall@10 of FAISS flat/IVF
  vs the torch brute force, and recall of the top-10 representer supporters from ``M`` candidates
  (written to ``knn.csv``);
* ``precond`` (only when named in ``sweeps``): the CG hypergradient at the optimum (``solve_head`` to ``cg_tol``),
  once per preconditioner of ``preconds`` (default ``none`` and ``auto``), no warm start, for each label model of
  ``precond_labels`` (:data:`LABELS`: random labels, or a teacher's) at n = 1e6, d = 512, K = 100 (quick: 2e4,
  64, 20): HVPs, seconds, the preconditioner's setup, training accuracy and peak RSS; the summary gives
  ``fewer_hvps_than_none`` per preconditioner;
* attribution (only if :mod:`reweight.attribution` imports; on small problems in float64):
  ``influence`` (``influence_cg`` scores on the mean validation loss), ``loo`` (exact leave-one-out,
  seconds per left-out sample), ``trak`` (one projected model).

Threads: ``threads`` (``--threads``) or, by default, :func:`reweight.streaming.auto_threads` of one HVP's FLOPs
(1 thread for small problems, all cores for large ones). Efficiency = (useful FLOPs / time) / (FLOP/s of
``matmul`` measured in the same process).
Writes ``runs/bench_scale/<name>/`` with ``results.csv``, ``results.json``, ``summary.json`` (the
acceptance numbers: HVP efficiency at n=1e5, d=512, K=100; log-log slope of HVP time in n;
peak memory of the n=1e6 CG hypergradient) and ``DONE``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from reweight.config import help_field as _f
from reweight.errors import ConfigError

from .study import Context, Study, shim

__all__ = ["BenchScaleConfig", "STUDY", "SWEEPS", "measure", "plan", "reference_matvec", "run_bench"]

SWEEPS = ("n", "d", "K", "mnist", "attr", "store", "knn", "precond")
#: label models of the ``precond`` sweep: ``random`` (labels independent of the features, so ``W* ~ 0`` and every
#: ``S_i ~ (I - 11^T/K)/K``) and ``teacher`` (``y = argmax(x W_t^T + Gumbel)``, ``W_t = teacher_scale N(0,1)/sqrt(d)``)
LABELS = ("random", "teacher")


@dataclass(frozen=True)
class BenchScaleConfig:
    """What the benchmark ran (saved as config.yaml of the run directory)."""

    name: str = _f("default", "run name")
    out_dir: str = _f("runs/bench_scale", "parent directory")
    quick: bool = _f(False, "small sizes (about a minute)")
    sweeps: List[str] = _f([s for s in SWEEPS if s != "precond"],
                           f"sweeps run, from {', '.join(SWEEPS)} (precond only when named)")
    repeats: int = _f(5, "timed repeats per operation (median reported)")
    threads: int = _f(0, "torch intra-op threads (0 = reweight.streaming.auto_threads of one HVP's FLOPs)")
    lam: float = _f(1e-2, "L2 strength")
    cg_tol: float = _f(1e-6, "CG relative residual")
    seed: int = _f(0, "data seed")
    timeout: int = _f(1800, "seconds per configuration (its subprocess is stopped after that)")
    precond_labels: List[str] = _f(list(LABELS), f"label models of the precond sweep, from {', '.join(LABELS)}")
    teacher_scale: float = _f(6.0, "scale of the teacher's weights (teacher labels; larger = more confident labels)")
    preconds: List[str] = _f(["none", "auto"], "preconditioners of the precond sweep's CG hypergradient, at the optimum")

    def __post_init__(self) -> None:
        bad = [s for s in self.sweeps if s not in SWEEPS]
        if bad:
            raise ConfigError(f"The 'sweeps' parameter must hold names from {', '.join(SWEEPS)}. Got {bad[0]!r} instead.")
        from reweight.precond import PRECONDITIONERS
        from reweight.validate import check_choice, check_number

        for lab in self.precond_labels:
            check_choice(lab, "precond_labels", "bench_scale", LABELS)
        for pc in self.preconds:
            check_choice(pc, "preconds", "bench_scale", ("auto",) + PRECONDITIONERS)
        check_number(self.teacher_scale, "teacher_scale", "bench_scale", low=0.0, low_open=True)
        if self.repeats < 1 or self.threads < 0 or self.timeout < 1:
            raise ConfigError(f"The 'repeats' (>= 1), 'threads' (>= 0) and 'timeout' (>= 1) parameters are out of "
                              f"range. Got {self.repeats!r}, {self.threads!r}, {self.timeout!r} instead.")


def reference_matvec(H, U):
    """The HVP formula of ``HeadHessian.matvec`` before optimisation (for the before/after table)."""
    Ub = U.unsqueeze(0)
    B = 1
    Z = H.X @ Ub.reshape(B * H.K, H.D).T
    Z = Z.reshape(-1, B, H.K)
    PZ = H.P.unsqueeze(1) * Z
    M = H.alpha[:, None, None] * (PZ - H.P.unsqueeze(1) * PZ.sum(dim=2, keepdim=True))
    return ((M.reshape(-1, B * H.K).T @ H.X).reshape(B, H.K, H.D) / H.n + H.lam * Ub)[0]


def _median_time(f: Callable[[], Any], repeats: int) -> float:
    f()  # warm-up (allocator, thread pool)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _synthetic(n: int, d: int, K: int, seed: int, labels: str = "random", teacher_scale: float = 6.0):
    """Gaussian features with a bias column, weights ``U(0.5, 1.5)``, a 1,000-row validation set and a small random
    ``W``; labels drawn by ``labels`` (:data:`LABELS`)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    X = torch.empty(n, d + 1)
    for lo in range(0, n, 1 << 16):  # fill in blocks: no (n, d) temporaries
        X[lo:lo + (1 << 16), :d].normal_(generator=g)
    X[:, d] = 1.0
    y = torch.randint(0, K, (n,), generator=g)
    alpha = torch.rand(n, generator=g) + 0.5
    Xv = torch.cat([torch.randn(1000, d, generator=g), torch.ones(1000, 1)], 1)
    yv = torch.randint(0, K, (1000,), generator=g)
    W = 0.05 * torch.randn(K, d + 1, generator=g)
    if labels == "teacher":
        Wt = teacher_scale * torch.randn(K, d, generator=g) / d ** 0.5

        def draw(x: torch.Tensor) -> torch.Tensor:
            u = torch.rand(x.shape[0], K, generator=g).clamp_min_(1e-12)
            return torch.argmax(x[:, :d] @ Wt.T - torch.log(-torch.log(u)), dim=1)

        y = torch.cat([draw(X[lo:lo + (1 << 16)]) for lo in range(0, n, 1 << 16)])
        yv = draw(Xv)
    return X, y, alpha, Xv, yv, W


def _mnist(seed: int):
    import torch

    from reweight.config import DataConfig, RunConfig
    from reweight.pipeline import features, head_problem

    cfg = RunConfig(seed=seed, data=DataConfig(dataset="mnist5k"))
    problem = head_problem(cfg, features(cfg)).problem
    g = torch.Generator().manual_seed(seed)
    n, D = problem.inner.X.shape
    alpha = torch.ones(n)
    return problem.inner.X, problem.inner.y, alpha, problem.X_val, problem.y_val, 0.05 * torch.randn(problem.inner.K, D, generator=g)


def measure(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Time the operations of one configuration in this process (see the module doc)."""
    import torch

    from reweight.head import HeadHessian, HeadObjective
    from reweight.streaming import ChunkedFeatures, StreamingObjective, val_alpha_grad

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    reps, lam = int(spec["repeats"]), float(spec["lam"])
    t0 = time.perf_counter()
    if spec["source"] == "store":
        return _measure_store(spec, t0)
    if spec["source"] == "knn":
        return _measure_knn(spec, t0)
    if spec["source"] == "mnist5k":
        X, y, alpha, Xv, yv, W = _mnist(spec["seed"])
        K = int(y.max()) + 1
    else:
        K = spec["K"]
        X, y, alpha, Xv, yv, W = _synthetic(spec["n"], spec["d"], K, spec["seed"], spec.get("labels", "random"),
                                            float(spec.get("teacher_scale", 6.0)))
    n, D = X.shape
    if not spec.get("threads"):
        from reweight.streaming import auto_threads

        torch.set_num_threads(auto_threads(4.0 * n * D * K))
    row: Dict[str, Any] = {"source": spec["source"], "sweep": spec["sweep"], "n": n, "d": D - 1, "K": K,
                           "threads": torch.get_num_threads(), "setup_s": time.perf_counter() - t0}
    obj = HeadObjective(X, y, K, lam)
    H = HeadHessian.from_tensors(X, obj.probs(W), alpha, lam)
    U = torch.randn(K, D, generator=torch.Generator().manual_seed(1))
    flops = 4.0 * n * D * K
    Z = X @ U.T
    t_mm = _median_time(lambda: (torch.mm(X, U.T), torch.mm(Z.T, X)), reps)
    Z = None  # free it (the timed products allocate their own)
    row.update(matmul_s=t_mm, matmul_gflops=flops / t_mm / 1e9)
    ops = spec["ops"]

    def rec(name: str, seconds: float, useful: Optional[float], **extra: Any) -> None:
        row[f"{name}_s"] = seconds
        if useful is not None:
            row[f"{name}_eff"] = (useful / seconds) / (flops / t_mm)
        row.update({f"{name}_{k}": v for k, v in extra.items()})

    if "hvp" in ops:
        rec("hvp", _median_time(lambda: H.matvec(U), reps), flops)
    if "hvp_reference" in ops:
        rec("hvp_reference", _median_time(lambda: reference_matvec(H, U), reps), flops)
    if "hvp_stream" in ops:
        Hs = StreamingObjective(ChunkedFeatures(X, 65536), y, K, lam).hessian(W, alpha)
        rec("hvp_stream", _median_time(lambda: Hs.matvec(U), reps), flops)
        del Hs
    if "grad" in ops:
        rec("grad", _median_time(lambda: obj.grad(W, alpha), reps), flops)
    if "cg" in ops:
        t = time.perf_counter()
        vag = val_alpha_grad(obj, Xv, yv, W, alpha, method="cg", rtol=float(spec["cg_tol"]), max_iter=500)
        sec = time.perf_counter() - t
        # useful work: the HVPs, softmax(X W^T) for the Hessian (2nDK) and X V^T for dL/dalpha (2nDK)
        rec("cg", sec, (vag.hvps + 1) * flops, hvps=vag.hvps, rel_residual=vag.rel_residual)
    if "cg_precond" in ops:  # the CG hypergradient at the optimum, once per preconditioner, no warm start
        from reweight.head import accuracy, solve_head

        sol = solve_head(obj, alpha, grad_tol=float(spec["cg_tol"]), max_iter=50)
        row.update(labels=spec["labels"], preconds=",".join(spec["preconds"]), fit_s=sol.seconds,
                   fit_newton_iters=sol.iters, fit_hvps=sol.hvps,
                   fit_grad_norm=sol.grad_norm, train_acc=float(accuracy(sol.W, X, y)))
        for pc in spec["preconds"]:
            t = time.perf_counter()
            vag = val_alpha_grad(obj, Xv, yv, sol.W, alpha, method="cg", rtol=float(spec["cg_tol"]), max_iter=500,
                                 precond=pc)
            rec(f"cg_{pc}", time.perf_counter() - t, (vag.hvps + 1) * flops, hvps=vag.hvps,
                rel_residual=vag.rel_residual, precond=vag.extra.get("precond"),
                precond_setup_s=vag.extra.get("precond_seconds"))
    attr = [o for o in ops if o in ("influence", "loo", "trak")]
    if attr:
        try:
            from reweight.attribution import TRAK, AttributionProblem, InfluenceCG, exact_loo
        except ImportError as e:  # written by another engineer; benchmark it only when present
            row["attribution_skipped"] = f"reweight.attribution unavailable: {e}"
        else:
            X64, Xv64 = X.double(), Xv.double()
            t = time.perf_counter()
            prob = AttributionProblem.from_data(X64, y, K, lam, alpha=alpha.double(), grad_tol=1e-10)
            row["attr_fit_head_s"] = time.perf_counter() - t
            if "influence" in attr:
                t = time.perf_counter()
                m = InfluenceCG(rtol=1e-8)
                m.fit(prob)
                m.scores(Xv64, yv, reduce="mean")
                rec("influence", time.perf_counter() - t, None)
            if "loo" in attr:
                sub = torch.arange(min(n, 16))
                t = time.perf_counter()
                exact_loo(prob, sub, X_val=Xv64, y_val=yv, grad_tol=1e-9)
                rec("loo_per_sample", (time.perf_counter() - t) / len(sub), None)
            if "trak" in attr:
                t = time.perf_counter()
                m = TRAK(proj_dim=min(256, K * D), n_models=1)
                m.fit(prob)
                m.scores(Xv64, yv, reduce="mean")
                rec("trak", time.perf_counter() - t, None)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return row


def _measure_store(spec: Dict[str, Any], t0: float) -> Dict[str, Any]:
    """Streaming HVP and CG hypergradient from an on-disk :class:`reweight.store.FeatureStore`.

    The store (float32, bias column included, shards of 65,536 rows) is written block by block, so
    neither writing nor reading holds the ``(n, D)`` matrix; peak RSS shows what streaming needs.
    The matmul reference is the same-shape products on one in-memory chunk, times the chunk count.
    """
    import shutil

    import torch

    from reweight.store import StoreWriter
    from reweight.streaming import ChunkedFeatures, StreamingObjective, val_alpha_grad

    n, d, K, reps, lam = spec["n"], spec["d"], spec["K"], int(spec["repeats"]), float(spec["lam"])
    D, chunk = d + 1, 65536
    root = Path(spec["store_dir"])
    g = torch.Generator().manual_seed(spec["seed"])
    ys = []
    with StoreWriter(root, D, shard_rows=chunk, overwrite=True) as w:
        for lo in range(0, n, chunk):
            b = min(chunk, n - lo)
            ys.append(torch.randint(0, K, (b,), generator=g))
            w.append(torch.cat([torch.randn(b, d, generator=g), torch.ones(b, 1)], 1), labels=ys[-1])
        store = w.close()
    y = torch.cat(ys)
    alpha = torch.rand(n, generator=g) + 0.5
    Xv = torch.cat([torch.randn(1000, d, generator=g), torch.ones(1000, 1)], 1)
    yv = torch.randint(0, K, (1000,), generator=g)
    W = 0.05 * torch.randn(K, D, generator=g)
    row: Dict[str, Any] = {"source": "store", "sweep": spec["sweep"], "n": n, "d": d, "K": K,
                           "threads": torch.get_num_threads(), "setup_s": time.perf_counter() - t0,
                           "store_gib": store.nbytes / 2**30, "chunk_rows": chunk}
    U = torch.randn(K, D, generator=torch.Generator().manual_seed(1))
    Xc = store.shard(0).clone()
    Zc = Xc @ U.T
    t_chunk = _median_time(lambda: (torch.mm(Xc, U.T), torch.mm(Zc.T, Xc)), reps)
    t_mm = t_chunk * n / Xc.shape[0]
    flops = 4.0 * n * D * K
    Xc = Zc = None  # free the chunk
    row.update(matmul_s=t_mm, matmul_gflops=flops / t_mm / 1e9)
    obj = StreamingObjective(ChunkedFeatures(store, chunk), y, K, lam)
    H = obj.hessian(W, alpha)
    t = _median_time(lambda: H.matvec(U), reps)
    row.update(hvp_store_s=t, hvp_store_eff=t_mm / t)
    t = time.perf_counter()
    vag = val_alpha_grad(obj, Xv, yv, W, alpha, method="cg", rtol=float(spec["cg_tol"]), max_iter=500)
    sec = time.perf_counter() - t
    row.update(cg_store_s=sec, cg_store_hvps=vag.hvps, cg_store_rel_residual=vag.rel_residual,
               cg_store_eff=(vag.hvps + 1) * flops / sec / (flops / t_mm))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    H = obj = store = None  # release the memory map before removing its files
    shutil.rmtree(root, ignore_errors=True)
    return row


def _measure_knn(spec: Dict[str, Any], t0: float) -> Dict[str, Any]:
    """Nearest-neighbour candidates: time and recall@10 of FAISS (flat, IVF at several ``nprobe``) and
    the torch brute force; recall of the top-10 representer supporters found from ``M`` candidates.

    Synthetic clustered float32 features (``K`` Gaussian clusters), 100 queries from the same law.
    """
    import torch

    from reweight.head import HeadObjective, add_bias, solve_head
    from reweight.neighbors import (
        brute_force_knn,
        faiss_available,
        knn,
        preselect_and_score,
        recall_at_k,
        representer_scores,
        representer_top,
    )

    n, d, K, k = spec["n"], spec["d"], spec["K"], 10
    g = torch.Generator().manual_seed(spec["seed"])
    C = 3.0 * torch.randn(K, d, generator=g)
    y = torch.randint(0, K, (n,), generator=g)
    X = C[y] + torch.randn(n, d, generator=g)
    yq = torch.randint(0, K, (100,), generator=g)
    Q = C[yq] + torch.randn(100, d, generator=g)
    rows: List[Dict[str, Any]] = []
    t = time.perf_counter()
    exact = brute_force_knn(Q, X, k)
    rows.append({"method": "torch_brute_force", "seconds": time.perf_counter() - t, "recall_at_10": 1.0})
    if faiss_available():
        t = time.perf_counter()
        r = knn(Q, X, k, backend="faiss", index="flat")
        rows.append({"method": "faiss_flat", "seconds": time.perf_counter() - t, "recall_at_10": recall_at_k(r.indices, exact.indices)})
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))  # the default of reweight.neighbors.knn
        for nprobe in (1, 4, 16, 64):
            t = time.perf_counter()
            r = knn(Q, X, k, backend="faiss", index="ivf", nlist=nlist, nprobe=nprobe)
            rows.append({"method": f"faiss_ivf_nlist{nlist}_nprobe{nprobe} (build+search)", "seconds": time.perf_counter() - t,
                         "recall_at_10": recall_at_k(r.indices, exact.indices)})
    # representer supporters: exact top-10 over all n vs top-10 among M pre-selected candidates
    sub = 20_000 if n > 20_000 else n  # the head is fitted on a subset to keep the benchmark short
    Xb = add_bias(X[:sub].double())
    lam = 1e-2
    W = solve_head(HeadObjective(Xb, y[:sub], K, lam), torch.ones(sub, dtype=torch.float64), grad_tol=1e-8).W
    Qb = add_bias(Q.double())
    cls = (Qb @ W.T).argmax(1)
    ones = torch.ones(sub, dtype=torch.float64)
    t = time.perf_counter()
    full = torch.topk(representer_scores(W, Xb, y[:sub], ones, lam, sub, Qb, cls), k, dim=1).indices
    t_full = time.perf_counter() - t
    rows.append({"method": "representer_exact_all", "seconds": t_full, "recall_at_10": 1.0, "n_scored": sub})

    def score(qi, idx):
        return representer_scores(W, Xb[idx], y[:sub][idx], ones[idx], lam, sub, Qb[qi:qi + 1], cls[qi:qi + 1])[0]

    for M in (100, 1000):
        t = time.perf_counter()
        r = preselect_and_score(Q, X[:sub], M, score, top=k)
        rows.append({"method": f"representer_by_feature_similarity_M{M}_{r.backend}", "seconds": time.perf_counter() - t,
                     "recall_at_10": recall_at_k(r.indices, full), "n_scored": M})
    ivf = {"backend": "faiss", "index": "ivf", "nprobe": 16} if faiss_available() else {"backend": "torch"}
    for name, kw in (("mips_exact", {"backend": "torch"}), ("mips_" + ("faiss_ivf_nprobe16" if faiss_available() else "torch"), ivf)):
        t = time.perf_counter()
        r = representer_top(W, Xb, y[:sub], ones, lam, Qb, cls, top=k, M=50, **kw)
        rows.append({"method": f"representer_{name}_M50", "seconds": time.perf_counter() - t,
                     "recall_at_10": recall_at_k(r.indices, full), "n_scored": 50})
    for r in rows:
        r.update(n=n, d=d, clusters=K)
    return {"source": "knn", "sweep": spec["sweep"], "n": n, "d": d, "K": K, "knn_rows": rows,
            "setup_s": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def plan(cfg: BenchScaleConfig) -> List[Dict[str, Any]]:
    """The configurations of the sweeps in ``cfg`` (each one subprocess)."""
    base = {"repeats": cfg.repeats, "lam": cfg.lam, "cg_tol": cfg.cg_tol, "seed": cfg.seed, "threads": cfg.threads,
            "source": "synthetic"}
    core = ["hvp", "hvp_reference", "hvp_stream", "grad", "cg"]
    if cfg.quick:
        ns, ds, Ks, n0, d0, K0 = [10_000, 30_000], [64, 256], [10, 100], 30_000, 128, 30
        attr_ns = [2_000]
    else:
        ns, ds, Ks, n0, d0, K0 = ([10_000, 30_000, 100_000, 300_000, 1_000_000], [64, 128, 256, 512, 1024, 2048],
                                  [10, 30, 100, 300, 1000], 100_000, 512, 100)
        attr_ns = [10_000, 30_000, 100_000]
    specs: List[Dict[str, Any]] = []
    if "d" in cfg.sweeps:
        specs += [dict(base, sweep="d", n=n0, d=d, K=K0, ops=core) for d in ds]
    if "K" in cfg.sweeps:
        specs += [dict(base, sweep="K", n=n0, d=d0, K=K, ops=core) for K in Ks]
    if "mnist" in cfg.sweeps:
        specs.append(dict(base, sweep="mnist", source="mnist5k", n=0, d=0, K=0, ops=core + ["influence", "loo", "trak"]))
    if "attr" in cfg.sweeps:
        specs += [dict(base, sweep="attr", n=n, d=64, K=10, ops=["hvp", "cg", "influence", "loo", "trak"]) for n in attr_ns]
    if "knn" in cfg.sweeps:
        specs.append(dict(base, sweep="knn", source="knn", n=10_000 if cfg.quick else 200_000, d=d0, K=20, ops=[]))
    if "store" in cfg.sweeps:
        specs.append(dict(base, sweep="store", source="store", n=30_000 if cfg.quick else 1_000_000, d=d0, K=K0,
                          ops=["hvp", "cg"], store_dir=str(Path(cfg.out_dir) / cfg.name / "_store")))
    if "precond" in cfg.sweeps:
        specs += [dict(base, sweep="precond", n=20_000 if cfg.quick else 1_000_000, d=64 if cfg.quick else d0,
                       K=20 if cfg.quick else K0, labels=lab, teacher_scale=cfg.teacher_scale,
                       preconds=list(cfg.preconds), ops=["cg_precond"]) for lab in cfg.precond_labels]
    if "n" in cfg.sweeps:  # last: the n = 1e6 configuration is the heaviest
        specs += [dict(base, sweep="n", n=n, d=d0, K=K0, ops=core) for n in ns]
    return specs


def _loglog_slope(ns, ts) -> float:
    return float(np.polyfit(np.log(np.asarray(ns, float)), np.log(np.asarray(ts, float)), 1)[0])


def _summarise(df) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    ref = df[(df.source == "synthetic") & (df.n == 100_000) & (df.d == 512) & (df.K == 100)]
    if len(ref):
        r = ref.iloc[0]
        out["hvp_efficiency_n1e5_d512_K100"] = float(r["hvp_eff"])
        out["hvp_reference_efficiency_n1e5_d512_K100"] = float(r.get("hvp_reference_eff", float("nan")))
        out["matmul_gflops_n1e5_d512_K100"] = float(r["matmul_gflops"])
    pre = df[df.sweep == "precond"] if "sweep" in df else df.iloc[:0]
    for _, r in pre.iterrows():
        hv = {pc: int(r[f"cg_{pc}_hvps"]) for pc in str(r["preconds"]).split(",")}
        out.setdefault("precond", {})[str(r["labels"])] = {
            "n": int(r.n), "d": int(r.d), "K": int(r.K), "hvps": hv, "train_acc": float(r.train_acc),
            "fewer_hvps_than_none": {k: hv["none"] / max(v, 1) for k, v in hv.items() if "none" in hv and k != "none"},
            "peak_rss_gib": float(r.peak_rss_mb) / 1024}
    ns = df[df.sweep == "n"].sort_values("n")
    if len(ns) >= 2:
        out["hvp_loglog_slope_in_n"] = _loglog_slope(ns.n, ns.hvp_s)
        out["cg_loglog_slope_in_n"] = _loglog_slope(ns.n, ns.cg_s / (ns.cg_hvps + 1))
        out["n_range"] = [int(ns.n.min()), int(ns.n.max())]
        big = ns[ns.n == ns.n.max()].iloc[0]
        out["largest_n"] = {"n": int(big.n), "cg_s": float(big.cg_s), "cg_hvps": int(big.cg_hvps),
                            "peak_rss_gib": float(big.peak_rss_mb) / 1024}
    return out


_WORKER = ("import json, sys; from experiments.bench_scale import measure; "
           "print('RESULT ' + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)")


def run_bench(cfg: BenchScaleConfig) -> Dict[str, Any]:
    """Run every configuration of :func:`plan` in its own subprocess; write the run directory; return the summary."""
    import pandas as pd

    from reweight.runs import RunDir

    run = RunDir(Path(cfg.out_dir) / cfg.name, cfg, overwrite=True)
    run.write_env(cfg.seed, "cpu")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    rows = []
    for spec in plan(cfg):
        label = f"{spec['sweep']}: n={spec['n']} d={spec['d']} K={spec['K']} ({spec['source']})"
        print(f"[bench_scale] {label} ...", flush=True)
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(spec)], capture_output=True, text=True,
                           timeout=cfg.timeout, env=env)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            print(f"[bench_scale]   failed (rc={p.returncode}): {p.stderr[-800:]}", flush=True)
            rows.append({"source": spec["source"], "sweep": spec["sweep"], "n": spec["n"], "d": spec["d"], "K": spec["K"],
                         "error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc={p.returncode}"})
            continue
        row = json.loads(lines[-1][len("RESULT "):])
        if "knn_rows" in row:
            knn_rows = row.pop("knn_rows")
            run.write_text("knn.csv", pd.DataFrame(knn_rows).to_csv(index=False, float_format="%.6g"))
        rows.append(row)
        eff = row.get("hvp_eff", row.get("hvp_store_eff", float("nan")))
        print(f"[bench_scale]   {time.perf_counter() - t:.1f}s  hvp_eff={eff:.2f} "
              f"peak={row['peak_rss_mb'] / 1024:.2f} GiB", flush=True)
        df = pd.DataFrame(rows)
        run.write_text("results.csv", df.to_csv(index=False, float_format="%.6g"))
    df = pd.DataFrame(rows)
    run.write_text("results.csv", df.to_csv(index=False, float_format="%.6g"))
    run.write_json("results.json", rows)
    summary = _summarise(df) if "error" not in df or df["error"].isna().all() else _summarise(df[df["error"].isna()])
    run.finish(summary)
    return {"summary": summary, "run_dir": str(run.path)}


def _run(cfg: BenchScaleConfig, ctx: Context) -> Dict[str, Any]:
    return run_bench(cfg)


def _report(res: Dict[str, Any]) -> str:
    return json.dumps(res["summary"], indent=2, sort_keys=True) + f"\nrun directory: {res['run_dir']}"


STUDY = Study(name="bench_scale", summary="scaling of the head kernels: time, peak memory, efficiency vs n, d, K",
              config=BenchScaleConfig, run=_run, report=_report, quick=("quick=true", "name=quick"),
              legacy_flags={"--name": "name", "--out-dir": "out_dir", "--sweeps": "sweeps[]", "--repeats": "repeats",
                            "--timeout": "timeout"},
              description=__doc__ or "")

if __name__ == "__main__":
    shim("bench_scale")
