r"""The head Hessian assembled fast, and the preconditioners of the one CG route, built over the row source.

Notation of :mod:`reweight.head`: ``vec(W)`` row-major (index ``k * D + a``), :math:`S_i = \operatorname{diag}(p_i)
- p_ip_i^\top` (never formed), and

.. math::

    H = \frac1n\sum_i \alpha_i\, S_i\otimes h_ih_i^\top + \lambda I
      = \frac1n\sum_{k<l} (e_k-e_l)(e_k-e_l)^\top \otimes G_{kl} + \lambda I,\qquad
    G_{kl} = \sum_i \alpha_i p_{ik}p_{il}\, h_ih_i^\top ,

because :math:`S_i = \sum_{k<l} p_{ik}p_{il}(e_k-e_l)(e_k-e_l)^\top` (rows of :math:`p_i` sum to one). So the
off-diagonal block :math:`(k,l)` of :math:`H - \lambda I` is :math:`-G_{kl}/n` and the diagonal block :math:`k` is
:math:`\sum_{l\ne k} G_{kl}/n` (minus the row sum of the off-diagonal blocks). Only the :math:`K(K-1)/2` coefficient
vectors :math:`\alpha p_kp_l \ge 0` are needed, and no block is a difference of large terms, which is what makes a
low-precision assembly usable. :func:`pair_gram` forms all :math:`G_{kl}` with one GEMM per row chunk,
:math:`(h\otimes h)_{a\le b}^\top\,[\alpha p_kp_l]_{k<l}` (the symmetric Khatri--Rao product of the rows, built
from contiguous slabs: ``n·D(D+1)/2·K(K-1)/2`` multiply-adds, a quarter of the naive ``n(KD)^2``).

Preconditioners :math:`M \approx H` (each applies :math:`M^{-1}` to ``(K, D)`` or ``(B, K, D)``), built from the
row source's chunks and completed by its all-reduce, so a streamed or sharded objective gets the same one:

* ``kfac`` -- trace-weighted K-FAC with exact damping (Martens & Grosse, ICML 2015):
  :math:`M = C\otimes A + \lambda I`, :math:`C = \frac1n\sum_i\alpha_iS_i = \frac1n(\operatorname{diag}(\sum_i\alpha_ip_i)
  - (\alpha\circ P)^\top P)`, :math:`A = \sum_i w_ih_ih_i^\top/\sum_i w_i` with :math:`w_i = \alpha_i\operatorname{tr}S_i
  = \alpha_i(1-\|p_i\|^2)`, so :math:`\operatorname{tr}C\,\operatorname{tr}A = \operatorname{tr}(H-\lambda I)` exactly.
  With :math:`C = U_c\Gamma U_c^\top`, :math:`A = U_a\Theta U_a^\top`:
  :math:`M^{-1}R = U_c[(U_c^\top RU_a)\oslash(\gamma\theta^\top + \lambda)]U_a^\top`. Setup ``n(K^2 + D^2)`` plus two
  ``eigh``; each application ``2(K^2D + KD^2)``.
* ``block_jacobi`` -- the ``K`` exact class blocks :math:`H_{kk} = \frac1n X^\top\operatorname{diag}(\alpha p_k(1-p_k))X
  + \lambda I`, Cholesky each. Measured: no better than no preconditioner on real features, because the coupling
  :math:`p_kp_l` between two classes is as large as the diagonal block (``docs/scale.md``); kept as the documented
  alternative.
* ``dense`` -- the exact Hessian assembled in low precision by :func:`assemble_hessian` (bfloat16 on CPUs with
  AMX or AVX512-BF16, float32 elsewhere and on GPUs; accumulated in float32) and factored by a float32 Cholesky.
  CG stays in the data's precision and converges in a few iterations (2--3 with a float32 factor, 5--11 with
  bfloat16); the factor never sets the answer. Memory ``(KD)^2`` float32, so only for ``K·D <= DENSE_PRECOND_MAX``.
* ``none`` -- plain CG.

``auto`` (the default of :meth:`reweight.head.HeadHessian.solve`) picks the cheapest by the cost model of
:func:`choose_preconditioner`.

References:
    Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate curvature", ICML 2015.
    Saad, *Iterative Methods for Sparse Linear Systems*, 2003, ch. 9 (preconditioned CG).
    Higham, "Iterative refinement and mixed precision", *Acta Numerica*, 2022 (a low-precision factor
    preconditioning a high-precision Krylov solve).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .errors import ConfigError

__all__ = [
    "BlockJacobi",
    "CHOL_RATE",
    "DENSE_PRECOND_MAX",
    "DensePreconditioner",
    "ELEM_RATE",
    "GEMM_RATE",
    "ITERS_PER_DECADE",
    "KFAC",
    "NoPreconditioner",
    "PRECONDITIONERS",
    "Preconditioner",
    "assemble_hessian",
    "block_quadforms",
    "build_preconditioner",
    "choose_preconditioner",
    "estimate_solve_cost",
    "helmert",
    "lowp_dtype",
    "pair_coefficients",
    "pair_gram",
]

#: largest K·D for which the ``dense`` preconditioner is considered ((K·D)^2 float32 entries: 144 MiB at 6144).
DENSE_PRECOND_MAX = 6144

#: the names :meth:`reweight.head.HeadHessian.solve` accepts as ``precond`` ("auto" chooses among the first three).
PRECONDITIONERS = ("dense", "kfac", "none", "block_jacobi")


def lowp_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype of the ``dense`` preconditioner's assembly: bfloat16 on CPUs with AMX tiles or AVX512-BF16 (the
    GEMM runs 4-8x faster than float32 there), float32 otherwise and on GPUs (where float32 GEMMs are fast)."""
    dev = torch.device(device)
    if dev.type != "cpu":
        return torch.float32
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        f = getattr(cpu, probe, None)
        try:
            if f is not None and bool(f()):
                return torch.bfloat16
        except Exception:  # pragma: no cover - private helpers of torch.cpu may change
            pass
    return torch.float32


