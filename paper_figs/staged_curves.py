"""Figure: accuracy per epoch per staged-training strategy, with stage boundaries.

Reads ``<study>/results.csv`` written by ``experiments.staged`` and the ``metrics.jsonl`` of every
staged run directory listed there (one JSON row per epoch). One panel per strategy: clean test
accuracy per epoch (mean over seeds, each seed faint), clean validation accuracy dashed, the final test accuracy after each stage restored its
best validation epoch (star), stage
boundaries as vertical lines labelled with the stage names, and the head-only strategy (a) as a
horizontal reference line. Saves ``<stem>.pdf`` and ``<stem>.png``.

Usage::

    .venv/bin/python -m paper_figs.staged_curves runs/staged [--out runs/staged/staged_curves]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["load_curves", "main", "plot_staged_curves"]

TITLES = {
    "b_focus": "(b) warm-up > freeze > focus (strategy B)",
    "b_focus_once": "(b2) warm-up > freeze > focus, weights once",
    "c_gradual": "(c) gradual unfreezing",
    "d_full": "(d) full fine-tuning, uniform weights",
}


def load_curves(study: str | Path) -> Dict[str, Dict[int, List[dict]]]:
    """``{strategy: {seed: metrics rows}}`` of the staged runs listed in ``<study>/results.csv``."""
    import pandas as pd

    study = Path(study)
    df = pd.read_csv(study / "results.csv")
    out: Dict[str, Dict[int, List[dict]]] = {}
    for r in df.itertuples():
        if r.strategy == "a_head_only":
            continue
        p = Path(r.run_dir) / "metrics.jsonl"
        if not p.is_file():
            p = study / Path(r.run_dir).name / "metrics.jsonl"
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        out.setdefault(r.strategy, {})[int(r.seed)] = rows
    return out


def _style():
    try:
        from paper_figs.style import apply_style, save_figure  # created by another module owner

        apply_style()
        return save_figure
    except ImportError:
        return None


def plot_staged_curves(study: str | Path, stem: str | Path, strategies: Optional[Sequence[str]] = None) -> List[Path]:
    """Draw the figure for the study directory ``study``; returns the written paths (PDF, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - used through matplotlib.ticker
    import numpy as np
    import pandas as pd

    save_figure = _style()
    study = Path(study)
    curves = load_curves(study)
    df = pd.read_csv(study / "results.csv")
    head_only = df.loc[df.strategy == "a_head_only", "test_acc"]
    names = [s for s in (strategies or list(TITLES)) if s in curves] + \
        [s for s in curves if s not in TITLES and (strategies is None or s in strategies)]
    n = max(1, len(names))
    cols = min(2, n)
    rows_n = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.3 * rows_n), sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, names):
        seeds = curves[name]
        test = []
        for sd, rows in sorted(seeds.items()):
            ep = [r["global_epoch"] + 1 for r in rows]
            ax.plot(ep, [r["test_acc"] for r in rows], color="C0", alpha=0.25, lw=0.8)
            test.append([r["test_acc"] for r in rows])
        rows0 = seeds[sorted(seeds)[0]]
        ep = np.array([r["global_epoch"] + 1 for r in rows0])
        L = min(len(t) for t in test)
        ax.plot(ep[:L], np.mean([t[:L] for t in test], axis=0), color="C0", lw=1.8, marker="o", ms=3,
                label="test (mean over seeds)")
        val = np.mean([[r["val_acc"] for r in seeds[s]][:L] for s in seeds], axis=0)
        ax.plot(ep[:L], val, color="C1", lw=1.2, ls="--", label="clean val")
        final = df.loc[df.strategy == name, "test_acc"]
        if len(final):
            ax.plot([ep[L - 1] + 0.3], [float(final.mean())], marker="*", ms=9, color="C3", ls="none",
                    label="final test (best epochs restored)")
        if len(head_only):
            ax.axhline(float(head_only.mean()), color="0.3", lw=1.0, ls=":", label="(a) head-only")
        # stage boundaries
        starts: Dict[str, int] = {}
        for r in rows0:
            starts.setdefault(r["stage"], r["global_epoch"])
        for st, g in starts.items():
            if g > 0:
                ax.axvline(g + 0.5, color="0.6", lw=0.8)
            ax.text(g + 0.6, 0.02, st, rotation=90, fontsize=7, color="0.35", transform=ax.get_xaxis_transform(),
                    va="bottom", clip_on=True)
        ax.set_title(TITLES.get(name, name), fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
        ax.set_xlim(0.5, max(ep[L - 1] + 0.7, 2.5))  # at least two epochs wide: integer ticks even for 1-epoch runs
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("accuracy")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    if save_figure is not None:
        res = save_figure(fig, str(stem))
        plt.close(fig)
        if isinstance(res, (list, tuple)) and res:
            return [Path(p) for p in res]
        return [stem.with_suffix(".pdf"), stem.with_suffix(".png")]
    paths = [stem.with_suffix(".pdf"), stem.with_suffix(".png")]
    fig.savefig(paths[0], bbox_inches="tight", metadata={"CreationDate": None})
    fig.savefig(paths[1], bbox_inches="tight", dpi=150)
    plt.close(fig)
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paper_figs.staged_curves", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", nargs="?", default="runs/staged", help="directory with results.csv (experiments.staged)")
    p.add_argument("--out", default=None, help="output stem (default <study>/staged_curves)")
    a = p.parse_args(argv)
    study = Path(a.study)
    if not (study / "results.csv").is_file():
        print(f"error: {study / 'results.csv'} not found; run python -m experiments.staged first.", file=sys.stderr)
        return 2
    for path in plot_staged_curves(study, a.out or study / "staged_curves"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
