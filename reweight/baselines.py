r"""Reweighting baselines that also produce per-sample weights and a trained head.

Every baseline shares the bilevel method's inputs -- the :class:`~reweight.hypergrad.BilevelProblem`
(training features and observed labels, the L2 head with its :math:`\lambda`, the clean validation
split) -- and returns a :class:`BaselineResult` with

* ``alpha`` ``(n,)``: final per-sample weights, rescaled so that :math:`\sum_i\alpha_i = n` (mean 1,
  the scale of the bilevel method's ``count`` class masses), used for the AUROC of flagging
  corrupted samples;
* ``W`` ``(K, D)``: **the exact L2-regularised head trained with those weights**,
  :math:`W = \arg\min_W F(W, \alpha)` (:func:`~reweight.head.solve_head`), used for test accuracy.
  This is the head the bilevel method reports too, so a difference in accuracy comes from the
  weights alone, not from an under-trained SGD head; for L2RW and MWN their own SGD-trained head is
  kept as ``W_sgd`` (and its accuracy may be reported beside).

Registered baselines (:data:`BASELINES`):

``uniform``
    :math:`\alpha_i = 1`.
``class_balanced``
    Cui et al. 2019: :math:`\alpha_i \propto (1-\beta)/(1-\beta^{n_{y_i}})` (inverse effective number of
    samples of the sample's class), normalised to :math:`\sum_i \alpha_i = n` (Cui et al. normalise
    :math:`\sum_c w_c = K`; the two differ by one global factor, which we fix so :math:`\lambda` keeps
    its meaning).
``l2rw``
    Learning to Reweight, Ren et al. 2018: per mini-batch ``B``, the one-step look-ahead
    meta-gradient at :math:`\epsilon = 0`,
    :math:`\partial L_{val}(W - \eta\nabla_W[\sum_{i\in B}\epsilon_i\ell_i + \tfrac\lambda2\|W\|^2])/\partial\epsilon_i
    = -\eta\langle\nabla L_{val}(W'), g_i h_i^\top\rangle` with :math:`W' = W - \eta\lambda W`; weights
    :math:`w_i = \max(0, \langle\nabla L_{val}(W'), g_i h_i^\top\rangle)` normalised to sum 1 over the
    batch (all zero if none is positive); then one SGD(momentum) step on
    :math:`\sum_{i\in B} w_i\ell_i + \tfrac\lambda2\|W\|^2`. The validation gradient is taken on the whole
    clean validation split (it is small). Final ``alpha``: the average over all epochs of
    :math:`|B|\,w_i` (1 = the uniform weight).
``mwn``
    Meta-Weight-Net, Shu et al. 2019: an MLP ``1 -> hidden -> 1`` (ReLU, sigmoid output) maps a
    sample's loss to its weight :math:`\mathcal V(\ell_i;\theta)`. Per mini-batch: pseudo-update
    :math:`\hat W(\theta) = W - \eta\nabla_W[\tfrac1{|B|}\sum_{i\in B}\mathcal V(\ell_i;\theta)\ell_i + \tfrac\lambda2\|W\|^2]`,
    one Adam step on :math:`\theta` for :math:`L_{val}(\hat W(\theta))` (the clean validation split),
    then one SGD(momentum) step on ``W`` with the updated weights. Final ``alpha``:
    :math:`\mathcal V(\ell_i(W_{sgd});\theta)` for every training sample.

Budget (shared with the bilevel method, see ``docs/hypergradients.md``): L2RW and MWN run
``epochs`` passes of mini-batch SGD over the training split, each mini-batch step also touching
the whole validation split once; the default ``epochs = 60`` matches the bilevel method's 60
outer steps (each of which costs a Newton solve and a CG solve, i.e. many passes over the data).
The meta-gradients use closed-form head gradients and plain autograd -- ``higher`` stays confined
to the ``unrolled`` hypergradient.

References:
    Cui, Jia, Lin, Song & Belongie, "Class-balanced loss based on effective number of samples",
    CVPR 2019.
    Ren, Zeng, Yang & Urtasun, "Learning to reweight examples for robust deep learning", ICML 2018.
    Shu, Xie, Yi, Zhao, Zhou, Xu & Meng, "Meta-Weight-Net: learning an explicit mapping for sample
    weighting", NeurIPS 2019.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch

from .errors import NonFiniteError
from .head import batch_grad, mean_ce, mean_ce_grad, solve_head
from .hypergrad import BilevelProblem
from .persample import per_sample_inner_products
from .registry import Registry
from .seeding import torch_generator
from .validate import check_int, check_number, renamed_field

__all__ = [
    "BASELINES",
    "BaselineResult",
    "ClassBalanced",
    "LearningToReweight",
    "MetaWeightNet",
    "Uniform",
    "class_balanced_weights",
    "make_baseline",
]

BASELINES: Registry = Registry("reweighting baseline")


@dataclass
class BaselineResult:
    """Final weights and heads of a baseline.

    Attributes:
        name: registered name.
        alpha: ``(n,)`` final per-sample weights, :math:`\\sum_i \\alpha_i = n`.
        W: ``(K, D)`` exact L2 head trained with ``alpha`` (the head used for test accuracy).
        W_sgd: ``(K, D)`` the baseline's own SGD-trained head (L2RW, MWN), else None.
        seconds: wall time of the baseline (weights + head).
        history: one dict per epoch (SGD baselines): mean training loss, validation loss.
        extra: method-specific diagnostics.
    """

    name: str
    alpha: torch.Tensor
    W: torch.Tensor
    W_sgd: Optional[torch.Tensor] = None
    seconds: float = 0.0
    history: List[Dict[str, float]] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)


def _sum_to_n(w: torch.Tensor) -> torch.Tensor:
    total = w.sum()
    if not total > 0:
        return torch.ones_like(w)
    return w * (w.numel() / total)


def _final_head(problem: BilevelProblem, alpha: torch.Tensor, grad_tol: float, max_iter: int) -> torch.Tensor:
    return solve_head(problem.inner, alpha, grad_tol=grad_tol, max_iter=max_iter).W


def _head_options(obj: Any, where: str) -> None:
    renamed_field(obj, "head_tol", "head_grad_tol", where)
    check_number(obj.head_grad_tol, "head_grad_tol", where, low=0.0, low_open=True)
    check_int(obj.head_max_iter, "head_max_iter", where, minimum=1)


def class_balanced_weights(labels: torch.Tensor, num_classes: int, beta: float = 0.999) -> torch.Tensor:
    r"""Per-sample class-balanced weights by the effective number of samples (Cui et al. 2019).

    .. math::

        E_c = \frac{1-\beta^{n_c}}{1-\beta},\qquad w_c \propto \frac1{E_c} = \frac{1-\beta}{1-\beta^{n_c}},
        \qquad \alpha_i = w_{y_i}\ \text{scaled so}\ \sum_i\alpha_i = n.

    ``beta = 0`` gives uniform weights; :math:`\beta\to1` gives inverse class frequency.

    Args:
        labels: ``(n,)`` observed training labels.
        num_classes: ``K``.
        beta: :math:`\beta \in [0, 1)`.

    Raises:
        ConfigError: for ``beta`` outside ``[0, 1)``.
    """
    check_number(beta, "beta", "class_balanced_weights", low=0.0, high=1.0, high_open=True)
    labels = torch.as_tensor(labels)
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    eff = torch.where(counts > 0, (1 - beta ** counts) / (1 - beta), torch.ones_like(counts))
    w = 1.0 / eff
    return _sum_to_n(w[labels])


@BASELINES.register("uniform")
@dataclass(frozen=True)
class Uniform:
    """Uniform weights :math:`\\alpha_i = 1` and the exact L2 head (the no-reweighting reference)."""

    head_grad_tol: float = 1e-5
    head_max_iter: int = 100
    head_tol: Optional[float] = None

    def __post_init__(self) -> None:
        _head_options(self, "uniform")

    def fit(self, problem: BilevelProblem, seed: int = 0) -> BaselineResult:
        t0 = time.perf_counter()
        X = problem.inner.X
        alpha = torch.ones(problem.inner.n, dtype=X.dtype, device=X.device)
        W = _final_head(problem, alpha, self.head_grad_tol, self.head_max_iter)
        return BaselineResult("uniform", alpha, W, seconds=time.perf_counter() - t0)


@BASELINES.register("class_balanced")
@dataclass(frozen=True)
class ClassBalanced:
    """Class-balanced weights by the effective number of samples (see :func:`class_balanced_weights`).

    Args:
        beta: :math:`\\beta` in ``[0, 1)`` (Cui et al. try 0.9 ... 0.9999; 0.999 default).
    """

    beta: float = 0.999
    head_grad_tol: float = 1e-5
    head_max_iter: int = 100
    head_tol: Optional[float] = None

    def __post_init__(self) -> None:
        _head_options(self, "class_balanced")
        check_number(self.beta, "beta", "class_balanced", low=0.0, high=1.0, high_open=True)

    def fit(self, problem: BilevelProblem, seed: int = 0) -> BaselineResult:
        t0 = time.perf_counter()
        X = problem.inner.X
        alpha = class_balanced_weights(problem.inner.y.cpu(), problem.inner.K, self.beta).to(X.device, X.dtype)
        W = _final_head(problem, alpha, self.head_grad_tol, self.head_max_iter)
        return BaselineResult("class_balanced", alpha, W, seconds=time.perf_counter() - t0)


@dataclass(frozen=True)
class _SGDSchedule:
    epochs: int = 60
    batch_size: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    head_grad_tol: float = 1e-5
    head_max_iter: int = 100
    head_tol: Optional[float] = None

    def _validate(self, where: str) -> None:
        _head_options(self, where)
        check_int(self.epochs, "epochs", where, minimum=1)
        check_int(self.batch_size, "batch_size", where, minimum=1)
        check_number(self.lr, "lr", where, low=0.0, low_open=True)
        check_number(self.momentum, "momentum", where, low=0.0, high=1.0, high_open=True)


def _epoch_log(problem: BilevelProblem, W: torch.Tensor, epoch: int, train_loss: float) -> Dict[str, float]:
    val = float(mean_ce(W, problem.X_val, problem.y_val))
    if not (math.isfinite(val) and math.isfinite(train_loss)):
        raise NonFiniteError(f"Baseline SGD diverged at epoch {epoch} (loss {train_loss}, val loss {val}); "
                             "lower its 'lr'.")
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val}


@BASELINES.register("l2rw")
@dataclass(frozen=True)
class LearningToReweight(_SGDSchedule):
    """Learning to Reweight (Ren et al., ICML 2018); see the module docstring for the update.

    Args:
        epochs: passes over the training split (budget).
        batch_size: mini-batch size.
        lr: SGD step :math:`\\eta` of the head (also the look-ahead step).
        momentum: SGD momentum.
        head_grad_tol, head_max_iter: solver settings of the final exact L2 head (``head_tol`` is the
            deprecated name of ``head_grad_tol``).
    """

    def __post_init__(self) -> None:
        self._validate("l2rw")

    def fit(self, problem: BilevelProblem, seed: int = 0) -> BaselineResult:
        t0 = time.perf_counter()
        inner = problem.inner
        X, y, n, lam = inner.X, inner.y, inner.n, inner.lam
        g = torch_generator(seed, "l2rw")
        W = torch.zeros(inner.shape, dtype=X.dtype, device=X.device)
        buf = torch.zeros_like(W)
        wsum = torch.zeros(n, dtype=X.dtype, device=X.device)
        history = []
        zero_batches = 0
        for epoch in range(self.epochs):
            perm = torch.randperm(n, generator=g).to(X.device)
            total = 0.0
            for i in range(0, n, self.batch_size):
                idx = perm[i:i + self.batch_size]
                Xb, yb = X[idx], y[idx]
                W_look = W - self.lr * lam * W  # the look-ahead at eps = 0 moves only through the L2 term
                gv = mean_ce_grad(W_look, problem.X_val, problem.y_val)
                w = per_sample_inner_products(gv, W, Xb, yb, check=False).clamp_min(0)
                s = w.sum()
                if s > 0:
                    w = w / s
                else:
                    zero_batches += 1
                grad = batch_grad(W, Xb, yb, w, lam, 1.0)  # the normalised batch weights sum to 1
                buf = self.momentum * buf + grad
                W = W - self.lr * buf
                wsum[idx] += w * idx.numel()
                total += float(torch.nn.functional.cross_entropy(Xb @ W.T, yb, reduction="sum"))
            history.append(_epoch_log(problem, W, epoch, total / n))
        alpha = _sum_to_n(wsum / self.epochs)
        W_final = _final_head(problem, alpha, self.head_grad_tol, self.head_max_iter)
        return BaselineResult("l2rw", alpha, W_final, W_sgd=W, seconds=time.perf_counter() - t0, history=history,
                              extra={"zero_weight_batches": zero_batches,
                                     "steps": self.epochs * math.ceil(n / self.batch_size)})


class _WeightNet(torch.nn.Module):
    """Meta-Weight-Net's MLP: loss -> weight in (0, 1)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(1, hidden)
        self.fc2 = torch.nn.Linear(hidden, 1)

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(loss[:, None]))))[:, 0]


