r"""Exact leave-one-out on a subset of training samples: the ground truth every estimator is checked against.

For each ``i`` of the subset, :math:`W^*_{-i} = \arg\min_W F(W, \alpha^{(-i)})` with
:math:`\alpha^{(-i)}_i = 0` and every other weight unchanged (no re-normalisation), solved to a
gradient-norm tolerance ``grad_tol``:

* ``warm_start="newton_step"`` (default): a batched chord (simplified Newton) iteration with the **exact
  leave-one-out Hessian at** :math:`W^*`, started at :math:`W^*`,

  .. math::

      W \leftarrow W - H_{-i}^{-1}\nabla F_{-i}(W), \qquad
      H_{-i} = H - c_i\,(S_i\otimes h_i)(I_K\otimes h_i)^\top,\quad c_i = \alpha_i/n,

  so its first step is the Newton step of the leave-one-out problem from :math:`W^*`. :math:`H_{-i}^{-1}` is applied
  by the Woodbury identity on one explicit inverse :math:`H^{-1}` (float32 by default: it only sets the contraction
  rate, the fixed point comes from the float64 gradient):

  .. math::

      H_{-i}^{-1}r = H^{-1}r + c_i\,Y_i S_i(I - c_iT_iS_i)^{-1}\,\operatorname{mat}(H^{-1}r)\,h_i, \qquad
      Y_i = H^{-1}(I_K\otimes h_i),\quad T_i = (I_K\otimes h_i)^\top Y_i,

  a ``K x K`` capacitance per sample. All samples of a block iterate together (one ``n·D·(B·K)`` gradient product
  per step, :meth:`~reweight.head.HeadObjective.grad_batch`), samples leave the active set as they reach
  ``grad_tol``; a sample whose gradient norm stops falling is finished by Newton
  (:func:`reweight.head.solve_head`), the only fallback. For heads too large to factor (``K·D > 4096``) the start
  is one CG solve with the full Hessian and ``solve_head`` does the rest;
* ``"optimum"``: Newton started at :math:`W^*`;
* ``"none"``: Newton from zeros -- the from-scratch refit (the slow twin used by tests and the benchmark).

All three converge to the same optimum (strong convexity); only the cost differs. Ground truth:

.. math::

    \Delta_i = L_{val}(W^*_{-i}) - L_{val}(W^*), \qquad
    \Delta_i(x) = \ell(W^*_{-i}h_x, y_x) - \ell(W^*h_x, y_x), \qquad \delta z_i(x) = (W^*_{-i} - W^*)h_x.

Reference:
    Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017 (LOO as
    the ground truth of influence estimates).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch

from ..errors import ConfigError, DataError
from ..head import solve_head
from ..precond import assemble_hessian
from ..validate import check_indices, check_int, check_number, renamed_option
from .base import AttributionProblem, check_queries

__all__ = ["LOOResult", "exact_loo", "inverse_hessian", "retrain"]

log = logging.getLogger(__name__)

DENSE_FACTOR_MAX = 4096  # K*D up to which the full Hessian is inverted explicitly (Woodbury chord iteration)


@dataclass
class LOOResult:
    r"""Exact leave-one-out ground truth on a subset.

    Attributes:
        subset: ``(m,)`` training rows left out (one at a time).
        delta_val: ``(m,)`` :math:`\Delta_i` on the mean validation loss (None without a validation set).
        delta_query: ``(m, Q)`` per-query loss changes (None without queries).
        delta_logits: ``(m, Q, K)`` per-query logit changes (None without queries).
        iters: ``(m,)`` iterations: chord steps plus Newton iterations of a fallback (``newton_step``), Newton
            iterations otherwise; seconds: ``(m,)`` wall time per sample (start + solve, a block's time shared
            equally by its samples); converged: ``(m,)``; grad_norm: ``(m,)`` final :math:`\|\nabla F_{-i}\|`.
        setup_seconds: one-off cost (the explicit inverse Hessian for ``newton_step``).
        warm_start: the start used.
        fallbacks: samples the chord iteration handed to Newton (``newton_step`` only).
    """

    subset: torch.Tensor
    delta_val: Optional[torch.Tensor]
    delta_query: Optional[torch.Tensor]
    delta_logits: Optional[torch.Tensor]
    iters: torch.Tensor
    seconds: torch.Tensor
    converged: torch.Tensor
    grad_norm: torch.Tensor
    setup_seconds: float
    warm_start: str
    fallbacks: int = 0

    @property
    def total_seconds(self) -> float:
        return float(self.seconds.sum()) + self.setup_seconds


def inverse_hessian(problem: AttributionProblem, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""The explicit :math:`H^{-1}` ``(K·D, K·D)`` at the optimum and the probabilities ``P`` ``(n, K)`` there.

    :math:`H` is assembled by :func:`reweight.precond.assemble_hessian` in ``dtype`` and inverted through its
    Cholesky factor; a float32 factor that fails (an extremely ill-conditioned head) is redone in float64.
    """
    H = problem.inner.hessian(problem.W, problem.alpha)
    for dt in ((dtype, torch.float64) if dtype != torch.float64 else (torch.float64,)):
        Hd = assemble_hessian(H, dt)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            return torch.cholesky_inverse(L), H.P if H.P is not None else problem.inner.probs(problem.W)
    raise FloatingPointError("The head Hessian is not positive definite (check lam > 0 and alpha >= 0).")


