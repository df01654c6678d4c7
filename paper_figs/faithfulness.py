"""Figure: faithfulness curves -- the query's confidence after removing / keeping only its top-K supporters.

Reads ``curves.csv`` of one finished faithfulness run (means and standard deviations over the
queries). Left: mean change of the query's confidence :math:`p_y(x)` after removing its K
top-scored training samples (lower = the method found the samples the prediction rests on);
right: mean confidence of a head trained on the top-K only (higher = more faithful). One line per
method, each with its own colour, marker and line style (registry order of
:data:`reweight.attribution.ATTRIBUTION`) and ``± std over queries`` error bars, dodged slightly
along K so they do not overlap; the K-random-samples baseline is the grey dotted line with a band
(identical for every method). Full text width.

Command line: ``carrot figure faithfulness FAITHFULNESS_RUN_DIR --out STEM``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["draw", "plot_faithfulness"]


def draw(runs: Sequence[Path], stem: Path) -> List[Path]:
    """Draw the two-panel figure from ``curves.csv`` of the one faithfulness run under ``runs``."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from analysis.tables import estimator_order

    from .loo_scatter import one_run
    from .style import DOUBLE_COL, apply_style, finish, series_style

    run = one_run(runs, ["curves.csv"], "faithfulness", "faithfulness runs")
    cv = pd.read_csv(run.path / "curves.csv")
    n_q = run.summary.get("n_queries", run.config.get("n_queries"))
    apply_style()
    modes = [m for m in ("remove", "keep") if m in set(cv["mode"])]
    fig, axes = plt.subplots(1, len(modes), figsize=(DOUBLE_COL, 2.6), squeeze=False)
    order = estimator_order()
    methods = sorted(cv.loc[cv["selection"] == "top", "method"].unique(),
                     key=lambda m: (order.index(m) if m in order else len(order), m))
    for ax, mode in zip(axes[0], modes):
        col = "d_conf" if mode == "remove" else "conf"
        sub = cv[cv["mode"] == mode]
        for j, name in enumerate(methods):
            g = sub[(sub["method"] == name) & (sub["selection"] == "top")].sort_values("k")
            st = series_style(order.index(name) if name in order else len(order) + j)
            dodge = 1.0 + 0.04 * (j - (len(methods) - 1) / 2)  # multiplicative: the K axis is logarithmic
            err = g[f"{col}_std"].to_numpy(dtype=float) if f"{col}_std" in g.columns else None
            ax.errorbar(g["k"] * dodge, g[f"{col}_mean"], yerr=err, capsize=1.5, elinewidth=0.6, label=name, **st)
        rnd = sub[sub["selection"] == "random"].groupby("k")[[f"{col}_mean"] +
                                                             ([f"{col}_std"] if f"{col}_std" in sub.columns else [])]
        r = rnd.mean()
        ax.plot(r.index, r[f"{col}_mean"], ls=":", color="0.4", lw=1.4, label="random K")
        if f"{col}_std" in r.columns:
            lo, hi = r[f"{col}_mean"] - r[f"{col}_std"], r[f"{col}_mean"] + r[f"{col}_std"]
            ax.fill_between(r.index, lo, hi, color="0.5", alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_xlabel("K (training samples)")
        ax.set_ylabel("$\\Delta p_y(x)$ after removing top-K" if mode == "remove" else "$p_y(x)$, head on top-K only")
        ax.set_title("remove top-K" if mode == "remove" else "keep only top-K")
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    handles, labels = axes[0][0].get_legend_handles_labels()
    title = f"mean ± std over {n_q} queries" if n_q else "mean ± std over queries"
    fig.legend(handles, labels, loc="outside right center", title=title)
    return finish(fig, stem)


def plot_faithfulness(run: Path, out: Optional[Path] = None) -> List[Path]:
    """Deprecated (one release): ``draw`` under its old name and signature."""
    from ._shim import warn_renamed

    warn_renamed("paper_figs.faithfulness.plot_faithfulness", "faithfulness")
    return draw([Path(run)], Path(out) if out else Path(run) / "figures" / "faithfulness")


if __name__ == "__main__":
    from paper_figs._shim import deprecated_main

    deprecated_main("faithfulness")
