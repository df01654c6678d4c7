"""One-command reproduction: run the experiment grid, then build every table and figure of the paper.

One command::

    .venv/bin/python -m experiments.paper --out paper_out            # default grid (MNIST-5k; 24 min measured on 2 cores)
    .venv/bin/python -m experiments.paper --out paper_out --quick    # quick grid (digits; 3-5 min measured on 2 cores)
    .venv/bin/python -m experiments.paper --out paper_out --quick --no-run   # rebuild tables/figures only

Steps (each sub-experiment runs as its own process with its own ``--quick`` flag, two at a time
(``--jobs``), so a crash in one does not stop the others, and its exact command is recorded):

1. ``main_job``: ``experiments.cli run`` for seeds 0, 1, 2 (uniform vs learned weights);
2. ``noise_grid``: ``experiments.noise_grid`` (bilevel vs baselines under label noise / imbalance);
3. ``hypergrad_accuracy``: ``experiments.hypergrad_accuracy`` (the approximation ladder vs exact);
4. ``sanity``: ``experiments.sanity`` (attribution estimators vs exact leave-one-out);
5. ``faithfulness``: ``experiments.faithfulness`` (remove / keep top-K supporters);
6. ``staged``: ``experiments.staged`` (head-only vs staged training).

A step whose module does not exist is skipped with a line in ``INDEX.md``; finished run directories
are reused on a rerun (each experiment resumes / skips its finished runs), and the feature cache
(``.carrot_cache``) makes warm-ups a one-time cost. Then every registered table
(:data:`analysis.TABLES`; CSV, Markdown, LaTeX) goes to ``<out>/tables/`` and every registered
figure (:data:`paper_figs.FIGURES`; PDF, PNG) to ``<out>/figures/``, each from the runs of the
study it names, with ``<out>/INDEX.md`` listing every artefact, its source runs, the runs it
skipped and why, and the command that rebuilds it alone, and ``provenance.json`` files (git
commit, package versions, config hashes).

Reproducibility: the ``*.csv`` tables hold no wall-clock numbers (those go to ``*_timing.csv``), so
rerunning the same grid on the same machine gives byte-identical CSV tables.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["GRIDS", "Step", "build_artefacts", "main", "plan", "run_steps", "study_dirs", "write_index"]

log = logging.getLogger(__name__)

SEEDS = (0, 1, 2)

GRIDS: Dict[str, Dict[str, List[str]]] = {
    "quick": {
        "main_job": ["data.dataset=digits", "backbone.epochs=6", "outer.steps=20"],
        "noise_grid": ["base.data.dataset=digits", "base.backbone.epochs=6", "settings=[sym40, lt10]",
                       "seeds=[0, 1]", "base.outer.steps=20", "baseline_epochs=20", "sgd_lr_grid=[0.01]"],
        "hypergrad_accuracy": ["base.backbone.epochs=6"],
        "sanity": ["data.dataset=digits", "backbone.epochs=6"],
        "faithfulness": ["data.dataset=digits", "backbone.epochs=6", "ks=[1, 10, 50]",
                         "methods=[hypergrad_cg, influence_cg, influence_kfac, representer, tracin]"],
        "staged": [],
    },
    "full": {
        "main_job": [],
        "noise_grid": [],
        "hypergrad_accuracy": [],
        "sanity": [],
        "faithfulness": ["n_queries=10", "n_random=2"],
        "staged": ["--seeds", "0"],  # one seed: its five strategies take ~30 CPU-minutes
    },
}
"""Overrides per grid and step (after the experiment's own ``--quick`` list, so they win). Every step
also gets ``threads=1`` (results do not depend on the machine's core count) and the feature cache
``<out>/.feature_cache`` (a fresh output folder recomputes everything; a rerun reuses it)."""


@dataclass
class Step:
    """One sub-experiment invocation: ``python -m <module> <argv>``."""

    name: str
    module: str
    argv: List[str]
    output: str
    description: str
    status: str = "pending"
    seconds: float = 0.0
    cpu_seconds: float = float("nan")
    message: str = ""

    def command(self) -> str:
        return " ".join(["python", "-m", self.module] + [_quote(a) for a in self.argv])


def _quote(a: str) -> str:
    return f"'{a}'" if any(ch in a for ch in " []{},") else a


def plan(out: Path, quick: bool) -> List[Step]:
    """The sub-experiment invocations of the quick or default grid, writing under ``<out>/runs/<grid>``."""
    grid = "quick" if quick else "full"
    g = GRIDS[grid]
    R = out / "runs" / grid
    q = ["--quick"] if quick else []
    cache = str(out / ".feature_cache")
    main = [Step(f"main_job_seed{s}", "experiments.cli",
                 ["run", "--quiet"] + g["main_job"] + ["threads=1", f"features.cache_dir={cache}", f"seed={s}",
                                                       f"name=seed{s}", f"out_dir={R / 'main'}"],
                 str(R / "main" / f"seed{s}"), f"main job, seed {s}: uniform vs learned weights") for s in SEEDS]
    other = {
        "noise_grid": Step("noise_grid", "experiments.noise_grid",
                           q + ["--threads", "1"] + g["noise_grid"] + [f"base.features.cache_dir={cache}",
                                                                       f"out_dir={R}", "name=noise_grid"],
                           str(R / "noise_grid"), "noise grid: bilevel reweighting vs baselines"),
        "hypergrad_accuracy": Step("hypergrad_accuracy", "experiments.hypergrad_accuracy",
                                   q + ["--threads", "1"] + g["hypergrad_accuracy"]
                                   + [f"base.features.cache_dir={cache}", f"out_dir={R}", "name=hypergrad_accuracy"],
                                   str(R / "hypergrad_accuracy"), "hypergradient ladder vs exact"),
        "sanity": Step("sanity", "experiments.sanity",
                       q + g["sanity"] + ["threads=1", f"features.cache_dir={cache}", f"out_dir={R}", "name=main"],
                       str(R / "sanity" / "main"), "attribution estimators vs exact leave-one-out"),
        "faithfulness": Step("faithfulness", "experiments.faithfulness",
                             q + g["faithfulness"] + ["threads=1", f"features.cache_dir={cache}", f"out_dir={R}",
                                                      "name=main"],
                             str(R / "faithfulness" / "main"), "faithfulness: remove / keep top-K supporters"),
        "staged": Step("staged", "experiments.staged", q + g["staged"] + ["--out", str(R / "staged")],
                       str(R / "staged"), "staged training strategies"),
    }
    # execution order with two workers: the longest steps start early; main seed 0 first builds the
    # seed-0 features that sanity / faithfulness / hypergrad_accuracy then read from the cache
    steps = [main[0], other["staged"], main[1], other["faithfulness"], main[2], other["sanity"], other["noise_grid"],
             other["hypergrad_accuracy"]]
    return steps


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _say(msg: str) -> None:
    """One progress line (a single write, so lines of parallel steps do not interleave)."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _run_one(st: Step, log_dir: Path, env: Dict[str, str], timeout: Optional[float]) -> None:
    """Run one step; records wall seconds and the child's CPU seconds (user + sys, from ``wait4``)."""
    _say(f"[paper] start {st.name}: {st.command()}")
    t0 = time.perf_counter()
    rc, cpu = -1, float("nan")
    with open(log_dir / f"{st.name}.log", "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", st.module] + st.argv, stdout=fh, stderr=subprocess.STDOUT,
                                env=env, cwd=os.getcwd())
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                rc = os.waitstatus_to_exitcode(status)
                cpu = ru.ru_utime + ru.ru_stime
                proc.returncode = rc
                break
            if timeout is not None and time.perf_counter() - t0 > timeout:
                proc.kill()
                proc.wait()
                rc = -1
                break
            time.sleep(0.2)
    st.seconds = time.perf_counter() - t0
    st.cpu_seconds = cpu
    if rc == 0:
        st.status = "done"
    else:
        tail = (log_dir / f"{st.name}.log").read_text(errors="replace").strip().splitlines()[-3:]
        st.status = "failed"
        st.message = f"exit code {rc}" + (" (timeout)" if rc == -1 else "") + ": " + " | ".join(tail)
    _say(f"[paper] {st.name}: {st.status} in {st.seconds:.0f}s (cpu {cpu:.0f}s) {st.message}")


def run_steps(steps: Sequence[Step], log_dir: Path, timeout: Optional[float] = None, jobs: int = 2) -> None:
    """Run the steps as subprocesses, ``jobs`` at a time, in list order (stdout/stderr to ``<log_dir>/<name>.log``).

    Steps are independent (they share only the content-addressed feature cache, whose writes are
    atomic), so running them side by side changes wall time, not results.
    """
    from concurrent.futures import ThreadPoolExecutor

    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONHASHSEED="0", CI=os.environ.get("CI", "1"))
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    todo = []
    for st in steps:
        if not _module_exists(st.module):
            st.status, st.message = "skipped", f"module {st.module} does not exist in this checkout"
            print(f"[paper] skip {st.name}: {st.message}", flush=True)
        else:
            todo.append(st)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        for f in [ex.submit(_run_one, st, log_dir, env, timeout) for st in todo]:
            f.result()


