"""The main job: learned sample weights vs uniform weights on a frozen backbone's features.

Default (``experiments/configs/main.yaml``): MNIST-5k, 40% symmetric label noise on the training
split, a timm ``test_resnet`` warmed up with cross-entropy (early stopping on the clean validation
split) and frozen; the L2 head is trained with uniform weights and with weights learned by
implicit-differentiation hypergradients (CG). Writes a run directory (DESIGN section 5); the body
is :func:`reweight.pipeline.run_main`.

Usage::

    carrot demo                       # the default config
    carrot run head.lam=0.3 seed=1 name=lam03
"""

from __future__ import annotations

from typing import Any, Dict

from reweight.config import RunConfig
from reweight.pipeline import run_main

from .study import Context, Study, shim

__all__ = ["STUDY", "format_summary", "run"]


def run(cfg: RunConfig, ctx: Context) -> Dict[str, Any]:
    """Run (or resume) the main job of ``cfg``; the summary also has the run directory."""
    summary = run_main(cfg, overwrite=ctx.overwrite, progress=ctx.progress, allow_unconverged=ctx.allow_unconverged)
    return {**summary, "run_dir": f"{cfg.out_dir}/{cfg.name}"}


def _num(x: Any) -> str:
    return "unknown" if x is None else f"{x:.3f}"


def format_summary(summary: Dict[str, Any]) -> str:
    """A human-readable block of the main numbers."""
    u, lrn = summary["uniform"], summary["learned"]
    corrupted = summary["mean_weight_corrupted"]
    lines = [
        f"dataset={summary['dataset']} noise={summary['noise']}@{summary['noise_rate']} "
        f"n_train={summary['n_train']} method={summary['method']}",
        f"test accuracy   uniform {u['test_acc']:.4f}   learned {lrn['test_acc']:.4f}",
        f"val accuracy    uniform {u['val_acc']:.4f}   learned {lrn['val_acc']:.4f}   (meta-train: in-sample for learned)",
        "AUROC of alpha (clean vs corrupted): " + ("unknown (no ground truth: user labels without synthetic noise "
                                                   "or clean labels)" if summary["auroc"] is None
                                                   else f"{summary['auroc']:.4f}"),
        f"min per-class ESS/n_c: {summary['ess_ratio_min']:.3f}   mean weight clean "
        f"{_num(summary['mean_weight_clean'])} / corrupted {_num(corrupted)}",
    ]
    methods = summary.get("methods") or {}
    if methods:
        lines.append("test accuracy by method (same features and trusted set): "
                     + ", ".join(f"{k} {v['test_acc']:.4f}" for k, v in methods.items()))
    g = summary.get("guard") or {}
    if g.get("mode", "off") != "off":
        lines.append(f"guard ({g['mode']}, {g.get('criterion')}, z={g.get('z')}): kept outer step {g['step']}"
                     + (" = uniform weights (no held-out gain beyond noise)" if g["step"] == 0 else ""))
    det = summary.get("detection") or {}
    if det:
        lines.append("noise detection AUROC: " + ", ".join(f"{k} {v['auroc']:.3f}" for k, v in det.items()
                                                              if v.get("auroc") is not None))
    lines += [
        ("converged" if summary.get("converged", True) else "NOT CONVERGED (marked; see summary.json convergence)"),
        f"time: total {summary['seconds']['total']:.1f}s (features {summary['seconds']['features']:.1f}s, "
        f"learned weights {summary['seconds']['learned']:.1f}s)",
    ]
    if summary.get("run_dir"):
        lines.append(f"run directory: {summary['run_dir']}")
    return "\n".join(lines)


STUDY = Study(name="run", summary="the main job: uniform vs learned weights on frozen features (resumes a killed run)",
              config=RunConfig, run=run, report=format_summary, quick=("outer.steps=10", "backbone.epochs=2"),
              default_config=__import__("pathlib").Path(__file__).parent / "configs" / "main.yaml",
              description=__doc__ or "")

if __name__ == "__main__":
    shim("run")
