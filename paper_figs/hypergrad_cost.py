"""Figure: hypergradient accuracy vs cost for every rung of the approximation ladder.

Reads ``results.csv`` of ``experiments.hypergrad_accuracy`` run directories (several runs are
averaged per point). Left: cosine similarity of :math:`\\partial J/\\partial s` to the exact
(dense-solve) hypergradient; right: its relative error (log scale); x: cost = HVPs + inner steps
(log scale; ``first_order`` costs 0 and is drawn at 0.5). One row per dataset. Saves
``<stem>.pdf``/``.png`` at full text width.

Usage::

    .venv/bin/python -m paper_figs.hypergrad_cost runs/hypergrad_accuracy --out paper_out/figures/hypergrad_cost
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Sequence

from paper_figs.style import DOUBLE_COL, apply_style, save_figure, run_dirs_figure_main

__all__ = ["main", "plot_hypergrad_cost"]

STYLES = {"cg": ("C0", "o"), "neumann": ("C1", "s"), "unrolled": ("C2", "^"), "one_step": ("C3", "D"),
          "first_order": ("C4", "v")}


def plot_hypergrad_cost(results, stem: str | Path) -> List[Path]:
    """Draw the figure from a results DataFrame, a RunSet or paths of run directories; returns ``[pdf, png]``."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from analysis.loading import RunSet, load_runs

    if isinstance(results, pd.DataFrame):
        df = results
    else:
        rs = results if isinstance(results, RunSet) else load_runs(results, require_files=["results.csv"],
                                                                   what="hypergradient-accuracy runs")
        df = rs.csv("results.csv")
    df = df[df["method"] != "exact"]
    num = ["cost", "cosine", "rel_error"]
    df = df.groupby(["dataset", "method", "variant", "budget"], sort=False)[num].mean().reset_index()
    datasets = list(dict.fromkeys(df["dataset"]))
    apply_style()
    fig, axes = plt.subplots(len(datasets), 2, figsize=(DOUBLE_COL, 2.0 * len(datasets) + 0.5), squeeze=False)
    for i, ds in enumerate(datasets):
        sub = df[df["dataset"] == ds]
        for variant in dict.fromkeys(sub["variant"]):
            v = sub[sub["variant"] == variant].sort_values("cost")
            color, marker = STYLES.get(v["method"].iloc[0], ("k", "x"))
            truncated = "last" in variant
            x = v["cost"].clip(lower=0.5)
            kw = dict(color=color, marker=marker, ls="--" if truncated else "-", mfc="white" if truncated else color,
                      label=variant)
            axes[i, 0].plot(x, v["cosine"], **kw)
            axes[i, 1].plot(x, v["rel_error"].clip(lower=1e-16), **kw)
        axes[i, 0].set_ylabel(f"{ds}\ncosine to exact")
        axes[i, 1].set_ylabel("relative error")
        axes[i, 1].set_yscale("log")
        lo = float(sub["cosine"].min())
        axes[i, 0].set_ylim(max(-1.0, lo - 0.05), 1.02)
        for ax in axes[i]:
            ax.set_xscale("log")
            ax.set_xlabel("cost (HVPs + inner steps)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.1 if len(datasets) == 1 else 0.06, 1, 1))
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_dirs_figure_main("hypergrad_cost", __doc__, plot_hypergrad_cost, "hypergrad_cost", paths_help='hypergrad_accuracy run directories or folders containing them', argv=argv)


if __name__ == "__main__":
    sys.exit(main())
