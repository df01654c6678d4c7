"""Third-party contenders shared by the benchmarks (``bench_libraries``, ``bench_precond``): the code a user of
another library writes for the same head problem, on the identical objective

.. math::

    F(W,\\alpha) = \\frac1n\\sum_i\\alpha_i\\ell_i(W) + \\frac\\lambda2\\|W\\|^2

(a constant-1 feature column, lambda on every parameter). Imported on use: ``torchopt`` is in the ``bench`` extra.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch

__all__ = ["interleaved", "lbfgs_fit", "torchopt_influence"]


def torchopt_influence(X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor, lam: float,
                       W_star: torch.Tensor, alpha: torch.Tensor, rtol: float = 1e-10, maxiter: int = 5000):
    r"""All-train influence on the mean validation loss by TorchOpt's implicit differentiation, on the identical objective.

    :math:`F(W,\alpha) = \frac1n\sum_i\alpha_i\ell_i(W) + \frac\lambda2\|W\|^2`; ``custom_root`` with the closed-form
    optimality condition :math:`\nabla_W F = \frac1n(\alpha\odot(P-Y))^\top X + \lambda W` (the fastest one a
    TorchOpt user can write) and ``solve_cg(rtol, maxiter)``; :math:`\hat\Delta_i = -\alpha_i\,\partial L_{val}/\partial\alpha_i`
    (DESIGN sign). Returns ``(scores, hvps)``. Reference: TorchOpt (Ren et al., JMLR 2023), ``torchopt.diff.implicit``.
    """
    import torch.nn.functional as Fn
    import torchopt

    n = X.shape[0]
    Y = Fn.one_hot(y, W_star.shape[0]).to(X.dtype)
    hvps = [0]

    def optimality(W, a):
        return (a[:, None] * (torch.softmax(X @ W.T, dim=1) - Y)).T @ X / n + lam * W

    base = torchopt.linear_solve.solve_cg(rtol=rtol, maxiter=maxiter)

    def solve(matvec, b):
        def counted(v):
            hvps[0] += 1
            return matvec(v)
        return base(counted, b)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def inner(W0, a):
        return W_star.clone()

    a = alpha.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():  # TorchOpt 0.7 calls the deprecated functorch.vjp
        warnings.simplefilter("ignore", FutureWarning)
        W: torch.Tensor = inner(W_star.detach().clone().requires_grad_(True), a)  # type: ignore[assignment]
        (g,) = torch.autograd.grad(Fn.cross_entropy(Xv @ W.T, yv), a)
    return -alpha * g, hvps[0]


def lbfgs_fit(X: torch.Tensor, y: torch.Tensor, K: int, lam: float, alpha: torch.Tensor, grad_tol: float,
              max_iter: int = 20000) -> torch.Tensor:
    """The fit a TorchOpt user writes: ``torch.optim.LBFGS`` (strong Wolfe, autograd) on the same objective, stopped
    when :math:`\\max|\nabla F|\\le` ``grad_tol``:math:`/\\sqrt{KD}` (so :math:`\\|\nabla F\\|_2\\le` ``grad_tol``)."""
    import math

    import torch.nn.functional as Fn

    n, D = X.shape
    W = torch.zeros(K, D, dtype=X.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, history_size=20,
                            tolerance_grad=grad_tol / math.sqrt(K * D), tolerance_change=1e-30,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        F = (alpha * Fn.cross_entropy(X @ W.T, y, reduction="none")).sum() / n + 0.5 * lam * (W * W).sum()
        F.backward()
        return F

    opt.step(closure)
    return W.detach()


def interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int) -> Tuple[Dict[str, List[float]], Dict[str, Any]]:
    """The timing protocol of the benchmarks: ``rounds`` rounds after one warm-up round, every function once per round
    in the given order (so a change of machine load hits all of them alike), process CPU seconds.

    Returns ``(seconds, last)``: the ``rounds`` timings of each name, and each function's last result.
    """
    seconds: Dict[str, List[float]] = {k: [] for k in fns}
    last: Dict[str, Any] = {}
    for r in range(rounds + 1):  # round 0 warms up
        for k, f in fns.items():
            t = time.process_time()
            last[k] = f()
            dt = time.process_time() - t
            if r:
                seconds[k].append(dt)
    return seconds, last
