"""One matplotlib style for every paper figure: house widths, print-size fonts, greyscale-safe series.

Widths follow a two-column conference layout (NeurIPS/ICML-like): a single column is 3.25 in, the
full text width 6.75 in. Figures are drawn at exactly one of these widths and saved without
cropping (no ``bbox_inches="tight"``), so a figure included at 100 % prints its fonts at their
nominal size: 8 pt labels and titles, 7 pt ticks, legends and annotations (never less).

:func:`save_figure` enforces both rules (:func:`check_figure`): a figure whose width is not 3.25 or
6.75 in, or with a visible text below 7 pt, is refused with an error naming the text.

Series are told apart by colour (Okabe-Ito, colour-blind safe), marker *and* line style
(:func:`series_style`), so a greyscale print stays readable; uncertainty is drawn with
:func:`band` (mean line plus a mean ± std band, with the number of runs in the label).

Usage::

    from paper_figs.style import DOUBLE_COL, SINGLE_COL, apply_style, save_figure
    apply_style()
    fig, ax = plt.subplots(figsize=(SINGLE_COL, 2.2))
    ...
    save_figure(fig, "out/fig_name")   # -> [out/fig_name.pdf, out/fig_name.png]

``save_figure`` strips the PDF creation date and software metadata, so re-rendering the same data
gives byte-identical PDFs (PNGs are identical too for the same matplotlib/freetype build).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

__all__ = ["DOUBLE_COL", "MIN_FONT_PT", "PALETTE", "SINGLE_COL", "apply_style", "band", "check_figure", "finish",
           "save_figure", "series_style"]

SINGLE_COL = 3.25
"""Width of one column in inches."""

DOUBLE_COL = 6.75
"""Width of the full text (two columns) in inches."""

MIN_FONT_PT = 7.0
"""Smallest font size (pt) allowed at print size."""

PALETTE = {
    "clean": "#1b7837",
    "corrupted": "#c51b7d",
    "uniform": "#7f7f7f",
    "learned": "#2166ac",
}
"""Colours with a fixed meaning across figures (clean/corrupted samples, uniform/learned weights)."""

_COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442", "#999999"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]
_LINESTYLES: List[Any] = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (6, 2)),
                          (0, (3, 1, 1, 1)), (0, (2, 2, 6, 2))]

_RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "figure.titlesize": 8,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "legend.frameon": False,
    "figure.dpi": 100,
    "figure.constrained_layout.use": True,
    "figure.constrained_layout.h_pad": 0.02,
    "figure.constrained_layout.w_pad": 0.02,
    "savefig.dpi": 300,
    "savefig.bbox": None,  # never crop: the saved width is the house width
    "pdf.fonttype": 42,  # TrueType in PDFs: editable text, accepted by publishers
    "ps.fonttype": 42,
    "svg.hashsalt": "carrot",
    "path.simplify": False,
}


def apply_style() -> None:
    """Set the shared rcParams (fonts, grid, spines, dpi, constrained layout, Type-42 fonts)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update(_RC)


def series_style(index: int) -> Dict[str, Any]:
    """Colour, marker and line style of the ``index``-th series (distinct in colour *and* greyscale).

    Figures index series by the method's position in its registry (see
    :func:`analysis.tables.registration_order`), so a method looks the same in every figure.

    Example:
        >>> series_style(0)["marker"], series_style(1)["linestyle"]
        ('o', '--')
    """
    i = int(index)
    return {"color": _COLORS[i % len(_COLORS)], "marker": _MARKERS[i % len(_MARKERS)],
            "linestyle": _LINESTYLES[i % len(_LINESTYLES)]}


def band(ax: Any, x: Any, mean: Any, std: Any, n: int, **style: Any) -> None:
    """Plot ``mean`` as a line and, when ``n > 1``, a shaded ``mean ± std`` band in the same colour."""
    import numpy as np

    line, = ax.plot(x, mean, **style)
    s = np.asarray(std, dtype=float)
    if n > 1 and np.isfinite(s).any():
        m = np.asarray(mean, dtype=float)
        ax.fill_between(x, m - np.nan_to_num(s), m + np.nan_to_num(s), color=line.get_color(), alpha=0.18, lw=0)


def check_figure(fig: Any, min_font: float = MIN_FONT_PT) -> Dict[str, Any]:
    """Check the house rules on ``fig``: width 3.25 or 6.75 in, every visible text >= ``min_font`` pt.

    Returns:
        ``{"width": inches, "height": inches, "min_font": smallest font size (pt), "n_texts": count}``.

    Raises:
        ValueError: naming the width, or the offending texts and their sizes.
    """
    from matplotlib.text import Text

    w, h = (float(v) for v in fig.get_size_inches())
    if not any(abs(w - ok) < 1e-6 for ok in (SINGLE_COL, DOUBLE_COL)):
        raise ValueError(f"A paper figure must be {SINGLE_COL} or {DOUBLE_COL} in wide. Got {w:.3g} in instead.")
    fig.canvas.draw()  # tick labels and legends exist only once drawn
    small, sizes = [], []
    for t in fig.findobj(Text):
        if not t.get_visible() or not t.get_text().strip():
            continue
        ax = t.axes
        if ax is not None and not ax.get_visible():
            continue
        sizes.append(float(t.get_fontsize()))
        if t.get_fontsize() < min_font - 1e-9:
            small.append(f"{t.get_text()[:40]!r} at {t.get_fontsize():g} pt")
    if small:
        raise ValueError(f"Every text of a paper figure must be at least {min_font:g} pt at print size. "
                         f"Got {len(small)} smaller: {'; '.join(small[:8])}.")
    return {"width": w, "height": h, "min_font": min(sizes) if sizes else None, "n_texts": len(sizes)}


def save_figure(fig: Any, stem: str | Path, dpi: int = 300) -> List[Path]:
    """Check ``fig`` (:func:`check_figure`), save ``<stem>.pdf`` and ``<stem>.png`` atomically; returns both.

    Args:
        fig: a matplotlib figure.
        stem: output path without suffix (a suffix ``.pdf``/``.png``, if given, is replaced).
        dpi: PNG resolution.

    Returns:
        ``[pdf_path, png_path]``.

    Raises:
        ValueError: if the figure breaks a house rule (width, font size).
    """
    check_figure(fig)
    stem = Path(stem)
    if stem.suffix in (".pdf", ".png"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    pdf, png = Path(f"{stem}.pdf"), Path(f"{stem}.png")
    _atomic_savefig(fig, pdf, format="pdf", metadata={"CreationDate": None, "Creator": None, "Producer": None})
    _atomic_savefig(fig, png, format="png", dpi=dpi, metadata={"Software": None})
    return [pdf, png]


def _atomic_savefig(fig: Any, path: Path, **kwargs: Any) -> None:
    """``fig.savefig`` to a temporary file in the same folder, then rename: readers never see half a figure."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, **kwargs)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finish(fig: Any, stem: str | Path) -> List[Path]:
    """Save ``fig`` with :func:`save_figure` and close it (also on error); returns the written paths."""
    import matplotlib.pyplot as plt

    try:
        return save_figure(fig, stem)
    finally:
        plt.close(fig)
