"""Figure: histogram of the learned weights of clean vs corrupted training samples.

Reads ``weights.pt`` (alpha and the ground-truth corruption mask) of every finished run under the
given paths (main-job runs, e.g. one per seed), pools the samples over runs, and draws the
density of :math:`\\alpha_i` on a log axis, clean and corrupted separately, with the uniform weight
1 as a reference line. Saves ``<stem>.pdf`` and ``<stem>.png`` at single-column width.

Usage::

    .venv/bin/python -m paper_figs.weight_hist runs/readme --out paper_out/figures/weight_hist
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Sequence

from paper_figs.style import PALETTE, SINGLE_COL, apply_style, save_figure, run_dirs_figure_main

__all__ = ["main", "plot_weight_hist"]


def plot_weight_hist(runs, stem: str | Path, bins: int = 40) -> List[Path]:
    """Draw the figure from an :class:`analysis.loading.RunSet` (or paths); returns ``[pdf, png]``.

    Raises:
        reweight.errors.RunDirError: if no run with a usable ``weights.pt`` is found.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    from analysis.loading import RunSet, load_runs

    if not isinstance(runs, RunSet):
        runs = load_runs(runs, require_weights=True, what="runs with weights.pt")
    w = runs.weights()
    apply_style()
    fig, ax = plt.subplots(figsize=(SINGLE_COL, 2.1))
    alpha = w["alpha"].to_numpy()
    lo, hi = max(alpha.min(), 1e-4), alpha.max()
    edges = np.geomspace(lo * 0.9, hi * 1.1, bins + 1)
    for flag, name in ((False, "clean"), (True, "corrupted")):
        a = w.loc[w["corrupted"] == flag, "alpha"].to_numpy()
        if a.size == 0:
            continue
        ax.hist(np.clip(a, edges[0], edges[-1]), bins=edges, histtype="stepfilled", alpha=0.35,
                color=PALETTE[name], label=f"{name} (n={a.size:,}, mean {a.mean():.2f})")
        ax.hist(np.clip(a, edges[0], edges[-1]), bins=edges, histtype="step", color=PALETTE[name], lw=1.0)
    ax.axvline(1.0, color=PALETTE["uniform"], ls="--", lw=0.9, label="uniform weight 1")
    ax.set_xscale("log")
    # decimal tick labels at 1-3-10 steps (matplotlib's log formatter labels minor ticks when the
    # range spans few decades, and those labels collide)
    from matplotlib.ticker import FixedLocator, NullFormatter

    cands = [m * 10.0 ** e for e in range(-4, 3) for m in (1, 3)]
    ticks = [t for t in cands if edges[0] <= t <= edges[-1]]
    if len(ticks) < 4:  # less than ~1.5 decades: 1-2-5 steps
        ticks = [t for t in (m * 10.0 ** e for e in range(-4, 3) for m in (1, 2, 5)) if edges[0] <= t <= edges[-1]]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(r"learned weight $\alpha_i$ (log scale)")
    ax.set_ylabel("training samples")
    n_runs = w["run"].nunique()
    ax.set_title(f"Learned weights, {n_runs} run{'s' if n_runs > 1 else ''} pooled")
    ax.legend(loc="upper left", frameon=True, facecolor="white", edgecolor="none", framealpha=0.9)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.6)  # room for the legend above the bars
    fig.tight_layout()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_dirs_figure_main("weight_hist", __doc__, plot_weight_hist, "weight_hist", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
