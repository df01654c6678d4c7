"""The main job: learned sample weights vs uniform weights on a frozen backbone's features.

Default: MNIST-5k, 40% symmetric label noise on the training split, a timm ``test_resnet`` warmed
up with cross-entropy (early stopping on the clean validation split) and frozen; the L2 head is
trained with uniform weights and with weights learned by implicit-differentiation hypergradients
(CG). Writes a run directory (DESIGN section 5) and prints a summary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from reweight.bilevel import run_bilevel, weight_auroc
from reweight.config import RunConfig
from reweight.features import FeatureSet, build_features
from reweight.head import HeadObjective, accuracy, add_bias, mean_ce, solve_head
from reweight.hypergrad import BilevelProblem, make_method
from reweight.runs import RunDir
from reweight.weights import WeightModel, class_report

__all__ = ["build_problem", "format_summary", "run_main"]

log = logging.getLogger(__name__)


def build_problem(cfg: RunConfig, fs: FeatureSet) -> Tuple[BilevelProblem, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
    """The bilevel problem of ``cfg`` on features ``fs`` (bias column, dtype, device) and eval sets."""
    dtype = getattr(torch, cfg.head.dtype)
    dev = torch.device(cfg.device)

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dev, dtype)
        return add_bias(x) if cfg.head.bias else x

    Xtr, Xva, Xte = prep(fs.X_train), prep(fs.X_val), prep(fs.X_test)
    inner = HeadObjective(Xtr, fs.y_train.to(dev), fs.num_classes, cfg.head.lam)
    wm = WeightModel(fs.y_train.to(dev), fs.num_classes, class_mass=cfg.weights.class_mass,
                     beta_entropy=cfg.weights.beta_entropy, beta_ess=cfg.weights.beta_ess,
                     ess_floor=cfg.weights.ess_floor, ess_penalty=cfg.weights.ess_penalty)
    problem = BilevelProblem(inner, Xva, fs.y_val.to(dev), wm)
    return problem, {"val": (Xva, fs.y_val.to(dev)), "test": (Xte, fs.y_test.to(dev))}


def _head_eval(W: torch.Tensor, problem: BilevelProblem, evals) -> Dict[str, float]:
    out = {f"{k}_acc": accuracy(W, X, y) for k, (X, y) in evals.items()}
    out.update({f"{k}_loss": float(mean_ce(W, X, y)) for k, (X, y) in evals.items()})
    return out


def _tensorboard_writer_cls():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # tensorboard is an optional extra
        from reweight.errors import ConfigError

        raise ConfigError("tensorboard=true needs the 'tensorboard' package: pip install 'carrot-reweight[tensorboard]'.") from e
    return SummaryWriter


def _tb_logger(writer, problem: BilevelProblem):
    """An ``on_step`` callback logging scalars, per-class ESS ratios and the weight histogram."""

    def log_step(row: Dict[str, Any], alpha: torch.Tensor) -> None:
        step = row["step"]
        for key in ("val_loss", "objective", "penalty", "val_acc", "test_acc", "auroc", "ess_ratio_min", "hvps",
                    "inner_iters"):
            if row.get(key) is not None:
                writer.add_scalar(key, row[key], step)
        for c, r in enumerate(row["ess_ratio"]):
            writer.add_scalar(f"ess_ratio/class_{c}", r, step)
        writer.add_histogram("alpha", alpha.detach().cpu(), step)

    return log_step


def run_main(cfg: RunConfig, overwrite: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Run (or resume) the main job of ``cfg``; returns the summary also written to ``summary.json``."""
    import pandas as pd

    t_start = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    method = make_method(cfg.hypergrad.method, cfg.hypergrad.options)  # bad method/options fail before any write
    tb_writer_cls = _tensorboard_writer_cls() if cfg.tensorboard else None
    run = RunDir(Path(cfg.out_dir) / cfg.name, cfg, overwrite=overwrite)
    run.write_env(cfg.seed, cfg.device)
    writer = tb_writer_cls(str(run.file("tensorboard"))) if tb_writer_cls else None
    try:
        t0 = time.perf_counter()
        fs = build_features(cfg.data, cfg.backbone, cfg.features, cfg.seed, progress=progress)
        t_features = time.perf_counter() - t0
        problem, evals = build_problem(cfg, fs)
        n = problem.inner.n
        ones = torch.ones(n, dtype=problem.inner.X.dtype, device=problem.inner.X.device)
        t0 = time.perf_counter()
        uni = solve_head(problem.inner, ones, grad_tol=cfg.head.grad_tol, max_iter=cfg.head.max_iter)
        t_uniform = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = run_bilevel(problem, method, cfg.outer.steps, cfg.outer.lr, grad_tol=cfg.head.grad_tol,
                          max_iter=cfg.head.max_iter, checkpoint_every=cfg.outer.checkpoint_every, run=run,
                          evals=evals, corrupted=fs.corrupted, method_name=cfg.hypergrad.method, progress=progress,
                          on_step=_tb_logger(writer, problem) if writer else None)
        t_learned = time.perf_counter() - t0
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            run.fail(f"{type(e).__name__}: {e}")
        raise
    finally:
        if writer is not None:
            writer.close()

    K = fs.num_classes
    before = pd.DataFrame(class_report(ones, fs.y_train, K, fs.corrupted)).assign(stage="uniform")
    after = pd.DataFrame(class_report(out.alpha, fs.y_train, K, fs.corrupted)).assign(stage="learned")
    table = pd.concat([before, after], ignore_index=True)
    run.write_text("per_class_ess.csv", table.to_csv(index=False, float_format="%.6g"))
    from reweight.runs import save_checked

    save_checked(run.file("weights.pt"), {"s": out.s.cpu(), "alpha": out.alpha.cpu(), "labels": fs.y_train.cpu(),
                                          "clean_labels": fs.y_train_clean.cpu(), "corrupted": fs.corrupted.cpu(),
                                          "train_index": fs.train_index.cpu()})
    uni_eval = _head_eval(uni.W, problem, evals)
    learned_eval = _head_eval(out.W, problem, evals)
    summary = {
        "dataset": cfg.data.dataset, "noise": cfg.data.noise, "noise_rate": cfg.data.noise_rate,
        "imbalance_factor": cfg.data.imbalance_factor, "method": cfg.hypergrad.method, "seed": cfg.seed,
        "n_train": n, "n_val": int(problem.X_val.shape[0]), "n_test": int(evals["test"][0].shape[0]),
        "feature_dim": fs.meta["feature_dim"], "feature_cache_hit": fs.meta["cache_hit"],
        "warmup_best_val_acc": max((h["val_acc"] for h in fs.meta["warmup_history"]), default=None),
        "uniform": uni_eval, "learned": learned_eval,
        "auroc": weight_auroc(out.alpha, fs.corrupted),
        "ess_ratio_min": float(after["ess_ratio"].min()),
        "mean_weight_clean": float(out.alpha[~fs.corrupted.bool()].mean()) if (~fs.corrupted.bool()).any() else None,
        "mean_weight_corrupted": float(out.alpha[fs.corrupted.bool()].mean()) if fs.corrupted.any() else None,
        "outer_steps": len(out.metrics), "resumed_from": out.resumed_from,
        "seconds": {"features": t_features, "uniform_head": t_uniform, "learned": t_learned,
                    "total": time.perf_counter() - t_start},
        "config_hash": run.hash,
    }
    run.finish(summary)
    return summary


def format_summary(summary: Dict[str, Any], run_dir: Optional[str] = None) -> str:
    """A human-readable block of the main numbers."""
    u, l = summary["uniform"], summary["learned"]
    lines = [
        f"dataset={summary['dataset']} noise={summary['noise']}@{summary['noise_rate']} "
        f"n_train={summary['n_train']} method={summary['method']}",
        f"test accuracy   uniform {u['test_acc']:.4f}   learned {l['test_acc']:.4f}",
        f"val accuracy    uniform {u['val_acc']:.4f}   learned {l['val_acc']:.4f}",
        f"AUROC of alpha (clean vs corrupted): {summary['auroc']:.4f}",
        f"min per-class ESS/n_c: {summary['ess_ratio_min']:.3f}   mean weight clean {summary['mean_weight_clean']:.3f}"
        f" / corrupted {summary['mean_weight_corrupted'] if summary['mean_weight_corrupted'] is None else round(summary['mean_weight_corrupted'], 3)}",
        f"time: total {summary['seconds']['total']:.1f}s (features {summary['seconds']['features']:.1f}s, "
        f"learned weights {summary['seconds']['learned']:.1f}s)",
    ]
    if run_dir:
        lines.append(f"run directory: {run_dir}")
    return "\n".join(lines)
