"""One matplotlib style for every paper figure: column widths, fonts, deterministic PDF/PNG output.

Widths follow a two-column conference layout (NeurIPS/ICML-like): a single column is 3.25 in, the
full text width 6.75 in. Fonts are sized for print at 100% (8-9 pt), so a figure made at
``SINGLE_COL`` width is readable without scaling in the paper.

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
from typing import Any, Callable, List, Optional, Sequence

__all__ = ["DOUBLE_COL", "PALETTE", "SINGLE_COL", "apply_style", "run_dirs_figure_main", "save_figure"]

SINGLE_COL = 3.25
"""Width of one column in inches."""

DOUBLE_COL = 6.75
"""Width of the full text (two columns) in inches."""

PALETTE = {
    "clean": "#1b7837",
    "corrupted": "#c51b7d",
    "uniform": "#7f7f7f",
    "learned": "#2166ac",
}
"""Colours with a fixed meaning across figures (clean/corrupted samples, uniform/learned weights)."""

_RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
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
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42,  # TrueType in PDFs: editable text, accepted by publishers
    "ps.fonttype": 42,
    "svg.hashsalt": "carrot",
    "path.simplify": False,
}


def apply_style() -> None:
    """Set the shared rcParams (fonts, grid, spines, dpi, Type-42 fonts) on the global matplotlib state."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update(_RC)


def save_figure(fig: Any, stem: str | Path, dpi: int = 300) -> List[Path]:
    """Save ``fig`` as ``<stem>.pdf`` and ``<stem>.png`` atomically (creating the parent folder); returns both paths.

    Args:
        fig: a matplotlib figure.
        stem: output path without suffix (a suffix, if given, is replaced).
        dpi: PNG resolution.

    Returns:
        ``[pdf_path, png_path]``.
    """
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


def run_dirs_figure_main(module: str, doc: Optional[str], plot: Callable[[Sequence[str], str], List[Path]],
                         default_stem: str, paths_help: str = "run directories or folders containing them",
                         argv: Optional[Sequence[str]] = None) -> int:
    """The command line shared by figure scripts that read run directories and write one figure.

    ``python -m paper_figs.<module> PATH [PATH ...] [--out STEM]`` calls ``plot(paths, stem)`` and
    prints the files it wrote.
    """
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m paper_figs.{module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help=paths_help)
    p.add_argument("--out", default=default_stem, help="output stem (default %(default)s)")
    a = p.parse_args(argv)
    for path in plot(a.paths, a.out):
        print(path)
    return 0
