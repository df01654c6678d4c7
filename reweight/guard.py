r"""The meta-val guard: pick the outer step (0 = uniform weights) on held-out trusted samples, and cross-fit.

The hypergradients of the outer loop are computed on the meta-train part of the trusted set, so the
validation loss they lower is an in-sample number: with a small trusted set the weights overfit it
(DESIGN section 5). The guard looks only at samples the path never saw:

* :func:`heldout_losses` -- per-sample held-out cross-entropy of every step's head :math:`W_t`
  (``t = 0`` is the uniform head), optionally at a per-step temperature fitted on the same samples
  (``criterion="tloss"``: it compares what the heads rank, not how confident they are);
* :func:`select_step` -- the step with the lowest mean held-out loss, kept only if it beats step 0 by
  more than ``z`` standard errors of the paired per-sample differences; otherwise uniform weights.
  A one-sided test of "the learned weights help on data they were not fitted to";
* :func:`geometric_combine` -- cross-fitting: the meta-train and meta-val halves swap roles, and the
  two paths' weights are combined by a class-normalised geometric mean (both halves of the trusted
  set are then used for the weights, and every step is still judged on held-out samples).

References:
    Chernozhukov et al., "Double/debiased machine learning for treatment and structural parameters",
    Econometrics Journal, 2018 (cross-fitting).
    Guo, Pleiss, Sun & Weinberger, "On calibration of modern neural networks", ICML 2017 (temperature
    scaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .validate import check_choice, check_number
from .weights import normalized_log_weights

__all__ = ["StepChoice", "geometric_combine", "heldout_losses", "select_step"]

#: inverse temperatures tried by ``criterion="tloss"`` (log-spaced, 0.2 to 5)
BETAS = torch.exp(torch.linspace(math.log(0.2), math.log(5.0), 41))


def heldout_losses(Ws: torch.Tensor, X: torch.Tensor, y: torch.Tensor, criterion: str = "tloss") -> torch.Tensor:
    r"""Per-sample held-out cross-entropy of every head, ``(T+1, m)``.

    ``criterion="loss"``: :math:`\ell(W_t h_j, y_j)`. ``"tloss"``: :math:`\ell(\beta_t W_t h_j, y_j)` with the
    inverse temperature :math:`\beta_t` (one scalar per head, from :data:`BETAS`) that minimises the mean
    over these samples.

    Args:
        Ws: ``(T+1, K, D)`` heads. X: ``(m, D)`` held-out features. y: ``(m,)`` labels.
    """
    check_choice(criterion, "criterion", "heldout_losses", ("loss", "tloss"))
    Z = torch.einsum("md,tkd->tmk", X, Ws)
    if criterion == "loss":
        return torch.stack([torch.nn.functional.cross_entropy(z, y, reduction="none") for z in Z])
    out = []
    for z in Z:
        L = torch.stack([torch.nn.functional.cross_entropy(z * b, y, reduction="none") for b in BETAS.to(z.dtype)])
        out.append(L[int(torch.argmin(L.mean(1)))])
    return torch.stack(out)


@dataclass
class StepChoice:
    """The guard's decision: ``step`` (0 = uniform), the best step before the test, the mean held-out gain over
    step 0 and its standard error, and whether the guard fell back to uniform."""

    step: int
    best_step: int
    gain: float
    se: float
    fell_back: bool


def select_step(L: torch.Tensor, z: float = 1.0) -> StepChoice:
    r"""The step with the lowest mean held-out loss, or 0 unless its gain over step 0 exceeds ``z`` standard errors.

    With :math:`d_j = L_{0j} - L_{tj}` the paired per-sample gains, the step is kept when
    :math:`\bar d > z\, s_d/\sqrt m`.

    Args:
        L: ``(T+1, m)`` held-out losses (row 0: uniform weights).
        z: the standard errors the gain must exceed (0 keeps any improvement; larger is more conservative).
    """
    check_number(z, "z", "select_step", low=0.0)
    t = int(torch.argmin(L.mean(1)))
    d = (L[0] - L[t]).double()
    gain = float(d.mean())
    se = float(d.std(unbiased=True) / math.sqrt(d.numel())) if d.numel() > 1 else float("inf")
    if t > 0 and not gain > z * se:
        return StepChoice(step=0, best_step=t, gain=gain, se=se, fell_back=True)
    return StepChoice(step=t, best_step=t, gain=gain, se=se, fell_back=False)


def geometric_combine(alphas: Sequence[torch.Tensor], labels: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
    r"""Class-normalised geometric mean of weight vectors: :math:`\alpha_i \propto \prod_f \alpha^{(f)}_i{}^{1/F}` per class.

    The mean of log-weights is the natural average of exponentiated-gradient iterates (their parameters
    are log-weights); each class keeps its mass :math:`m_c`.
    """
    logs = torch.stack([torch.log(a.clamp_min(torch.finfo(a.dtype).tiny)) for a in alphas]).mean(0)
    return normalized_log_weights(logs, labels, masses)