# ---------------------------------------------------------------------------------------------
# the fast dense Hessian
# ---------------------------------------------------------------------------------------------


def _chunks(hess: Any) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(rows, P, alpha * P)`` per chunk of the Hessian's row source (see ``HeadHessian._chunk_probs``)."""
    return hess._chunk_probs()


def pair_coefficients(aP: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    r""":math:`[\alpha_ip_{ik}p_{il}]_{k<l}`, ``(b, K(K-1)/2)``, pairs in ``torch.triu_indices(K, K, 1)`` order.

    Built from ``K - 1`` contiguous slabs (no index gathers over rows).
    """
    b, K = P.shape
    C = torch.empty(b, K * (K - 1) // 2, dtype=P.dtype, device=P.device)
    off = 0
    for k in range(K - 1):
        torch.mul(aP[:, k:k + 1], P[:, k + 1:], out=C[:, off:off + K - k - 1])
        off += K - k - 1
    return C


def _fill_slabs(xt: torch.Tensor, kr: torch.Tensor, a0: int, a1: int) -> None:
    """Rows ``(a, a..D-1)`` of the symmetric Khatri--Rao product of the columns of ``xt`` ``(D, b)`` for ``a`` in
    ``[a0, a1)``, written into ``kr`` as contiguous slabs ``x_a * x_{a..D-1}``."""
    D = xt.shape[0]
    off = 0
    for a in range(a0, a1):
        torch.mul(xt[a:a + 1], xt[a:], out=kr[off:off + D - a])
        off += D - a


def block_quadforms(M: torch.Tensor, X: torch.Tensor, K: int, rows_per_chunk: int = 1024) -> torch.Tensor:
    r""":math:`T_{ikl} = h_i^\top M_{kl} h_i` for every row of ``X`` ``(n, D)`` and every ``D x D`` block of
    ``M`` ``(K·D, K·D)``, ``(n, K, K)`` (symmetric in ``k, l`` when ``M`` is).

    One GEMM per row chunk against the symmetric Khatri--Rao product of the rows,
    :math:`(h\otimes h)_{a\le b}\,[\operatorname{sym}(M_{kl})_{ab}(2-\delta_{ab})]_{a\le b,\,k\le l}`:
    ``n·D(D+1)/2·K(K+1)/2`` multiply-adds, no per-sample loop. Only the symmetric part of each block enters
    :math:`h^\top M_{kl}h`, so the blocks are symmetrised first. Computed in ``M``'s dtype.
    """
    n, D = X.shape
    dt = M.dtype
    ia, ib = torch.triu_indices(D, D, device=M.device)
    ku, lu = torch.triu_indices(K, K, device=M.device)
    M4 = M.reshape(K, D, K, D)
    Ms = M4[ku, :, lu, :]  # (Kpd, D, D) blocks k <= l
    Ms = 0.5 * (Ms + Ms.transpose(1, 2))
    w = torch.where(ia == ib, 1.0, 2.0).to(dt)
    Ms = (Ms[:, ia, ib] * w).contiguous()  # (Kpd, Dp)
    out = torch.empty(n, K, K, dtype=dt, device=M.device)
    Dp = ia.numel()
    buf = torch.empty(Dp * min(rows_per_chunk, max(n, 1)), dtype=dt, device=M.device)
    for lo in range(0, n, rows_per_chunk):
        hi = min(n, lo + rows_per_chunk)
        xt = X[lo:hi].T.to(dt).contiguous()
        kr = buf[:Dp * (hi - lo)].view(Dp, hi - lo)
        _fill_slabs(xt, kr, 0, D)
        q = (Ms @ kr).T  # (b, Kpd)
        o = out[lo:hi]
        o[:, ku, lu] = q
        o[:, lu, ku] = q
    return out


def _slab_groups(D: int, rows: int) -> List[Tuple[int, int, int, int]]:
    """Consecutive ``a`` ranges ``[a0, a1)`` of the symmetric Khatri--Rao rows ``(a, a..D-1)`` holding about ``rows``
    rows each, with their row span ``[r0, r1)`` in ``torch.triu_indices(D, D)`` order."""
    groups, a0, r0, cnt = [], 0, 0, 0
    for a in range(D):
        cnt += D - a
        if cnt >= rows or a == D - 1:
            groups.append((a0, a + 1, r0, r0 + cnt))
            a0, r0, cnt = a + 1, r0 + cnt, 0
    return groups


def pair_gram(hess: Any, dtype: torch.dtype, rows_per_chunk: Optional[int] = None,
              slab_rows: Optional[int] = None) -> torch.Tensor:
    r""":math:`G_{kl} = \sum_i\alpha_ip_{ik}p_{il}h_ih_i^\top` for all pairs :math:`k<l` over the row source, as the
    upper triangles: ``(D(D+1)/2, K(K-1)/2)`` (rows in ``torch.triu_indices(D, D)`` order), all-reduced.

    Per chunk of rows, :math:`(h\otimes h)_{a\le b}^\top C` with :math:`C = [\alpha p_kp_l]_{k<l}`: the symmetric
    Khatri--Rao product of the rows is built from contiguous slabs ``x_a * x_{a..D-1}``, a group of about
    ``slab_rows`` rows at a time (so it stays in cache), each group multiplied by ``C`` at once. ``dtype`` is the
    GEMM's dtype; sums are accumulated in float32 for bfloat16 / float16 and in ``dtype`` otherwise.
    """
    K, D = hess.K, hess.D
    Dp, Kp = D * (D + 1) // 2, K * (K - 1) // 2
    lowp = dtype in (torch.bfloat16, torch.float16)
    acc = torch.float32 if lowp else dtype
    device = hess.rows.device
    G = torch.zeros(Dp, Kp, dtype=acc, device=device)
    if Kp == 0:
        return hess.rows.allreduce(G)
    # rows per chunk (measured on one thread, docs/scale.md): the GEMMs' inner dimension
    b_max = rows_per_chunk or (4096 if lowp else 1024)
    groups = _slab_groups(D, slab_rows or (1024 if lowp else 256))
    # a flat buffer viewed as a contiguous (rows, b) block: a strided view with garbage in its padding tripped an
    # oneDNN bfloat16 GEMM (NaN * 0 from the uninitialised padding), so every operand is contiguous
    buf = torch.empty(max(r1 - r0 for _, _, r0, r1 in groups) * b_max, dtype=dtype, device=device)
    for X, P, aP in _chunks(hess):
        for lo in range(0, X.shape[0], b_max):
            hi = min(X.shape[0], lo + b_max)
            if lowp:  # coefficients in the data's precision, rounded once
                C = pair_coefficients(aP[lo:hi], P[lo:hi]).to(dtype)
            else:
                C = pair_coefficients(aP[lo:hi].to(dtype), P[lo:hi].to(dtype))
            xt = X[lo:hi].T.to(dtype).contiguous()  # (D, b)
            b = hi - lo
            for a0, a1, r0, r1 in groups:
                kr = buf[:(r1 - r0) * b].view(r1 - r0, b)
                _fill_slabs(xt, kr, a0, a1)
                if lowp:
                    G[r0:r1].add_(kr @ C)  # the low-precision GEMM rounds its output once; accumulate in float32
                else:
                    G[r0:r1].addmm_(kr, C)
    return hess.rows.allreduce(G)


def helmert(K: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    r"""An orthonormal basis ``Q`` ``(K, K-1)`` of the complement of the all-ones vector (Helmert contrasts):
    :math:`Q^\top\mathbf 1 = 0`, :math:`Q^\top Q = I`."""
    Q = torch.zeros(K, K - 1, dtype=dtype, device=device)
    for j in range(1, K):
        Q[:j, j - 1] = 1.0 / math.sqrt(j * (j + 1))
        Q[j, j - 1] = -j / math.sqrt(j * (j + 1))
    return Q


def _pair_blocks(hess: Any, dtype: torch.dtype) -> torch.Tensor:
    """The blocks :math:`G_{kl}/n`, ``(K(K-1)/2, D*D)`` row-major, from :func:`pair_gram`."""
    D = hess.D
    G = pair_gram(hess, dtype)
    ia, ib = torch.triu_indices(D, D, device=G.device)
    full = torch.empty(D, D, dtype=torch.long, device=G.device)  # (a, b) -> row of the upper-triangle storage
    full[ia, ib] = torch.arange(ia.numel(), device=G.device)
    full[ib, ia] = full[ia, ib]
    return G.index_select(0, full.reshape(-1)).T.contiguous().div_(hess.n)


def _blocks_to_matrix(Hb: torch.Tensor, K: int, D: int, lam: float) -> torch.Tensor:
    """``(K*K, D*D)`` blocks (block ``(k, l)`` at row ``k*K + l``) -> the ``(K*D, K*D)`` matrix plus ``lam I``."""
    H = Hb.view(K, K, D, D).permute(0, 2, 1, 3).reshape(K * D, K * D)
    H.diagonal().add_(lam)
    return H


def assemble_hessian(hess: Any, dtype: torch.dtype = torch.float64, basis: str = "full") -> torch.Tensor:
    r"""The dense Hessian of the operator ``hess`` from :func:`pair_gram` (module docstring).

    ``basis="full"``: :math:`H`, ``(K·D, K·D)``. ``basis="reduced"``: :math:`H_r = (Q\otimes I)^\top H(Q\otimes I)`,
    ``((K-1)·D, (K-1)·D)``, with ``Q = helmert(K)``; since :math:`S_i\mathbf 1 = 0`, :math:`H(\mathbf 1\otimes v) =
    \lambda(\mathbf 1\otimes v)` exactly, so :math:`H` is block-diagonal in the basis :math:`[Q, \mathbf 1/\sqrt K]` and
    :math:`H^{-1} = (Q\otimes I)H_r^{-1}(Q\otimes I)^\top + \lambda^{-1}(\mathbf 1\mathbf 1^\top/K\otimes I)` (0.73x the
    Cholesky flops at ``K = 10``). :math:`H_r - \lambda I = \frac1n\sum_{k<l}u_{kl}u_{kl}^\top\otimes G_{kl}`,
    :math:`u_{kl} = Q^\top(e_k - e_l)`: one ``((K-1)^2, K(K-1)/2) x (K(K-1)/2, D^2)`` GEMM.

    Exactly symmetric; in float64 it equals the textbook assembly to rounding. With ``dtype`` bfloat16 the GEMM
    runs in bfloat16 and the result is float32 (use it only as a preconditioner). Full-basis blocks are placed by
    row-wise index copies over the ``K^2`` blocks (no per-pair loop): off-diagonal :math:`-G_{kl}/n`, diagonal
    the sum of the row's :math:`G_{kl}/n`.
    """
    K, D = hess.K, hess.D
    Gf = _pair_blocks(hess, dtype)
    dt, device = Gf.dtype, Gf.device
    ku0, ku1 = torch.triu_indices(K, K, 1, device=device)
    if basis == "reduced":
        Q = helmert(K, dt, device)
        U = Q[ku0] - Q[ku1]  # (Kp, K-1): u_kl
        U2 = (U[:, :, None] * U[:, None, :]).reshape(U.shape[0], -1)  # (Kp, (K-1)^2)
        return _blocks_to_matrix(U2.T @ Gf, K - 1, D, hess.lam)
    if basis != "full":
        raise ConfigError(f"The 'basis' parameter of assemble_hessian must be 'full' or 'reduced'. Got {basis!r} instead.")
    Hb = torch.zeros(K * K, D * D, dtype=dt, device=device)
    Hb[ku0 * K + ku1] = -Gf
    Hb[ku1 * K + ku0] = -Gf
    Hb.index_add_(0, ku0 * (K + 1), Gf).index_add_(0, ku1 * (K + 1), Gf)  # diagonal: minus the row sums
    return _blocks_to_matrix(Hb, K, D, hess.lam)


# ---------------------------------------------------------------------------------------------
# preconditioners
# ---------------------------------------------------------------------------------------------


class Preconditioner:
    """Base class: ``M(R)`` applies :math:`M^{-1}` to ``R`` ``(K, D)`` or ``(B, K, D)``.

    Attributes:
        name: the kind (``kfac``, ``block_jacobi``, ``dense``, ``none``).
        setup_seconds: wall time of the build.
        info: diagnostics (dtype of a dense factor, damping shift, ...).
    """

    name = "base"

    def __init__(self) -> None:
        self.setup_seconds = 0.0
        self.info: Dict[str, Any] = {}

    def __call__(self, R: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class NoPreconditioner(Preconditioner):
    """:math:`M = I` (plain CG); ``as_callable`` is ``None`` so :func:`~reweight.linalg.conjugate_gradient` runs
    its unpreconditioned recurrence."""

    name = "none"

    def __call__(self, R: torch.Tensor) -> torch.Tensor:
        return R


class KFAC(Preconditioner):
    r"""Trace-weighted K-FAC with exact damping: :math:`M = C\otimes A + \lambda I` (module docstring).

    Args:
        hess: the Hessian operator.
        max_rows: the feature factor :math:`A` (an average, ``n·D^2`` to form) is taken over every ``s``-th row,
            ``s = ceil(n / max_rows)`` (all rows when ``n <= max_rows``); :math:`C` always uses every row. At
            n = 1e6, D = 513 this cuts the setup from about 3 HVPs to a fraction of one.

    Attributes:
        C: ``(K, K)`` :math:`\frac1n\sum_i\alpha_iS_i`; A: ``(D, D)`` :math:`\sum_iw_ih_ih_i^\top/\sum_iw_i`,
        :math:`w_i = \alpha_i(1 - \|p_i\|^2)` (both float64).
    """

    name = "kfac"

    def __init__(self, hess: Any, max_rows: int = 1 << 17):
        super().__init__()
        t0 = time.perf_counter()
        K, D = hess.K, hess.D
        f64 = torch.float64
        dev = hess.rows.device
        stride = max(1, -(-int(hess.n) // int(max_rows)))
        # one packed buffer -> one all-reduce: [sum_i alpha p_i (K) | sum_i (alpha p_i) p_i^T (K*K) | sum w (1) | A (D*D)]
        buf = torch.zeros(K + K * K + 1 + D * D, dtype=f64, device=dev)
        csum, cpp = buf[:K], buf[K:K + K * K].view(K, K)
        wsum, A = buf[K + K * K:K + K * K + 1], buf[K + K * K + 1:].view(D, D)
        offset = 0
        for X, P, aP in _chunks(hess):
            csum.add_(aP.sum(0).to(f64))
            cpp.add_((aP.T @ P).to(f64))
            first = (-offset) % stride  # every stride-th row of this process, counted across chunks
            offset += X.shape[0]
            Xs, Ps, aPs = X[first::stride], P[first::stride], aP[first::stride]
            w = aPs.sum(1) - (aPs * Ps).sum(1)  # alpha_i (1 - ||p_i||^2), since the rows of P sum to one
            wsum.add_(w.sum().to(f64))
            A.add_(((Xs * w[:, None]).T @ Xs).to(f64))
        hess.rows.allreduce(buf)
        self.stride = stride
        C = (torch.diag(csum) - cpp) / hess.n
        A = A / wsum.clamp_min(torch.finfo(f64).tiny)
        self.C, self.A = 0.5 * (C + C.T), 0.5 * (A + A.T)
        gc, Uc = torch.linalg.eigh(self.C)
        ga, Ua = torch.linalg.eigh(self.A)
        dt = hess.rows.dtype
        self.lam = float(hess.lam)
        self._Uc, self._Ua = Uc.to(dt), Ua.to(dt)
        self._UcT, self._UaT = Uc.T.contiguous().to(dt), Ua.T.contiguous().to(dt)
        # exact damping: lambda added to the Kronecker eigenvalues, not to each factor
        self._denom = (gc.clamp_min(0)[:, None] * ga.clamp_min(0)[None, :] + self.lam).to(dt)
        self.setup_seconds = time.perf_counter() - t0

    def __call__(self, R: torch.Tensor) -> torch.Tensor:
        Z = self._UcT @ R @ self._Ua
        return self._Uc @ (Z / self._denom) @ self._UaT


class BlockJacobi(Preconditioner):
    r"""The ``K`` exact class blocks :math:`H_{kk} = \frac1n X^\top\operatorname{diag}(\alpha p_k(1-p_k))X + \lambda I`
    (one ``(D, n) x (n, K·D)`` GEMM per chunk, float64 accumulation, batched Cholesky)."""

    name = "block_jacobi"

    def __init__(self, hess: Any):
        super().__init__()
        t0 = time.perf_counter()
        K, D = hess.K, hess.D
        dev = hess.rows.device
        acc = torch.zeros(D, K * D, dtype=torch.float64, device=dev)
        for X, P, aP in _chunks(hess):
            c = aP - aP * P  # alpha p_k (1 - p_k), (b, K)
            Bk = (c[:, :, None] * X[:, None, :]).reshape(X.shape[0], K * D)
            acc.add_((X.T @ Bk).to(torch.float64))
        hess.rows.allreduce(acc)
        blocks = acc.view(D, K, D).permute(1, 0, 2) / hess.n  # (K, D, D)
        blocks = 0.5 * (blocks + blocks.transpose(1, 2))
        blocks.diagonal(dim1=1, dim2=2).add_(hess.lam)
        self.blocks = blocks
        self._L = torch.linalg.cholesky(blocks).to(hess.rows.dtype)
        self.K, self.D = K, D
        self.setup_seconds = time.perf_counter() - t0

    def __call__(self, R: torch.Tensor) -> torch.Tensor:
        Rb = R.reshape(-1, self.K, self.D).permute(1, 2, 0)  # (K, D, B)
        Y = torch.cholesky_solve(Rb, self._L)
        return Y.permute(2, 0, 1).reshape(R.shape)


class DensePreconditioner(Preconditioner):
    r"""The exact Hessian assembled in ``dtype`` (:func:`assemble_hessian`), factored by a float32 Cholesky
    (float64 when ``dtype`` is float64: then it is the exact inverse).

    Args:
        hess: the Hessian operator.
        dtype: assembly dtype (default :func:`lowp_dtype`).
        basis: ``reduced`` (the Helmert basis of :func:`assemble_hessian`, ``(K-1)·D``) or ``full``; default
            ``reduced`` when ``K <= D`` (then its extra GEMM, ``K^4 D^2 / 2`` flops, costs less than the Cholesky
            flops it saves).

    If the low-precision matrix is not numerically positive definite (bfloat16 rounding at tiny :math:`\lambda`), a
    diagonal shift of ``16 eps(dtype) max diag(H)`` is added and doubled until the factorisation succeeds (recorded in
    ``info['shift']``); CG in the data's precision corrects any such perturbation.
    """

    name = "dense"

    def __init__(self, hess: Any, dtype: Optional[torch.dtype] = None, basis: Optional[str] = None):
        super().__init__()
        t0 = time.perf_counter()
        dt = dtype or lowp_dtype(hess.rows.device)
        K, D = hess.K, hess.D
        self.basis = basis or ("reduced" if 2 <= K <= D else "full")
        H = assemble_hessian(hess, dt, self.basis)
        fdt = torch.float64 if dt == torch.float64 else torch.float32
        H = H.to(fdt)
        L, info = torch.linalg.cholesky_ex(H)
        shift, tries = 0.0, 0
        if int(info) != 0:
            base = 16 * torch.finfo(dt).eps * float(H.diagonal().abs().max())
            while int(info) != 0 and tries < 30:
                shift = base * 2 ** tries
                Hs = H.clone()
                Hs.diagonal().add_(shift)
                L, info = torch.linalg.cholesky_ex(Hs)
                tries += 1
            if int(info) != 0:
                raise FloatingPointError("The head Hessian is not positive definite (check lam > 0 and alpha >= 0).")
        self._L = L
        self.K, self.D, self.lam = K, D, float(hess.lam)
        self._Q = helmert(K, fdt, L.device) if self.basis == "reduced" else None
        self.info = {"dtype": str(dt).replace("torch.", ""), "shift": shift, "basis": self.basis}
        self.setup_seconds = time.perf_counter() - t0

    def _solve(self, b: torch.Tensor) -> torch.Tensor:
        # two triangular solves: 4x faster than torch.cholesky_solve for one right-hand side on CPU (measured)
        y = torch.linalg.solve_triangular(self._L, b, upper=False)
        return torch.linalg.solve_triangular(self._L.mT, y, upper=True)

    def __call__(self, R: torch.Tensor) -> torch.Tensor:
        K, D = self.K, self.D
        R3 = R.reshape(-1, K, D)
        B = R3.shape[0]
        if self._Q is None:
            return self._solve(R3.reshape(B, K * D).T.to(self._L.dtype)).T.reshape(R.shape).to(R.dtype)
        Q = self._Q
        Rr = (Q.T @ R3.to(Q.dtype)).reshape(B, (K - 1) * D)  # (B, (K-1) D)
        Y = self._solve(Rr.T).T.reshape(B, K - 1, D)
        out = (Q @ Y).to(R.dtype).add_(R3.mean(dim=1, keepdim=True), alpha=1.0 / self.lam)  # exact 1/lam on ones
        return out.reshape(R.shape)


_BUILDERS: Dict[str, Callable[..., Preconditioner]] = {
    "kfac": KFAC,
    "block_jacobi": BlockJacobi,
    "dense": DensePreconditioner,
    "none": lambda hess: NoPreconditioner(),
}


def build_preconditioner(hess: Any, kind: str, dtype: Optional[torch.dtype] = None) -> Preconditioner:
    """Build the preconditioner ``kind`` (one of :data:`PRECONDITIONERS`) of the Hessian operator ``hess``.

    ``dtype`` sets the assembly dtype of ``dense`` (default :func:`lowp_dtype`); other kinds ignore it.

    Raises:
        ConfigError: for an unknown kind.
    """
    if kind not in _BUILDERS:
        raise ConfigError(f"The 'precond' parameter must be one of 'auto', {', '.join(repr(k) for k in PRECONDITIONERS)}. "
                          f"Got {kind!r} instead.")
    if kind == "dense":
        return DensePreconditioner(hess, dtype)
    return _BUILDERS[kind](hess)


# ---------------------------------------------------------------------------------------------
# the cost model of precond="auto"
# ---------------------------------------------------------------------------------------------

#: Effective single-thread throughputs (GFLOP/s) measured on the development machine (Xeon with AMX, one torch
#: thread, ``docs/scale.md``); only their ratios matter to the choice. ``gemm``: a well-shaped GEMM; the head's HVP
#: (two thin ``n x D x K`` GEMMs plus elementwise passes) runs at ``gemm x K / (K + 30)`` (measured 3-36 GFLOP/s in
#: float64 for K = 2-100); ``chol``: a float32/float64 Cholesky of order ~1000; ``elem``: elementwise products
#: (G entries/s).
GEMM_RATE: Dict[torch.dtype, float] = {torch.float64: 45.0, torch.float32: 90.0, torch.bfloat16: 350.0, torch.float16: 90.0}
CHOL_RATE: Dict[torch.dtype, float] = {torch.float64: 20.0, torch.float32: 30.0}
ELEM_RATE = 2.5

#: CG iterations per decade of ``rtol`` (measured at lam 1e-3 and 1e-2 on MNIST-5k and digits features,
#: ``docs/scale.md``): plain CG 18, trace-weighted K-FAC 5, the bfloat16 dense factor 0.8, a float32 one 0.3.
#: (A well-conditioned problem needs fewer plain-CG iterations -- 10 for 6 decades on the synthetic n = 1e6
#: benchmark -- so ``auto`` may pick ``kfac`` where ``none`` would tie; the price is K-FAC's setup, 1-3 HVPs.)
ITERS_PER_DECADE = {"none": 18.0, "kfac": 5.0, "dense_bf16": 0.8, "dense_f32": 0.3}


def estimate_solve_cost(kind: str, n: int, K: int, D: int, rtol: float, dtype: torch.dtype = torch.float64,
                        lowp: torch.dtype = torch.bfloat16) -> float:
    r"""Estimated seconds (one thread) of a CG solve to ``rtol`` with preconditioner ``kind``: setup plus
    ``iterations x (HVP + application)``, from :data:`GEMM_RATE`, :data:`CHOL_RATE`, :data:`ELEM_RATE` and :data:`ITERS_PER_DECADE`.

    ======== ======================================================= ==========================
    kind     setup                                                   application (flops)
    ======== ======================================================= ==========================
    none     0                                                       0
    kfac     ``2(nK^2 + min(n, 2^17)D^2)`` GEMM flops, two ``eigh``  ``4(K^2D + KD^2)``
    dense    ``2n D(D+1)/2 K(K-1)/2`` low-precision GEMM flops,      ``2(K'D)^2`` (float32)
             ``n(D(D+1)/2 + K(K-1)/2)`` elementwise products,
             ``(K'D)^3/3`` float32 Cholesky flops (``K' = K-1``
             in the reduced basis, ``K`` otherwise)
    ======== ======================================================= ==========================

    HVP: ``4nKD`` flops at ``gemm x K/(K + 30)``. Iterations: ``ITERS_PER_DECADE[kind] x log10(1/rtol)``
    (plus one for ``dense``), at least 1.
    """
    g = 1e9
    dt = dtype if dtype in (torch.float64, torch.float32) else torch.float32
    decades = max(0.3, math.log10(1.0 / max(rtol, 1e-300)))
    t_hvp = 4.0 * n * K * D / (GEMM_RATE[dt] * K / (K + 30.0) * g)
    if kind == "none":
        return max(1.0, ITERS_PER_DECADE["none"] * decades) * t_hvp
    if kind == "kfac":
        setup = 2.0 * (n * K * K + min(n, 1 << 17) * D * D) / (GEMM_RATE[dt] * g) + 9.0 * (K ** 3 + D ** 3) / (CHOL_RATE[torch.float64] * g)
        apply = 4.0 * (K * K * D + K * D * D) / (GEMM_RATE[dt] * g)
        return setup + max(1.0, ITERS_PER_DECADE["kfac"] * decades) * (t_hvp + apply)
    if kind == "dense":
        Kr = K - 1 if 2 <= K <= D else K
        m = Kr * D
        Dp, Kp = D * (D + 1) / 2, K * (K - 1) / 2
        ldt = lowp if lowp in GEMM_RATE else torch.float32
        setup = (2.0 * n * Dp * Kp / (GEMM_RATE[ldt] * g) + n * (Dp + Kp) / (ELEM_RATE * g)
                 + m ** 3 / 3.0 / (CHOL_RATE[torch.float32] * g))
        apply = 2.0 * m * m / (GEMM_RATE[torch.float32] * g)
        it = ITERS_PER_DECADE["dense_bf16" if ldt in (torch.bfloat16, torch.float16) else "dense_f32"]
        return setup + max(1.0, it * decades + 1.0) * (t_hvp + apply)
    raise ConfigError(f"Unknown preconditioner kind {kind!r}.")


def choose_preconditioner(n: int, K: int, D: int, rtol: float, dtype: torch.dtype = torch.float64,
                          device: torch.device | str = "cpu") -> str:
    """The preconditioner of least :func:`estimate_solve_cost` among ``none``, ``kfac`` and (for
    ``K·D <= DENSE_PRECOND_MAX``) ``dense`` -- the rule behind ``precond="auto"``.

    ``block_jacobi`` is never chosen (measured no better than ``none``, module docstring).
    """
    lowp = lowp_dtype(device)
    kinds = ["none", "kfac"] + (["dense"] if K * D <= DENSE_PRECOND_MAX else [])
    costs = {k: estimate_solve_cost(k, n, K, D, rtol, dtype, lowp) for k in kinds}
    return min(costs, key=lambda k: costs[k])
