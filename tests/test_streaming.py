"""Streaming head computations against their in-memory twins (float64), and the optimised HVP/gradient
of reweight.head against dense/autograd/finite-difference oracles."""

from __future__ import annotations

import pytest
import torch

from reweight.errors import ConfigError, DataError
from reweight.head import HeadHessian, HeadObjective, add_bias, mean_ce, solve_head
from reweight.hypergrad import BilevelProblem, ConjugateGradient, Exact, alpha_grad_from_v, hypergradient
from reweight.store import write_store
from reweight.streaming import ChunkedFeatures, StreamingObjective, influence_on_val_loss, val_alpha_grad
from reweight.weights import WeightModel, initial_s

DT = torch.float64
RTOL = 1e-6  # acceptance: streaming == in-memory to 1e-6 relative in float64 (observed ~1e-14)


def _problem(n=157, d=6, K=4, seed=0, lam=0.1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, K, (n,), generator=g)
    alpha = torch.rand(n, generator=g, dtype=DT) + 0.5
    W = 0.5 * torch.randn(K, d + 1, generator=g, dtype=DT)
    Xv = add_bias(torch.randn(40, d, generator=g, dtype=DT))
    yv = torch.randint(0, K, (40,), generator=g)
    return X, y, alpha, W, Xv, yv, lam


def _close(a, b, rtol=RTOL):
    """Relative agreement in norm (scale-free), plus elementwise with a matching atol."""
    scale = float(torch.linalg.vector_norm(b))
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale / max(1.0, b.numel() ** 0.5))


@pytest.fixture(params=["tensor", "store"])
def pair(request, tmp_path):
    X, y, alpha, W, Xv, yv, lam = _problem()
    K = 4
    mem = HeadObjective(add_bias(X), y, K, lam)
    if request.param == "tensor":
        src = ChunkedFeatures(X, chunk_rows=23, bias=True)  # 157 = 6*23 + 19: a ragged last chunk
    else:
        store = write_store(tmp_path / "s", X, y, shard_rows=50, dtype="float64")
        src = ChunkedFeatures(store, chunk_rows=17, bias=True)
    return mem, StreamingObjective(src, y, K, lam), alpha, W, Xv, yv


def test_loss_grad_probs_agree(pair):
    mem, st, alpha, W, _, _ = pair
    _close(st.loss(W, alpha), mem.loss(W, alpha))
    _close(st.grad(W, alpha), mem.grad(W, alpha))
    _close(st.probs(W), mem.probs(W))
    _close(st.residuals(W), mem.residuals(W))
    _close(st.sample_losses(W), mem.sample_losses(W))


