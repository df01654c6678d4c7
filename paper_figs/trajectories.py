"""Figure: the outer loop over its steps -- validation loss, weight AUROC, min per-class ESS, accuracy.

Reads ``metrics.jsonl`` (one row per outer step) of every finished run under the given paths
(main-job runs of one config, one per seed; runs of different configs are refused): the mean over
runs as a line and, with several runs, a ``mean ± std`` band. Step ``t`` is the state after ``t``
updates of the weights: step 0 is the uniform start, before any update (the row ``step`` of
``metrics.jsonl``). Panels: clean validation loss :math:`L_\\mathrm{val}(W^*(\\alpha))`; AUROC of
:math:`\\alpha` at separating clean from corrupted samples; :math:`\\min_c \\mathrm{ESS}_c/n_c`;
test accuracy. Full text width.

Command line: ``carrot figure trajectories RUN_DIR... --out STEM``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

__all__ = ["PANELS", "draw", "plot_trajectories"]

PANELS = [("val_loss", "validation loss\n(outer objective)"), ("auroc", "AUROC of weights\n(clean vs corrupted)"),
          ("ess_ratio_min", r"min$_c$ ESS$_c/n_c$"), ("test_acc", "test accuracy")]


def draw(runs: Sequence[Path], stem: Path, panels=PANELS) -> List[Path]:
    """Draw the figure from the runs under ``runs``; panels whose metric no run logs are left out."""
    import matplotlib.pyplot as plt

    from analysis.loading import load_runs

    from .style import DOUBLE_COL, PALETTE, apply_style, band, finish

    rs = load_runs(runs, require_metrics=["step", "val_loss"], what="runs with metrics")
    rs.require_one_config("The trajectories figure")
    m = rs.metrics(require=["step"])
    panels = [(k, lab) for k, lab in panels if k in m.columns and m[k].notna().any()]
    n_runs = m["run"].nunique()
    apply_style()
    fig, axes = plt.subplots(1, len(panels), figsize=(DOUBLE_COL, 2.0), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        g = m.groupby("step")[key]
        mean, std = g.mean(), g.std(ddof=1)
        band(ax, mean.index.to_numpy(), mean.to_numpy(), std.to_numpy(), n_runs, color=PALETTE["learned"],
             label=f"mean ± std over {n_runs} runs" if n_runs > 1 else "1 run")
        ax.set_ylabel(label)
        ax.set_xlabel("outer step $t$")
        ax.set_xlim(left=0)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=2,
               title="outer step $t$ = weights after $t$ updates ($t = 0$: uniform weights, before any update)")
    return finish(fig, stem)


def plot_trajectories(runs: Sequence[Path], stem: Path) -> List[Path]:
    """Deprecated (one release): ``draw`` under its old name and signature."""
    from ._shim import warn_renamed

    warn_renamed("paper_figs.trajectories.plot_trajectories", "trajectories")
    return draw([Path(r) for r in runs], Path(stem))


if __name__ == "__main__":
    from paper_figs._shim import deprecated_main

    deprecated_main("trajectories")
