"""Figure: accuracy per epoch per staged-training strategy, with stage boundaries.

Reads the ``experiments.staged`` study folder(s) (``results.csv`` plus the ``metrics.jsonl`` of each
staged run listed there, one row per epoch; :func:`analysis.loading.load_staged_study`). One panel
per strategy: clean test accuracy per epoch (mean over seeds, with a ``± std`` band when there are
several), clean validation accuracy dashed (in-sample: every stage keeps its best validation
epoch), the final test accuracy after each stage restored its best epoch (star), stage boundaries
as vertical lines labelled with the stage names, and the head-only strategy (a) as a dotted
reference line. Runs of one strategy whose configs differ are refused. Full text width
(6.75 in, two panels per row).

Command line: ``carrot figure staged_curves STUDY_DIR... --out STEM``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

__all__ = ["TITLES", "draw", "plot_staged_curves"]

TITLES = {
    "b_focus": "(b) warm-up > freeze > focus (strategy B)",
    "b_focus_once": "(b2) warm-up > freeze > focus, weights once",
    "c_gradual": "(c) gradual unfreezing",
    "d_full": "(d) full fine-tuning, uniform weights",
}


def draw(runs: Sequence[Path], stem: Path) -> List[Path]:
    """Draw the figure for the staged study folder(s) ``runs``; returns ``[pdf, png]``.

    Raises:
        reweight.errors.RunDirError: if a folder has no ``results.csv`` or a staged run no metrics.
        reweight.errors.ConfigError: if runs of one strategy differ in config (other than seeds).
    """
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    from analysis.loading import config_differences, load_staged_study
    from reweight.errors import ConfigError, RunDirError

    from .style import DOUBLE_COL, apply_style, finish, series_style

    df, rs = load_staged_study(runs)
    diffs = config_differences(df, ["strategy"])
    if diffs:
        raise ConfigError(f"The staged_curves figure pools the seeds of one strategy only, but their configs differ "
                          f"in {', '.join(c[4:] for c in diffs)}. Pass study folders of one config.")
    records = {r.run: r for r in rs}
    curves: Dict[str, Dict[int, List[dict]]] = {}
    for row in df.itertuples():
        if row.strategy == "a_head_only":
            continue
        rows = records[row.run].metrics_rows()
        if not rows:
            raise RunDirError(f"Run {records[row.run].path} has no metrics.jsonl rows.")
        curves.setdefault(row.strategy, {})[int(row.seed)] = rows
    head_only = df.loc[df.strategy == "a_head_only", "test_acc"]
    names = [s for s in TITLES if s in curves] + sorted(s for s in curves if s not in TITLES)
    if not names:
        raise RunDirError(f"No staged strategy (other than a_head_only) under {', '.join(map(str, runs))}.")
    cols = min(2, len(names))
    nrows = int(np.ceil(len(names) / cols))
    test_st, val_st = series_style(0), series_style(1)
    apply_style()
    fig, axes = plt.subplots(nrows, cols, figsize=(DOUBLE_COL, 2.0 * nrows + 0.45), sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, names):
        seeds = curves[name]
        L = min(len(r) for r in seeds.values())
        rows0 = seeds[sorted(seeds)[0]]
        ep = np.array([r["global_epoch"] + 1 for r in rows0[:L]])
        test = np.array([[r["test_acc"] for r in seeds[s][:L]] for s in sorted(seeds)], dtype=float)
        val = np.array([[r["val_acc"] for r in seeds[s][:L]] for s in sorted(seeds)], dtype=float)
        n = len(seeds)
        for arr, st, lab in ((test, test_st, "test"), (val, val_st, "clean val (in-sample)")):
            mean = arr.mean(0)
            line, = ax.plot(ep, mean, color=st["color"], ls=st["linestyle"], marker=st["marker"], ms=2.5,
                            label=lab + (f", mean ± std over {n} seeds" if n > 1 and lab == "test" else ""))
            if n > 1:
                sd = arr.std(0, ddof=1)
                ax.fill_between(ep, mean - sd, mean + sd, color=st["color"], alpha=0.18, lw=0)
        final = df.loc[df.strategy == name, "test_acc"]
        if len(final):
            ax.plot([ep[-1] + 0.3], [float(final.mean())], marker="*", ms=8, color="#D55E00", ls="none",
                    label="final test (best epochs restored)")
        if len(head_only):
            ax.axhline(float(head_only.mean()), color="0.3", lw=1.0, ls=":", label="(a) head-only")
        starts: Dict[str, int] = {}
        for r in rows0:
            starts.setdefault(r["stage"], r["global_epoch"])
        for st_name, g in starts.items():
            if g > 0:
                ax.axvline(g + 0.5, color="0.6", lw=0.8)
            ax.text(g + 0.6, 0.03, st_name, rotation=90, fontsize=7, color="0.35",
                    transform=ax.get_xaxis_transform(), va="bottom", clip_on=True)
        ax.set_title(TITLES.get(name, name))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
        ax.set_xlim(0.5, max(ep[-1] + 0.7, 2.5))  # at least two epochs wide: integer ticks even for 1-epoch runs
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4))
    return finish(fig, stem)


def plot_staged_curves(study: Path, stem: Path) -> List[Path]:
    """Deprecated (one release): ``draw`` under its old name and signature."""
    from ._shim import warn_renamed

    warn_renamed("paper_figs.staged_curves.plot_staged_curves", "staged_curves")
    return draw([Path(study)], Path(stem))


if __name__ == "__main__":
    from paper_figs._shim import deprecated_main

    deprecated_main("staged_curves")
