"""Figure: histogram of the learned weights of clean vs corrupted training samples.

Reads ``weights.pt`` (alpha and the ground-truth corruption mask) of every finished run under the
given paths (main-job runs of one config, e.g. one per seed; runs of different configs are refused).
Each run is binned on one set of log-spaced bins; the figure shows the mean count per bin over the
runs (a step line) with a ``± std`` band when there are several runs, clean samples solid and
corrupted samples dashed and hatched (readable in greyscale), and the uniform weight 1 as a
reference line. Single-column width.

Command line: ``carrot figure weight_hist RUN_DIR... --out STEM``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

__all__ = ["draw", "plot_weight_hist"]


def draw(runs: Sequence[Path], stem: Path, bins: int = 40) -> List[Path]:
    """Draw the figure from the runs under ``runs``; returns ``[pdf, png]``.

    Raises:
        reweight.errors.RunDirError: if no run with a usable ``weights.pt`` is found.
        reweight.errors.ConfigError: if the runs' configs differ in more than seeds/names/paths.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FixedLocator, NullFormatter

    from analysis.loading import load_runs

    from .style import PALETTE, SINGLE_COL, apply_style, finish

    rs = load_runs(runs, require_weights=True, what="runs with weights.pt")
    rs.require_one_config("The weight_hist figure")
    w = rs.weights()
    alpha = w["alpha"].to_numpy()
    lo, hi = max(float(alpha.min()), 1e-4), max(float(alpha.max()), 1e-3)
    edges = np.geomspace(lo * 0.9, hi * 1.1, bins + 1)
    n_runs = w["run"].nunique()
    apply_style()
    fig, ax = plt.subplots(figsize=(SINGLE_COL, 2.2))
    for flag, name, ls, hatch in ((False, "clean", "-", None), (True, "corrupted", "--", "////")):
        sub = w[w["corrupted"] == flag]
        if sub.empty:
            continue
        counts = np.stack([np.histogram(np.clip(g["alpha"].to_numpy(), edges[0], edges[-1]), bins=edges)[0]
                           for _, g in sub.groupby("run")]).astype(float)
        mean = counts.mean(0)
        std = counts.std(0, ddof=1) if n_runs > 1 else np.zeros_like(mean)
        a = sub["alpha"].to_numpy()
        label = f"{name} (n={a.size // n_runs:,}/run, mean {a.mean():.2f})"
        ax.stairs(mean, edges, color=PALETTE[name], lw=1.1, ls=ls, label=label)
        if n_runs > 1:  # mean ± std of the count per bin over the runs
            ax.stairs(mean + std, edges, baseline=np.clip(mean - std, 0, None), color=PALETTE[name], alpha=0.3,
                      fill=True, lw=0, hatch=hatch)
        else:
            ax.stairs(mean, edges, color=PALETTE[name], alpha=0.15, fill=True, hatch=hatch)
    ax.axvline(1.0, color=PALETTE["uniform"], ls=":", lw=1.0, label="uniform weight 1")
    ax.set_xscale("log")
    # decimal tick labels at 1-10, 1-3-10 or 1-2-5 steps by the range (matplotlib's log formatter
    # labels minor ticks when the range spans few decades, and those labels collide)
    decades = np.log10(edges[-1] / edges[0])
    steps = (1,) if decades > 3 else (1, 3) if decades > 1.5 else (1, 2, 5)
    ticks = [t for t in (m * 10.0 ** e for e in range(-5, 4) for m in steps) if edges[0] <= t <= edges[-1]]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(r"learned weight $\alpha_i$ (log scale)")
    ax.set_ylabel("training samples per bin")
    what = f"mean ± std over {n_runs} runs" if n_runs > 1 else "1 run"
    ax.set_title(f"Learned weights ({what})")
    ax.legend(loc="upper left", frameon=True, facecolor="white", edgecolor="none", framealpha=0.9)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.6)  # room for the legend above the bars
    return finish(fig, stem)


def plot_weight_hist(runs: Sequence[Path], stem: Path) -> List[Path]:
    """Deprecated (one release): ``draw`` under its old name and signature."""
    from ._shim import warn_renamed

    warn_renamed("paper_figs.weight_hist.plot_weight_hist", "weight_hist")
    return draw([Path(r) for r in runs], Path(stem))


if __name__ == "__main__":
    from paper_figs._shim import deprecated_main

    deprecated_main("weight_hist")
