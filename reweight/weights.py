r"""Per-sample weights: class-normalised softplus, entropy and ESS penalties, per-class reports.

Notation (DESIGN section 2): ``s`` (n,) free parameters, labels ``y`` (n,), class counts ``n_c``,
target class masses ``m_c``.

.. math::

    \tilde\alpha_i = \operatorname{softplus}(s_i), \qquad
    \alpha_i = m_{y_i} \frac{\tilde\alpha_i}{\sum_{j: y_j = y_i} \tilde\alpha_j}

so every class keeps mass :math:`m_c` (default :math:`m_c = n_c`, so the mean weight is 1;
``balanced``: :math:`m_c = n/K`). The normalisation is computed in log space,
:math:`\alpha_i = m_c \exp(\log\tilde\alpha_i - \operatorname{LSE}_{j\in c}\log\tilde\alpha_j)`,
with :math:`\log\operatorname{softplus}(s) \approx s` for very negative ``s``, so it is finite in
float32 for any finite ``s`` (no 0/0 when a whole class has ``s -> -inf``).

Penalties (each per class, weighted by ``n_c / n``):

* entropy: :math:`p_i = \alpha_i / m_c`, :math:`H_c = -\sum_{i\in c} p_i \log p_i`, penalty
  :math:`\log n_c - H_c` (KL from uniform; >= 0, 0 at uniform);
* ESS: :math:`\mathrm{ESS}_c = (\sum_{i\in c}\alpha_i)^2 / \sum_{i\in c}\alpha_i^2 \in [1, n_c]`,
  penalty :math:`\max(0, \rho - \mathrm{ESS}_c/n_c)^2` (``hinge``) or :math:`-\log(\mathrm{ESS}_c/n_c)` (``log``).

Reference: the ESS is Kish's effective sample size (Kish, *Survey Sampling*, 1965); the
class-normalised positive parameterisation follows the seeds of this project (DESIGN section 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional

import torch

from .data import check_labels
from .errors import ConfigError

__all__ = [
    "WeightModel",
    "class_masses",
    "class_report",
    "ess_per_class",
    "entropy_per_class",
    "initial_s",
    "log_softplus",
    "normalized_log_weights",
    "normalized_weights",
]

INIT_S = math.log(math.expm1(1.0))  # softplus(INIT_S) == 1


def initial_s(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``s`` at which every ``softplus(s_i) = 1`` (uniform weights), shape ``(n,)``."""
    return torch.full((n,), INIT_S, dtype=dtype)


def log_softplus(s: torch.Tensor) -> torch.Tensor:
    r""":math:`\log\operatorname{softplus}(s)`, finite for every finite ``s``.

    For ``s < -15``, :math:`\log\log(1+e^s) = s + O(e^s)`, so ``s`` itself is used.
    """
    safe = torch.where(s < -15, torch.zeros_like(s), s)
    return torch.where(s < -15, s, torch.log(torch.nn.functional.softplus(safe)))


def class_masses(labels: torch.Tensor, num_classes: int, mode: str = "count") -> torch.Tensor:
    """Target class masses ``m_c``: ``n_c`` (``count``) or ``n / K`` (``balanced``); shape ``(K,)``."""
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    if mode == "count":
        return counts
    if mode == "balanced":
        return torch.full((num_classes,), labels.numel() / num_classes, dtype=torch.float64)
    raise ConfigError(f"The 'class_mass' parameter must be one of 'count', 'balanced'. Got {mode!r} instead.")


