r"""Faithfulness of attributions: retrain without (or with only) each query's top-K supporters.

For a query ``x`` with label ``y`` and per-query scores :math:`\tau_i(x)` (positive = ``i`` helps
``x``'s loss), let :math:`T_K` be the ``K`` highest-scoring training samples.

* ``remove``: retrain with :math:`\alpha_i = 0` on :math:`T_K` (others unchanged, the
  leave-one-out convention) and measure the change of the query's confidence
  :math:`p_y(x)` and accuracy; a faithful method drops the confidence more than removing ``K``
  random samples does.
* ``keep``: train a head (same :math:`\lambda`) on :math:`T_K` only, with the mean over the kept
  samples (:math:`\frac1K\sum_{i\in T_K}\ell_i + \frac\lambda2\|W\|^2`); a faithful method gives a
  higher confidence than ``K`` random samples.

Reference:
    Hooker, Erhan, Kindermans & Kim, "A benchmark for interpretability methods in deep neural
    networks" (ROAR), NeurIPS 2019; Yeh et al., NeurIPS 2018 (removing representer supporters).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from ..errors import ConfigError, DataError
from ..head import HeadObjective, solve_head
from ..seeding import torch_generator
from .base import AttributionProblem, check_queries, check_top_k

__all__ = ["faithfulness"]


def _conf(W: torch.Tensor, x: torch.Tensor, y: int) -> tuple:
    p = torch.softmax(x @ W.T, dim=0)
    return float(p[y]), float(int(p.argmax()) == y)


def faithfulness(problem: AttributionProblem, scores: torch.Tensor, X_query: torch.Tensor, y_query: torch.Tensor,
                 ks: Sequence[int] = (1, 5, 10, 20, 50), modes: Sequence[str] = ("remove", "keep"),
                 n_random: int = 3, seed: int = 0, grad_tol: float = 1e-8) -> List[Dict[str, Any]]:
    """Confidence/accuracy of each query after removing / keeping only its top-K or K random samples.

    Args:
        problem: the trained head.
        scores: ``(Q, n)`` per-query scores (Delta scale).
        X_query, y_query: ``(Q, D)`` queries and ``(Q,)`` labels.
        ks: the K values, each in ``1..n``.
        modes: any of ``remove``, ``keep``.
        n_random: random draws per (query, K) for the baseline (``faithfulness_random`` stream).

    Returns:
        One dict per (query, mode, K, selection): ``query, mode, k, selection`` (``top`` or
        ``random``), ``conf``, ``acc``, ``conf_full``, ``acc_full``, ``d_conf`` (``conf - conf_full``).

    Raises:
        ConfigError: if a K is not in ``1..n`` or a mode is unknown (before any retraining).
        DataError: for mis-shaped scores or queries.
    """
    n = problem.n
    ks = [check_top_k(k, n, "faithfulness", "ks") for k in ks]
    for m in modes:
        if m not in ("remove", "keep"):
            raise ConfigError(f"The 'modes' parameter of faithfulness must contain only 'remove' and 'keep'. Got {m!r} instead.")
    check_queries(X_query, y_query, problem.D, problem.K, "faithfulness")
    if scores.shape != (X_query.shape[0], n):
        raise DataError(f"The 'scores' parameter of faithfulness must have shape ({X_query.shape[0]}, {n}). "
                        f"Got {tuple(scores.shape)} instead.")
    inner, dt, dev = problem.inner, problem.inner.X.dtype, problem.inner.X.device
    X_query, y_query = X_query.to(dev, dt), torch.as_tensor(y_query).to(dev)
    g = torch_generator(seed, "faithfulness_random")
    rows: List[Dict[str, Any]] = []
    for q in range(X_query.shape[0]):
        x, y = X_query[q], int(y_query[q])
        c0, a0 = _conf(problem.W, x, y)
        order = torch.argsort(scores[q], descending=True)
        for k in ks:
            sels = [("top", order[:k])] + [("random", torch.randperm(n, generator=g)[:k]) for _ in range(n_random)]
            for mode in modes:
                for sel, idx in sels:
                    idx = idx.to(dev)
                    if mode == "remove":
                        a = problem.alpha.clone()
                        a[idx] = 0.0
                        W = solve_head(inner, a, W0=problem.W, grad_tol=grad_tol).W
                    else:
                        sub = HeadObjective(inner.X[idx], inner.y[idx], problem.K, problem.lam)
                        W = solve_head(sub, problem.alpha[idx].clone(), grad_tol=grad_tol).W
                    c, acc = _conf(W, x, y)
                    rows.append({"query": q, "mode": mode, "k": k, "selection": sel, "conf": c, "acc": acc,
                                 "conf_full": c0, "acc_full": a0, "d_conf": c - c0})
    return rows
