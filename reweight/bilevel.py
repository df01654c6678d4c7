r"""The outer loop: solve the inner head (warm-started), take a hypergradient, update ``s``.

Each outer step ``t``:

1. :math:`\alpha_t = \alpha(s_t)`; :math:`W_t = \arg\min_W F(W, \alpha_t)` by Newton from :math:`W_{t-1}`;
2. :math:`\partial J/\partial s` at :math:`s_t` by the configured method (CG warm-started from :math:`V_{t-1}`);
3. log one metrics row (losses, accuracies, ESS per class, entropy, solver and CG diagnostics, timings);
4. Adam step on ``s``.

A checkpoint (``s``, Adam state, ``W``, ``V``, step, metrics) is written atomically every
``checkpoint_every`` steps and at the end; :func:`run_bilevel` resumes from the newest valid one,
and because every step is a deterministic function of that state, a killed and resumed run ends at
the same ``s`` and writes the same tables as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .errors import ConfigError, ConvergenceError, NonFiniteError
from .head import HeadSolution, accuracy, solve_head
from .hypergrad import BilevelProblem, HypergradMethod, hypergradient
from .runs import RunDir
from .validate import check_choice, renamed_option
from .weights import entropy_per_class, ess_per_class

__all__ = ["MISS_FACTOR", "OPTIMIZERS", "BilevelOutcome", "check_convergence", "convergence_summary", "run_bilevel", "weight_auroc"]

log = logging.getLogger(__name__)


def weight_auroc(alpha: torch.Tensor, corrupted: torch.Tensor) -> float:
    """AUROC of ``alpha`` at ranking clean samples above corrupted ones (NaN if one group is empty).

    Uses :func:`sklearn.metrics.roc_auc_score` with clean = positive class.
    """
    from sklearn.metrics import roc_auc_score

    c = torch.as_tensor(corrupted).bool().cpu().numpy()
    if c.all() or not c.any():
        return float("nan")
    return float(roc_auc_score(~c, alpha.detach().double().cpu().numpy()))


#: a hypergradient whose relative residual exceeds this multiple of its method's rtol, or an inner
#: solve whose gradient norm exceeds this multiple of grad_tol, stops the run (unless allowed)
MISS_FACTOR = 100.0


def convergence_summary(metrics: Sequence[Dict[str, Any]], final: Optional[HeadSolution] = None) -> Dict[str, Any]:
    """Convergence of a run from its metrics rows: ``converged`` (every inner solve and hypergradient reached its
    tolerance), the worst relative residual and inner gradient norm, the count of unconverged steps, and the
    outer objective's first / last / lowest value (its trend)."""
    res = [r["cg_rel_residual"] for r in metrics if r.get("cg_rel_residual") is not None
           and math.isfinite(r["cg_rel_residual"])]
    gns = [r["inner_grad_norm"] for r in metrics if r.get("inner_grad_norm") is not None]
    bad = [r["step"] for r in metrics if not r.get("inner_converged", True) or not r.get("hypergrad_converged", True)]
    obj = [r["objective"] for r in metrics if r.get("objective") is not None]
    final_ok = final is None or final.converged
    return {"converged": not bad and final_ok, "unconverged_steps": len(bad), "first_unconverged_step": bad[0] if bad else None,
            "worst_rel_residual": max(res) if res else None, "worst_inner_grad_norm": max(gns) if gns else None,
            "final_inner_grad_norm": final.grad_norm if final is not None else None,
            "objective_first": obj[0] if obj else None, "objective_last": obj[-1] if obj else None,
            "objective_min": min(obj) if obj else None}


