"""Figure: exact leave-one-out change vs each estimator's prediction, one panel per method.

Reads ``loo_scores.csv`` of a finished ``experiments.sanity`` run (columns ``lam, seed, method,
train_index, corrupted, loo, estimate``; target: the mean validation loss). Each panel scatters the
exact :math:`\\Delta_i` (x) against the method's score (y) for the LOO subset, clean samples and
label-corrupted samples in their fixed colours, with Spearman's rho in the corner. Saves
``<stem>.pdf`` and ``<stem>.png``.

Usage::

    .venv/bin/python -m paper_figs.loo_scatter runs/sanity/main [--lam 0.01] [--seed 0] [--out STEM]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["main", "plot_loo_scatter"]


def plot_loo_scatter(run: str | Path, lam: Optional[float] = None, seed: Optional[int] = None,
                     out: Optional[str | Path] = None) -> List[Path]:
    """Draw the figure for one ``lam`` (default: the middle one) and ``seed`` (default: the first)."""
    import matplotlib.pyplot as plt
    import pandas as pd
    from scipy.stats import spearmanr

    from .style import DOUBLE_COL, PALETTE, apply_style, save_figure

    run = Path(run)
    if not (run / "DONE").is_file():
        raise SystemExit(f"{run} is not a finished sanity run (no DONE marker).")
    df = pd.read_csv(run / "loo_scores.csv")
    lams = sorted(df["lam"].unique())
    lam = lams[len(lams) // 2] if lam is None else lam
    seed = int(df["seed"].min()) if seed is None else seed
    df = df[(df["lam"] == lam) & (df["seed"] == seed)]
    if df.empty:
        raise SystemExit(f"No rows for lam={lam} seed={seed}; available lams: {lams}.")
    methods = sorted(df["method"].unique())
    apply_style()
    cols = 3
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(DOUBLE_COL, 1.9 * rows), squeeze=False)
    for ax, name in zip(axes.flat, methods):
        g = df[df["method"] == name]
        for corrupted, key in ((False, "clean"), (True, "corrupted")):
            h = g[g["corrupted"] == corrupted]
            ax.scatter(h["loo"], h["estimate"], s=4, alpha=0.7, color=PALETTE[key], label=key, linewidths=0)
        rho = spearmanr(g["loo"], g["estimate"]).statistic
        ax.set_title(name)
        ax.text(0.03, 0.95, f"$\\rho$ = {rho:.3f}", transform=ax.transAxes, va="top")
        ax.axhline(0, color="0.6", lw=0.5)
        ax.axvline(0, color="0.6", lw=0.5)
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    for ax in list(axes.flat)[len(methods):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("exact LOO $\\Delta_i$")
    for ax in axes[:, 0]:
        ax.set_ylabel("estimate")
    axes.flat[0].legend(loc="lower right")
    fig.suptitle(f"Estimators vs exact leave-one-out (mean validation loss, $\\lambda$={lam:g}, seed {seed})", fontsize=8)
    fig.tight_layout()
    stem = Path(out) if out else run / "figures" / f"loo_scatter_lam{lam:g}_seed{seed}"
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paper_figs.loo_scatter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished experiments.sanity run directory")
    p.add_argument("--lam", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="output stem (default <run>/figures/loo_scatter_lam<lam>_seed<seed>)")
    args = p.parse_args(argv)
    for path in plot_loo_scatter(args.run, args.lam, args.seed, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
