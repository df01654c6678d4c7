"""Figure: per-class effective sample size ratio before and after learning the weights.

For each class ``c``: :math:`\\mathrm{ESS}_c/n_c` of the learned weights (mean over runs, error bar =
std over runs), the uniform weights' value 1, and the fraction of clean labels in the class
(``1 - corruption rate``) -- the ESS ratio of weights spread evenly over the clean samples only
(corrupted ones at 0). Computed with :func:`analysis.tables.per_class_ess_table`.

Usage::

    .venv/bin/python -m paper_figs.class_ess runs/readme --out paper_out/figures/class_ess
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Sequence

from paper_figs.style import PALETTE, SINGLE_COL, apply_style, save_figure, run_dirs_figure_main

__all__ = ["main", "plot_class_ess"]


def plot_class_ess(runs, stem: str | Path) -> List[Path]:
    """Draw the figure from a RunSet (or paths) of runs with ``weights.pt``; returns ``[pdf, png]``."""
    import matplotlib.pyplot as plt
    import numpy as np

    from analysis.loading import RunSet, load_runs
    from analysis.tables import per_class_ess_table

    if not isinstance(runs, RunSet):
        runs = load_runs(runs, require_weights=True, what="runs with weights.pt")
    t = per_class_ess_table(runs).data
    learned = t[t["stage"] == "learned"].groupby("class", sort=True).mean(numeric_only=True)
    classes = learned.index.to_numpy()
    apply_style()
    fig, ax = plt.subplots(figsize=(SINGLE_COL, 2.1))
    x = np.arange(len(classes))
    std = learned["ess_ratio_std"].fillna(0).to_numpy()
    ax.bar(x, learned["ess_ratio_mean"], width=0.7, color=PALETTE["learned"], alpha=0.85,
           yerr=std if std.any() else None, capsize=1.5, error_kw={"lw": 0.7}, label="learned")
    ax.scatter(x, 1 - learned["corruption_rate_mean"], marker="_", s=120, color=PALETTE["clean"], zorder=3, lw=1.5,
               label="clean fraction")
    ax.axhline(1.0, color=PALETTE["uniform"], ls="--", lw=0.9, label="uniform")
    ax.set_xticks(x, [str(c) for c in classes])
    ax.set_xlabel("class c")
    ax.set_ylabel(r"$\mathrm{ESS}_c / n_c$")
    ax.set_ylim(0, 1.45)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    n = int(t["n_runs"].max())
    ax.set_title(f"Per-class effective sample size ({n} run{'s' if n > 1 else ''})")
    ax.legend(loc="upper center", ncol=3, handlelength=1.5, columnspacing=1.0)
    ax.grid(axis="x", visible=False)
    fig.tight_layout()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_dirs_figure_main("class_ess", __doc__, plot_class_ess, "class_ess", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
