"""The ``carrot`` command line.

Examples::

    carrot demo                                   # the main job with default settings
    carrot run --config experiments/configs/main.yaml head.lam=0.3 seed=1
    carrot runs list runs/                        # status and key numbers of every run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from reweight.config import RunConfig, load_config
from reweight.errors import CarrotError

__all__ = ["main"]

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "main.yaml"


def _quiet() -> bool:
    return bool(os.environ.get("CI")) or not sys.stderr.isatty()


def _cmd_run(args: argparse.Namespace) -> int:
    from .main_job import format_summary, run_main

    cfg: RunConfig = load_config(args.config, args.overrides)
    summary = run_main(cfg, overwrite=args.overwrite, progress=not (args.quiet or _quiet()))
    print(format_summary(summary, str(Path(cfg.out_dir) / cfg.name)))
    return 0


def _cmd_runs_list(args: argparse.Namespace) -> int:
    from reweight.runs import run_status

    root = Path(args.root)
    if not root.is_dir():
        print(f"No run directory at {root}.", file=sys.stderr)
        return 2
    rows = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        status = run_status(d)
        if status == "empty":
            continue
        info = ""
        if (d / "summary.json").is_file():
            s = json.loads((d / "summary.json").read_text())
            if "learned" in s:
                info = (f"test uniform {s['uniform']['test_acc']:.4f} learned {s['learned']['test_acc']:.4f} "
                        f"auroc {s['auroc']:.3f}")
        elif (d / "metrics.jsonl").is_file():
            n = sum(1 for _ in (d / "metrics.jsonl").open())
            info = f"{n} outer steps logged"
        rows.append(f"{d.name:30s} {status:10s} {info}")
    print("\n".join(rows) if rows else f"No runs under {root}.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="carrot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True)

    def add_run_args(sp: argparse.ArgumentParser, default_config: Optional[Path]) -> None:
        sp.add_argument("--config", default=default_config, help="YAML config (default: %(default)s)")
        sp.add_argument("--overwrite", action="store_true", help="reuse a run directory made by another config")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. head.lam=0.3 outer.steps=20")

    demo = sub.add_parser("demo", help="run the main job (MNIST-5k, 40%% symmetric noise)",
                          description="Run the main job with the default config. Example: carrot demo seed=1")
    add_run_args(demo, DEFAULT_CONFIG)
    demo.set_defaults(func=_cmd_run)
    run = sub.add_parser("run", help="run a config (resumes a killed run of the same config)",
                         description="Example: carrot run --config experiments/configs/main.yaml head.lam=0.3")
    add_run_args(run, DEFAULT_CONFIG)
    run.set_defaults(func=_cmd_run)
    runs = sub.add_parser("runs", help="inspect run directories")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    rl = runs_sub.add_parser("list", help="list runs with status (finished, incomplete, failed) and key numbers",
                             description="Example: carrot runs list runs/")
    rl.add_argument("root", nargs="?", default="runs")
    rl.set_defaults(func=_cmd_runs_list)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except CarrotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
