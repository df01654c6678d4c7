r"""Hypergradients :math:`\partial J/\partial s` of the outer objective, behind one registry.

Outer objective (DESIGN section 2):

.. math::

    J(s) = L_{val}(W^*(\alpha(s))) + \beta_H R_H(\alpha(s)) + \beta_E R_{ESS}(\alpha(s)).

By the implicit function theorem, with :math:`H = \nabla^2_W F(W^*, \alpha)` and
:math:`V = H^{-1}\nabla_W L_{val}(W^*)`,

.. math::

    \frac{\partial L_{val}}{\partial \alpha_i} = -\frac1n\, g_i^\top V h_i, \qquad g_i = p_i - e_{y_i},

all ``n`` of them in one matrix product once ``V`` is known; the chain through the class
normalisation and softplus, and the penalties, are added by autograd in :func:`hypergradient`.
Methods differ only in how they approximate :math:`\partial L_{val}/\partial\alpha`; each is a
small dataclass registered in :data:`HYPERGRAD` and returns its cost with the gradient.

The approximation ladder (every rung has the signature of :class:`HypergradMethod`):

========== ====================================================== ============================
name        approximation of :math:`V = H^{-1}\nabla L_{val}`      cost reported
========== ====================================================== ============================
exact       dense Cholesky of the ``(K·D)^2`` Hessian                (dense solve)
cg          preconditioned CG to a relative residual               ``hvps``, ``extra['precond']``
neumann     :math:`\eta\sum_{k=0}^{K}(I-\eta H)^k\nabla L_{val}`     ``hvps`` (incl. power iteration)
unrolled    differentiate ``L_val`` through ``T`` GD steps (higher)  ``inner_steps`` (+ ``hvps``)
one_step    :math:`H \approx I/\eta` at the look-ahead point        ``inner_steps = 1``
first_order :math:`H \approx I` (TracIn-like dot products)          none
========== ====================================================== ============================

References:
    Pedregosa, "Hyperparameter optimization with approximate gradient", ICML 2016.
    Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017.
    Lorraine, Vicol & Duvenaud, "Optimizing millions of hyperparameters by implicit
    differentiation", AISTATS 2020 (Neumann series).
    Maclaurin, Duvenaud & Adams, "Gradient-based hyperparameter optimization through reversible
    learning", ICML 2015; Shaban et al., "Truncated back-propagation for bilevel optimization",
    AISTATS 2019 (unrolled and truncated differentiation).
    Ren, Zeng, Yang & Urtasun, "Learning to reweight examples for robust deep learning", ICML 2018
    (one-step look-ahead).
    Pruthi, Liu, Kale & Sundararajan, "Estimating training data influence by tracing gradient
    descent", NeurIPS 2020 (first-order dot products).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple

import torch

from .errors import ConfigError, NonFiniteError
from .head import InnerObjective, mean_ce, mean_ce_grad
from .precond import PRECONDITIONERS
from .registry import Registry
from .rows import TensorRows
from .validate import check_bool, check_choice, check_features, check_int, check_labels, check_number, renamed_field
from .weights import WeightModel

__all__ = [
    "HYPERGRAD",
    "BilevelProblem",
    "ConjugateGradient",
    "Exact",
    "FirstOrder",
    "HypergradMethod",
    "HypergradResult",
    "Neumann",
    "OneStep",
    "Unrolled",
    "ValAlphaGrad",
    "alpha_grad_from_v",
    "hypergradient",
    "largest_eigenvalue",
    "make_method",
]

HYPERGRAD: Registry = Registry("hypergradient method")


@dataclass
class BilevelProblem:
    r"""Everything the outer problem needs: the inner objective, the clean validation split, weights.

    Args:
        inner: the inner objective (:class:`~reweight.head.HeadObjective` on the training rows).
        X_val: ``(m, D)`` validation features (same columns as the training features).
        y_val: ``(m,)`` validation labels.
        weights: :class:`~reweight.weights.WeightModel` of the training set (``None`` for a bare
            target, e.g. one query of an attribution method: then only ``val_alpha_grad`` applies).
        all_classes: require every class in ``y_val`` (a validation split must hold them all; a
            single-query target need not).
        X_meta_val, y_meta_val: the held-out part of the trusted set (meta-val), which alone selects
            stopping steps and knobs (DESIGN section 5); ``None`` when nothing is held out. ``X_val``
            is then the meta-train part, the one that drives the hypergradients.
    """

    inner: InnerObjective
    X_val: torch.Tensor
    y_val: torch.Tensor
    weights: Optional[WeightModel] = None
    all_classes: bool = True
    X_meta_val: Optional[torch.Tensor] = None
    y_meta_val: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        check_features(self.X_val, "validation features", dim=self.inner.shape[1])
        check_labels(self.y_val, self.inner.K, "validation labels", n=self.X_val.shape[0],
                     require_all_classes=self.all_classes)
        if self.weights is not None and self.weights.n != self.inner.n:
            raise ConfigError(f"Weight model has {self.weights.n} samples but the training set has {self.inner.n}.")
        self.y_val = torch.as_tensor(self.y_val).to(self.X_val.device)
        if (self.X_meta_val is None) != (self.y_meta_val is None):
            raise ConfigError("BilevelProblem needs both X_meta_val and y_meta_val, or neither.")
        if self.X_meta_val is not None and self.y_meta_val is not None:
            check_features(self.X_meta_val, "meta-val features", dim=self.inner.shape[1])
            check_labels(self.y_meta_val, self.inner.K, "meta-val labels", n=self.X_meta_val.shape[0],
                         require_all_classes=False)
            self.y_meta_val = torch.as_tensor(self.y_meta_val).to(self.X_meta_val.device)

    def weight_model(self, where: str) -> WeightModel:
        """The weight model, or a ConfigError naming ``where`` for a bare problem (``weights=None``)."""
        if self.weights is None:
            raise ConfigError(f"{where} needs a BilevelProblem with a WeightModel (weights=None given).")
        return self.weights

    @property
    def has_meta_val(self) -> bool:
        """Whether a held-out meta-val part of the trusted set exists."""
        return self.X_meta_val is not None and self.X_meta_val.shape[0] > 0

    def trusted(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The whole trusted set: meta-train rows then meta-val rows."""
        if not self.has_meta_val:
            return self.X_val, self.y_val
        assert self.X_meta_val is not None and self.y_meta_val is not None
        return torch.cat([self.X_val, self.X_meta_val]), torch.cat([self.y_val, self.y_meta_val])

    def meta_val_score(self, W: torch.Tensor) -> Tuple[float, float]:
        """``(mean CE, accuracy)`` of the head ``W`` on meta-val (NaNs without meta-val): the selection criterion."""
        if not self.has_meta_val:
            return float("nan"), float("nan")
        assert self.X_meta_val is not None and self.y_meta_val is not None
        loss = float(mean_ce(W, self.X_meta_val, self.y_meta_val))
        acc = float(((self.X_meta_val @ W.T).argmax(1) == self.y_meta_val).double().mean())
        return loss, acc

    def val_loss(self, W: torch.Tensor) -> torch.Tensor:
        r""":math:`L_{val}(W)`: mean validation cross-entropy (no L2 term)."""
        return mean_ce(W, self.X_val, self.y_val)

    def val_grad(self, W: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla_W L_{val}(W)`, ``(K, D)``."""
        return mean_ce_grad(W, self.X_val, self.y_val)


@dataclass
class ValAlphaGrad:
    r"""A method's estimate of :math:`\partial L_{val}/\partial\alpha` and its cost."""

    grad_alpha: torch.Tensor
    v: Optional[torch.Tensor] = None
    hvps: int = 0
    inner_steps: int = 0
    rel_residual: float = float("nan")
    converged: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class HypergradResult:
    r"""Result of :func:`hypergradient`.

    Attributes:
        grad_s: ``(n,)`` :math:`\partial J/\partial s` (validation part + penalties, through the chain).
        grad_alpha: ``(n,)`` the method's :math:`\partial L_{val}/\partial\alpha`.
        grad_alpha_total: ``(n,)`` :math:`\partial J/\partial\alpha` (validation part + penalties), the
            gradient of mirror-descent (exponentiated-gradient) updates.
        v: :math:`H^{-1}\nabla_W L_{val}` when the method forms it (reusable by influence functions).
        val_loss, penalty, objective: :math:`L_{val}(W)`, :math:`\beta_H R_H + \beta_E R_E`, their sum.
        hvps, inner_steps, seconds, rel_residual, converged: cost and diagnostics.
    """

    grad_s: torch.Tensor
    grad_alpha: torch.Tensor
    v: Optional[torch.Tensor]
    val_loss: float
    penalty: float
    objective: float
    hvps: int
    inner_steps: int
    seconds: float
    rel_residual: float
    converged: bool
    method: str
    extra: Dict[str, Any] = field(default_factory=dict)
    grad_alpha_total: Optional[torch.Tensor] = None


class HypergradMethod(Protocol):
    """What a registered method implements."""

    def val_alpha_grad(self, problem: BilevelProblem, W: torch.Tensor, alpha: torch.Tensor,
                       v0: Optional[torch.Tensor] = None) -> ValAlphaGrad: ...


def alpha_grad_from_v(inner: InnerObjective, W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r""":math:`\partial L_{val}/\partial\alpha_i = -\frac1n g_i^\top V h_i` for all ``i`` at once, ``(n,)``.

    The formula lives in :meth:`reweight.head.HeadObjective.alpha_grad_from_v`; this is its
    functional spelling.

    Args:
        inner: the inner objective (features ``h_i`` and labels).
        W: ``(K, D)`` head at which the residuals :math:`g_i` are taken (the inner optimum).
        v: ``(K, D)`` :math:`V = H^{-1}\nabla_W L_{val}` (or an approximation of it).
    """
    return inner.alpha_grad_from_v(W, v)


@HYPERGRAD.register("exact")
@dataclass(frozen=True)
class Exact:
    """Implicit differentiation with a dense Cholesky solve of :math:`H V = \\nabla L_{val}` (small ``K·D``)."""

    def val_alpha_grad(self, problem: BilevelProblem, W: torch.Tensor, alpha: torch.Tensor,
                       v0: Optional[torch.Tensor] = None) -> ValAlphaGrad:
        H = problem.inner.hessian(W, alpha)
        sol = H.solve(problem.val_grad(W), method="dense")
        return ValAlphaGrad(problem.inner.alpha_grad_from_v(W, sol.x), v=sol.x, rel_residual=sol.rel_residual)


@HYPERGRAD.register("cg")
@dataclass(frozen=True)
class ConjugateGradient:
    r"""Implicit differentiation with CG on the vectorised HVP, warm-started from the previous ``V``.

    Args:
        rtol: relative residual :math:`\|HV - \nabla L_{val}\| / \|\nabla L_{val}\|` to stop at (the
            one default of the CG hypergradient; ``tol`` is its deprecated name).
        max_iter: HVP budget.
        warm_start: start CG from the previous outer step's ``V``.
        precond: preconditioner of the solve (:meth:`reweight.head.HeadHessian.solve`): ``auto`` (cost model),
            ``dense``, ``kfac``, ``block_jacobi`` or ``none``. Its name and build seconds are reported in ``extra``.
    """

    rtol: float = 1e-6
    max_iter: int = 500
    warm_start: bool = True
    precond: str = "auto"
    tol: Optional[float] = None

    def __post_init__(self) -> None:
        renamed_field(self, "tol", "rtol", "cg")
        check_number(self.rtol, "rtol", "cg", low=0.0, low_open=True)
        check_int(self.max_iter, "max_iter", "cg", minimum=1)
        check_bool(self.warm_start, "warm_start", "cg")
        check_choice(self.precond, "precond", "cg", ("auto",) + PRECONDITIONERS)

    def val_alpha_grad(self, problem: BilevelProblem, W: torch.Tensor, alpha: torch.Tensor,
                       v0: Optional[torch.Tensor] = None) -> ValAlphaGrad:
        H = problem.inner.hessian(W, alpha)
        sol = H.solve(problem.val_grad(W), method="cg", rtol=self.rtol, max_iter=self.max_iter,
                      x0=v0 if self.warm_start else None, precond=self.precond)
        return ValAlphaGrad(problem.inner.alpha_grad_from_v(W, sol.x, P=H.P), v=sol.x, hvps=sol.hvps,
                            rel_residual=sol.rel_residual, converged=sol.converged,
                            extra={"precond": sol.precond, "precond_seconds": sol.precond_seconds})


def largest_eigenvalue(matvec: Callable[[torch.Tensor], torch.Tensor], shape: Tuple[int, ...],
                       dtype: torch.dtype, device: torch.device | str = "cpu", iters: int = 20,
                       seed: int = 0) -> float:
    r"""Power-iteration estimate of the largest eigenvalue :math:`\lambda_{max}` of a symmetric PSD operator.

    Runs ``iters`` products :math:`u \leftarrow A u / \|A u\|` from a seeded Gaussian start and returns
    the last Rayleigh quotient :math:`u^\top A u` (a lower bound of :math:`\lambda_{max}` that is tight
    when the top of the spectrum is separated; callers add a safety factor).

    Args:
        matvec: ``u -> A u`` for tensors of shape ``shape``.
        shape: shape of the operator's input (``(K, D)`` for the head Hessian).
        dtype, device: of the start vector.
        iters: number of products (>= 1); each is one HVP.
        seed: seed of the start vector (fixed, so results are deterministic).

    Raises:
        ConfigError: for ``iters < 1``.

    References:
        von Mises & Pollaczek-Geiringer, "Praktische Verfahren der Gleichungsauflösung", ZAMM 1929.
    """
    check_int(iters, "iters", "largest_eigenvalue", minimum=1)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    u = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    u = u / torch.linalg.vector_norm(u)
    est = 0.0
    for _ in range(iters):
        Au = matvec(u)
        est = float((u * Au).sum())
        nrm = torch.linalg.vector_norm(Au)
        if not nrm > 0:
            return 0.0
        u = Au / nrm
    return est


#: safety factor on the power-iteration estimate: eta = 1 / (EIG_SAFETY * lambda_max_hat).
EIG_SAFETY = 1.05


def _default_step(H: Any, W: torch.Tensor, power_iters: int) -> float:
    lam_max = largest_eigenvalue(H.matvec, tuple(W.shape), W.dtype, W.device, iters=power_iters)
    return 1.0 / (EIG_SAFETY * lam_max)


@HYPERGRAD.register("neumann")
@dataclass(frozen=True)
class Neumann:
    r"""Implicit differentiation with a truncated Neumann series for :math:`H^{-1}`.

    .. math::

        V \approx \eta \sum_{k=0}^{K} (I - \eta H)^k\, \nabla_W L_{val}(W^*), \qquad
        \frac{\partial L_{val}}{\partial\alpha_i} \approx -\frac1n g_i^\top V h_i,

    exact as :math:`K \to\infty` when :math:`0 < \eta < 2/\lambda_{max}(H)`; the error after
    ``K`` terms is :math:`H^{-1}(I-\eta H)^{K+1}\nabla L_{val}`, i.e. it contracts by
    :math:`1 - \eta\lambda_{min}` per term. The residual :math:`\nabla L_{val} - H V =
    (I-\eta H)^{K+1}\nabla L_{val}` is the last series term, so it is reported at no extra cost and
    the series stops early once it falls below ``tol``.

    Args:
        order: ``K``, the number of terms after the first, >= 1. The series costs ``K + 1`` HVPs
            (the last one yields the residual).
        eta: step :math:`\eta`; ``None`` (default) uses :math:`\eta = 1/(1.05\,\hat\lambda_{max})` with
            :math:`\hat\lambda_{max}` from ``power_iters`` power iterations on ``H`` (their HVPs are
            counted in the cost).
        power_iters: power iterations for the default ``eta``.
        rtol: relative residual at which the series stops early; ``converged`` is False when ``order``
            terms did not reach it (recorded, never silent). ``tol`` is its deprecated name.

    References:
        Lorraine, Vicol & Duvenaud, "Optimizing millions of hyperparameters by implicit
        differentiation", AISTATS 2020.
    """

    order: int = 100
    eta: Optional[float] = None
    power_iters: int = 20
    rtol: float = 1e-6
    tol: Optional[float] = None

    def __post_init__(self) -> None:
        renamed_field(self, "tol", "rtol", "neumann")
        check_int(self.order, "order", "neumann", minimum=1)
        check_number(self.eta, "eta", "neumann", low=0.0, low_open=True, allow_none=True)
        check_int(self.power_iters, "power_iters", "neumann", minimum=1)
        check_number(self.rtol, "rtol", "neumann", low=0.0, low_open=True)

    def val_alpha_grad(self, problem: BilevelProblem, W: torch.Tensor, alpha: torch.Tensor,
                       v0: Optional[torch.Tensor] = None) -> ValAlphaGrad:
        H = problem.inner.hessian(W, alpha)
        eta = self.eta if self.eta is not None else _default_step(H, W, self.power_iters)
        b = problem.val_grad(W)
        bnorm = float(torch.linalg.vector_norm(b)) or 1.0
        p, acc = b.clone(), torch.zeros_like(b)
        terms, rel = 0, 1.0
        while True:
            acc = acc + p  # sum_{k<=terms} (I - eta H)^k b
            p = p - eta * H.matvec(p)  # (I - eta H)^{terms+1} b == b - H V
            rel = float(torch.linalg.vector_norm(p)) / bnorm
            if rel <= self.rtol or terms >= self.order or not math.isfinite(rel):
                break
            terms += 1
        v = eta * acc
        if not math.isfinite(rel):  # the series overflowed (eta > 2/lambda_max): make it loud downstream
            v = torch.full_like(b, float("nan"))
        return ValAlphaGrad(problem.inner.alpha_grad_from_v(W, v), v=v, hvps=H.hvps, rel_residual=rel,
                            converged=rel <= self.rtol, extra={"eta": eta, "terms": terms})


def _in_memory_rows(inner: InnerObjective, method: str) -> torch.Tensor:
    """The training rows as one tensor (methods that differentiate through them with autograd need it)."""
    if not isinstance(inner.rows, TensorRows):
        raise ConfigError(f"The '{method}' hypergradient needs in-memory training features; got a "
                          f"{type(inner.rows).__name__} source. Use 'cg' or 'exact' for streamed or sharded rows.")
    return inner.rows.X


def _gd_steps_no_graph(inner: InnerObjective, W: torch.Tensor, alpha: torch.Tensor, lr: float,
                       steps: int) -> torch.Tensor:
    """``steps`` plain gradient-descent steps on ``F(., alpha)`` without a graph (closed-form gradient)."""
    with torch.no_grad():
        for _ in range(steps):
            W = W - lr * inner.grad(W, alpha)
    return W


@HYPERGRAD.register("unrolled")
@dataclass(frozen=True)
class Unrolled:
    r"""Differentiate :math:`L_{val}(W_T)` through ``T`` inner gradient-descent steps (``higher``).

    .. math::

        W_0 = W,\quad W_{t+1} = W_t - \eta\,\nabla_W F(W_t, \alpha),\qquad
        \frac{\partial L_{val}}{\partial\alpha} \approx \frac{d\, L_{val}(W_T)}{d\alpha}.

    Warm-started from the current head ``W`` (the inner optimum, in the bilevel loop). Only the
    last ``truncate`` steps are differentiated (truncated back-propagation); the first
    ``T - truncate`` run without a graph. Started at the exact optimum, :math:`W_t = W^*` and
    :math:`dW_T/d\alpha = -\eta\sum_{t<T}(I-\eta H)^t\,\partial_\alpha\nabla_W F`, so the result
    equals the Neumann series of order ``T - 1`` with the same :math:`\eta` -- it tends to the
    exact hypergradient as ``T`` grows.

    ``higher`` (unmaintained since 2021) is imported here only. It is handed a bias-free
    :class:`torch.nn.Linear` holding only the head's weight (no frozen sub-modules, which higher
    refuses), and each functional context is closed and its references dropped before returning
    (higher's patched modules form reference cycles that otherwise pile up across outer steps).

    Args:
        steps: ``T``, inner gradient-descent steps (>= 1).
        truncate: differentiate through only the last ``truncate`` steps (``None`` = all ``T``).
        lr: inner step :math:`\eta`; ``None`` uses :math:`1/(1.05\,\hat\lambda_{max}(H))` from
            ``power_iters`` power iterations (HVPs counted).
        power_iters: power iterations for the default ``lr``.

    Cost: ``inner_steps = T`` (each differentiated step also costs about one HVP in the backward
    pass). ``converged`` is False when the inner loop diverged (final :math:`\|\nabla_W F\|` above
    ``max(10 x initial, 1e-8)``), which happens for :math:`\eta > 2/\lambda_{max}`; there is no
    linear-system residual, so ``rel_residual`` is NaN.

    References:
        Maclaurin, Duvenaud & Adams, ICML 2015; Franceschi et al., "Forward and reverse
        gradient-based hyperparameter optimization", ICML 2017; Shaban et al., "Truncated
        back-propagation for bilevel optimization", AISTATS 2019; Grefenstette et al.,
        "Generalized inner loop meta-learning" (higher), arXiv:1910.01727, 2019.
    """

    steps: int = 50
    truncate: Optional[int] = None
    lr: Optional[float] = None
    power_iters: int = 20

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", "unrolled", minimum=1)
        if self.truncate is not None:
            check_int(self.truncate, "truncate", "unrolled", minimum=1)
            if self.truncate > self.steps:
                raise ConfigError(f"The 'truncate' parameter of unrolled must be <= steps ({self.steps}). "
                                  f"Got {self.truncate!r} instead.")
        check_number(self.lr, "lr", "unrolled", low=0.0, low_open=True, allow_none=True)
        check_int(self.power_iters, "power_iters", "unrolled", minimum=1)

    def val_alpha_grad(self, problem: BilevelProblem, W: torch.Tensor, alpha: torch.Tensor,
                       v0: Optional[torch.Tensor] = None) -> ValAlphaGrad:
        import higher

        inner = problem.inner
        X = _in_memory_rows(inner, "unrolled")
        hvps = 0
        if self.lr is None:
            H = inner.hessian(W, alpha)
            lr = _default_step(H, W, self.power_iters)
            hvps = H.hvps
        else:
            lr = float(self.lr)
        trunc = self.steps if self.truncate is None else self.truncate
        W0 = W.detach()
        g0 = float(torch.linalg.vector_norm(inner.grad(W0, alpha)))
        Wstart = _gd_steps_no_graph(inner, W0, alpha, lr, self.steps - trunc)
        K, D = inner.shape
        head = torch.nn.Linear(D, K, bias=False).to(device=W.device, dtype=W.dtype)
        with torch.no_grad():
            head.weight.copy_(Wstart)
        a = alpha.detach().clone().requires_grad_(True)
        opt = torch.optim.SGD(head.parameters(), lr=lr)
        with torch.enable_grad():
            with higher.innerloop_ctx(head, opt, copy_initial_weights=True, track_higher_grads=True) as (fhead, diffopt):
                for _ in range(trunc):
                    Wt = fhead.weight
                    losses = torch.nn.functional.cross_entropy(fhead(X), inner.y, reduction="none")
                    F = (a * losses).sum() / inner.n + 0.5 * inner.lam * (Wt * Wt).sum()
                    diffopt.step(F)
                WT = fhead.weight
                val = problem.val_loss(WT)
                (grad_alpha,) = torch.autograd.grad(val, a)
                WT = WT.detach()
                del Wt, losses, F, val
            del fhead, diffopt
        del opt, head
        gT = float(torch.linalg.vector_norm(inner.grad(WT, alpha)))
        converged = math.isfinite(gT) and gT <= max(10.0 * g0, 1e-8)
        return ValAlphaGrad(grad_alpha.detach(), v=None, hvps=hvps, inner_steps=self.steps,
                            converged=converged,
                            extra={"lr": lr, "truncate": trunc, "grad_norm_start": g0, "grad_norm_end": gT})


@HYPERGRAD.register("one_step")
@dataclass(frozen=True)
class OneStep:
    r"""One-step look-ahead (Learning to Reweight): differentiate :math:`L_{val}` after one GD step.

    .. math::

        W' = W - \eta\,\nabla_W F(W, \alpha), \qquad
        \frac{\partial L_{val}(W')}{\partial\alpha_i} = -\frac{\eta}{n}\, g_i(W)^\top\,
        \nabla_W L_{val}(W')\, h_i,

    exact for the one-step objective; as a hypergradient it replaces :math:`H^{-1}` by
    :math:`\eta I` (at the inner optimum :math:`W' = W^*`, so it equals ``neumann`` with order 0).

    Args:
        lr: :math:`\eta`; ``None`` uses :math:`1/(1.05\,\hat\lambda_{max}(H))` from ``power_iters``
            power iterations (HVPs counted), which matches the scale of :math:`H^{-1}` along the top
            of the spectrum.
        power_iters: power iterations for the default ``lr``.

    References:
        Ren, Zeng, Yang & Urtasun, "Learning to reweight examples for robust deep learning",
        ICML 2018.
    """

    lr: Optional[float] = None
    power_iters: int = 20

    def __post_init__(self) -> None:
        check_number(self.lr, "lr", "one_step", low=0.0, low_open=True, allow_none=True)
        check_int(self.power_iters, "power_iters", "one_step", minimum=1)

    def val_alpha_grad(self, problem: BilevelProblem, W: torch.Tensor, alpha: torch.Tensor,
                       v0: Optional[torch.Tensor] = None) -> ValAlphaGrad:
        hvps = 0
        if self.lr is None:
            H = problem.inner.hessian(W, alpha)
            lr = _default_step(H, W, self.power_iters)
            hvps = H.hvps
        else:
            lr = float(self.lr)
        W1 = W - lr * problem.inner.grad(W, alpha)
        v = lr * problem.val_grad(W1)
        return ValAlphaGrad(problem.inner.alpha_grad_from_v(W, v), v=v, hvps=hvps, inner_steps=1,
                            extra={"lr": lr})


@HYPERGRAD.register("first_order")
@dataclass(frozen=True)
class FirstOrder:
    r"""First-order (identity-Hessian, TracIn-like) hypergradient: :math:`H \approx I`.

    .. math::

        \frac{\partial L_{val}}{\partial\alpha_i} \approx -\frac1n
        \langle \nabla_W L_{val}(W),\ g_i h_i^\top\rangle,

    i.e. the dot product of the validation gradient with each sample's loss gradient (one
    TracIn checkpoint with unit step). Its scale is that of :math:`H^{-1}` replaced by ``I``, so
    only its direction is comparable with the exact hypergradient. No HVPs.

    References:
        Pruthi, Liu, Kale & Sundararajan, "Estimating training data influence by tracing gradient
        descent", NeurIPS 2020.
    """

    def val_alpha_grad(self, problem: BilevelProblem, W: torch.Tensor, alpha: torch.Tensor,
                       v0: Optional[torch.Tensor] = None) -> ValAlphaGrad:
        v = problem.val_grad(W)
        return ValAlphaGrad(problem.inner.alpha_grad_from_v(W, v), v=v)


def make_method(name: str, options: Optional[Mapping[str, Any]] = None) -> HypergradMethod:
    """Instantiate the registered method ``name`` with ``options``.

    Raises:
        ConfigError: for an unknown name (lists the registered ones) or unknown option (lists valid ones).
    """
    return HYPERGRAD.create(name, options)


def hypergradient(method: HypergradMethod, problem: BilevelProblem, s: torch.Tensor, W: torch.Tensor,
                  v0: Optional[torch.Tensor] = None, name: str = "") -> HypergradResult:
    r""":math:`\partial J/\partial s` at ``s`` with the inner solution ``W`` (solve it first).

    The method supplies :math:`\partial L_{val}/\partial\alpha`; this function adds the chain
    :math:`\partial\alpha/\partial s` (class normalisation, softplus) and the penalties by autograd:
    :math:`\partial J/\partial s = (\partial\alpha/\partial s)^\top(\partial L_{val}/\partial\alpha
    + \partial R/\partial\alpha)`.

    Raises:
        NonFiniteError: if the result is NaN/Inf (names the method and the quantity).
    """
    if problem.weights is None:
        raise ConfigError("hypergradient needs a BilevelProblem with a weight model (weights=None given).")
    t0 = time.perf_counter()
    s_ = s.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        alpha = problem.weights.alpha(s_)
        vag = method.val_alpha_grad(problem, W, alpha.detach(), v0=v0)
        pen = problem.weights.penalty(alpha)
        total = (alpha * vag.grad_alpha.detach()).sum() + pen
        grad_s, grad_alpha_total = torch.autograd.grad(total, [s_, alpha])
    val_loss = float(problem.val_loss(W))
    label = name or type(method).__name__
    for what, t in (("dL_val/dalpha", vag.grad_alpha), ("dJ/ds", grad_s)):
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"Hypergradient method {label!r} produced a non-finite {what}.")
    return HypergradResult(
        grad_s=grad_s.detach(), grad_alpha=vag.grad_alpha.detach(), grad_alpha_total=grad_alpha_total.detach(),
        v=vag.v, val_loss=val_loss,
        penalty=float(pen.detach()), objective=val_loss + float(pen.detach()), hvps=vag.hvps, inner_steps=vag.inner_steps,
        seconds=time.perf_counter() - t0, rel_residual=vag.rel_residual, converged=vag.converged,
        method=label, extra=vag.extra,
    )
