"""Figure: exact leave-one-out change vs each estimator's prediction, one panel per method.

Reads ``loo_scores.csv`` of one finished sanity run (columns ``lam, seed, method, train_index,
corrupted, loo, estimate``; target: the mean validation loss) and draws its middle ``lam`` and
first seed (named in the title). Each panel scatters the exact :math:`\\Delta_i` (x) against the
method's score (y) for the LOO subset -- clean samples as green circles, label-corrupted ones as
magenta triangles (distinct in greyscale) -- with the ground-truth line :math:`y = x` (dashed; an
estimator on the LOO scale lies on it) and Spearman's :math:`\\rho` in the corner. Panels follow
the registry order of :data:`reweight.attribution.ATTRIBUTION`. Full text width.

Command line: ``carrot figure loo_scatter SANITY_RUN_DIR --out STEM``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["draw", "one_run", "plot_loo_scatter"]


def one_run(runs: Sequence[Path], require_files: Sequence[str], figure: str, what: str):
    """The single usable run under ``runs`` (a :class:`analysis.loading.RunRecord`).

    Raises:
        reweight.errors.ConfigError: if several runs are found (named), since the figure draws one.
    """
    from analysis.loading import load_runs
    from reweight.errors import ConfigError

    rs = load_runs(runs, require_files=list(require_files), what=what)
    if len(rs) > 1:
        raise ConfigError(f"The {figure} figure draws one run, but {len(rs)} {what} were found: "
                          f"{', '.join(str(r.path) for r in rs)}. Pass one run directory.")
    return rs.runs[0]


def draw(runs: Sequence[Path], stem: Path, lam: Optional[float] = None, seed: Optional[int] = None) -> List[Path]:
    """Draw the figure from the one sanity run under ``runs``; returns ``[pdf, png]``.

    ``lam`` (default: the run's middle one) and ``seed`` (default: the first) pick the scores drawn.

    Raises:
        reweight.errors.RunDirError: if the run has no rows for ``lam``/``seed`` (naming the available ones).
    """
    import matplotlib.pyplot as plt
    import pandas as pd
    from scipy.stats import spearmanr

    from analysis.tables import estimator_order
    from reweight.errors import RunDirError

    from .style import DOUBLE_COL, PALETTE, apply_style, finish

    run = one_run(runs, ["loo_scores.csv"], "loo_scatter", "sanity runs")
    df = pd.read_csv(run.path / "loo_scores.csv")
    if df.empty:
        raise RunDirError(f"Run {run.path}: loo_scores.csv has no rows.")
    lams = sorted(df["lam"].unique())
    lam = lams[len(lams) // 2] if lam is None else lam
    seed = int(df["seed"].min()) if seed is None else int(seed)
    df = df[(df["lam"] == lam) & (df["seed"] == seed)]
    if df.empty:
        seeds = sorted(pd.read_csv(run.path / "loo_scores.csv")["seed"].unique())
        raise RunDirError(f"Run {run.path}: loo_scores.csv has no rows for lam={lam} seed={seed}; "
                          f"available lams: {lams}, seeds: {seeds}.")
    order = estimator_order()
    methods = sorted(df["method"].unique(), key=lambda m: (order.index(m) if m in order else len(order), m))
    apply_style()
    cols = 3
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(DOUBLE_COL, 1.75 * rows + 0.55), squeeze=False)
    for ax, name in zip(axes.flat, methods):
        g = df[df["method"] == name]
        for corrupted, key, marker in ((False, "clean", "o"), (True, "corrupted", "^")):
            h = g[g["corrupted"] == corrupted]
            ax.scatter(h["loo"], h["estimate"], s=7, alpha=0.75, color=PALETTE[key], marker=marker,
                       label=f"{key} sample", linewidths=0)
        ax.axline((0.0, 0.0), slope=1.0, color="0.25", ls="--", lw=0.8, label="$y = x$ (exact)")
        rho = spearmanr(g["loo"], g["estimate"]).statistic
        ax.set_title(name)
        ax.text(0.03, 0.95, f"$\\rho$ = {rho:.3f}", transform=ax.transAxes, va="top", fontsize=7)
        ax.axhline(0, color="0.7", lw=0.5)
        ax.axvline(0, color="0.7", lw=0.5)
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    for ax in list(axes.flat)[len(methods):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("exact LOO $\\Delta_i$")
    for ax in axes[:, 0]:
        ax.set_ylabel("estimate")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, markerscale=1.5)
    fig.suptitle(f"Estimators vs exact leave-one-out (mean validation loss, $\\lambda$ = {lam:g}, seed {seed})")
    return finish(fig, stem)


def plot_loo_scatter(run: Path, lam: Optional[float] = None, seed: Optional[int] = None,
                     out: Optional[Path] = None) -> List[Path]:
    """Deprecated (one release): ``draw`` under its old name and signature."""
    from ._shim import warn_renamed

    warn_renamed("paper_figs.loo_scatter.plot_loo_scatter", "loo_scatter")
    return draw([Path(run)], Path(out) if out else Path(run) / "figures" / "loo_scatter", lam=lam, seed=seed)


if __name__ == "__main__":
    from paper_figs._shim import deprecated_main

    deprecated_main("loo_scatter")
