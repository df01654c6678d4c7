r"""TRAK (Park et al. 2023) for the L2 head: projected margin gradients, ensembled over heads.

For each of ``M`` heads :math:`W_m` (trained on independent random subsets of the training set),
with the margin :math:`f(x) = \log\frac{p_y(x)}{1-p_y(x)}` and its gradient
:math:`\nabla_W f(x) = u_x h_x^\top`, :math:`u_x = e_y - \operatorname{softmax}_{k\ne y}(z_x)`
(the softmax over the other classes; finite even when :math:`p_y\to 1`),

.. math::

    \phi_i = P_m \operatorname{vec}(u_i h_i^\top) \in \mathbb R^k, \qquad
    \tau(x, i) = \frac1M\sum_m \phi_x^\top(\Phi_m^\top\Phi_m + \epsilon I)^{-1}\phi_i\,(1 - p_{i,y_i}),

with :math:`P_m` a Gaussian :math:`k\times KD` projection (entries :math:`\mathcal N(0, 1/k)`),
:math:`\Phi_m` the stacked :math:`\phi_i` of all training samples and :math:`(1-p_{i,y_i})` the
residual weighting :math:`Q`. Positive :math:`\tau` = sample ``i`` raises ``x``'s margin, i.e.
helps (same sign as :math:`\Delta_i`; TRAK's units, not a loss change).

The subset heads keep :math:`\lambda` and rescale the kept weights by ``1/subset_fraction`` so the
balance between data term and L2 matches the full head.

Reference:
    Park, Georgiev, Ilyas, Leclerc & Madry, "TRAK: Attributing model behavior at scale", ICML 2023,
    https://arxiv.org/abs/2303.14186.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional

import torch

from ..head import solve_head
from ..seeding import numpy_rng, torch_generator
from ..validate import check_int, check_number, renamed_field
from .base import ATTRIBUTION, AttributionMethod, AttributionProblem

__all__ = ["TRAK", "margin_gradient_factors", "project_gradients"]


def margin_gradient_factors(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`u_x = \partial f/\partial z` of the margin :math:`f = \log p_y - \log(1-p_y)`, ``(Q, K)``."""
    Z = X @ W.T
    mask = torch.nn.functional.one_hot(y, W.shape[0]).bool()
    other = torch.softmax(Z.masked_fill(mask, float("-inf")), dim=1)
    return mask.to(Z.dtype) - other


def project_gradients(X: torch.Tensor, U: torch.Tensor, P: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    r""":math:`\phi_i = P\operatorname{vec}(u_ih_i^\top)` for every row, ``(n, k)``; ``P`` is ``(k, K, D)``."""
    k, K, D = P.shape
    Pm = P.permute(2, 0, 1).reshape(D, k * K)
    out = []
    for lo in range(0, X.shape[0], chunk):
        T = (X[lo:lo + chunk] @ Pm).reshape(-1, k, K)
        out.append((T * U[lo:lo + chunk, None, :]).sum(dim=2))
    return torch.cat(out)


@ATTRIBUTION.register("trak")
@dataclass
class TRAK(AttributionMethod):
    r"""TRAK scores ensembled over ``n_models`` heads (module docstring).

    Args:
        proj_dim: projection dimension ``k`` (>= 1).
        n_models: ensemble size ``M`` (>= 1).
        subset_fraction: fraction of the training set each head is trained on, in (0, 1].
        seed: root seed of the ``trak_subset_m`` and ``trak_proj_m`` streams.
        damping: ridge :math:`\epsilon` relative to the mean diagonal of :math:`\Phi^\top\Phi`.
        grad_tol: gradient-norm tolerance of each head's Newton solve (``tol`` is its deprecated name).
    """

    proj_dim: int = 256
    n_models: int = 5
    subset_fraction: float = 0.5
    seed: int = 0
    damping: float = 1e-6
    grad_tol: float = 1e-8
    tol: Optional[float] = None
    name: ClassVar[str] = "trak"

    def __post_init__(self) -> None:
        renamed_field(self, "tol", "grad_tol", "TRAK")
        check_int(self.proj_dim, "proj_dim", "TRAK", minimum=1)
        check_int(self.n_models, "n_models", "TRAK", minimum=1)
        check_number(self.subset_fraction, "subset_fraction", "TRAK", low=0.0, high=1.0, low_open=True)
        check_number(self.damping, "damping", "TRAK", low=0.0)
        check_number(self.grad_tol, "grad_tol", "TRAK", low=0.0, low_open=True)

    def _fit(self, problem: AttributionProblem) -> None:
        inner, n, K, D = problem.inner, problem.n, problem.K, problem.D
        dt, dev = inner.X.dtype, inner.X.device
        self._models: List[tuple] = []
        for m in range(self.n_models):
            if self.subset_fraction < 1:
                keep = torch.from_numpy(numpy_rng(self.seed, f"trak_subset_{m}").random(n) < self.subset_fraction)
                a = problem.alpha * keep.to(dev, dt) / self.subset_fraction
            else:
                a = problem.alpha
            W = solve_head(inner, a, W0=problem.W, grad_tol=self.grad_tol).W
            P = torch.randn(self.proj_dim, K, D, generator=torch_generator(self.seed, f"trak_proj_{m}"),
                            dtype=torch.float64).to(dev, dt) / self.proj_dim ** 0.5
            Phi = project_gradients(inner.X, margin_gradient_factors(W, inner.X, inner.y), P)  # (n, k)
            A = Phi.T @ Phi
            A = A + self.damping * float(A.diagonal().mean()) * torch.eye(A.shape[0], dtype=dt, device=dev)
            L = torch.linalg.cholesky(A)
            q = 1.0 - torch.softmax(inner.X @ W.T, dim=1).gather(1, inner.y[:, None])[:, 0]  # residual weighting
            self._models.append((W, P, torch.cholesky_solve(Phi.T, L) * q[None, :]))  # (k, n)

    def _scores(self, X: torch.Tensor, y: torch.Tensor, reduce: str) -> torch.Tensor:
        out = None
        for W, P, Rq in self._models:
            phx = project_gradients(X, margin_gradient_factors(W, X, y), P)  # (Q, k)
            if reduce == "mean":
                phx = phx.mean(dim=0, keepdim=True)
            s = phx @ Rq
            out = s if out is None else out + s
        out = out / len(self._models)
        return out[0] if reduce == "mean" else out
