"""Build one paper table from existing run directories.

Usage::

    python -m analysis main_job runs/readme --out tables/            # uniform vs learned (main job)
    python -m analysis per_class_ess runs/readme --out tables/
    python -m analysis method_comparison runs/noise_grid --out tables/
    python -m analysis method_comparison_acc runs/noise_grid --out tables/
    python -m analysis rank_correlations runs/sanity/main --out tables/
    python -m analysis hypergrad_accuracy runs/hypergrad_accuracy --out tables/
    python -m analysis staged runs/staged --out tables/

Writes ``<name>.csv`` (+ ``<name>_timing.csv``), ``.md`` and ``.tex`` and prints the Markdown.
Incomplete, failed, unconverged or outdated runs are skipped with a warning naming each run and why
(``--strict``: fail instead). Runs whose configs differ (other than seeds, names, paths) are kept
apart: the table gains those config fields as key columns and a note says so.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from reweight.errors import CarrotError

from .build import TABLES, build_table
from .export import export_table, to_markdown
from .tables import registration_order

__all__ = ["main"]

def main(argv: Optional[List[str]] = None) -> int:
    names = registration_order(TABLES)
    epilog = "tables:\n" + "\n".join(f"  {n:22s} {TABLES.get(n).description} (study: {TABLES.get(n).study})"
                                      for n in names)
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=names)
    p.add_argument("paths", nargs="+", help="run directories or folders containing them")
    p.add_argument("--out", default=".", help="output folder (default: current folder)")
    p.add_argument("--strict", action="store_true", help="fail on an incomplete/outdated run instead of skipping it")
    a = p.parse_args(argv)
    try:
        t = build_table(a.table, a.paths, a.strict)
        paths = export_table(t, a.out)
    except (CarrotError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(t))
    print("\n".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
