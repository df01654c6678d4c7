"""The ``carrot`` command line: every study, the run inspector, tables and figures, behind one parser.

Usage::

    carrot <study> [--config F] [--quick] [--overwrite] [--threads N] [-v] [--dry-run] [--quiet] key=value ...
    carrot runs list [ROOT]                      # status and key numbers of every run below ROOT
    carrot table NAME RUN_DIR... --out DIR       # one paper table (CSV, Markdown, LaTeX)
    carrot figure NAME RUN_DIR... --out STEM     # one paper figure (PDF, PNG)
    carrot weights export RUN_DIR [--out FILE]   # the learned weights per sample (CSV, + parquet with pyarrow)

Examples::

    carrot demo                                   # the main job with default settings
    carrot run --config experiments/configs/main.yaml head.lam=0.3 seed=1
    carrot noise_grid --quick --threads 1
    carrot sanity seeds=[0,1,2] --overwrite       # options may stand anywhere among the overrides
    carrot run --dry-run head.lam=0.3             # print the resolved config and stop

Studies: see ``carrot --help``; each has ``carrot <study> --help``. Options are validated, and the
config is resolved completely, before any work starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from reweight.errors import CarrotError

from .study import STUDIES, Context, legacy_flags_to_overrides, load_study

__all__ = ["build_parser", "main"]

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "main.yaml"


def _quiet() -> bool:
    return bool(os.environ.get("CI")) or not sys.stderr.isatty()


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {v}")
    return v


def build_parser(studies: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The one parser: a sub-command per registered study plus ``runs``, ``table`` and ``figure``.

    ``studies`` limits the study sub-commands built (their modules are imported to read their
    configs and help texts); ``None`` builds all of them (``carrot --help``).
    """
    p = argparse.ArgumentParser(prog=os.environ.get("CARROT_PROG", "carrot"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    study_parsers: Dict[str, argparse.ArgumentParser] = {}
    for name in (STUDIES if studies is None else studies):
        study = load_study(name)
        sp = sub.add_parser(name, help=study.summary, description=study.description or study.summary,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        default = f" (default: {study.default_config})" if study.default_config else " (default: built-in defaults)"
        sp.add_argument("--config", default=None, help="YAML config" + default)
        sp.add_argument("--quick", action="store_true",
                        help="smoke-sized run: " + (" ".join(study.quick) if study.quick else "(same as default)"))
        sp.add_argument("--overwrite", action="store_true",
                        help="replace a run directory made by another config (the old one is kept until success)")
        sp.add_argument("--threads", type=_positive_int, default=None, help="torch intra-op threads (recorded)")
        sp.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
        sp.add_argument("--allow-unconverged", action="store_true",
                        help="mark (instead of stopping at) solves that miss their tolerance by 100x")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
        sp.add_argument("overrides", nargs="*", help="dotted overrides key=value, e.g. head.lam=0.3 seeds=[0,1]")
        study_parsers[name] = sp
    runs = sub.add_parser("runs", help="inspect run directories")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    rl = runs_sub.add_parser("list", help="list runs (recursively) with status and key numbers",
                             description="Example: carrot runs list runs/")
    rl.add_argument("root", nargs="?", default="runs")
    tb = sub.add_parser("table", help="build one paper table from run directories",
                        description="Example: carrot table main_job runs/readme --out tables/")
    tb.add_argument("name")
    tb.add_argument("runs", nargs="+")
    tb.add_argument("--out", default=".", help="output folder")
    tb.add_argument("--strict", action="store_true", help="fail on an incomplete or outdated run instead of skipping it")
    fg = sub.add_parser("figure", help="draw one paper figure from run directories",
                        description="Example: carrot figure weight_hist runs/readme --out figures/weight_hist")
    fg.add_argument("name")
    fg.add_argument("runs", nargs="+")
    fg.add_argument("--out", required=True, help="output stem (writes STEM.pdf and STEM.png)")
    wt = sub.add_parser("weights", help="export learned weights")
    wt_sub = wt.add_subparsers(dest="weights_command", required=True)
    we = wt_sub.add_parser("export", help="write index,id,label,alpha (+ corrupted, + scores) per training sample",
                           description="Example: carrot weights export runs/main --out weights.csv. Writes CSV, and "
                                       "parquet beside it when pyarrow is installed; id is the image path relative to "
                                       "data.train_dir, the id given in the embeddings file, or the sample's index.")
    we.add_argument("run_dir")
    we.add_argument("--out", default=None, help="output CSV file (default: RUN_DIR/weights.csv)")
    p.set_defaults(study_parsers=study_parsers)
    return p


def _run_study(parser: argparse.ArgumentParser, name: str, argv: Sequence[str]) -> int:
    import torch
    import yaml

    from reweight.config import load_config, to_dict

    study = load_study(name)
    sp = parser.get_default("study_parsers")[name]
    args = sp.parse_intermixed_args(legacy_flags_to_overrides(argv, study.legacy_flags))
    _logging(args.verbose)
    overrides = list(study.quick if args.quick else []) + list(args.overrides)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        if study.threads_key:
            overrides.append(f"{study.threads_key}={args.threads}")
    cfg = load_config(args.config or study.default_config, overrides, cls=study.config)
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    ctx = Context(overwrite=args.overwrite, progress=not (args.quiet or _quiet()), verbose=args.verbose,
                  allow_unconverged=args.allow_unconverged)
    result = study.run(cfg, ctx)
    text = study.report(result)
    if text:
        print(text)
    # a study whose work partly failed (e.g. a paper step) says so with an ``exit_code`` in its result
    return int(result.get("exit_code", 0)) if isinstance(result, dict) else 0


def _runs_list(root: Path) -> int:
    from reweight.runs import run_status

    if not root.is_dir():
        print(f"error: no run directory at {root}.", file=sys.stderr)
        return 2
    rows = []
    for d in sorted(p for p in [root, *root.rglob("*")] if p.is_dir() and (p / "config.yaml").is_file()):
        status = run_status(d)
        info = ""
        if (d / "summary.json").is_file():
            s = json.loads((d / "summary.json").read_text())
            if "learned" in s and "uniform" in s:
                auroc = s.get("auroc")
                info = (f"test uniform {s['uniform']['test_acc']:.4f} learned {s['learned']['test_acc']:.4f} "
                        f"auroc {'unknown' if auroc is None else format(auroc, '.3f')}")
            elif "test_acc" in s:
                info = f"test {s['test_acc']:.4f}"
            if s.get("converged") is False:
                info += "  NOT CONVERGED"
        elif (d / "metrics.jsonl").is_file():
            n = sum(1 for _ in (d / "metrics.jsonl").open())
            info = f"{n} steps logged"
        rel = d.relative_to(root) if d != root else Path(".")
        rows.append(f"{str(rel):40s} {status:10s} {info}")
    print("\n".join(rows) if rows else f"No runs under {root}.")
    return 0


def _table(args: argparse.Namespace) -> int:
    from analysis.build import build_table
    from analysis.export import export_table, to_markdown

    t = build_table(args.name, args.runs, args.strict)
    paths = export_table(t, args.out)
    print(to_markdown(t))
    print("\n".join(str(x) for x in paths))
    return 0


def _figure(args: argparse.Namespace) -> int:
    from paper_figs import draw_figure

    for path in draw_figure(args.name, args.runs, args.out):
        print(path)
    return 0


def _weights_export(args: argparse.Namespace) -> int:
    from reweight.export import write_weights_table

    out = Path(args.out) if args.out else Path(args.run_dir) / "weights.csv"
    for path in write_weights_table(args.run_dir, out):
        print(path)
    return 0


def _logging(verbose: int) -> None:
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s", force=True)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``carrot`` (and of the ``python -m experiments.<study>`` shims); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from .children import sigterm_as_interrupt

    sigterm_as_interrupt()  # SIGTERM stops a study as Ctrl-C does: one line, exit 130
    try:
        first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
        if first is not None and argv[first] in STUDIES:
            _logging(argv[:first].count("-v") + argv[:first].count("--verbose"))
            return _run_study(build_parser([argv[first]]), argv[first], argv[:first] + argv[first + 1:])
        known = first is not None and argv[first] in ("runs", "table", "figure", "weights")
        parser = build_parser([] if known else None)
        args = parser.parse_args(argv)
        _logging(args.verbose)
        if args.command == "runs":
            return _runs_list(Path(args.root))
        if args.command == "table":
            return _table(args)
        if args.command == "figure":
            return _figure(args)
        if args.command == "weights":
            return _weights_export(args)
        parser.error(f"unknown command {args.command!r}")
    except CarrotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished steps are kept and a rerun resumes from them.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