def _segment_logsumexp(v: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class log-sum-exp of ``v`` (n,) -> (K,), differentiable, stable."""
    with torch.no_grad():
        cmax = torch.full((num_classes,), -torch.inf, dtype=v.dtype, device=v.device)
        cmax = cmax.scatter_reduce(0, labels, v, reduce="amax")
        cmax = torch.where(torch.isfinite(cmax), cmax, torch.zeros_like(cmax))
    sums = torch.zeros(num_classes, dtype=v.dtype, device=v.device).index_add(0, labels, torch.exp(v - cmax[labels]))
    return cmax + torch.log(sums)


def normalized_log_weights(u: torch.Tensor, labels: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
    r""":math:`\alpha_i = m_{y_i}\exp(u_i) / \sum_{j: y_j=y_i}\exp(u_j)` (a per-class softmax of log-weights ``u``).

    The parameterisation of exponentiated-gradient (mirror-descent) updates: :math:`u = 0` is uniform,
    adding a constant to a class's ``u`` changes nothing, and every class keeps its mass :math:`m_c`.
    """
    lse = _segment_logsumexp(u, labels, masses.numel())
    return masses.to(u.dtype)[labels] * torch.exp(u - lse[labels])


def normalized_weights(s: torch.Tensor, labels: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
    r""":math:`\alpha_i = m_{y_i}\,\operatorname{softplus}(s_i) / \sum_{j: y_j=y_i}\operatorname{softplus}(s_j)`.

    Args:
        s: ``(n,)`` free parameters (any finite values).
        labels: ``(n,)`` int64 class of each sample.
        masses: ``(K,)`` target mass of each class.

    Returns:
        ``(n,)`` weights, differentiable in ``s``; :math:`\sum_{i\in c}\alpha_i = m_c`.
    """
    K = masses.numel()
    la = log_softplus(s)
    lse = _segment_logsumexp(la, labels, K)
    return masses.to(s.dtype)[labels] * torch.exp(la - lse[labels])


def _class_sums(v: torch.Tensor, labels: torch.Tensor, K: int) -> torch.Tensor:
    return torch.zeros(K, dtype=v.dtype, device=v.device).index_add(0, labels, v)


def ess_per_class(alpha: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    r""":math:`\mathrm{ESS}_c = (\sum_{i\in c}\alpha_i)^2 / \sum_{i\in c}\alpha_i^2`, shape ``(K,)``.

    Classes without samples get ESS 0.
    """
    s1 = _class_sums(alpha, labels, num_classes)
    s2 = _class_sums(alpha * alpha, labels, num_classes)
    return torch.where(s2 > 0, s1 * s1 / torch.where(s2 > 0, s2, torch.ones_like(s2)), torch.zeros_like(s1))


def entropy_per_class(alpha: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    r""":math:`H_c = -\sum_{i\in c} p_i\log p_i` with :math:`p_i = \alpha_i / \sum_{j\in c}\alpha_j`, shape ``(K,)``."""
    mass = _class_sums(alpha, labels, num_classes)
    p = alpha / mass[labels]
    # p log p with log's argument clamped: value 0 at p = 0 and a finite derivative there
    # (xlogy's derivative log p + 1 is -inf at 0 and turns the chain into NaN).
    tiny = torch.finfo(p.dtype).tiny
    return -_class_sums(p * torch.log(p.clamp_min(tiny)), labels, num_classes)


@dataclass
class WeightModel:
    """The alpha parameterisation of one training set, with its penalties.

    Args:
        labels: ``(n,)`` int64 training labels (observed, possibly noisy).
        num_classes: ``K``.
        class_mass: ``count`` (``m_c = n_c``) or ``balanced`` (``m_c = n/K``).
        beta_entropy, beta_ess: penalty weights :math:`\beta_H`, :math:`\beta_E`.
        ess_floor: :math:`\rho` of the hinge ESS penalty.
        ess_penalty: ``hinge`` or ``log``.
    """

    labels: torch.Tensor
    num_classes: int
    class_mass: Literal["count", "balanced"] = "count"
    beta_entropy: float = 0.0
    beta_ess: float = 0.0
    ess_floor: float = 0.3
    ess_penalty: Literal["hinge", "log"] = "hinge"
    parameterization: Literal["softplus", "exp"] = "softplus"

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels)
        check_labels(self.labels, self.num_classes, "training labels")
        if self.parameterization not in ("softplus", "exp"):
            raise ConfigError(f"The 'parameterization' parameter must be one of 'softplus', 'exp'. "
                              f"Got {self.parameterization!r} instead.")
        if self.ess_penalty not in ("hinge", "log"):
            raise ConfigError(f"The 'ess_penalty' parameter must be one of 'hinge', 'log'. Got {self.ess_penalty!r} instead.")
        self.masses = class_masses(self.labels, self.num_classes, self.class_mass)
        self.counts = torch.bincount(self.labels, minlength=self.num_classes).to(torch.float64)

    @property
    def n(self) -> int:
        return int(self.labels.numel())

    def alpha(self, s: torch.Tensor) -> torch.Tensor:
        """Weights ``alpha(s)``: class-normalised softplus (:func:`normalized_weights`) or, with
        ``parameterization="exp"``, class-normalised exp (:func:`normalized_log_weights`)."""
        if s.shape != self.labels.shape:
            raise ConfigError(f"Expected s of shape {tuple(self.labels.shape)}, but got {tuple(s.shape)}.")
        if self.parameterization == "exp":
            return normalized_log_weights(s, self.labels.to(s.device), self.masses.to(s.device))
        return normalized_weights(s, self.labels.to(s.device), self.masses.to(s.device))

    def initial(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The parameters of uniform weights (every :math:`\alpha_i = m_c/n_c`)."""
        return torch.zeros(self.n, dtype=dtype) if self.parameterization == "exp" else initial_s(self.n, dtype)

    def entropy_penalty(self, alpha: torch.Tensor) -> torch.Tensor:
        r""":math:`R_H = \sum_c (n_c/n)(\log n_c - H_c)`."""
        H = entropy_per_class(alpha, self.labels.to(alpha.device), self.num_classes)
        c = self.counts.to(alpha.device, alpha.dtype)
        present = c > 0
        return ((c / self.n) * torch.where(present, torch.log(c.clamp_min(1)) - H, torch.zeros_like(H))).sum()

    def ess_penalty_value(self, alpha: torch.Tensor) -> torch.Tensor:
        r""":math:`R_E = \sum_c (n_c/n)\,\max(0,\rho-\mathrm{ESS}_c/n_c)^2` (hinge)
        or :math:`\sum_c (n_c/n)(-\log \mathrm{ESS}_c/n_c)` (log)."""
        c = self.counts.to(alpha.device, alpha.dtype)
        ratio = ess_per_class(alpha, self.labels.to(alpha.device), self.num_classes) / c.clamp_min(1)
        present = c > 0
        if self.ess_penalty == "hinge":
            per = torch.clamp(self.ess_floor - ratio, min=0) ** 2
        else:
            per = -torch.log(torch.where(present, ratio, torch.ones_like(ratio)))
        return ((c / self.n) * torch.where(present, per, torch.zeros_like(per))).sum()

    def penalty(self, alpha: torch.Tensor) -> torch.Tensor:
        r""":math:`\beta_H R_H(\alpha) + \beta_E R_E(\alpha)` (a scalar, differentiable)."""
        out = alpha.new_zeros(())
        if self.beta_entropy:
            out = out + self.beta_entropy * self.entropy_penalty(alpha)
        if self.beta_ess:
            out = out + self.beta_ess * self.ess_penalty_value(alpha)
        return out


def class_report(alpha: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 corrupted: Optional[torch.Tensor] = None) -> List[Dict[str, float]]:
    """One row per class: ``n_c``, mass, ``ESS_c``, ``ESS_c/n_c``, entropy, mean weight of clean/corrupted.

    Args:
        alpha: ``(n,)`` weights.
        labels: ``(n,)`` observed labels.
        corrupted: optional ``(n,)`` bool ground-truth mask of corrupted labels.
    """
    alpha = alpha.detach().to(torch.float64).cpu()
    labels = torch.as_tensor(labels).cpu()
    ess = ess_per_class(alpha, labels, num_classes)
    ent = entropy_per_class(alpha, labels, num_classes)
    rows = []
    for c in range(num_classes):
        m = labels == c
        n_c = int(m.sum())
        row = {
            "class": c,
            "n_c": n_c,
            "mass": float(alpha[m].sum()),
            "ess": float(ess[c]),
            "ess_ratio": float(ess[c] / n_c) if n_c else float("nan"),
            "entropy": float(ent[c]),
            "max_entropy": math.log(n_c) if n_c else float("nan"),
        }
        if corrupted is not None:
            cm = torch.as_tensor(corrupted).cpu().bool()
            clean, bad = m & ~cm, m & cm
            row["mean_w_clean"] = float(alpha[clean].mean()) if clean.any() else float("nan")
            row["mean_w_corrupted"] = float(alpha[bad].mean()) if bad.any() else float("nan")
            row["corruption_rate"] = float(bad.sum() / n_c) if n_c else float("nan")
        rows.append(row)
    return rows