def check_convergence(step: int, method: str, hg: Any, sol: HeadSolution, rtol: Optional[float], grad_tol: float,
                      allow_unconverged: bool) -> None:
    """Stop the run (:class:`~reweight.errors.ConvergenceError`) when the inner solve or the hypergradient missed
    its tolerance by more than :data:`MISS_FACTOR`, or the hypergradient diverged; with ``allow_unconverged`` the
    step is only logged (and marked in the metrics and the summary)."""
    problems = []
    if not sol.converged and not sol.grad_norm <= MISS_FACTOR * grad_tol:
        problems.append(f"the inner solve stopped at ||grad F|| = {sol.grad_norm:.3g} (grad_tol {grad_tol:.3g}; "
                        f"raise head.max_iter or head.lam)")
    rel = hg.rel_residual
    if rtol is not None and rel == rel and not rel <= MISS_FACTOR * rtol:
        problems.append(f"the hypergradient's relative residual is {rel:.3g} (rtol {rtol:.3g}; raise its max_iter, "
                        f"or head.lam, or choose another method)")
    if hg.extra.get("grad_norm_end") is not None and not hg.converged:
        problems.append(f"the unrolled inner loop diverged (||grad F|| {hg.extra['grad_norm_start']:.3g} -> "
                        f"{hg.extra['grad_norm_end']:.3g}; lower its lr)")
    if not problems:
        return
    msg = f"Outer step {step}, method {method!r}: " + "; ".join(problems) + "."
    if allow_unconverged:
        log.warning("%s Continuing (allow_unconverged); the run is marked unconverged.", msg)
        return
    raise ConvergenceError(msg + " The run stops (pass --allow-unconverged to continue and mark it).")


@dataclass
class BilevelOutcome:
    """Final ``s``, ``alpha``, head ``W``, the metrics rows, whether the run resumed, and its convergence."""

    s: torch.Tensor
    alpha: torch.Tensor
    W: torch.Tensor
    metrics: List[Dict[str, Any]]
    resumed_from: Optional[int]
    final_solution: HeadSolution
    convergence: Dict[str, Any] = field(default_factory=dict)
    path_alpha: Optional[torch.Tensor] = None
    path_W: Optional[torch.Tensor] = None
    guard: Dict[str, Any] = field(default_factory=dict)
    score: Optional[torch.Tensor] = None


OPTIMIZERS = ("adam", "sgd", "ngd", "eg")


def _centre(g: torch.Tensor, labels: torch.Tensor, K: int) -> torch.Tensor:
    """``g`` minus its mean over each class (a per-class constant does not change class-normalised weights)."""
    cnt = torch.bincount(labels, minlength=K).to(g.dtype).clamp_min(1)
    mu = torch.zeros(K, dtype=g.dtype, device=g.device).index_add(0, labels, g) / cnt
    return g - mu[labels]


def _rms_normalised(g: torch.Tensor) -> torch.Tensor:
    return g / g.pow(2).mean().sqrt().clamp_min(torch.finfo(g.dtype).tiny)


def _row(step: int, problem: BilevelProblem, alpha: torch.Tensor, sol: HeadSolution, hg, evals, corrupted,
         t_inner: float) -> Dict[str, Any]:
    K = problem.inner.K
    wm = problem.weight_model("run_bilevel")
    labels = wm.labels.to(alpha.device)
    ess = ess_per_class(alpha, labels, K)
    counts = wm.counts.to(alpha.device, alpha.dtype)
    ratio = (ess / counts.clamp_min(1)).tolist()
    row: Dict[str, Any] = {
        "step": step,
        "val_loss": hg.val_loss if hg is not None else float(problem.val_loss(sol.W)),
        "objective": hg.objective if hg is not None else None,
        "penalty": hg.penalty if hg is not None else None,
        "ess_ratio": ratio,
        "ess_ratio_min": min(ratio),
        "entropy": entropy_per_class(alpha, labels, K).tolist(),
        "inner_iters": sol.iters,
        "inner_grad_norm": sol.grad_norm,
        "inner_converged": sol.converged,
        "inner_seconds": t_inner,
    }
    if hg is not None:
        row.update({"hypergrad_method": hg.method, "hvps": hg.hvps, "precond": hg.extra.get("precond"),
                    "cg_rel_residual": hg.rel_residual,
                    "hypergrad_converged": hg.converged, "hypergrad_seconds": hg.seconds,
                    "grad_s_norm": float(torch.linalg.vector_norm(hg.grad_s))})
    for name, (X, y) in evals.items():
        row[f"{name}_acc"] = accuracy(sol.W, X, y)
    if corrupted is not None:
        row["auroc"] = weight_auroc(alpha, corrupted)
    return row


