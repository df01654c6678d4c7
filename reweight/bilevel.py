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

from .errors import ConvergenceError, NonFiniteError
from .head import HeadSolution, accuracy, solve_head
from .hypergrad import BilevelProblem, HypergradMethod, hypergradient
from .runs import RunDir
from .validate import renamed_option
from .weights import entropy_per_class, ess_per_class, initial_s

__all__ = ["MISS_FACTOR", "BilevelOutcome", "check_convergence", "convergence_summary", "run_bilevel", "weight_auroc"]

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


def _row(step: int, problem: BilevelProblem, alpha: torch.Tensor, sol: HeadSolution, hg, evals, corrupted,
         t_inner: float) -> Dict[str, Any]:
    K = problem.inner.K
    labels = problem.weights.labels.to(alpha.device)
    ess = ess_per_class(alpha, labels, K)
    counts = problem.weights.counts.to(alpha.device, alpha.dtype)
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
        row.update({"hypergrad_method": hg.method, "hvps": hg.hvps, "cg_rel_residual": hg.rel_residual,
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
                allow_unconverged: bool = False, tol: Optional[float] = None) -> BilevelOutcome:
    """Run (or resume) the outer loop for ``steps`` Adam steps of size ``lr`` on ``s``.

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
        allow_unconverged: log and mark (instead of stopping at) an inner solve or hypergradient that
            misses its tolerance by more than :data:`MISS_FACTOR` (:func:`check_convergence`).

    Raises:
        NonFiniteError: when ``s``, the loss or the hypergradient becomes non-finite (the last good
            checkpoint stays in place).
        ConvergenceError: when a step misses its tolerances by far (see ``allow_unconverged``).
    """
    from tqdm.auto import tqdm

    tol = renamed_option(grad_tol, tol, "tol", "grad_tol", "run_bilevel", 1e-6)
    evals = evals or {}
    dtype, device = problem.inner.rows.dtype, problem.inner.rows.device
    s = initial_s(problem.inner.n, dtype).to(device).requires_grad_(True)
    opt = torch.optim.Adam([s], lr=lr)
    W: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    metrics: List[Dict[str, Any]] = []
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
            log.info("Resuming from outer step %d.", start)
            run.write_metrics(metrics)

    def checkpoint(step: int) -> None:
        if run is not None:
            run.save_checkpoint(step, {"step": step, "s": s.detach().clone(), "opt": opt.state_dict(),
                                       "W": W, "v": v, "metrics": metrics})
            run.write_metrics(metrics)

    for step in tqdm(range(start, steps), desc="outer", disable=not progress, initial=start, total=steps):
        alpha = problem.weights.alpha(s.detach())
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
        if on_step is not None:
            on_step(row, alpha)
        opt.zero_grad(set_to_none=True)
        s.grad = hg.grad_s.to(dtype)
        opt.step()
        if not bool(torch.isfinite(s).all()):
            raise NonFiniteError(f"Outer step {step}: s became non-finite after the update (method {hg.method!r}).")
        W, v = sol.W, hg.v
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            checkpoint(step + 1)

    alpha = problem.weights.alpha(s.detach())
    final = solve_head(problem.inner, alpha, W0=W, grad_tol=tol, max_iter=max_iter)
    return BilevelOutcome(s=s.detach(), alpha=alpha.detach(), W=final.W, metrics=metrics, resumed_from=resumed,
                          final_solution=final, convergence=convergence_summary(metrics, final))
