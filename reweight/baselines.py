r"""Reweighting baselines that also produce per-sample weights and a trained head.

Every baseline shares the bilevel method's inputs -- the :class:`~reweight.hypergrad.BilevelProblem`
(training features and observed labels, the L2 head with its :math:`\lambda`, the clean validation
split) -- and returns a :class:`BaselineResult` with

* ``alpha`` ``(n,)``: final per-sample weights, rescaled so that :math:`\sum_i\alpha_i = n` (mean 1,
  except the trusted-set baselines: filters keep weight 1 / drop to 0 at the uniform head's
  :math:`\lambda`, ``clean_only`` uses no training sample;
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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .errors import NonFiniteError
from .head import HeadObjective, batch_grad, mean_ce, mean_ce_grad, solve_head
from .hypergrad import BilevelProblem
from .persample import per_sample_inner_products
from .registry import Registry
from .seeding import torch_generator
from .validate import check_int, check_number, renamed_field

__all__ = [
    "BASELINES",
    "BaselineResult",
    "ClassBalanced",
    "CleanOnly",
    "KNNClean",
    "LearningToReweight",
    "LossFilter",
    "MetaWeightNet",
    "TrainPlusClean",
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
        extra: method-specific diagnostics (the knob chosen on meta-val and every candidate's score).
        score: ``(n,)`` how clean each training sample looks to the method (higher = cleaner; for the
            detection table), when the method has such a score.
    """

    name: str
    alpha: torch.Tensor
    W: torch.Tensor
    W_sgd: Optional[torch.Tensor] = None
    seconds: float = 0.0
    history: List[Dict[str, float]] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)
    score: Optional[torch.Tensor] = None


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


# ------------------------------------------------------------------------------------------------
# baselines on the trusted set (issue 12): each tunes its one knob on meta-val only
# ------------------------------------------------------------------------------------------------


def _select(problem: BilevelProblem, candidates: Sequence[Tuple[Any, torch.Tensor]]) -> Tuple[Any, torch.Tensor, list]:
    """The candidate ``(knob, W)`` with the lowest meta-val loss (ties: higher accuracy, then the first).

    Without meta-val the first candidate (the knob's default) is returned. Returns ``(knob, W, table)``.
    """
    table = []
    best = None
    for knob, W in candidates:
        loss, acc = problem.meta_val_score(W)
        table.append({"knob": knob, "meta_val_loss": loss, "meta_val_acc": acc})
        key = (loss, -acc)
        if problem.has_meta_val and (best is None or key < best[0]):
            best = (key, knob, W)
    if best is None:
        knob, W = candidates[0]
        return knob, W, table
    return best[1], best[2], table


