r"""Linear solvers written against a ``matvec`` callable (never a materialised matrix).

:func:`conjugate_gradient` solves :math:`A x = b` for symmetric positive-definite ``A`` given only
:math:`x \mapsto A x`; ``b`` and ``x`` may be tensors of any shape (the inner product is over all
entries), so the head's ``(K, D)`` matrices are used as they are.

Reference: Hestenes & Stiefel, "Methods of conjugate gradients for solving linear systems",
J. Res. NBS, 1952; the use for influence/hypergradients follows Koh & Liang (ICML 2017) and
Pedregosa (ICML 2016).

Example:
    >>> import torch
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> res = conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64), rtol=1e-12)
    >>> torch.allclose(A @ res.x, torch.tensor([1.0, 2.0], dtype=torch.float64))
    True
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .validate import check_int, check_number

__all__ = ["CGResult", "conjugate_gradient"]


@dataclass
class CGResult:
    """Solution ``x``, iterations (= matvecs, excluding the initial residual), relative residual."""

    x: torch.Tensor
    iters: int
    rel_residual: float
    converged: bool


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sum(a * b)


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: Optional[torch.Tensor] = None,
    rtol: Optional[float] = None,
    max_iter: int = 500,
    precond: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    tol: Optional[float] = None,
) -> CGResult:
    r"""Solve :math:`A x = b` by (preconditioned) conjugate gradients until :math:`\|b - A x\| \le \mathrm{rtol}\,\|b\|`.

    With a preconditioner :math:`M \approx A` (``precond`` applies :math:`M^{-1}`, symmetric positive
    definite), the search directions are :math:`M^{-1}`-conjugate (Saad, *Iterative Methods for Sparse
    Linear Systems*, 2003, Alg. 9.1); the stopping test stays on the true residual :math:`\|b - Ax\|`.

    Args:
        matvec: ``v -> A v`` for a symmetric positive-definite ``A``; ``v`` has ``b``'s shape.
        b: right-hand side, any shape.
        x0: initial guess (default zeros).
        rtol: relative residual tolerance, a finite number > 0 (required; ``tol`` is its deprecated name).
        max_iter: maximum iterations (matvecs), >= 1.
        precond: ``r -> M^{-1} r`` (default: none, plain CG).

    Returns:
        :class:`CGResult`; ``converged`` is False when ``max_iter`` was hit first (never silent:
        callers record it).

    Raises:
        ConfigError: for a missing or non-positive ``rtol`` or ``max_iter < 1``.
    """
    if tol is not None:
        warnings.warn("conjugate_gradient(tol=...) is deprecated; use rtol=... (relative residual).",
                      DeprecationWarning, stacklevel=2)
        rtol = tol if rtol is None else rtol
    check_number(rtol, "rtol", "conjugate_gradient", low=0.0, low_open=True)
    check_int(max_iter, "max_iter", "conjugate_gradient", minimum=1)
    assert rtol is not None
    bnorm = torch.linalg.vector_norm(b)
    if bnorm == 0:
        return CGResult(torch.zeros_like(b), 0, 0.0, True)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    z = r if precond is None else precond(r)
    p = z.clone()
    rz = _dot(r, z)
    it = 0
    rel = float((torch.sqrt(rz) if precond is None else torch.linalg.vector_norm(r)) / bnorm)
    while rel > rtol and it < max_iter:
        Ap = matvec(p)
        pAp = _dot(p, Ap)
        if pAp <= 0:  # not positive definite along p (or breakdown): stop, report honestly
            break
        a = rz / pAp
        x = x + a * p
        r = r - a * Ap
        if precond is None:
            rz_new = _dot(r, r)
            rel = float(torch.sqrt(rz_new) / bnorm)
            p = r + (rz_new / rz) * p
        else:
            z = precond(r)
            rz_new = _dot(r, z)
            rel = float(torch.linalg.vector_norm(r) / bnorm)
            p = z + (rz_new / rz) * p
        rz = rz_new
        it += 1
    return CGResult(x=x, iters=it, rel_residual=rel, converged=rel <= rtol)