def test_hvp_and_dense_agree(pair):
    mem, st, alpha, W, _, _ = pair
    U = torch.randn(3, *W.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    Hs, Hm = st.hessian(W, alpha), mem.hessian(W, alpha)
    _close(Hs.matvec(U[0]), Hm.matvec(U[0]))
    _close(Hs.matvec(U), Hm.matvec(U))  # batched, second pass uses the cached probabilities
    _close(Hs.dense(), Hm.dense())
    assert Hs.hvps == 4
    Hn = st.hessian(W, alpha, cache_probs=False)
    _close(Hn.matvec(U[1]), Hm.matvec(U[1]))


def test_solver_and_hypergradients_agree(pair):
    mem, st, alpha, W, Xv, yv = pair
    sm, ss = solve_head(mem, alpha, grad_tol=1e-11), solve_head(st, alpha, grad_tol=1e-11)
    assert sm.converged and ss.converged
    _close(ss.W, sm.W)
    for method in ("cg", "dense"):
        a = val_alpha_grad(st, Xv, yv, sm.W, alpha, method=method, rtol=1e-12)
        b = val_alpha_grad(mem, Xv, yv, sm.W, alpha, method=method, rtol=1e-12)
        _close(a.grad_alpha, b.grad_alpha)
        _close(a.v, b.v)
    ia, _ = influence_on_val_loss(st, Xv, yv, sm.W, alpha, rtol=1e-12)
    ib, _ = influence_on_val_loss(mem, Xv, yv, sm.W, alpha, rtol=1e-12)
    _close(ia, ib)


def test_full_hypergradient_through_registry_agrees(pair):
    """The registered methods and reweight.hypergrad.hypergradient run unchanged on a streaming objective."""
    mem, st, _, _, Xv, yv = pair
    wm = WeightModel(mem.y, mem.K, beta_ess=1.0, ess_floor=0.9)
    s = initial_s(mem.n, DT) + 0.3 * torch.randn(mem.n, dtype=DT, generator=torch.Generator().manual_seed(2))
    alpha = wm.alpha(s).detach()
    W = solve_head(mem, alpha, grad_tol=1e-11).W
    for method in (ConjugateGradient(rtol=1e-12), Exact()):
        hm = hypergradient(method, BilevelProblem(mem, Xv, yv, wm), s, W)
        hs = hypergradient(method, BilevelProblem(st, Xv, yv, wm), s, W)
        _close(hs.grad_s, hm.grad_s)
        _close(hs.grad_alpha, hm.grad_alpha)


def test_chunked_alpha_grad_equals_reference():
    """The objective's alpha-gradient from V, chunked and with the probabilities given, equals the reference."""
    X, y, alpha, W, *_ = _problem()
    mem = HeadObjective(add_bias(X), y, 4, 0.1)
    st = StreamingObjective(ChunkedFeatures(X, 23, bias=True), y, 4, 0.1)
    v = torch.randn_like(W)
    ref = -(mem.residuals(W) * (add_bias(X) @ v.T)).sum(dim=1) / mem.n  # the formula, spelled out
    _close(alpha_grad_from_v(mem, W, v), ref)
    _close(mem.alpha_grad_from_v(W, v, P=mem.probs(W)), ref)
    _close(st.alpha_grad_from_v(W, v), ref)
    _close(st.alpha_grad_from_v(W, v, P=st.probs(W)), ref)


def test_influence_matches_finite_difference_of_val_loss():
    """Oracle for sign, 1/n and lambda: d L_val(W*(alpha)) / d alpha_i by central differences of re-solved heads."""
    X, y, alpha, _, Xv, yv, lam = _problem(n=60, d=3, K=3, lam=0.05)
    obj = StreamingObjective(ChunkedFeatures(X, 7, bias=True), y, 3, lam)
    W = solve_head(obj, alpha, grad_tol=1e-12).W
    vag = val_alpha_grad(obj, Xv, yv, W, alpha, rtol=1e-13)
    eps = 1e-4
    for i in (0, 17, 59):
        e = torch.zeros_like(alpha)
        e[i] = eps
        Lp = mean_ce(solve_head(obj, alpha + e, W0=W, grad_tol=1e-13).W, Xv, yv)
        Lm = mean_ce(solve_head(obj, alpha - e, W0=W, grad_tol=1e-13).W, Xv, yv)
        fd = (Lp - Lm) / (2 * eps)
        torch.testing.assert_close(vag.grad_alpha[i], fd, rtol=1e-5, atol=1e-9)


def test_wrong_global_n_would_be_detected():
    """Chunk operators with their local n (instead of the global n) give a different H U: the
    tolerance used above is far below that error, so a factor-of-n bug cannot pass."""
    X, y, alpha, W, *_ = _problem()
    mem = HeadObjective(add_bias(X), y, 4, 0.1)
    U = torch.randn_like(W)
    P = mem.probs(W)
    wrong = sum(HeadHessian.from_tensors(mem.X[lo:lo + 50], P[lo:lo + 50], alpha[lo:lo + 50], 0.0).matvec(U)
                for lo in range(0, mem.n, 50)) + 0.1 * U
    right = sum(HeadHessian.from_tensors(mem.X[lo:lo + 50], P[lo:lo + 50], alpha[lo:lo + 50], 0.0, n=mem.n).matvec(U)
                for lo in range(0, mem.n, 50)) + 0.1 * U
    _close(right, mem.hessian(W, alpha).matvec(U))
    with pytest.raises(AssertionError):
        _close(wrong, mem.hessian(W, alpha).matvec(U))


# ---- the optimised in-memory kernels of reweight.head ----------------------------------------


def test_head_hvp_equals_autograd_hessian():
    X, y, alpha, W, *_ = _problem(n=80, d=3, K=3)
    obj = HeadObjective(add_bias(X), y, 3, 0.1)
    Hfull = torch.autograd.functional.hessian(lambda w: obj.loss(w.reshape(W.shape), alpha), W.reshape(-1))
    U = torch.randn(2, *W.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    H = obj.hessian(W, alpha)
    torch.testing.assert_close(H.matvec(U[0]).reshape(-1), Hfull @ U[0].reshape(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H.matvec(U), torch.stack([H.matvec(u) for u in U]), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(H.dense(), Hfull, rtol=1e-10, atol=1e-12)


def test_head_hvp_blocks_do_not_change_the_result():
    """matvec works in row blocks of ~2**24 entries of Z; a batch large enough to need several blocks
    gives the same product as the dense Hessian."""
    g = torch.Generator().manual_seed(4)
    n, D, K, B = 9000, 3, 2, 1000  # B*K = 2000 columns -> 8388 rows per block -> two blocks
    X = torch.randn(n, D, generator=g, dtype=DT)
    P = torch.softmax(torch.randn(n, K, generator=g, dtype=DT), 1)
    a = torch.rand(n, generator=g, dtype=DT)
    H = HeadHessian.from_tensors(X, P, a, 0.2)
    U = torch.randn(B, K, D, generator=g, dtype=DT)
    ref = (H.dense() @ U.reshape(B, -1).T).T.reshape(B, K, D)
    torch.testing.assert_close(H.matvec(U), ref, rtol=1e-10, atol=1e-12)


def test_head_grad_central_finite_differences():
    X, y, alpha, W, *_ = _problem(n=50, d=2, K=3)
    obj = HeadObjective(add_bias(X), y, 3, 0.1)
    g = obj.grad(W, alpha)
    eps = 1e-6
    fd = torch.zeros_like(W)
    for k in range(W.shape[0]):
        for a in range(W.shape[1]):
            E = torch.zeros_like(W)
            E[k, a] = eps
            fd[k, a] = (obj.loss(W + E, alpha) - obj.loss(W - E, alpha)) / (2 * eps)
    torch.testing.assert_close(g, fd, rtol=1e-7, atol=1e-9)


# ---- bad input -------------------------------------------------------------------------------


def test_bad_input_errors(tmp_path):
    X, y, alpha, W, Xv, yv, lam = _problem()
    with pytest.raises(ConfigError, match="The 'chunk_rows' parameter of ChunkedFeatures must be an int >= 1. Got 0 instead."):
        ChunkedFeatures(X, chunk_rows=0)
    with pytest.raises(ConfigError, match="The 'lam' parameter of [A-Za-z]* must be a finite number > 0"):
        StreamingObjective(ChunkedFeatures(X, 10), y, 4, 0.0)
    with pytest.raises(DataError, match="Length mismatch: 157 feature rows but 156 training labels"):
        StreamingObjective(ChunkedFeatures(X, 10), y[:-1], 4, lam)
    bad = X.clone()
    bad[101, 2] = float("inf")
    with pytest.raises(DataError, match=r"training features contain NaN/Inf; first offending rows: \[101\]"):
        StreamingObjective(ChunkedFeatures(bad, 10), y, 4, lam, check_finite=True)
    st = StreamingObjective(ChunkedFeatures(X, 10, bias=True), y, 4, lam)
    with pytest.raises(DataError, match="Expected validation features with 7 columns"):
        val_alpha_grad(st, Xv[:, :-1], yv, W, alpha)
    with pytest.raises(DataError, match=r"Expected alpha of shape \(157,\)"):
        val_alpha_grad(st, Xv, yv, W, alpha[:-1])


def test_threads_helpers():
    from reweight.streaming import auto_threads, num_threads

    assert auto_threads(1e6) == 1
    assert auto_threads(1e12, max_threads=3) == 3
    old = torch.get_num_threads()
    with num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == old
    with pytest.raises(ConfigError, match="The 'k' parameter of num_threads must be an int >= 1. Got 0 instead."):
        with num_threads(0):
            pass


def test_bench_scale_worker_smoke(tmp_path):
    """The benchmark worker runs end to end on a tiny configuration (in-memory and store-backed)."""
    from experiments.bench_scale import measure

    base = {"sweep": "t", "d": 8, "K": 3, "repeats": 1, "lam": 0.01, "cg_tol": 1e-6, "seed": 0, "threads": 1}
    row = measure(dict(base, source="synthetic", n=3000, ops=["hvp", "hvp_reference", "hvp_stream", "grad", "cg"]))
    assert row["cg_hvps"] >= 1 and row["hvp_eff"] > 0 and row["peak_rss_mb"] > 0
    row = measure(dict(base, source="store", n=3000, ops=["hvp", "cg"], store_dir=str(tmp_path / "st")))
    assert row["cg_store_rel_residual"] <= 1e-6 and not (tmp_path / "st").exists()


def test_bench_scale_precond_sweep_worker(tmp_path):
    """The precond sweep fits the head, solves once per preconditioner to the same tolerance, and the teacher's
    labels are learnable while random ones are not; bad sweep settings are refused before any work."""
    from experiments.bench_scale import BenchScaleConfig, measure
    from reweight.config import load_config

    base = {"sweep": "precond", "source": "synthetic", "n": 4000, "d": 8, "K": 4, "repeats": 1, "lam": 0.01,
            "cg_tol": 1e-6, "seed": 0, "threads": 1, "teacher_scale": 6.0, "preconds": ["none", "kfac", "dense"],
            "ops": ["cg_precond"]}
    rows = {lab: measure(dict(base, labels=lab)) for lab in ("random", "teacher")}
    for r in rows.values():
        assert r["fit_grad_norm"] <= 1e-6
        for pc in ("none", "kfac", "dense"):
            assert r[f"cg_{pc}_rel_residual"] <= 1e-6 and r[f"cg_{pc}_precond"] == pc and r[f"cg_{pc}_hvps"] >= 1
        assert r["cg_dense_hvps"] <= r["cg_none_hvps"]
    assert rows["teacher"]["train_acc"] > 0.6 > 0.4 > rows["random"]["train_acc"]
    for override, match in (("precond_labels=[nope]", "precond_labels"), ("preconds=[fast]", "preconds"),
                            ("teacher_scale=0", "teacher_scale")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [override], cls=BenchScaleConfig)
