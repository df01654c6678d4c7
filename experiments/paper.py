"""One-command reproduction: run the experiment grid, then build every table and figure of the paper.

One command::

    carrot paper out=paper_out                    # default grid (MNIST-5k; about 2 h on 2 cores with the trusted study)
    carrot paper --quick out=paper_out            # quick grid (digits; 4.6 min measured on 2 cores)
    carrot paper --quick out=paper_out no_run=true    # rebuild tables/figures only
    carrot paper out=paper_out steps=[sanity, faithfulness]

Steps (each sub-experiment runs as its own process through the one command line,
``python -m experiments.cli <study> --threads 1 --quiet [--quick] key=value ...``, ``jobs`` at a time,
so a crash in one does not stop the others, and its exact command is recorded):

1. ``main_job``: ``run`` for seeds 0, 1, 2 (uniform vs learned weights);
2. ``noise_grid``: bilevel vs baselines under label noise / imbalance;
3. ``hypergrad_accuracy``: the approximation ladder vs exact;
4. ``sanity``: attribution estimators vs exact leave-one-out;
5. ``faithfulness``: remove / keep top-K supporters;
6. ``staged``: head-only vs staged training;
7. ``trusted``: learned weights vs uniform and the baselines across trusted-set sizes and noise (paired).

A step whose study is not registered in this checkout is skipped with a line in ``INDEX.md``;
finished run directories are reused on a rerun (each experiment resumes / skips its finished runs),
and the feature cache (``<out>/.feature_cache``) makes warm-ups a one-time cost. Then every
registered table (:data:`analysis.TABLES`; CSV, Markdown, LaTeX) goes to ``<out>/tables/`` and
every registered figure (:data:`paper_figs.FIGURES`; PDF, PNG) to ``<out>/figures/``, each from the
runs of the study it names, with ``<out>/INDEX.md`` listing every artefact, its source runs, the runs
it skipped and why, and the command that rebuilds it alone, and ``provenance.json`` files (git
commit, package versions, config hashes).

Reproducibility: the ``*.csv`` tables hold no wall-clock numbers (those go to ``*_timing.csv``), so
rerunning the same grid on the same machine gives byte-identical CSV tables.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from reweight.config import help_field as _f
from reweight.errors import ConfigError

from .children import Child, cli_command, run_children
from .study import STUDIES, Study, shim

__all__ = ["GRIDS", "PaperConfig", "STEPS", "STUDY", "Step", "build_artefacts",
           "plan", "run_paper", "run_steps", "study_dirs", "write_index"]

log = logging.getLogger(__name__)

SEEDS = (0, 1, 2)

#: step name -> the study it runs (``main_job`` is the main job, run once per seed)
STEPS: Dict[str, str] = {"main_job": "run", "noise_grid": "noise_grid", "hypergrad_accuracy": "hypergrad_accuracy",
                         "sanity": "sanity", "faithfulness": "faithfulness", "staged": "staged", "trusted": "trusted"}

GRIDS: Dict[str, Dict[str, List[str]]] = {
    "quick": {
        "main_job": ["data.dataset=digits", "backbone.epochs=6", "outer.steps=20"],
        "noise_grid": ["base.data.dataset=digits", "base.backbone.epochs=6", "settings=[sym40, lt10]",
                       "seeds=[0, 1]", "base.outer.steps=20", "baseline_epochs=20", "sgd_lr_grid=[0.01]"],
        "hypergrad_accuracy": ["base.backbone.epochs=6"],
        "sanity": ["base.data.dataset=digits", "base.backbone.epochs=6"],
        "faithfulness": ["base.data.dataset=digits", "base.backbone.epochs=6", "ks=[1, 10, 50]",
                         "methods=[hypergrad_cg, influence_cg, influence_kfac, representer, tracin]"],
        "staged": [],
        "trusted": ["jobs=1"],
    },
    "full": {
        "main_job": [],
        "noise_grid": [],
        "hypergrad_accuracy": [],
        "sanity": [],
        "faithfulness": ["n_queries=10", "n_random=2"],
        "staged": ["seeds=[0]"],  # one seed: its five strategies take ~30 CPU-minutes
        "trusted": ["jobs=1"],  # 160 cells + variants, one at a time beside the other steps (~2 CPU-hours)
    },
}
"""Overrides per grid and step (after the study's own ``--quick`` list, so they win). Every step also
runs with ``--threads 1`` (results do not depend on the machine's core count) and the feature cache
``<out>/.feature_cache`` (a fresh output folder recomputes everything; a rerun reuses it)."""

#: the feature-cache key of each study's config
_CACHE_KEY = {"run": "features.cache_dir", "trusted": "cache_dir"}


@dataclass(frozen=True)
class PaperConfig:
    """The reproduction: which grid, where, which steps."""

    out: str = _f("paper_out", "output folder (runs, logs, tables, figures, INDEX.md)")
    quick: bool = _f(False, "the quick grid (digits, few steps; < 5 min on 2 cores)")
    no_run: bool = _f(False, "do not run experiments; build tables/figures from existing runs")
    steps: List[str] = _f([], f"run only these steps, from {', '.join(STEPS)} (empty = all)")
    timeout: Optional[float] = _f(None, "per-step timeout in seconds (null = none)")
    jobs: int = _f(2, "sub-experiments run side by side")

    def __post_init__(self) -> None:
        bad = [s for s in self.steps if s not in STEPS]
        if bad:
            raise ConfigError(f"The 'steps' parameter must name steps from {', '.join(sorted(STEPS))}. "
                              f"Got {bad} instead.")
        if self.jobs < 1 or (self.timeout is not None and not self.timeout > 0):
            raise ConfigError(f"The 'jobs' (>= 1) and 'timeout' (> 0 or null) parameters are out of range. "
                              f"Got {self.jobs!r} and {self.timeout!r} instead.")


@dataclass
class Step:
    """One sub-experiment: ``python -m experiments.cli <study> <argv>``."""

    name: str
    study: str
    argv: List[str]
    output: str
    description: str
    status: str = "pending"
    seconds: float = 0.0
    cpu_seconds: float = float("nan")
    message: str = ""

    def command(self) -> str:
        return cli_command(self.study, self.argv)


def plan(out: Path, quick: bool) -> List[Step]:
    """The sub-experiment invocations of the quick or default grid, writing under ``<out>/runs/<grid>``."""
    grid = "quick" if quick else "full"
    g = GRIDS[grid]
    R = out / "runs" / grid
    cache = str(out / ".feature_cache")

    def argv(step: str, *where: str) -> List[str]:
        study = STEPS[step]
        q = ["--quick"] if quick and study != "run" else []  # the main job's quick grid is its overrides
        return ["--threads", "1", "--quiet"] + q + g[step] + [f"{_CACHE_KEY.get(study, 'base.features.cache_dir')}={cache}",
                                                              *where]

    main = [Step(f"main_job_seed{s}", "run", argv("main_job", f"seed={s}", f"name=seed{s}", f"out_dir={R / 'main'}"),
                 str(R / "main" / f"seed{s}"), f"main job, seed {s}: uniform vs learned weights") for s in SEEDS]
    other = {
        "noise_grid": Step("noise_grid", "noise_grid", argv("noise_grid", f"out_dir={R}", "name=noise_grid"),
                           str(R / "noise_grid"), "noise grid: bilevel reweighting vs baselines"),
        "hypergrad_accuracy": Step("hypergrad_accuracy", "hypergrad_accuracy",
                                   argv("hypergrad_accuracy", f"out_dir={R}", "name=hypergrad_accuracy"),
                                   str(R / "hypergrad_accuracy"), "hypergradient ladder vs exact"),
        "sanity": Step("sanity", "sanity", argv("sanity", f"out_dir={R}", "name=main"),
                       str(R / "sanity" / "main"), "attribution estimators vs exact leave-one-out"),
        "faithfulness": Step("faithfulness", "faithfulness", argv("faithfulness", f"out_dir={R}", "name=main"),
                             str(R / "faithfulness" / "main"), "faithfulness: remove / keep top-K supporters"),
        "staged": Step("staged", "staged", argv("staged", f"out={R / 'staged'}"), str(R / "staged"),
                       "staged training strategies"),
        "trusted": Step("trusted", "trusted", argv("trusted", f"out_dir={R}", "name=trusted"), str(R / "trusted"),
                        "trusted-set study: learned weights vs uniform and baselines across sizes and noise"),
    }
    # execution order with two workers: the longest steps start early; main seed 0 first builds the
    # seed-0 features that sanity / faithfulness / hypergrad_accuracy then read from the cache
    return [main[0], other["trusted"], other["staged"], main[1], other["faithfulness"], main[2], other["sanity"],
            other["noise_grid"], other["hypergrad_accuracy"]]


def _study_exists(study: str) -> bool:
    """Whether ``study`` is registered and its module is in this checkout (not imported: no experiment imports another)."""
    try:
        return study in STUDIES and importlib.util.find_spec(STUDIES[study]) is not None
    except (ImportError, ValueError):
        return False


def _say(msg: str) -> None:
    """One progress line (a single write, so lines of parallel steps do not interleave)."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _missing(st: Step) -> str:
    return f"study {st.study!r} is not registered in this checkout"


def run_steps(steps: Sequence[Step], log_dir: Path, timeout: Optional[float] = None, jobs: int = 2) -> None:
    """Run the steps as subprocesses, ``jobs`` at a time, in list order (stdout/stderr to ``<log_dir>/<name>.log``).

    Steps are independent (they share only the content-addressed feature cache, whose writes are
    atomic), so running them side by side changes wall time, not results. Ctrl-C / SIGTERM stops every
    running step (:func:`experiments.children.run_children`); a rerun resumes from the finished ones.
    """
    todo, kids = [], []
    for st in steps:
        if not _study_exists(st.study):
            st.status, st.message = "skipped", _missing(st)
            _say(f"[paper] skip {st.name}: {st.message}")
        else:
            todo.append(st)
            kids.append(Child(st.name, st.study, st.argv, log_dir / f"{st.name}.log"))
    try:
        # a longer grace than the steps' own (1.5 s): a multi-step step (trusted) ends its children first
        run_children(kids, jobs=jobs, timeout=timeout, on_event=lambda m: _say(f"[paper] {m}"), grace=3.0)
    finally:
        for st, c in zip(todo, kids):
            st.status, st.seconds, st.cpu_seconds, st.message = c.status, c.seconds, c.cpu_seconds, c.message


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


def write_index(out: Path, quick: bool, steps: Sequence[Step], arts: Sequence[Artefact], command: str,
                seconds: float) -> Path:
    """``<out>/INDEX.md``: the experiments run (command, status, time) and every artefact with its source."""
    from reweight.runs import atomic_write_text, environment_info

    env = environment_info()
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    lines = [f"# Paper artefacts ({'quick' if quick else 'default'} grid)", "",
             f"Made by `{command}` in {seconds:.0f} s "
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


def _command(cfg: PaperConfig) -> str:
    parts = ["carrot paper"] + (["--quick"] if cfg.quick else []) + [f"out={cfg.out}"]
    parts += ["no_run=true"] if cfg.no_run else []
    parts += [f"steps=[{','.join(cfg.steps)}]"] if cfg.steps else []
    return " ".join(parts)


def run_paper(cfg: PaperConfig) -> Dict[str, Any]:
    """Run the steps of the grid (unless ``no_run``), build every artefact, write INDEX.md.

    Returns the steps, the artefacts, the index path and ``exit_code`` (1 if a step or an artefact failed).
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    steps = plan(out, cfg.quick)
    for s in steps:
        if not _study_exists(s.study):
            s.status, s.message = "skipped", _missing(s)
        elif cfg.no_run or (cfg.steps and s.name.split("_seed")[0] not in cfg.steps):
            s.status = "not run (no_run/steps): existing runs used"
    todo = [s for s in steps if s.status == "pending"]
    run_steps(todo, out / "logs" / ("quick" if cfg.quick else "full"), timeout=cfg.timeout, jobs=cfg.jobs)
    arts = build_artefacts(out, cfg.quick, steps)
    index = write_index(out, cfg.quick, steps, arts, _command(cfg), time.perf_counter() - t0)
    failed = [s.name for s in steps if s.status == "failed"] + [x.name for x in arts if x.status == "failed"]
    return {"steps": steps, "artefacts": arts, "index": str(index), "failed": failed,
            "seconds": time.perf_counter() - t0, "exit_code": 1 if failed else 0}


def _report(res: Dict[str, Any]) -> str:
    arts = res["artefacts"]
    return (f"[paper] {sum(x.status == 'built' for x in arts)} artefacts built, "
            f"{sum(x.status == 'skipped' for x in arts)} skipped, {len(res['failed'])} failed "
            f"({', '.join(res['failed']) or 'none'}) in {res['seconds']:.0f}s; index: {res['index']}")


STUDY = Study(name="paper", summary="run the experiment grid, then build every table and figure of the paper",
              config=PaperConfig, run=lambda cfg, ctx: run_paper(cfg), report=_report, quick=("quick=true",),
              threads_key=None,
              legacy_flags={"--out": "out", "--no-run": "no_run", "--steps": "steps[]", "--timeout": "timeout",
                            "--jobs": "jobs"},
              description=__doc__ or "")


def main(argv: Optional[List[str]] = None) -> int:
    """``carrot paper ARGS`` (old flags such as ``--out DIR --no-run`` are read as overrides); returns the exit code."""
    from .cli import main as cli_main

    return cli_main(["paper", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    shim("paper")
