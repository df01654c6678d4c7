r"""Curvature approximations of the head's Hessian from BackPACK (the only BackPACK door of attribution).

For the linear softmax head the generalised Gauss-Newton matrix equals the Hessian of the data
term (cross-entropy is convex in the logits and the model is linear), so

* :func:`diag_ggn` -- the exact diagonal :math:`\operatorname{diag}(H) = \frac1n\sum_i\alpha_i\,
  \operatorname{diag}\big((\operatorname{diag}p_i - p_ip_i^\top)\otimes h_ih_i^\top\big) + \lambda`,
  from BackPACK's per-sample ``BatchDiagGGNExact`` (so non-uniform :math:`\alpha` is exact);
* :func:`kfac` -- the Kronecker factorisation :math:`H \approx G\otimes A + \lambda I` with
  :math:`G = \frac1n\sum_i(\operatorname{diag}p_i - p_ip_i^\top)` and :math:`A = \frac1n\sum_i h_ih_i^\top`
  from BackPACK's ``KFLR`` (exact for one sample; uniform :math:`\alpha` only).

Both are applied to a ``torch.nn.Linear(D, K, bias=False)`` on the bias-augmented features, whose
``weight`` is ``W`` (row-major ``vec``, the convention of :mod:`reweight.head`).

References:
    Dangel, Kunstner & Hennig, "BackPACK: Packing more into backprop", ICLR 2020.
    Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate curvature",
    ICML 2015; Botev, Ritter & Barber, "Practical Gauss-Newton optimisation for deep learning",
    ICML 2017 (KFLR).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import ConfigError

__all__ = ["KroneckerCurvature", "diag_ggn", "kfac"]


def _linear(W: torch.Tensor):
    from backpack import extend

    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False).to(W.device, W.dtype)
    lin.weight.data.copy_(W)
    return extend(lin)


def diag_ggn(X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, alpha: torch.Tensor, lam: float,
             n: int | None = None, chunk: int = 4096) -> torch.Tensor:
    r"""Diagonal of :math:`H = \nabla^2_W F` from BackPACK's per-sample exact GGN diagonal, ``(K, D)``.

    Args:
        X: ``(n, D)`` features; y: ``(n,)`` labels; W: ``(K, D)`` head; alpha: ``(n,)`` weights.
        lam: :math:`\lambda` added to the diagonal.
        n: the ``n`` of the ``1/n`` (default ``X.shape[0]``).
        chunk: rows per BackPACK pass (memory bound ``chunk·K·D``).
    """
    from backpack import backpack, extend
    from backpack.extensions import BatchDiagGGNExact

    n = int(X.shape[0] if n is None else n)
    lin = _linear(W)
    lossf = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
    total = torch.zeros_like(W)
    for lo in range(0, X.shape[0], chunk):
        hi = min(X.shape[0], lo + chunk)
        lin.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "full backward hook ... no inputs require gradients"
            loss = lossf(lin(X[lo:hi]), y[lo:hi])
            with backpack(BatchDiagGGNExact()):
                loss.backward()
        per = lin.weight.diag_ggn_exact_batch  # (b, K, D)
        total += torch.einsum("b,bkd->kd", alpha[lo:hi].to(per.dtype), per.detach())
    return total / n + lam


@dataclass
class KroneckerCurvature:
    r""":math:`H \approx G\otimes A + \lambda I` with eigendecompositions of both factors.

    :meth:`solve` applies the exact inverse of the approximation: with :math:`G = Q_G\Lambda_GQ_G^\top`,
    :math:`A = Q_A\Lambda_AQ_A^\top`, :math:`(G\otimes A+\lambda I)^{-1}\operatorname{vec}(B) =
    \operatorname{vec}\big(Q_G[(Q_G^\top BQ_A)\oslash(\lambda_G\lambda_A^\top+\lambda)]Q_A^\top\big)`.
    """

    G: torch.Tensor
    A: torch.Tensor
    lam: float

    def __post_init__(self) -> None:
        self.eG, self.QG = torch.linalg.eigh(self.G)
        self.eA, self.QA = torch.linalg.eigh(self.A)

    def dense(self) -> torch.Tensor:
        """The dense ``(K·D, K·D)`` approximation (tests only)."""
        KD = self.G.shape[0] * self.A.shape[0]
        return torch.kron(self.G, self.A) + self.lam * torch.eye(KD, dtype=self.G.dtype, device=self.G.device)

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """Apply the inverse to ``B`` ``(K, D)`` or a batch ``(Q, K, D)``."""
        T = self.QG.T @ B @ self.QA
        T = T / (self.eG[:, None] * self.eA[None, :] + self.lam)
        return self.QG @ T @ self.QA.T


def kfac(X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, alpha: torch.Tensor, lam: float) -> KroneckerCurvature:
    r"""The KFLR Kronecker factors of the head's Hessian from BackPACK (uniform :math:`\alpha` only).

    Raises:
        ConfigError: if ``alpha`` is not uniform (BackPACK's KFLR has no per-sample weights; use
            :func:`diag_ggn`, which is exact for any weights).
    """
    from backpack import backpack, extend
    from backpack.extensions import KFLR

    if not bool(torch.all(alpha == alpha[0])):
        raise ConfigError("The 'alpha' parameter of kfac must be uniform (BackPACK's KFLR has no per-sample "
                          "weights). Use curvature='diag_ggn' for non-uniform weights.")
    lin = _linear(W)
    lossf = extend(torch.nn.CrossEntropyLoss(reduction="mean"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loss = lossf(lin(X), y)
        with backpack(KFLR()):
            loss.backward()
    G, A = (t.detach() for t in lin.weight.kflr)
    return KroneckerCurvature(G=float(alpha[0]) * G, A=A, lam=float(lam))