def run_bilevel(problem: BilevelProblem, method: HypergradMethod, steps: int, lr: float, *,
                grad_tol: Optional[float] = None, max_iter: int = 100, checkpoint_every: int = 5, run: Optional[RunDir] = None,
                evals: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
                corrupted: Optional[torch.Tensor] = None, method_name: str = "", progress: bool = False,
                on_step: Optional[Callable[[Dict[str, Any], torch.Tensor], None]] = None,
                allow_unconverged: bool = False, optimizer: str = "adam", schedule: str = "constant",
                record_path: bool = False, tol: Optional[float] = None) -> BilevelOutcome:
    r"""Run (or resume) the outer loop for ``steps`` steps of size ``lr`` on the weight parameters ``s``.

    Optimisers (the update of step ``t``, with :math:`\eta_t = \mathrm{lr}` or :math:`\mathrm{lr}/\sqrt{t+1}`):

    * ``adam``: Adam on ``s`` (its first step moves every :math:`s_i` by about :math:`\eta\,\mathrm{sign}(g_i)`,
      discarding the hypergradient's magnitudes);
    * ``sgd``: :math:`s \leftarrow s - \eta_t \partial J/\partial s`;
    * ``ngd``: normalised gradient, :math:`s \leftarrow s - \eta_t g/\mathrm{rms}(g)`, :math:`g = \partial J/\partial s`;
    * ``eg``: exponentiated gradient, i.e. mirror descent on :math:`\alpha` with the entropy mirror map
      (Kivinen & Warmuth, "Exponentiated gradient versus gradient descent for linear predictors", 1997):
      :math:`\log\alpha \leftarrow \log\alpha - \eta_t \tilde g/\mathrm{rms}(\tilde g)` then class
      renormalisation, :math:`\tilde g = \partial J/\partial\alpha` centred per class. It keeps the
      hypergradient's magnitudes (step 1 ranks the samples as the step-0 hypergradient does) and needs
      the ``exp`` parameterisation of the weight model (``s`` are the log-weights).

    Args:
        problem: the bilevel problem.
        method: a hypergradient method (see :data:`reweight.hypergrad.HYPERGRAD`).
        steps, lr: outer budget and Adam learning rate.
        grad_tol, max_iter: inner solver tolerance (gradient norm, default 1e-6; ``tol`` is its
            deprecated name) and iteration cap.
        checkpoint_every: checkpoint interval in outer steps (with ``run``).
        run: run directory for metrics and checkpoints (resumes from its newest valid checkpoint).
        evals: named ``(X, y)`` sets whose accuracy is logged each step (e.g. ``val``, ``test``).
        corrupted: ground-truth mask; logs the AUROC of ``alpha`` each step.
        on_step: called as ``on_step(row, alpha)`` after each step's metrics row is built.
        optimizer, schedule: the update above; ``constant`` or ``inv_sqrt`` step sizes.
        record_path: keep :math:`\alpha_t` and :math:`W_t` of every step ``t = 0..steps`` (``t = 0``: uniform) in
            the outcome and the checkpoints, for a guard that picks the step on held-out data.
        allow_unconverged: log and mark (instead of stopping at) an inner solve or hypergradient that
            misses its tolerance by more than :data:`MISS_FACTOR` (:func:`check_convergence`).

    Raises:
        NonFiniteError: when ``s``, the loss or the hypergradient becomes non-finite (the last good
            checkpoint stays in place).
        ConvergenceError: when a step misses its tolerances by far (see ``allow_unconverged``).
    """
    from tqdm.auto import tqdm

    tol = renamed_option(grad_tol, tol, "tol", "grad_tol", "run_bilevel", 1e-6)
    check_choice(optimizer, "optimizer", "run_bilevel", OPTIMIZERS)
    wm = problem.weight_model("run_bilevel")
    check_choice(schedule, "schedule", "run_bilevel", ("constant", "inv_sqrt"))
    if optimizer == "eg" and wm.parameterization != "exp":
        raise ConfigError("The 'eg' optimizer needs a weight model with parameterization='exp' (s are log-weights).")
    evals = evals or {}
    dtype, device = problem.inner.rows.dtype, problem.inner.rows.device
    labels = wm.labels.to(device)
    s = wm.initial(dtype).to(device).requires_grad_(True)
    opt = torch.optim.Adam([s], lr=lr)
    W: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    metrics: List[Dict[str, Any]] = []
    path_a: List[torch.Tensor] = []
    path_w: List[torch.Tensor] = []
    start, resumed = 0, None
    if run is not None:
        ck = run.load_latest_checkpoint()
        if ck is not None:
            with torch.no_grad():
                s.copy_(ck["s"].to(device, dtype))
            opt.load_state_dict(ck["opt"])
            W = ck["W"].to(device, dtype) if ck["W"] is not None else None
            v = ck["v"].to(device, dtype) if ck["v"] is not None else None
            metrics, start, resumed = list(ck["metrics"]), int(ck["step"]), int(ck["step"])
            path_a = [a.to(device, dtype) for a in ck.get("path_alpha", [])]
            path_w = [w.to(device, dtype) for w in ck.get("path_W", [])]
            log.info("Resuming from outer step %d.", start)
            run.write_metrics(metrics)

    def checkpoint(step: int) -> None:
        if run is not None:
            state = {"step": step, "s": s.detach().clone(), "opt": opt.state_dict(), "W": W, "v": v,
                     "metrics": metrics}
            if record_path:
                state.update(path_alpha=path_a, path_W=path_w)
            run.save_checkpoint(step, state)
            run.write_metrics(metrics)

    for step in tqdm(range(start, steps), desc="outer", disable=not progress, initial=start, total=steps):
        alpha = wm.alpha(s.detach())
        t0 = time.perf_counter()
        sol = solve_head(problem.inner, alpha, W0=W, grad_tol=tol, max_iter=max_iter)
        t_inner = time.perf_counter() - t0
        try:
            hg = hypergradient(method, problem, s.detach(), sol.W, v0=v, name=method_name)
        except NonFiniteError as e:
            raise NonFiniteError(f"Outer step {step}: {e} The last good checkpoint is kept; "
                                 f"lower outer.lr or raise head.lam.") from e
        if not math.isfinite(hg.objective):
            raise NonFiniteError(f"Outer step {step}: the objective (validation loss + penalties) is non-finite "
                                 f"(method {hg.method!r}).")
        check_convergence(step, hg.method, hg, sol, getattr(method, "rtol", None), tol, allow_unconverged)
        row = _row(step, problem, alpha, sol, hg, evals, corrupted, t_inner)
        if not hg.converged:
            log.warning("Outer step %d: %s hypergradient did not reach its tolerance (relative residual %.2e).",
                        step, hg.method, hg.rel_residual)
        metrics.append(row)
        if record_path:
            path_a.append(alpha.detach().clone())
            path_w.append(sol.W.detach().clone())
        if on_step is not None:
            on_step(row, alpha)
        eta = lr if schedule == "constant" else lr / math.sqrt(step + 1)
        if optimizer == "adam":
            opt.zero_grad(set_to_none=True)
            s.grad = hg.grad_s.to(dtype)
            opt.step()
        else:
            with torch.no_grad():
                if optimizer == "eg":
                    assert hg.grad_alpha_total is not None
                    s -= eta * _rms_normalised(_centre(hg.grad_alpha_total.to(dtype), labels, problem.inner.K))
                elif optimizer == "ngd":
                    s -= eta * _rms_normalised(hg.grad_s.to(dtype))
                else:
                    s -= eta * hg.grad_s.to(dtype)
        if not bool(torch.isfinite(s).all()):
            raise NonFiniteError(f"Outer step {step}: s became non-finite after the update (method {hg.method!r}).")
        W, v = sol.W, hg.v
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            checkpoint(step + 1)

    alpha = wm.alpha(s.detach())
    final = solve_head(problem.inner, alpha, W0=W, grad_tol=tol, max_iter=max_iter)
    if record_path:
        path_a.append(alpha.detach().clone())
        path_w.append(final.W.detach().clone())
    return BilevelOutcome(s=s.detach(), alpha=alpha.detach(), W=final.W, metrics=metrics, resumed_from=resumed,
                          final_solution=final, convergence=convergence_summary(metrics, final),
                          path_alpha=torch.stack(path_a) if record_path and path_a else None,
                          path_W=torch.stack(path_w) if record_path and path_w else None)
