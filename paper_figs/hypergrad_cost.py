"""Figure: hypergradient accuracy vs cost for every rung of the approximation ladder.

Reads ``results.csv`` of ``experiments.hypergrad_accuracy`` run directories of one config (several
runs are averaged per point, with ``± std`` error bars; runs of different configs are refused).
Left: cosine similarity of :math:`\\partial J/\\partial s` to the exact (dense-solve) hypergradient;
right: its relative error (log scale); x: cost = HVPs + inner steps on a symlog axis (linear below
1), so the zero-cost ``first_order`` sits at a labelled 0 instead of vanishing off a log axis. Every
method has its own colour, marker and line style (registry order of
:data:`reweight.hypergrad.HYPERGRAD`); truncated back-propagation is dashed with open markers.
Single-point methods (``one_step``, ``first_order``) are drawn as large open markers under the
curves, and a point where ``one_step`` coincides with unrolled ``T = 1`` is annotated, so neither
hides the other. One row per dataset; full text width.

Command line: ``carrot figure hypergrad_cost RUN_DIR... --out STEM``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

__all__ = ["draw", "plot_hypergrad_cost"]


def draw(runs: Sequence[Path], stem: Path) -> List[Path]:
    """Draw the figure from the runs under ``runs``; returns ``[pdf, png]``."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    from analysis.loading import load_runs
    from analysis.tables import hypergrad_order

    from .style import DOUBLE_COL, apply_style, finish, series_style

    rs = load_runs(runs, require_files=["results.csv"], what="hypergradient-accuracy runs")
    rs.require_one_config("The hypergrad_cost figure")
    df = rs.csv("results.csv")
    df = df[df["method"] != "exact"]
    num = ["cost", "cosine", "rel_error"]
    g = df.groupby(["dataset", "method", "variant", "budget"], sort=False)[num]
    agg = g.mean().join(g.std(ddof=1).add_suffix("_std")).reset_index()
    n_runs = len(rs)
    order = hypergrad_order()
    datasets = list(dict.fromkeys(agg["dataset"]))
    apply_style()
    fig, axes = plt.subplots(len(datasets), 2, figsize=(DOUBLE_COL, 2.1 * len(datasets) + 0.6), squeeze=False)
    for i, ds in enumerate(datasets):
        sub = agg[agg["dataset"] == ds]
        variants = sorted(dict.fromkeys(sub["variant"]),
                          key=lambda v: (order.index(sub.loc[sub.variant == v, "method"].iloc[0])
                                         if sub.loc[sub.variant == v, "method"].iloc[0] in order else len(order), v))
        for variant in variants:
            v = sub[sub["variant"] == variant].sort_values("cost")
            method = v["method"].iloc[0]
            st = series_style(order.index(method) if method in order else len(order))
            truncated = "last" in variant
            single = len(v) == 1
            kw = dict(color=st["color"], marker=st["marker"], ls="--" if truncated else st["linestyle"],
                      mfc="white" if (truncated or single) else st["color"], label=variant,
                      ms=7 if single else 3.5, zorder=2 if single else 3, mew=1.0)
            if single:
                kw["ls"] = "none"
            for ax, col in ((axes[i, 0], "cosine"), (axes[i, 1], "rel_error")):
                y = v[col].to_numpy(dtype=float)
                if col == "rel_error":
                    y = np.clip(y, 1e-16, None)  # an exact zero error sits on the 1e-16 floor
                err = v[f"{col}_std"].to_numpy(dtype=float) if n_runs > 1 else None
                ax.errorbar(v["cost"], y, yerr=err, capsize=1.5, elinewidth=0.6, **kw)
        # one_step is unrolled differentiation through one inner step: say so where they coincide
        one = sub[sub["method"] == "one_step"]
        unr = sub[(sub["method"] == "unrolled") & (sub["budget"] == 1) & ~sub["variant"].str.contains("last")]
        if len(one) and len(unr) and abs(float(one["cost"].iloc[0]) - float(unr["cost"].iloc[0])) < 1e-9:
            same = abs(float(one["cosine"].iloc[0]) - float(unr["cosine"].iloc[0])) < 1e-3
            axes[i, 0].annotate("one_step" + (" = unrolled $T$=1" if same else " vs unrolled $T$=1"),
                                xy=(float(one["cost"].iloc[0]), float(one["cosine"].iloc[0])), xytext=(8, -14),
                                textcoords="offset points", fontsize=7, arrowprops={"arrowstyle": "-", "lw": 0.5})
        axes[i, 0].set_ylabel(f"{ds}\ncosine to exact")
        axes[i, 1].set_ylabel("relative error")
        axes[i, 1].set_yscale("log")
        lo = float(sub["cosine"].min())
        axes[i, 0].set_ylim(max(-1.0, lo - 0.05), 1.02)
        top = float(sub["cost"].max())
        for ax in axes[i]:
            ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
            ax.set_xlim(-0.3, max(top, 1.0) * 1.6)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel("cost (HVPs + inner steps; 0 = first-order)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    title = f"mean ± std over {n_runs} runs" if n_runs > 1 else None
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), title=title)
    return finish(fig, stem)


def plot_hypergrad_cost(runs: Sequence[Path], stem: Path) -> List[Path]:
    """Deprecated (one release): ``draw`` under its old name and signature."""
    from ._shim import warn_renamed

    warn_renamed("paper_figs.hypergrad_cost.plot_hypergrad_cost", "hypergrad_cost")
    return draw([Path(r) for r in runs], Path(stem))


if __name__ == "__main__":
    from paper_figs._shim import deprecated_main

    deprecated_main("hypergrad_cost")
