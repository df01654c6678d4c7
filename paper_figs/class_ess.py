"""Figure: per-class effective sample size ratio before and after learning the weights.

For each class ``c``: :math:`\\mathrm{ESS}_c/n_c` of the learned weights (bars: mean over runs,
error bars: std over runs when there are several), the uniform weights' value 1 (dotted line), and
the fraction of clean labels in the class (``1 - corruption rate``, diamonds) -- the ESS ratio of
weights spread evenly over the clean samples only (corrupted ones at 0). Computed with
:func:`analysis.tables.per_class_ess_table` from main-job runs of one config (runs of different
configs are refused). Single-column width.

Command line: ``carrot figure class_ess RUN_DIR... --out STEM``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

__all__ = ["draw", "plot_class_ess"]


def draw(runs: Sequence[Path], stem: Path) -> List[Path]:
    """Draw the figure from the runs (with ``weights.pt``) under ``runs``; returns ``[pdf, png]``."""
    import matplotlib.pyplot as plt
    import numpy as np

    from analysis.loading import load_runs
    from analysis.tables import per_class_ess_table

    from .style import PALETTE, SINGLE_COL, apply_style, finish

    rs = load_runs(runs, require_weights=True, what="runs with weights.pt")
    rs.require_one_config("The class_ess figure")
    t = per_class_ess_table(rs).data
    learned = t[t["stage"] == "learned"].set_index("class").sort_index()
    classes = learned.index.to_numpy()
    n = int(t["n_runs"].max())
    apply_style()
    fig, ax = plt.subplots(figsize=(SINGLE_COL, 2.2))
    x = np.arange(len(classes))
    std = learned["ess_ratio_std"].to_numpy(dtype=float)
    ax.bar(x, learned["ess_ratio_mean"], width=0.7, color=PALETTE["learned"], alpha=0.85,
           yerr=np.nan_to_num(std) if n > 1 else None, capsize=1.5, error_kw={"lw": 0.7},
           label=f"learned (± std, {n} runs)" if n > 1 else "learned")
    ax.scatter(x, 1 - learned["corruption_rate_mean"], marker="D", s=12, color=PALETTE["clean"], zorder=3,
               edgecolors="white", linewidths=0.4, label="clean fraction")
    ax.axhline(1.0, color=PALETTE["uniform"], ls=":", lw=1.0, label="uniform")
    ax.set_xticks(x, [str(c) for c in classes])
    ax.set_xlabel("class $c$")
    ax.set_ylabel(r"$\mathrm{ESS}_c / n_c$")
    ax.set_ylim(0, 1.45)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_title(f"Per-class effective sample size ({n} run{'s' if n > 1 else ''})")
    ax.legend(loc="upper center", ncol=3, handlelength=1.5, columnspacing=1.0)
    ax.grid(axis="x", visible=False)
    return finish(fig, stem)


def plot_class_ess(runs: Sequence[Path], stem: Path) -> List[Path]:
    """Deprecated (one release): ``draw`` under its old name and signature."""
    from ._shim import warn_renamed

    warn_renamed("paper_figs.class_ess.plot_class_ess", "class_ess")
    return draw([Path(r) for r in runs], Path(stem))


if __name__ == "__main__":
    from paper_figs._shim import deprecated_main

    deprecated_main("class_ess")