class _WoodburyBlock:
    r""":math:`H_{-i}^{-1}` for a block of left-out samples by the Woodbury identity (module docstring)."""

    def __init__(self, Hinv: torch.Tensor, P: torch.Tensor, X: torch.Tensor, alpha: torch.Tensor, n: int,
                 blk: torch.Tensor, K: int, D: int):
        fdt = Hinv.dtype
        B = blk.numel()
        self.Hinv, self.K, self.D = Hinv, K, D
        self.h = X[blk].to(fdt)  # (B, D)
        # Y_i = H^{-1}(I (x) h_i): one (K D K, D) x (D, B) product for the block
        self.Y = (Hinv.reshape(K * D * K, D) @ self.h.T).reshape(K * D, K, B).permute(2, 0, 1).contiguous()  # (B, KD, K)
        T = torch.einsum("bkal,ba->bkl", self.Y.view(B, K, D, K), self.h)  # leverages T_i, (B, K, K)
        p = P[blk].to(fdt)
        S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        self.c = (alpha[blk] / n).to(fdt)
        cap = torch.eye(K, dtype=fdt, device=p.device) - self.c[:, None, None] * (T @ S)
        self.M = S @ torch.linalg.inv(cap)  # S_i (I - c_i T_i S_i)^{-1}, (B, K, K)

    def apply(self, R: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """:math:`H_{-i}^{-1}R_j` for the block rows ``act`` (``R`` ``(len(act), K, D)``)."""
        m, K, D = R.shape[0], self.K, self.D
        Xr = (R.reshape(m, K * D).to(self.Hinv.dtype) @ self.Hinv).view(m, K, D)  # H^{-1} r (H^{-1} symmetric)
        v = torch.einsum("mkd,md->mk", Xr, self.h[act])  # mat(H^{-1} r) h_i
        w = self.c[act, None] * torch.einsum("mkl,ml->mk", self.M[act], v)
        corr = torch.bmm(self.Y[act], w.unsqueeze(2)).view(m, K, D)
        return (Xr + corr).to(R.dtype)


def _woodbury_chord(inner, alpha: torch.Tensor, W_star: torch.Tensor, Hinv: torch.Tensor, P: torch.Tensor,
                    blk: torch.Tensor, tol: float, steps: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The batched chord iteration :math:`W \leftarrow W - H_{-i}^{-1}\nabla F_{-i}(W)` from :math:`W^*` for the
    left-out samples ``blk``; a sample leaves the active set at ``tol`` or when its gradient norm stops falling.

    Returns ``W`` ``(B, K, D)``, the exact gradient norms :math:`\|\nabla F_{-i}(W)\|` ``(B,)`` and the steps ``(B,)``.
    """
    B = blk.numel()
    K, D = W_star.shape
    wb = _WoodburyBlock(Hinv, P, inner.X, alpha, inner.n, blk, K, D)
    A = alpha[:, None].repeat(1, B)
    A[blk.to(A.device), torch.arange(B, device=A.device)] = 0.0
    W = W_star[None].repeat(B, 1, 1)
    g = inner.grad_batch(W, A)
    gn = torch.linalg.vector_norm(g.reshape(B, -1), dim=1)
    stalled = torch.zeros(B, dtype=torch.bool, device=gn.device)
    n_steps = torch.zeros(B, dtype=torch.int64, device=gn.device)
    for _ in range(steps):
        act = torch.nonzero((gn > tol) & ~stalled).flatten()  # only unfinished samples cost a gradient
        if act.numel() == 0:
            break
        W_new = W[act] - wb.apply(g[act], act)
        g_new = inner.grad_batch(W_new, A[:, act])
        gn_new = torch.linalg.vector_norm(g_new.reshape(act.numel(), -1), dim=1)
        n_steps[act] += 1
        better = gn_new < gn[act]
        stalled[act[~better]] = True  # no longer contracting: Newton finishes it
        upd = act[better]
        W[upd], g[upd], gn[upd] = W_new[better], g_new[better], gn_new[better]
    return W, gn, n_steps


def exact_loo(problem: AttributionProblem, subset, X_val: Optional[torch.Tensor] = None,
              y_val: Optional[torch.Tensor] = None, X_query: Optional[torch.Tensor] = None,
              y_query: Optional[torch.Tensor] = None, grad_tol: Optional[float] = None, max_iter: int = 100,
              warm_start: Literal["newton_step", "optimum", "none"] = "newton_step",
              newton_system: Literal["auto", "dense", "cg"] = "auto", chord_steps: int = 50,
              block_size: int = 100, factor_dtype: torch.dtype = torch.float32, progress: bool = False,
              tol: Optional[float] = None) -> LOOResult:
    r"""Retrain without each sample of ``subset`` (module docstring) and measure the changes.

    Args:
        problem: the trained head; ``problem.W`` must be its optimum to about ``grad_tol``.
        subset: ``(m,)`` distinct training indices in ``0..n-1``.
        X_val, y_val: ``(m_val, D)``, ``(m_val,)`` validation set for :math:`\Delta_i` (optional).
        X_query, y_query: ``(Q, D)``, ``(Q,)`` queries for per-query changes (optional).
        grad_tol: gradient-norm tolerance of every solve (default ``1e-10``: float64 with ``1e-10`` gives
            ~1e-10 accuracy in :math:`W`, far below the :math:`\Delta_i` it measures; ``tol`` is its
            deprecated name).
        max_iter: Newton iteration cap (fallback and the other starts).
        warm_start: ``newton_step`` (the Woodbury chord iteration), ``optimum`` or ``none`` (Newton from
            :math:`W^*` or from scratch).
        newton_system: passed to :func:`~reweight.head.solve_head`.
        chord_steps: at most this many chord steps per sample before Newton takes over.
        block_size: left-out samples iterated together (memory ``block_size·K·D·K`` for the Woodbury terms and
            ``n·block_size`` weights).
        factor_dtype: dtype of the explicit :math:`H^{-1}` (float32 default: it sets only the contraction rate).

    Raises:
        DataError: for indices out of range or duplicated, or validation/query features of the
            wrong width (bias column included).
        ConfigError: for an unknown ``warm_start`` or a ``grad_tol`` that is not a finite number > 0.
    """
    from tqdm.auto import tqdm

    idx = check_indices(subset, problem.n, "exact_loo")
    if warm_start not in ("newton_step", "optimum", "none"):
        raise ConfigError(f"The 'warm_start' parameter of exact_loo must be one of 'newton_step', 'optimum', 'none'. "
                          f"Got {warm_start!r} instead.")
    grad_tol = renamed_option(grad_tol, tol, "tol", "grad_tol", "exact_loo", 1e-10)
    check_number(grad_tol, "grad_tol", "exact_loo", low=0.0, low_open=True)
    check_int(chord_steps, "chord_steps", "exact_loo", minimum=0)
    check_int(block_size, "block_size", "exact_loo", minimum=1)
    tol = grad_tol
    for Xs, ys, what in ((X_val, y_val, "validation"), (X_query, y_query, "query")):
        if (Xs is None) != (ys is None):
            raise DataError(f"exact_loo needs both {what} features and labels, or neither.")
        if Xs is not None:
            check_queries(Xs, ys, problem.D, problem.K, "exact_loo")
    inner, W_star, alpha = problem.inner, problem.W, problem.alpha
    dt, dev = inner.X.dtype, inner.X.device
    if X_val is not None:
        X_val, y_val = X_val.to(dev, dt), torch.as_tensor(y_val).to(dev)
        base_val = float(torch.nn.functional.cross_entropy(X_val @ W_star.T, y_val))
    if X_query is not None:
        X_query, y_query = X_query.to(dev, dt), torch.as_tensor(y_query).to(dev)
        base_logits = X_query @ W_star.T
        base_q = torch.nn.functional.cross_entropy(base_logits, y_query, reduction="none")

    t0 = time.perf_counter()
    Hinv = P = H = None
    if warm_start == "newton_step":
        if problem.K * problem.D <= DENSE_FACTOR_MAX:
            Hinv, P = inverse_hessian(problem, factor_dtype)
        else:
            H = inner.hessian(W_star, alpha)
    G = problem.residuals()
    setup = time.perf_counter() - t0

    m = idx.numel()
    d_val = torch.empty(m, dtype=dt) if X_val is not None else None
    d_q = torch.empty(m, X_query.shape[0], dtype=dt) if X_query is not None else None
    d_z = torch.empty(m, X_query.shape[0], problem.K, dtype=dt) if X_query is not None else None
    iters = torch.empty(m, dtype=torch.int64)
    secs = torch.empty(m, dtype=torch.float64)
    conv = torch.empty(m, dtype=torch.bool)
    gns = torch.empty(m, dtype=torch.float64)
    fallbacks = 0
    bar = tqdm(total=m, desc="exact LOO", disable=not progress)
    for lo in range(0, m, block_size):
        blk = idx[lo:lo + block_size]
        t1 = time.perf_counter()
        Wc = gc = steps = None
        if Hinv is not None:
            Wc, gc, steps = _woodbury_chord(inner, alpha, W_star, Hinv, P, blk, tol, chord_steps)
        t_start = (time.perf_counter() - t1) / blk.numel()
        for jj, i in enumerate(blk.tolist()):
            j = lo + jj
            t1 = time.perf_counter()
            if Wc is not None and float(gc[jj]) <= tol:  # certified by the chord iteration's exact gradient
                W_i, iters[j], conv[j], gns[j] = Wc[jj], int(steps[jj]), True, float(gc[jj])
            else:
                a = alpha.clone()
                a[i] = 0.0
                if warm_start == "none":
                    W0 = None
                elif warm_start == "optimum":
                    W0 = W_star
                elif Wc is not None:  # the chord iteration stalled: Newton from where it stopped
                    W0 = Wc[jj]
                    fallbacks += 1
                else:  # large head: the Newton step from W* by CG on the full Hessian
                    assert H is not None
                    b = (alpha[i] / problem.n) * G[i][:, None] * inner.X[i][None, :]  # -grad F_{-i}(W*)
                    W0 = W_star + H.solve(b, method="cg", rtol=1e-6).x
                sol = solve_head(inner, a, W0=W0, grad_tol=tol, max_iter=max_iter, newton_system=newton_system)
                W_i, conv[j], gns[j] = sol.W, sol.converged, sol.grad_norm
                iters[j] = sol.iters + (int(steps[jj]) if steps is not None else 0)
            secs[j] = time.perf_counter() - t1 + t_start
            if X_val is not None:
                d_val[j] = float(torch.nn.functional.cross_entropy(X_val @ W_i.T, y_val)) - base_val
            if X_query is not None:
                z = X_query @ W_i.T
                d_z[j] = (z - base_logits).cpu()
                d_q[j] = (torch.nn.functional.cross_entropy(z, y_query, reduction="none") - base_q).cpu()
        bar.update(blk.numel())
    bar.close()
    if not bool(conv.all()):
        log.warning("exact_loo: %d of %d leave-one-out solves did not reach grad_tol=%.3g.", int((~conv).sum()), m, tol)
    return LOOResult(subset=idx, delta_val=d_val, delta_query=d_q, delta_logits=d_z, iters=iters, seconds=secs,
                     converged=conv, grad_norm=gns, setup_seconds=setup, warm_start=warm_start, fallbacks=fallbacks)


def retrain(problem: AttributionProblem, alpha: torch.Tensor, grad_tol: float = 1e-8, max_iter: int = 100) -> torch.Tensor:
    r""":math:`\arg\min_W F(W, \alpha)` for new weights, warm-started at ``problem.W``, ``(K, D)``."""
    return solve_head(problem.inner, alpha, W0=problem.W, grad_tol=grad_tol, max_iter=max_iter).W