def _head_on(problem: BilevelProblem, X: torch.Tensor, y: torch.Tensor, lam: float, grad_tol: float,
             max_iter: int, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    obj = HeadObjective(X, y, problem.inner.K, lam)
    a = torch.ones(X.shape[0], dtype=X.dtype, device=X.device) if alpha is None else alpha
    return solve_head(obj, a, grad_tol=grad_tol, max_iter=max_iter).W


def _stratified_folds(y: torch.Tensor, folds: int, seed: int) -> List[torch.Tensor]:
    """Fold index of every sample (stratified round-robin over a seeded permutation per class)."""
    g = torch_generator(seed, "cv_folds")
    fold = torch.empty(y.numel(), dtype=torch.int64)
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        fold[idx] = torch.arange(idx.numel()) % folds
    return [torch.nonzero(fold == f).flatten() for f in range(folds)]


@BASELINES.register("clean_only")
@dataclass(frozen=True)
class CleanOnly:
    r"""A head trained on the trusted set alone (uniform weights), :math:`\lambda` by cross-validation inside it.

    The reviewer's first question: with ``M`` clean samples, is reweighting ``n`` noisy ones any better
    than dropping them? :math:`\lambda` is chosen from ``lam_factors`` times the run's :math:`\lambda` by
    stratified ``folds``-fold cross-validation (mean held-out cross-entropy) on the whole trusted set
    (meta-train and meta-val: the method uses no other data), then the head is refitted on all of it.
    Detection score: the clean-only head's probability of each training sample's given label.
    """

    lam_factors: Tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    folds: int = 5
    head_grad_tol: float = 1e-5
    head_max_iter: int = 100
    head_tol: Optional[float] = None

    def __post_init__(self) -> None:
        _head_options(self, "clean_only")
        check_int(self.folds, "folds", "clean_only", minimum=2)
        for f in self.lam_factors:
            check_number(f, "lam_factors", "clean_only", low=0.0, low_open=True)

    def fit(self, problem: BilevelProblem, seed: int = 0) -> BaselineResult:
        t0 = time.perf_counter()
        X, y = problem.trusted()
        lam0 = problem.inner.lam
        folds = _stratified_folds(y.cpu(), min(self.folds, int(torch.bincount(y).min())) if y.numel() else 2, seed)
        folds = [f for f in folds if f.numel()]
        cv = []
        for fct in self.lam_factors:
            losses = []
            if len(folds) >= 2:
                for f in folds:
                    keep = torch.ones(y.numel(), dtype=torch.bool)
                    keep[f] = False
                    W = _head_on(problem, X[keep], y[keep], lam0 * fct, self.head_grad_tol, self.head_max_iter)
                    losses.append(float(mean_ce(W, X[f], y[f])))
            cv.append({"lam": lam0 * fct, "cv_loss": sum(losses) / len(losses) if losses else float("nan")})
        best = min(cv, key=lambda r: (r["cv_loss"], abs(math.log(r["lam"] / lam0)))) if len(folds) >= 2 else \
            {"lam": lam0}
        W = _head_on(problem, X, y, best["lam"], self.head_grad_tol, self.head_max_iter)
        Xtr, ytr = problem.inner.X, problem.inner.y
        score = torch.softmax(Xtr @ W.T, dim=1).gather(1, ytr[:, None])[:, 0]
        alpha = torch.zeros(problem.inner.n, dtype=Xtr.dtype, device=Xtr.device)
        return BaselineResult("clean_only", alpha, W, seconds=time.perf_counter() - t0, score=score,
                              extra={"lam_selected": best["lam"], "cv": cv, "n_trusted": int(y.numel())})


@BASELINES.register("train_plus_clean")
@dataclass(frozen=True)
class TrainPlusClean:
    """Uniform weights on the training split joined with the whole trusted set (no knob)."""

    head_grad_tol: float = 1e-5
    head_max_iter: int = 100
    head_tol: Optional[float] = None

    def __post_init__(self) -> None:
        _head_options(self, "train_plus_clean")

    def fit(self, problem: BilevelProblem, seed: int = 0) -> BaselineResult:
        t0 = time.perf_counter()
        Xt, yt = problem.trusted()
        X = torch.cat([problem.inner.X, Xt])
        y = torch.cat([problem.inner.y, yt])
        W = _head_on(problem, X, y, problem.inner.lam, self.head_grad_tol, self.head_max_iter)
        alpha = torch.ones(problem.inner.n, dtype=X.dtype, device=X.device)
        return BaselineResult("train_plus_clean", alpha, W, seconds=time.perf_counter() - t0)


@BASELINES.register("loss_filter")
@dataclass(frozen=True)
class LossFilter:
    r"""Small-loss filtering: drop the highest-loss fraction under the uniform head, refit; the fraction on meta-val.

    The uniform head :math:`W_u` gives every training sample its loss :math:`\ell(W_u h_i, y_i)`; the
    fraction ``f`` of samples with the largest loss is dropped (weight 0) and the head refitted on the
    rest. ``f`` is chosen from ``fractions`` by meta-val loss (0 = uniform is a candidate). Detection
    score: :math:`-\ell_i` under the uniform head. (Han et al., "Co-teaching", NeurIPS 2018, for the
    small-loss criterion.)
    """

    fractions: Tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    head_grad_tol: float = 1e-5
    head_max_iter: int = 100
    head_tol: Optional[float] = None

    def __post_init__(self) -> None:
        _head_options(self, "loss_filter")
        for f in self.fractions:
            check_number(f, "fractions", "loss_filter", low=0.0, high=1.0, high_open=True)

    def fit(self, problem: BilevelProblem, seed: int = 0) -> BaselineResult:
        t0 = time.perf_counter()
        inner = problem.inner
        ones = torch.ones(inner.n, dtype=inner.X.dtype, device=inner.X.device)
        Wu = solve_head(inner, ones, grad_tol=self.head_grad_tol, max_iter=self.head_max_iter).W
        losses = inner.sample_losses(Wu)
        order = torch.argsort(losses, descending=True, stable=True)
        cands = []
        for f in self.fractions:
            a = ones.clone()
            a[order[: int(round(f * inner.n))]] = 0.0
            W = Wu if f == 0 else solve_head(inner, a, W0=Wu, grad_tol=self.head_grad_tol,
                                             max_iter=self.head_max_iter).W
            cands.append(((f, a), W))
        (f, a), W, table = _select(problem, cands)
        return BaselineResult("loss_filter", a, W, seconds=time.perf_counter() - t0, score=-losses,
                              extra={"fraction_selected": f, "candidates": table})


@BASELINES.register("knn_clean")
@dataclass(frozen=True)
class KNNClean:
    r"""kNN cleaning: drop samples whose label disagrees with the majority of their ``k`` nearest neighbours.

    Neighbours by cosine similarity of the training features (bias column excluded), among the
    training samples themselves; ``k`` is chosen from ``ks`` by meta-val loss of the refitted head.
    Detection score: the fraction of the ``k`` neighbours that share the sample's label. (Cover & Hart,
    "Nearest neighbor pattern classification", 1967; Wilson's editing, IEEE SMC 1972.)
    """

    ks: Tuple[int, ...] = (5, 10, 20, 40)
    head_grad_tol: float = 1e-5
    head_max_iter: int = 100
    head_tol: Optional[float] = None

    def __post_init__(self) -> None:
        _head_options(self, "knn_clean")
        for k in self.ks:
            check_int(k, "ks", "knn_clean", minimum=1)

    def fit(self, problem: BilevelProblem, seed: int = 0) -> BaselineResult:
        from .neighbors import brute_force_knn

        t0 = time.perf_counter()
        inner = problem.inner
        X, y, K = inner.X, inner.y, inner.K
        H = X[:, :-1] if bool((X[:, -1] == 1).all()) else X  # drop the constant bias column
        kmax = min(max(self.ks), inner.n - 1)
        nb = brute_force_knn(H, H, kmax + 1, metric="cosine").indices[:, 1:]  # the sample itself comes first
        ones = torch.ones(inner.n, dtype=X.dtype, device=X.device)
        cands, agree = [], {}
        for k in self.ks:
            kk = min(k, kmax)
            votes = torch.zeros(inner.n, K, dtype=X.dtype, device=X.device)
            votes.scatter_add_(1, y[nb[:, :kk]], torch.ones(inner.n, kk, dtype=X.dtype, device=X.device))
            agree[k] = votes.gather(1, y[:, None])[:, 0] / kk
            a = (votes.argmax(1) == y).to(X.dtype)
            W = solve_head(inner, a if a.sum() > 0 else ones, grad_tol=self.head_grad_tol,
                           max_iter=self.head_max_iter).W
            cands.append(((k, a), W))
        (k, a), W, table = _select(problem, cands)
        return BaselineResult("knn_clean", a, W, seconds=time.perf_counter() - t0, score=agree[k],
                              extra={"k_selected": k, "candidates": table})


def make_baseline(name: str, options: Optional[Mapping[str, Any]] = None):
    """Instantiate the registered baseline ``name`` with ``options``.

    Raises:
        ConfigError: for an unknown name (lists the registered ones) or option (lists the valid ones).
    """
    return BASELINES.create(name, options)
