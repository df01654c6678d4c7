r"""TracIn (Pruthi et al. 2020) from the checkpoints of an SGD run of the L2 head.

The head is trained by mini-batch SGD on :math:`F(W,\alpha)` (unbiased mini-batch gradient
:math:`\frac1{|b|}\sum_{i\in b}\alpha_i\nabla\ell_i + \lambda W`), saving :math:`W_t` and the step
size :math:`\eta_t` after every epoch. One epoch visits each sample once with step
:math:`\eta_t\alpha_i/|b|`, so removing sample ``i`` would change the target loss by about

.. math::

    \hat\Delta_i(x) = \sum_t \frac{\eta_t\,\alpha_i}{|b|}\,\nabla\ell_i(W_t)\cdot\nabla\ell_x(W_t)
    = \sum_t \frac{\eta_t\,\alpha_i}{|b|}\,(g_i^{(t)}\cdot g_x^{(t)})\,(h_i\cdot h_x),

positive when ``i`` helps ``x`` (TracInCP, first-order; only the ordering and sign are meaningful).

Reference:
    Pruthi, Liu, Kale & Sundararajan, "Estimating training data influence by tracing gradient
    descent", NeurIPS 2020, https://arxiv.org/abs/2002.08484.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Literal, Optional

import torch

from ..head import HeadObjective, batch_grad
from ..seeding import torch_generator
from ..validate import check_choice, check_int, check_number
from .base import ATTRIBUTION, AttributionMethod, AttributionProblem, bilinear_scores, target_gradients

__all__ = ["SGDTrace", "TracIn", "sgd_head"]


@dataclass
class SGDTrace:
    """Checkpoints ``W_t`` ``(T, K, D)``, their step sizes ``eta`` ``(T,)`` and the batch size of an SGD run."""

    checkpoints: torch.Tensor
    lrs: torch.Tensor
    batch_size: int
    final_grad_norm: float = float("nan")
    losses: List[float] = field(default_factory=list)


def sgd_head(inner: HeadObjective, alpha: torch.Tensor, epochs: int = 10, lr: float = 0.5, batch_size: int = 64,
             seed: int = 0, schedule: Literal["constant", "linear"] = "linear",
             W0: Optional[torch.Tensor] = None) -> SGDTrace:
    r"""Mini-batch SGD on :math:`F(W,\alpha)`, saving :math:`W_t` and :math:`\eta_t` after each epoch.

    Args:
        inner: the objective; alpha: ``(n,)`` weights.
        epochs: number of epochs (= checkpoints), >= 1.
        lr: initial step size :math:`\eta_0 > 0`.
        batch_size: mini-batch size, >= 1.
        seed: root seed of the ``tracin_sgd`` shuffling stream.
        schedule: ``constant`` or ``linear`` decay :math:`\eta_t = \eta_0 (1 - t/T)` (per epoch).
        W0: initial head (default zeros).

    Raises:
        ConfigError: for a non-positive ``epochs``, ``lr`` or ``batch_size`` or an unknown schedule.
    """
    check_int(epochs, "epochs", "sgd_head", minimum=1)
    check_number(lr, "lr", "sgd_head", low=0.0, low_open=True)
    check_int(batch_size, "batch_size", "sgd_head", minimum=1)
    check_choice(schedule, "schedule", "sgd_head", ("constant", "linear"))
    X, y, n = inner.X, inner.y, inner.n
    W = torch.zeros(inner.shape, dtype=X.dtype, device=X.device) if W0 is None else W0.detach().clone()
    g = torch_generator(seed, "tracin_sgd")
    cks, lrs, losses = [], [], []
    for t in range(epochs):
        eta = lr * (1.0 - t / epochs) if schedule == "linear" else lr
        perm = torch.randperm(n, generator=g).to(X.device)
        for lo in range(0, n, batch_size):
            b = perm[lo:lo + batch_size]
            W = W - eta * batch_grad(W, X[b], y[b], alpha[b], inner.lam, b.numel())
        cks.append(W.clone())
        lrs.append(eta)
        losses.append(float(inner.loss(W, alpha)))
    gn = float(torch.linalg.vector_norm(inner.grad(W, alpha)))
    return SGDTrace(checkpoints=torch.stack(cks), lrs=torch.tensor(lrs, dtype=X.dtype), batch_size=batch_size,
                    final_grad_norm=gn, losses=losses)


@ATTRIBUTION.register("tracin")
@dataclass
class TracIn(AttributionMethod):
    r"""TracInCP scores from an SGD run of the head (see the module docstring for the formula).

    Args:
        epochs, lr, batch_size, schedule, seed: the SGD run (:func:`sgd_head`); its checkpoints are
            the epochs' ends.
    """

    epochs: int = 10
    lr: float = 0.5
    batch_size: int = 64
    schedule: str = "linear"
    seed: int = 0
    name: ClassVar[str] = "tracin"

    def _fit(self, problem: AttributionProblem) -> None:
        self.trace = sgd_head(problem.inner, problem.alpha, self.epochs, self.lr, self.batch_size, self.seed,
                              self.schedule)  # type: ignore[arg-type]

    def _scores(self, X: torch.Tensor, y: torch.Tensor, reduce: str) -> torch.Tensor:
        pr = self.problem
        out = None
        for W_t, eta in zip(self.trace.checkpoints, self.trace.lrs):
            B = target_gradients(W_t, X, y, reduce)
            s = float(eta) * bilinear_scores(pr.inner.X, pr.inner.residuals(W_t), B)
            out = s if out is None else out + s
        out = out * (pr.alpha / self.trace.batch_size)[None, :]
        return out[0] if reduce == "mean" else out