@BASELINES.register("mwn")
@dataclass(frozen=True)
class MetaWeightNet(_SGDSchedule):
    """Meta-Weight-Net (Shu et al., NeurIPS 2019); see the module docstring for the update.

    Args:
        epochs, batch_size, lr, momentum: the head's SGD schedule (budget shared with L2RW).
        hidden: hidden units of the weight net (100 in the paper).
        meta_lr: Adam learning rate of the weight net (1e-3 as in the paper's code).
        meta_weight_decay: Adam weight decay of the weight net (1e-4 as in the paper's code).
        head_grad_tol, head_max_iter: solver settings of the final exact L2 head (``head_tol`` is the
            deprecated name of ``head_grad_tol``).
    """

    hidden: int = 100
    meta_lr: float = 1e-3
    meta_weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        self._validate("mwn")
        check_int(self.hidden, "hidden", "mwn", minimum=1)
        check_number(self.meta_lr, "meta_lr", "mwn", low=0.0, low_open=True)
        check_number(self.meta_weight_decay, "meta_weight_decay", "mwn", low=0.0)

    def fit(self, problem: BilevelProblem, seed: int = 0) -> BaselineResult:
        t0 = time.perf_counter()
        inner = problem.inner
        X, y, n, lam = inner.X, inner.y, inner.n, inner.lam
        g = torch_generator(seed, "mwn")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            net = _WeightNet(self.hidden).to(device=X.device, dtype=X.dtype)
        meta_opt = torch.optim.Adam(net.parameters(), lr=self.meta_lr, weight_decay=self.meta_weight_decay)
        W = torch.zeros(inner.shape, dtype=X.dtype, device=X.device)
        buf = torch.zeros_like(W)
        history = []
        for epoch in range(self.epochs):
            perm = torch.randperm(n, generator=g).to(X.device)
            total = 0.0
            for i in range(0, n, self.batch_size):
                idx = perm[i:i + self.batch_size]
                Xb, yb = X[idx], y[idx]
                B = idx.numel()
                losses = torch.nn.functional.cross_entropy(Xb @ W.T, yb, reduction="none")
                with torch.enable_grad():
                    v = net(losses)
                    W_hat = W - self.lr * batch_grad(W, Xb, yb, v, lam, B)
                    meta_loss = mean_ce(W_hat, problem.X_val, problem.y_val)
                    meta_opt.zero_grad(set_to_none=True)
                    meta_loss.backward()
                meta_opt.step()
                with torch.no_grad():
                    v = net(losses)
                grad = batch_grad(W, Xb, yb, v, lam, B)
                buf = self.momentum * buf + grad
                W = W - self.lr * buf
                total += float(losses.sum())
            history.append(_epoch_log(problem, W, epoch, total / n))
        with torch.no_grad():
            alpha = _sum_to_n(net(inner.sample_losses(W)))
        W_final = _final_head(problem, alpha, self.head_grad_tol, self.head_max_iter)
        return BaselineResult("mwn", alpha.detach(), W_final, W_sgd=W, seconds=time.perf_counter() - t0,
                              history=history, extra={"steps": self.epochs * math.ceil(n / self.batch_size)})


def make_baseline(name: str, options: Optional[Mapping[str, Any]] = None):
    """Instantiate the registered baseline ``name`` with ``options``.

    Raises:
        ConfigError: for an unknown name (lists the registered ones) or option (lists the valid ones).
    """
    return BASELINES.create(name, options)
