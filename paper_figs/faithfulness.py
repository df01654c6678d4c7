"""Figure: faithfulness curves -- the query's confidence after removing / keeping only its top-K supporters.

Reads ``curves.csv`` of a finished ``experiments.faithfulness`` run. Left: mean change of the
query's confidence :math:`p_y(x)` after removing its K top-scored training samples (lower = the
method found the samples the prediction rests on), one line per method, and the K-random-samples
baseline (dashed; identical for every method). Right: mean confidence of a head trained on the
top-K only (higher = more faithful). Saves ``<stem>.pdf`` and ``<stem>.png``.

Usage::

    .venv/bin/python -m paper_figs.faithfulness runs/faithfulness/main [--out STEM]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["main", "plot_faithfulness"]


def plot_faithfulness(run: str | Path, out: Optional[str | Path] = None) -> List[Path]:
    """Draw the two-panel figure from ``<run>/curves.csv``."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from .style import DOUBLE_COL, apply_style, save_figure

    run = Path(run)
    if not (run / "DONE").is_file():
        raise SystemExit(f"{run} is not a finished faithfulness run (no DONE marker).")
    cv = pd.read_csv(run / "curves.csv")
    apply_style()
    modes = [m for m in ("remove", "keep") if m in set(cv["mode"])]
    fig, axes = plt.subplots(1, len(modes), figsize=(DOUBLE_COL, 2.4), squeeze=False)
    cmap = plt.get_cmap("tab10")
    methods = sorted(cv["method"].unique())
    for ax, mode in zip(axes[0], modes):
        col = "d_conf_mean" if mode == "remove" else "conf_mean"
        sub = cv[cv["mode"] == mode]
        for j, name in enumerate(methods):
            g = sub[(sub["method"] == name) & (sub["selection"] == "top")].sort_values("k")
            ax.plot(g["k"], g[col], marker="o", color=cmap(j % 10), label=name)
        rnd = sub[sub["selection"] == "random"].groupby("k")[col].mean()
        ax.plot(rnd.index, rnd.values, ls="--", color="0.3", label="random K")
        ax.set_xscale("log")
        ax.set_xlabel("K (training samples)")
        ax.set_ylabel("$\\Delta p_y(x)$ after removing top-K" if mode == "remove" else "$p_y(x)$, head on top-K only")
        ax.set_title("remove top-K" if mode == "remove" else "keep only top-K")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    stem = Path(out) if out else run / "figures" / "faithfulness"
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paper_figs.faithfulness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished experiments.faithfulness run directory")
    p.add_argument("--out", default=None, help="output stem (default <run>/figures/faithfulness)")
    args = p.parse_args(argv)
    for path in plot_faithfulness(args.run, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
