"""Deprecated ``python -m paper_figs.<name>`` entry points: forward to ``carrot figure <name> ...``.

Kept for one release. No argument parsing here: the arguments go to the one command line
(``experiments.cli``), which owns the parser.
"""

from __future__ import annotations

import os
import sys

__all__ = ["deprecated_main", "warn_renamed"]


def deprecated_main(name: str) -> None:
    """Print a one-line deprecation note and replace this process by ``carrot figure <name> <args>``."""
    print(f"python -m paper_figs.{name} is deprecated and will be removed in the next release; "
          f"use: carrot figure {name} RUN_DIR... --out STEM", file=sys.stderr, flush=True)
    os.execvp(sys.executable, [sys.executable, "-m", "experiments.cli", "figure", name, *sys.argv[1:]])


def warn_renamed(old: str, name: str) -> None:
    """DeprecationWarning for the old per-module plotting function ``old`` (kept for one release)."""
    import warnings

    warnings.warn(f"{old} is deprecated; use paper_figs.draw_figure({name!r}, runs, stem) "
                  f"(or carrot figure {name} RUN_DIR... --out STEM).", DeprecationWarning, stacklevel=3)
