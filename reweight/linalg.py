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
    >>> res = conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64), tol=1e-12)
    >>> torch.allclose(A @ res.x, torch.tensor([1.0, 2.0], dtype=torch.float64))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import ConfigError

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
    tol: float = 1e-6,
    max_iter: int = 500,
) -> CGResult:
    r"""Solve :math:`A x = b` by conjugate gradients until :math:`\|b - A x\| \le \mathrm{tol}\,\|b\|`.

    Args:
        matvec: ``v -> A v`` for a symmetric positive-definite ``A``; ``v`` has ``b``'s shape.
        b: right-hand side, any shape.
        x0: initial guess (default zeros).
        tol: relative residual tolerance, > 0.
        max_iter: maximum iterations (matvecs), >= 1.

    Returns:
        :class:`CGResult`; ``converged`` is False when ``max_iter`` was hit first (never silent:
        callers record it).

    Raises:
        ConfigError: for ``tol <= 0`` or ``max_iter < 1``.
    """
    if not tol > 0:
        raise ConfigError(f"The 'tol' parameter of conjugate_gradient must be > 0. Got {tol!r} instead.")
    if max_iter < 1:
        raise ConfigError(f"The 'max_iter' parameter of conjugate_gradient must be >= 1. Got {max_iter!r} instead.")
    bnorm = torch.linalg.vector_norm(b)
    if bnorm == 0:
        return CGResult(torch.zeros_like(b), 0, 0.0, True)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = _dot(r, r)
    it = 0
    rel = float(torch.sqrt(rs) / bnorm)
    while rel > tol and it < max_iter:
        Ap = matvec(p)
        pAp = _dot(p, Ap)
        if pAp <= 0:  # not positive definite along p (or breakdown): stop, report honestly
            break
        a = rs / pAp
        x = x + a * p
        r = r - a * Ap
        rs_new = _dot(r, r)
        p = r + (rs_new / rs) * p
        rs = rs_new
        it += 1
        rel = float(torch.sqrt(rs) / bnorm)
    return CGResult(x=x, iters=it, rel_residual=rel, converged=rel <= tol)