# ------------------------------------------------------------------------------------------------
# artefacts
# ------------------------------------------------------------------------------------------------


@dataclass
class Artefact:
    """A table or figure: its files, sources and the command that regenerates it."""

    kind: str
    name: str
    description: str
    files: List[str] = field(default_factory=list)
    sources: List[Dict[str, Any]] = field(default_factory=list)
    command: str = ""
    status: str = "built"
    message: str = ""
    warnings: List[str] = field(default_factory=list)


def _sources_hash(sources: Sequence[Dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(list(sources), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _guard(art: Artefact, fn: Callable[[], None]) -> Artefact:
    """Run ``fn`` collecting warnings (skipped runs, named) and turning errors into a recorded failure."""
    from analysis.loading import SkippedRunWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- one artefact's failure must not stop the others
            art.status = "failed"
            art.message = f"{type(e).__name__}: {e}".strip()
            log.debug("artefact %s failed:\n%s", art.name, traceback.format_exc())
    art.warnings = [str(w.message) for w in caught if issubclass(w.category, SkippedRunWarning)]
    return art


def study_dirs(steps: Sequence[Step]) -> Dict[str, Path]:
    """``{study: folder holding its runs}`` from the plan: a step's output, or the common parent of a study's steps."""
    outs: Dict[str, List[Path]] = {}
    for st in steps:
        outs.setdefault(st.name.split("_seed")[0], []).append(Path(st.output))
    return {k: v[0] if len(v) == 1 else Path(os.path.commonpath([str(x) for x in v])) for k, v in outs.items()}


def build_artefacts(out: Path, quick: bool, steps: Sequence[Step]) -> List[Artefact]:
    """Build every registered table (``<out>/tables``) and figure (``<out>/figures``) from the runs of the grid.

    Iterates :data:`analysis.TABLES` and :data:`paper_figs.FIGURES` in registration order; each
    entry names the study whose runs it reads, and the study's folder comes from the plan
    (:func:`study_dirs`). An artefact whose study was skipped (or is not in the plan) is recorded as
    skipped; one whose build fails is recorded as failed with the error, and the others are built.
    """
    from analysis import TABLES
    from analysis.export import export_table
    from analysis.tables import registration_order
    from paper_figs import FIGURES
    from reweight.runs import atomic_write_json, environment_info

    grid = "quick" if quick else "full"
    T, F = out / "tables", out / "figures"
    env = environment_info()
    dirs = study_dirs(steps)
    status = {s.name.split("_seed")[0]: s for s in steps}
    arts: List[Artefact] = []

    def add(art: Artefact, study: str, go: Callable[[], None]) -> None:
        s = status.get(study)
        if study not in dirs:
            art.status, art.message = "skipped", f"no step of this grid produces the {study!r} study"
            arts.append(art)
        elif s is not None and s.status == "skipped":
            art.status, art.message = "skipped", s.message
            arts.append(art)
        else:
            arts.append(_guard(art, go))

    for name in registration_order(TABLES):
        spec = TABLES.get(name)
        src = dirs.get(spec.study)
        art = Artefact("table", name, spec.description, command=f"python -m analysis {name} {src} --out {T}")

        def go(spec=spec, src=src, art=art) -> None:
            t = spec([src])
            art.sources = t.sources
            prov = {"git_commit": env.get("git_commit"), "sources_hash": _sources_hash(t.sources),
                    "generated_by": art.command}
            art.files = [str(p) for p in export_table(t, T, provenance=prov)]

        add(art, spec.study, go)

    for name in registration_order(FIGURES):
        spec = FIGURES.get(name)
        src = dirs.get(spec.study)
        art = Artefact("figure", name, spec.description, command=f"carrot figure {name} {src} --out {F / name}")

        def draw(spec=spec, src=src, art=art) -> None:
            art.files = [str(p) for p in spec([src], F / spec.name)]

        add(art, spec.study, draw)

    # ---- provenance --------------------------------------------------------------------------
    for kind, folder in (("table", T), ("figure", F)):
        items = {a.name: {"files": [Path(f).name for f in a.files], "status": a.status,
                          "sources": a.sources, "sources_hash": _sources_hash(a.sources) if a.sources else None,
                          "command": a.command} for a in arts if a.kind == kind}
        atomic_write_json(folder / "provenance.json", {
            "grid": grid, "git_commit": env.get("git_commit"), "packages": env.get("packages"),
            "python": env.get("python"), "platform": env.get("platform"), kind + "s": items})
    return arts


def write_index(out: Path, quick: bool, steps: Sequence[Step], arts: Sequence[Artefact], argv: Sequence[str],
                seconds: float) -> Path:
    """``<out>/INDEX.md``: the experiments run (command, status, time) and every artefact with its source."""
    from reweight.runs import atomic_write_text, environment_info

    env = environment_info()
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    lines = [f"# Paper artefacts ({'quick' if quick else 'default'} grid)", "",
             f"Made by `python -m experiments.paper {' '.join(argv)}` in {seconds:.0f} s "
             f"(git commit `{env.get('git_commit')}`, python {env.get('python')}, torch {env['packages'].get('torch')}).",
             "Package versions, source runs and config hashes: `tables/provenance.json`, `figures/provenance.json`.",
             "CSV tables are byte-identical on a rerun of the same grid; wall-clock times live only in `*_timing.csv`,",
             "`.md` and `.tex` (and are excluded from the byte-identity promise).", "",
             "## Experiments", "", "Wall time depends on the machine's load; CPU time (user + sys of the step's process) does not.", "",
             "| step | status | wall (s) | CPU (s) | output | command |", "|---|---|---:|---:|---|---|"]
    for s in steps:
        note = f" -- {s.message}" if s.message else ""
        cpu = "--" if s.cpu_seconds != s.cpu_seconds else f"{s.cpu_seconds:.0f}"
        lines.append(f"| {s.name} | {s.status}{note} | {s.seconds:.0f} | {cpu} | `{rel(s.output)}` | `{s.command()}` |")
    for kind in ("table", "figure"):
        lines += ["", f"## {kind.capitalize()}s", "", "| name | status | files | what | made by |", "|---|---|---|---|---|"]
        for a in arts:
            if a.kind != kind:
                continue
            files = ", ".join(f"`{rel(f)}`" for f in a.files) or "--"
            st = a.status + (f": {a.message}" if a.message else "")
            if a.warnings:
                st += " (skipped runs: " + "; ".join(w.replace("\n", " ") for w in a.warnings) + ")"
            lines.append(f"| {a.name} | {st.replace('|', '/')} | {files} | {a.description} | `{a.command}` |")
    lines.append("")
    path = out / "INDEX.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m experiments.paper", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="paper_out", help="output folder (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="the quick grid (digits, few steps; < 5 min on 2 cores)")
    p.add_argument("--no-run", action="store_true", help="do not run experiments; build tables/figures from existing runs")
    p.add_argument("--steps", nargs="+", default=None,
                   help="run only these steps (main_job, noise_grid, hypergrad_accuracy, sanity, faithfulness, staged)")
    p.add_argument("--timeout", type=float, default=None, help="per-step timeout in seconds")
    p.add_argument("--jobs", type=int, default=2, help="sub-experiments run side by side (default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    steps = plan(out, a.quick)
    if a.steps:
        known = {s.name.split("_seed")[0] for s in steps}
        bad = [s for s in a.steps if s not in known]
        if bad:
            print(f"error: The '--steps' parameter must name steps from {', '.join(sorted(known))}. Got {bad} instead.",
                  file=sys.stderr)
            return 2
    for s in steps:
        if not _module_exists(s.module):
            s.status, s.message = "skipped", f"module {s.module} does not exist in this checkout"
        elif a.no_run or (a.steps and s.name.split("_seed")[0] not in a.steps):
            s.status = "not run (--no-run/--steps): existing runs used"
    todo = [s for s in steps if s.status == "pending"]
    run_steps(todo, out / "logs" / ("quick" if a.quick else "full"), timeout=a.timeout, jobs=a.jobs)
    arts = build_artefacts(out, a.quick, steps)
    index = write_index(out, a.quick, steps, arts, argv, time.perf_counter() - t0)
    failed = [s.name for s in steps if s.status == "failed"] + [x.name for x in arts if x.status == "failed"]
    print(f"[paper] {sum(x.status == 'built' for x in arts)} artefacts built, "
          f"{sum(x.status == 'skipped' for x in arts)} skipped, {len(failed)} failed "
          f"({', '.join(failed) or 'none'}) in {time.perf_counter() - t0:.0f}s; index: {index}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
