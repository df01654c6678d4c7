r"""Linear datamodeling score (LDS; Park et al. 2023, as in TRAK and dattri).

Draw ``M`` random subsets :math:`S_m` holding a fraction (default 1/2) of the training set, retrain
the head on each (weights :math:`\alpha_i` kept on :math:`S_m`, set to 0 elsewhere, no
re-normalisation -- the leave-one-out convention of :mod:`reweight.attribution.loo`) and record the
target losses. With scores :math:`\tau_i` on the :math:`\Delta` scale (positive = removing ``i``
raises the loss), the additive prediction of the target loss after removing the complement is

.. math::

    \hat L(S_m) = L(W^*) + \sum_{i\notin S_m}\tau_i,

and the LDS of a target is the Spearman rank correlation between :math:`\hat L(S_m)` and the
actual :math:`L(W^*_{S_m})` over the ``M`` subsets (averaged over targets).

Reference:
    Park, Georgiev, Ilyas, Leclerc & Madry, "TRAK: Attributing model behavior at scale", ICML 2023;
    Deng et al., "dattri: A library for efficient data attribution", NeurIPS 2024 (datasets and benchmarks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..head import solve_head
from ..seeding import numpy_rng
from .base import AttributionProblem, check_queries

__all__ = ["SubsetOutputs", "lds", "random_subsets", "subset_outputs"]


def random_subsets(n: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``(M, n)`` boolean masks, each holding exactly ``round(fraction * n)`` random samples (``lds_subsets`` stream).

    Raises:
        ConfigError: for ``num_subsets < 2`` or ``fraction`` outside (0, 1).
    """
    if isinstance(num_subsets, bool) or not isinstance(num_subsets, int) or num_subsets < 2:
        raise ConfigError(f"The 'num_subsets' parameter of random_subsets must be an int >= 2 (a rank correlation "
                          f"needs at least two points). Got {num_subsets!r} instead.")
    if not 0 < fraction < 1:
        raise ConfigError(f"The 'fraction' parameter of random_subsets must be in (0, 1). Got {fraction!r} instead.")
    rng = numpy_rng(seed, "lds_subsets")
    k = int(round(fraction * n))
    masks = np.zeros((num_subsets, n), dtype=bool)
    for m in range(num_subsets):
        masks[m, rng.choice(n, size=k, replace=False)] = True
    return torch.from_numpy(masks)


@dataclass
class SubsetOutputs:
    """Target losses of heads retrained on each subset: ``val`` ``(M,)`` and ``query`` ``(M, Q)``; ``base_*`` at ``W*``."""

    masks: torch.Tensor
    val: Optional[torch.Tensor]
    query: Optional[torch.Tensor]
    base_val: Optional[float]
    base_query: Optional[torch.Tensor]
    seconds: float


def subset_outputs(problem: AttributionProblem, masks: torch.Tensor, X_val: Optional[torch.Tensor] = None,
                   y_val: Optional[torch.Tensor] = None, X_query: Optional[torch.Tensor] = None,
                   y_query: Optional[torch.Tensor] = None, grad_tol: float = 1e-8) -> SubsetOutputs:
    r"""Retrain the head on each subset (:math:`\alpha` masked, warm start :math:`W^*`) and record the losses.

    Raises:
        DataError: if ``masks`` is not ``(M, n)`` boolean or features have the wrong width.
    """
    masks = torch.as_tensor(masks)
    if masks.ndim != 2 or masks.shape[1] != problem.n or masks.dtype != torch.bool:
        raise DataError(f"The 'masks' parameter of subset_outputs must be a boolean (M, {problem.n}) tensor. "
                        f"Got shape {tuple(masks.shape)} and dtype {masks.dtype} instead.")
    inner, dt, dev = problem.inner, problem.inner.X.dtype, problem.inner.X.device
    ce = torch.nn.functional.cross_entropy
    sets = []
    for Xs, ys in ((X_val, y_val), (X_query, y_query)):
        if Xs is not None:
            check_queries(Xs, ys, problem.D, problem.K, "subset_outputs")
            sets.append((Xs.to(dev, dt), torch.as_tensor(ys).to(dev)))
        else:
            sets.append(None)
    t0 = time.perf_counter()
    val, query = [], []
    for mask in masks:
        W = solve_head(inner, problem.alpha * mask.to(dev, dt), W0=problem.W, grad_tol=grad_tol).W
        if sets[0] is not None:
            val.append(float(ce(sets[0][0] @ W.T, sets[0][1])))
        if sets[1] is not None:
            query.append(ce(sets[1][0] @ W.T, sets[1][1], reduction="none").cpu())
    return SubsetOutputs(
        masks=masks, val=torch.tensor(val, dtype=torch.float64) if sets[0] is not None else None,
        query=torch.stack(query).to(torch.float64) if sets[1] is not None else None,
        base_val=float(ce(sets[0][0] @ problem.W.T, sets[0][1])) if sets[0] is not None else None,
        base_query=ce(sets[1][0] @ problem.W.T, sets[1][1], reduction="none").cpu() if sets[1] is not None else None,
        seconds=time.perf_counter() - t0)


def lds(scores: torch.Tensor, masks: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    r"""Per-target LDS: Spearman over subsets of :math:`\sum_{i\notin S_m}\tau_i` vs the actual loss.

    Args:
        scores: ``(n,)`` (one target) or ``(Q, n)`` scores on the :math:`\Delta` scale.
        masks: ``(M, n)`` boolean subset masks.
        actual: ``(M,)`` or ``(M, Q)`` actual target losses of the subset heads.

    Returns:
        ``(Q,)`` Spearman correlations (``(1,)`` for one target); NaN where a side is constant.

    Raises:
        DataError: if the shapes disagree.
    """
    from scipy.stats import spearmanr

    S = scores[None, :] if scores.ndim == 1 else scores
    A = actual[:, None] if actual.ndim == 1 else actual
    masks = torch.as_tensor(masks)
    if masks.ndim != 2 or masks.shape[1] != S.shape[1] or A.shape != (masks.shape[0], S.shape[0]):
        raise DataError(f"Expected scores (Q, n), masks (M, n) and actual (M, Q); got {tuple(S.shape)}, "
                        f"{tuple(masks.shape)} and {tuple(A.shape)}.")
    pred = (~masks).to(torch.float64) @ S.to(torch.float64).T.cpu()  # (M, Q)
    out = []
    for q in range(S.shape[0]):
        a, p = A[:, q].numpy(), pred[:, q].numpy()
        out.append(float(spearmanr(a, p).statistic) if np.ptp(a) > 0 and np.ptp(p) > 0 else float("nan"))
    return torch.tensor(out, dtype=torch.float64)
