"""Figure: the outer loop over its steps -- validation loss, weight AUROC, min per-class ESS, accuracy.

Reads ``metrics.jsonl`` (one row per outer step) of every finished run under the given paths
(main-job runs, one per seed): the mean over runs as a line, the range (min..max) over runs as a
band. Panels: clean validation loss :math:`L_\\mathrm{val}(W^*(\\alpha))`; AUROC of :math:`\\alpha`
at separating clean from corrupted samples; :math:`\\min_c \\mathrm{ESS}_c/n_c`; test accuracy.
Saves ``<stem>.pdf``/``.png`` at full text width.

Usage::

    .venv/bin/python -m paper_figs.trajectories runs/readme --out paper_out/figures/trajectories
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Sequence

from paper_figs.style import DOUBLE_COL, PALETTE, apply_style, save_figure, run_dirs_figure_main

__all__ = ["PANELS", "main", "plot_trajectories"]

PANELS = [("val_loss", "validation loss"), ("auroc", "AUROC of weights\n(clean vs corrupted)"),
          ("ess_ratio_min", r"min$_c$ ESS$_c/n_c$"), ("test_acc", "test accuracy")]


def plot_trajectories(runs, stem: str | Path, panels=PANELS) -> List[Path]:
    """Draw the figure from a RunSet (or paths); panels whose metric no run logs are left out."""
    import matplotlib.pyplot as plt

    from analysis.loading import RunSet, load_runs

    if not isinstance(runs, RunSet):
        runs = load_runs(runs, require_metrics=["step", "val_loss"], what="runs with metrics")
    m = runs.metrics(require=["step"])
    panels = [(k, lab) for k, lab in panels if k in m.columns and m[k].notna().any()]
    apply_style()
    fig, axes = plt.subplots(1, len(panels), figsize=(DOUBLE_COL, 1.75), squeeze=False)
    n_runs = m["run"].nunique()
    for ax, (key, label) in zip(axes[0], panels):
        g = m.groupby("step")[key]
        mean, lo, hi = g.mean(), g.min(), g.max()
        x = mean.index.to_numpy() + 1
        ax.fill_between(x, lo.to_numpy(), hi.to_numpy(), color=PALETTE["learned"], alpha=0.2, lw=0,
                        label=f"range over {n_runs} runs" if n_runs > 1 else None)
        ax.plot(x, mean.to_numpy(), color=PALETTE["learned"], label="mean" if n_runs > 1 else None)
        ax.set_ylabel(label)
        ax.set_xlabel("outer step")
    if n_runs > 1:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=2, bbox_to_anchor=(0.5, 1.0))
        fig.tight_layout(w_pad=1.0, rect=(0, 0, 1, 0.88))
    else:
        fig.tight_layout(w_pad=1.0)
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_dirs_figure_main("trajectories", __doc__, plot_trajectories, "trajectories", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
