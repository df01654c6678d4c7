"""Preconditioned CG (reweight.precond): every preconditioner against the exact dense solve in float64, the K-FAC
factors and the fast Hessian assembly against brute-force definitions, row-source independence, the cost model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reweight.errors import ConfigError
from reweight.head import DENSE_MAX, HeadObjective, add_bias, solve_head
from reweight.precond import (
    DENSE_PRECOND_MAX,
    KFAC,
    PRECONDITIONERS,
    BlockJacobi,
    DensePreconditioner,
    assemble_hessian,
    build_preconditioner,
    choose_preconditioner,
    estimate_solve_cost,
    helmert,
    lowp_dtype,
    pair_gram,
)
from reweight.rows import ChunkedFeatures

DT = torch.float64
ROOT = Path(__file__).resolve().parent.parent


def _problem(n=150, d=5, K=4, lam=1e-3, seed=0, chunk_rows=None):
    """A small ill-conditioned head (lam 1e-3, separated classes) at its optimum, with non-uniform alpha."""
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(K, d, generator=g, dtype=DT)
    y = torch.arange(n) % K
    X = add_bias(centers[y] + torch.randn(n, d, generator=g, dtype=DT))
    alpha = 0.2 + 1.8 * torch.rand(n, generator=g, dtype=DT)
    src = X if chunk_rows is None else ChunkedFeatures(X, chunk_rows=chunk_rows)
    obj = HeadObjective(src, y, K, lam)
    W = solve_head(HeadObjective(X, y, K, lam), alpha, grad_tol=1e-12).W
    return obj, X, y, alpha, W


def _brute_hessian(X, P, alpha, lam):
    """The slow, obviously correct twin: a per-sample loop over (diag p_i - p_i p_i^T) kron h_i h_i^T."""
    n, D = X.shape
    K = P.shape[1]
    H = torch.zeros(K * D, K * D, dtype=DT)
    for i in range(n):
        S = torch.diag(P[i]) - torch.outer(P[i], P[i])
        H += alpha[i] * torch.kron(S, torch.outer(X[i], X[i]))
    return H / n + lam * torch.eye(K * D, dtype=DT)


@pytest.fixture(scope="module")
def fx():
    obj, X, y, alpha, W = _problem()
    H = obj.hessian(W, alpha)
    Hd = _brute_hessian(X, torch.softmax(X @ W.T, dim=1), alpha, obj.lam)
    return obj, X, y, alpha, W, H, Hd


# ---------------------------------------------------------------------------------------------
# the fast dense Hessian
# ---------------------------------------------------------------------------------------------


def test_fast_dense_hessian_equals_per_sample_sum(fx):
    obj, X, y, alpha, W, H, Hd = fx
    got = H.dense()
    assert torch.equal(got, got.T)  # exactly symmetric
    torch.testing.assert_close(got, Hd, rtol=1e-12, atol=1e-14)


def test_reduced_basis_hessian_is_the_projection(fx):
    obj, X, y, alpha, W, H, Hd = fx
    K, D = obj.shape
    E = torch.kron(helmert(K), torch.eye(D, dtype=DT))
    torch.testing.assert_close(helmert(K).T @ helmert(K), torch.eye(K - 1, dtype=DT))
    torch.testing.assert_close(helmert(K).sum(0), torch.zeros(K - 1, dtype=DT), atol=1e-15, rtol=0)
    torch.testing.assert_close(assemble_hessian(H, DT, "reduced"), E.T @ Hd @ E, rtol=1e-12, atol=1e-14)
    with pytest.raises(ConfigError, match="'basis' parameter of assemble_hessian must be 'full' or 'reduced'"):
        assemble_hessian(H, DT, "bogus")


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 64, 4096])
def test_pair_gram_does_not_depend_on_chunking(fx, rows_per_chunk):
    obj, X, y, alpha, W, H, Hd = fx
    ref = pair_gram(H, DT)
    torch.testing.assert_close(pair_gram(H, DT, rows_per_chunk=rows_per_chunk, slab_rows=3), ref, rtol=1e-12, atol=1e-14)


def test_low_precision_assembly_is_close(fx):
    obj, X, y, alpha, W, H, Hd = fx
    scale = float(Hd.abs().max())
    for dt, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):  # measured 8e-8 and 2e-3 (bf16: 8-bit mantissa)
        got = assemble_hessian(H, dt)
        assert got.dtype == torch.float32
        assert float((got.double() - Hd).abs().max()) <= tol * scale


def test_chunked_and_in_memory_dense_agree():
    obj, X, y, alpha, W = _problem(chunk_rows=17)
    mem = HeadObjective(X, y, 4, obj.lam)
    torch.testing.assert_close(obj.hessian(W, alpha).dense(), mem.hessian(W, alpha).dense(), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# K-FAC against its brute-force definition
# ---------------------------------------------------------------------------------------------


def test_kfac_factors_match_their_definitions(fx):
    obj, X, y, alpha, W, H, Hd = fx
    n, K, D, lam = obj.n, obj.K, obj.shape[1], obj.lam
    P = torch.softmax(X @ W.T, dim=1)
    S = [torch.diag(P[i]) - torch.outer(P[i], P[i]) for i in range(n)]
    C = sum(alpha[i] * S[i] for i in range(n)) / n
    w = torch.stack([alpha[i] * torch.trace(S[i]) for i in range(n)])
    A = sum(w[i] * torch.outer(X[i], X[i]) for i in range(n)) / w.sum()
    M = KFAC(H)
    torch.testing.assert_close(M.C, C, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(M.A, A, rtol=1e-12, atol=1e-15)
    # trace weighting makes the trace exact: tr(C) tr(A) = tr(H - lam I)
    torch.testing.assert_close(torch.trace(C) * torch.trace(A), torch.trace(Hd) - lam * K * D, rtol=1e-12, atol=0)
    # M^{-1} is the inverse of C kron A + lam I (exact damping), vec row-major
    R = torch.randn(3, K, D, dtype=DT, generator=torch.Generator().manual_seed(5))
    Minv = torch.linalg.inv(torch.kron(C, A) + lam * torch.eye(K * D, dtype=DT))
    expect = (Minv @ R.reshape(3, -1).T).T.reshape(R.shape)
    torch.testing.assert_close(M(R), expect, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(M(R[0]), expect[0], rtol=1e-9, atol=1e-12)
    # the comparison above fails for a factor n on C, a factor 2 on lambda, or damping added to the factors
    wrong = [torch.kron(n * C, A) + lam * torch.eye(K * D, dtype=DT),
             torch.kron(C, A) + 2 * lam * torch.eye(K * D, dtype=DT),
             torch.kron(C + lam ** 0.5 * torch.eye(K, dtype=DT), A + lam ** 0.5 * torch.eye(D, dtype=DT))]
    for Mw in wrong:
        other = (torch.linalg.inv(Mw) @ R.reshape(3, -1).T).T.reshape(R.shape)
        assert not torch.allclose(M(R), other, rtol=1e-6, atol=1e-9)


def test_kfac_feature_factor_on_a_row_subsample():
    """max_rows: A from every s-th row (counted across chunks), C from every row; the solve is unchanged."""
    obj, X, y, alpha, W = _problem(chunk_rows=17)
    H = obj.hessian(W, alpha)
    M = KFAC(H, max_rows=40)  # n = 150 -> every 4th row
    assert M.stride == 4
    P = torch.softmax(X @ W.T, dim=1)
    rows = torch.arange(0, obj.n, 4)
    w = alpha[rows] * (1 - (P[rows] ** 2).sum(1))
    torch.testing.assert_close(M.A, (X[rows] * w[:, None]).T @ X[rows] / w.sum(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(M.C, KFAC(H).C, rtol=1e-12, atol=1e-15)
    B = torch.randn(obj.shape, dtype=DT, generator=torch.Generator().manual_seed(13))
    res = H.solve(B, method="cg", rtol=1e-12, max_iter=2000, precond=M)
    torch.testing.assert_close(res.x, H.solve(B, method="dense").x, rtol=1e-9, atol=1e-12)


def test_block_jacobi_is_the_inverse_of_the_class_blocks(fx):
    obj, X, y, alpha, W, H, Hd = fx
    K, D = obj.shape
    M = BlockJacobi(H)
    R = torch.randn(2, K, D, dtype=DT, generator=torch.Generator().manual_seed(6))
    for k in range(K):
        blk = Hd[k * D:(k + 1) * D, k * D:(k + 1) * D]
        torch.testing.assert_close(M.blocks[k], blk, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(M(R)[:, k], torch.linalg.solve(blk, R[:, k].T).T, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("basis", ["full", "reduced"])
def test_dense_preconditioner_in_float64_is_the_exact_inverse(fx, basis):
    obj, X, y, alpha, W, H, Hd = fx
    K, D = obj.shape
    M = DensePreconditioner(H, DT, basis)
    assert M.info["basis"] == basis and M.info["shift"] == 0.0
    R = torch.randn(3, K, D, dtype=DT, generator=torch.Generator().manual_seed(7))
    expect = torch.linalg.solve(Hd, R.reshape(3, -1).T).T.reshape(R.shape)
    torch.testing.assert_close(M(R), expect, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# every preconditioner through HeadHessian.solve against the exact solve (float64)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precond", ["auto", *PRECONDITIONERS])
@pytest.mark.parametrize("chunk_rows", [None, 17])
def test_preconditioned_cg_matches_the_exact_solve(precond, chunk_rows):
    obj, X, y, alpha, W = _problem(chunk_rows=chunk_rows)
    H = obj.hessian(W, alpha)
    B = torch.randn(obj.shape, dtype=DT, generator=torch.Generator().manual_seed(8))
    exact = H.solve(B, method="dense")
    res = H.solve(B, method="cg", rtol=1e-12, max_iter=2000, precond=precond)
    assert res.converged and res.rel_residual <= 1e-12 and res.method == "cg"
    assert res.precond in PRECONDITIONERS and (precond == "auto" or res.precond == precond)
    torch.testing.assert_close(res.x, exact.x, rtol=1e-9, atol=1e-9 * float(exact.x.abs().max()))
    assert res.precond_seconds >= 0.0
    again = H.solve(B, method="cg", rtol=1e-12, max_iter=2000, precond=res.precond)
    assert again.precond_seconds == 0.0  # built once per operator
    torch.testing.assert_close(again.x, res.x)


def test_preconditioners_cut_hvps_on_an_ill_conditioned_head(fx):
    obj, X, y, alpha, W, H, Hd = fx
    B = torch.randn(obj.shape, dtype=DT, generator=torch.Generator().manual_seed(9))
    hv = {k: H.solve(B, method="cg", rtol=1e-10, max_iter=5000, precond=k).hvps for k in ("none", "kfac", "dense")}
    dense64 = H.solve(B, method="cg", rtol=1e-10, precond=build_preconditioner(H, "dense", DT)).hvps
    assert dense64 <= 2 < hv["dense"] + 2 and hv["dense"] < hv["kfac"] < hv["none"], hv


def test_batched_right_hand_sides_and_warm_start(fx):
    obj, X, y, alpha, W, H, Hd = fx
    B = torch.randn(3, *obj.shape, dtype=DT, generator=torch.Generator().manual_seed(10))
    exact = H.solve(B, method="dense").x
    for k in ("kfac", "dense", "block_jacobi"):
        res = H.solve(B, method="cg", rtol=1e-12, max_iter=3000, precond=k)
        torch.testing.assert_close(res.x, exact, rtol=1e-8, atol=1e-9 * float(exact.abs().max()))
        warm = H.solve(B, method="cg", rtol=1e-10, precond=k, x0=exact)
        assert warm.hvps <= 3 * 1 + 3  # the residual product plus at most a couple of iterations


def test_float32_data_with_a_bfloat16_factor_converges():
    obj, X, y, alpha, W = _problem(lam=1e-2)
    obj32 = HeadObjective(X.float(), y, 4, 1e-2)
    H = obj32.hessian(W.float(), alpha.float())
    B = torch.randn(obj.shape, generator=torch.Generator().manual_seed(11))
    M = build_preconditioner(H, "dense", torch.bfloat16)
    res = H.solve(B, method="cg", rtol=1e-5, precond=M)
    assert res.converged and res.hvps <= 10 and M.info["dtype"] == "bfloat16"
    assert res.x.dtype == torch.float32


def test_solve_errors(fx):
    obj, X, y, alpha, W, H, Hd = fx
    B = torch.zeros(obj.shape, dtype=DT)
    with pytest.raises(ConfigError, match="The 'precond' parameter of HeadHessian.solve must be one of 'auto', 'dense'"):
        H.solve(B, method="cg", rtol=1e-6, precond="jacobi")
    with pytest.raises(ConfigError, match="The 'precond' parameter must be one of"):
        build_preconditioner(H, "jacobi")
    with pytest.raises(ConfigError, match="Unknown preconditioner kind"):
        estimate_solve_cost("jacobi", 10, 2, 2, 1e-6)


def test_newton_reuses_its_preconditioner_and_converges():
    obj, X, y, alpha, W = _problem(n=400, d=30, K=8)  # K*D = 248 > DENSE_MAX: truncated Newton by PCG
    assert obj.shape[0] * obj.shape[1] > DENSE_MAX
    sol = solve_head(obj, alpha, grad_tol=1e-11)
    assert sol.converged and sol.hvps > 0
    for pc in ("none", "kfac", "dense", "block_jacobi"):
        other = solve_head(obj, alpha, grad_tol=1e-11, precond=pc)
        assert other.converged
        torch.testing.assert_close(other.W, sol.W, rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# the cost model of precond="auto"
# ---------------------------------------------------------------------------------------------


def test_cost_model_choices():
    lowp = lowp_dtype("cpu")
    assert lowp in (torch.bfloat16, torch.float32) and lowp_dtype("meta") == torch.float32
    # the measured regimes (docs/scale.md): MNIST-5k and digits heads at tight rtol -> the dense factor;
    # n = 1e6, d = 512, K = 100 -> K-FAC (K*D beyond DENSE_PRECOND_MAX); a loose Newton forcing term on a
    # binary head with wide features -> none (K-FAC's D x D factor would cost more than the HVPs it saves)
    assert choose_preconditioner(3500, 10, 97, 1e-10) == "dense"
    assert choose_preconditioner(1259, 10, 97, 1e-10) == "dense"
    assert 100 * 513 > DENSE_PRECOND_MAX and choose_preconditioner(10 ** 6, 100, 513, 1e-6, torch.float32) == "kfac"
    assert choose_preconditioner(10 ** 5, 2, 2049, 0.5) == "none"
    for kind in ("none", "kfac", "dense"):  # cost grows with n and with the accuracy asked
        assert estimate_solve_cost(kind, 2000, 10, 50, 1e-8) < estimate_solve_cost(kind, 4000, 10, 50, 1e-8)
        assert estimate_solve_cost(kind, 2000, 10, 50, 1e-4) < estimate_solve_cost(kind, 2000, 10, 50, 1e-10)


# ---------------------------------------------------------------------------------------------
# sharded rows: a real 2-process torchrun builds the same preconditioners from all-reduced sums
# ---------------------------------------------------------------------------------------------


def test_torchrun_two_ranks_build_the_same_preconditioners(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests._precond_dist_driver", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = torch.load(tmp_path / "rank0.pt")
    obj, X, y, alpha, W = _problem(n=130, seed=3)
    H = obj.hessian(W, alpha)
    B = torch.randn(obj.shape, dtype=DT, generator=torch.Generator().manual_seed(12))
    exact = H.solve(B, method="dense").x
    torch.testing.assert_close(got["dense"], H.dense(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got["kfac_C"], KFAC(H).C, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got["kfac_A"], KFAC(H).A, rtol=1e-12, atol=1e-15)
    for k in ("auto", *PRECONDITIONERS):
        torch.testing.assert_close(got[f"x_{k}"], exact, rtol=1e-9, atol=1e-9 * float(exact.abs().max()))
        torch.testing.assert_close(got[f"x_{k}"], torch.load(tmp_path / "rank1.pt")[f"x_{k}"])  # identical on every rank
