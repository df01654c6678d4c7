"""Figure: test accuracy vs trusted-set size, one panel per noise setting, one line per method.

Reads the trusted-set study (``carrot trusted``; :func:`analysis.trusted.load_trusted`, default
variant). Each point is the mean test accuracy over seeds with its 95 % Student-t interval as an
error bar; methods keep one colour, marker and line style (readable in greyscale), the oracle (true
labels) is a thin dotted reference. Double-column width.

Command line: ``carrot figure trusted_size STUDY_DIR --out STEM``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence

__all__ = ["draw"]


def draw(runs: Sequence[Path], stem: Path) -> List[Path]:
    """Draw the figure from the study folder(s) ``runs``; returns ``[pdf, png]``.

    Raises:
        reweight.errors.RunDirError: if no finished trusted-study run is found.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy.stats import t as student_t

    from analysis.trusted import METHOD_ORDER, load_trusted, order_rows

    from .style import DOUBLE_COL, apply_style, finish, series_style

    frame = load_trusted(list(runs))
    m = frame.methods[frame.methods["variant"] == "default"]
    settings = list(dict.fromkeys(order_rows(m)["setting"]))
    apply_style()
    ncol = min(4, len(settings))
    nrow = math.ceil(len(settings) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(DOUBLE_COL, 2.1 * nrow + 0.5), squeeze=False, sharey=False)
    methods = [x for x in METHOD_ORDER if x in set(m["method"])]
    handles = {}
    for ax, setting in zip(axes.flat, settings):
        sub = m[m["setting"] == setting]
        for i, meth in enumerate(methods):
            g = sub[sub["method"] == meth].groupby("M")["test_acc"]
            mean, sd, n = g.mean(), g.std(ddof=1), g.count()
            half = np.array([student_t.ppf(0.975, k - 1) * s / math.sqrt(k) if k > 1 else 0.0
                             for s, k in zip(sd.fillna(0), n)])
            st = series_style(i)
            kw = dict(lw=0.8, ls=":", marker=None, color="0.3") if meth == "oracle" else dict(lw=1.1, ms=3.5, **st)
            h = ax.errorbar(mean.index, mean.values, yerr=half, capsize=2, elinewidth=0.7, label=meth, **kw)
            handles[meth] = h
        ax.set_xscale("log")
        ticks = sorted(set(sub["M"]))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(setting)
        ax.set_xlabel("trusted-set size M")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    for ax in list(axes.flat)[len(settings):]:
        ax.set_visible(False)
    seeds = int(m.groupby(["setting", "M", "method"])["seed"].nunique().min())
    fig.legend([handles[k] for k in methods], methods, loc="lower center", ncol=min(len(methods), 7), frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    axes[0, 0].set_ylabel(f"test accuracy\n(mean, 95 % CI, {seeds} seeds)")
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.set(rect=(0, 0.08, 1, 0.92))
    return finish(fig, stem)
