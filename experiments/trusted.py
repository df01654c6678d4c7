"""The trusted-set study: learned weights vs uniform and strong baselines, across trusted-set sizes and noise.

One command::

    carrot trusted                 # sizes {50, 100, 250, 500} x {sym20, sym40, sym60, asym40} x 10 seeds
    carrot trusted --quick         # digits, sizes {50, 100}, two settings, 3 seeds, one variant at 50
    carrot trusted jobs=1 seeds=[0,1,2]

Every cell (setting, trusted-set size ``M``, seed) is one main job, ``carrot run`` with
``data.trusted_size=M`` and the setting's noise (defaults of ``experiments/configs/main.yaml``:
the meta-val guard, cross-fitting, exponentiated-gradient outer steps), run as its own process
(:mod:`experiments.children`), ``jobs`` at a time, one thread each. Its summary holds every method
of the comparison on the same features, splits and trusted set (``uniform``, ``carrot``,
``clean_only``, ``train_plus_clean``, ``loss_filter``, ``knn_clean``, ``oracle``) and the detection
table (AUROC / AP of the learned ranking, the uniform-head loss, the step-0 hypergradient, kNN
agreement, the clean-only head and the attribution scores). ``variants`` (e.g. the trusted samples
kept out of the final head, or the old Adam outer loop without guard) rerun the learned weights
on the cached features of the cells of ``variant_sizes`` (default: M = 50), for the comparison of defaults.

Layout: ``<out_dir>/<name>/<setting>/M<size>/<variant>/seed<k>/`` (a run directory each; the
default variant is ``default``). Finished cells are skipped on a rerun, a killed cell resumes, and
Ctrl-C stops every running cell (exit 130). Then the tables of :mod:`analysis.trusted` (paired
differences with 95 % intervals and win/tie/loss, accuracy per method, detection, variants) go to
``<out_dir>/<name>/tables/`` as CSV, Markdown and LaTeX, and the figure ``trusted_size`` (test
accuracy vs trusted-set size) to ``<out_dir>/<name>/figures/``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from reweight.config import help_field as _f
from reweight.data import NOISE_SETTINGS
from reweight.errors import ConfigError

from .children import Child, run_children
from .study import Context, Study, shim

__all__ = ["STUDY", "TrustedConfig", "cells", "run_trusted"]

_NO_COMPARE = ["compare.baselines=[]", "compare.oracle=false", "compare.attribution=[]"]

VARIANTS: Dict[str, List[str]] = {
    "no_trusted_inner": ["guard.trusted_in_inner=false"],
    "select": ["guard.mode=select"],
    "adam_noguard": ["outer.optimizer=adam", "outer.steps=60", "guard.mode=off", "guard.trusted_in_inner=false",
                     "data.meta_val_fraction=0.0"],
}
"""Named alternatives to the defaults: dotted overrides of ``carrot run`` (``adam_noguard`` = the first
release's defaults: 60 Adam steps, hypergradients on the whole trusted set, no guard)."""


@dataclass(frozen=True)
class TrustedConfig:
    """The trusted-set study: the grid, the variants, how many cells run side by side."""

    name: str = _f("trusted", "study name: runs, tables and figures go to <out_dir>/<name>/")
    out_dir: str = _f("runs", "parent directory")
    sizes: List[int] = _f([50, 100, 250, 500], "trusted-set sizes (data.trusted_size)")
    settings: List[str] = _f(["sym20", "sym40", "sym60", "asym40"], f"noise settings, from {', '.join(NOISE_SETTINGS)}")
    seeds: List[int] = _f(list(range(10)), "root seeds (splits, noise, trusted set, warm-up)")
    overrides: List[str] = _f([], "dotted overrides of every cell's `carrot run` (e.g. data.dataset=digits)")
    variants: List[str] = _f(["no_trusted_inner", "adam_noguard"], f"variants to run, from {', '.join(VARIANTS)}")
    variant_sizes: List[int] = _f([50], "trusted-set sizes at which the variants run (the smallest: where "
                                  "overfitting the trusted set bites)")
    cache_dir: str = _f(".carrot_cache", "feature cache shared by the cells")
    jobs: int = _f(2, "cells run side by side (one thread each)")
    timeout: Optional[float] = _f(None, "per-cell timeout in seconds (null = none)")

    def __post_init__(self) -> None:
        bad = [s for s in self.settings if s not in NOISE_SETTINGS]
        if bad or not self.settings:
            raise ConfigError(f"The 'settings' parameter must hold names from {', '.join(NOISE_SETTINGS)}. Got {self.settings!r} instead.")
        bad_v = [v for v in self.variants if v not in VARIANTS]
        if bad_v:
            raise ConfigError(f"The 'variants' parameter must hold names from {', '.join(VARIANTS)}. Got {bad_v!r} instead.")
        for key in ("sizes", "variant_sizes"):
            vals = getattr(self, key)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 2 for v in vals) or (key == "sizes" and not vals):
                raise ConfigError(f"The '{key}' parameter must be a list of ints >= 2. Got {vals!r} instead.")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ConfigError(f"The 'seeds' parameter must be a non-empty list of ints >= 0. Got {self.seeds!r} instead.")
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise ConfigError(f"The 'jobs' parameter must be an int >= 1. Got {self.jobs!r} instead.")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"The 'timeout' parameter must be > 0 or null. Got {self.timeout!r} instead.")
        if any(o.partition("=")[0].strip() in ("seed", "name", "out_dir", "data.trusted_size") for o in self.overrides):
            raise ConfigError(f"The 'overrides' parameter must not set seed, name, out_dir or data.trusted_size (the study "
                              f"sets them per cell). Got {self.overrides!r}.")


def cells(cfg: TrustedConfig) -> List[Child]:
    """Every cell of the study as a ``carrot run`` child, default variant first (the variants reuse its features)."""
    root = Path(cfg.out_dir) / cfg.name
    logs = root / "logs"
    out: List[Child] = []
    for variant in ["default", *cfg.variants]:
        for seed in cfg.seeds:  # seed-major: an interrupted study has every cell at nearly the same number of seeds
            for setting in cfg.settings:
                noise, rate, imb = NOISE_SETTINGS[setting]
                for size in cfg.sizes:
                    if variant != "default" and size not in cfg.variant_sizes:
                        continue
                    extra = [] if variant == "default" else VARIANTS[variant] + _NO_COMPARE
                    argv = ["--threads", "1", "--quiet", *cfg.overrides, f"data.noise={noise}", f"data.noise_rate={rate}",
                            f"data.imbalance_factor={imb}", f"data.trusted_size={size}", f"seed={seed}",
                            f"name=seed{seed}", f"out_dir={root / setting / f'M{size}' / variant}",
                            f"features.cache_dir={cfg.cache_dir}", *extra]
                    out.append(Child(f"{setting}/M{size}/{variant}/seed{seed}", "run", argv,
                                     logs / setting / f"M{size}" / variant / f"seed{seed}.log"))
    return out


def _finished(c: Child) -> bool:
    out_dir = next(a.split("=", 1)[1] for a in c.argv if a.startswith("out_dir="))
    name = next(a.split("=", 1)[1] for a in c.argv if a.startswith("name="))
    return (Path(out_dir) / name / "DONE").is_file()


def run_trusted(cfg: TrustedConfig, ctx: Context) -> Dict[str, Any]:
    """Run the cells not yet finished, then write the tables and the figure; returns their paths and the failures."""
    from analysis.export import export_table
    from analysis.trusted import TRUSTED_TABLES, load_trusted, trusted_variants_table
    from paper_figs import draw_figure

    root = Path(cfg.out_dir) / cfg.name
    todo = [c for c in cells(cfg) if ctx.overwrite or not _finished(c)]
    if ctx.overwrite:
        for c in todo:
            c.argv.insert(0, "--overwrite")
    say = (lambda m: print(f"[trusted] {m}", flush=True)) if ctx.progress else (lambda m: None)
    say(f"{len(todo)} of {len(cells(cfg))} cells to run, {cfg.jobs} at a time")
    run_children(todo, jobs=cfg.jobs, timeout=cfg.timeout, on_event=say)
    failed = [c.name for c in todo if c.status == "failed"]
    frame = load_trusted([root])
    paths: List[str] = []
    for build in TRUSTED_TABLES:
        if build is trusted_variants_table and not cfg.variants:
            continue  # no variant runs asked for: no variants table
        paths += [str(p) for p in export_table(build(frame), root / "tables")]
    paths += [str(p) for p in draw_figure("trusted_size", [root], root / "figures" / "trusted_size")]
    return {"root": str(root), "paths": paths, "failed": failed, "exit_code": 1 if failed else 0}


def _report(res: Dict[str, Any]) -> str:
    md = Path(res["root"]) / "tables" / "trusted_paired.md"
    head = md.read_text() if md.is_file() else ""
    tail = f"\nfailed cells: {', '.join(res['failed'])}" if res["failed"] else ""
    return head + "\n" + "\n".join(res["paths"]) + tail


STUDY = Study(name="trusted", summary="learned weights vs uniform and baselines across trusted-set sizes and noise "
              "(paired, 10 seeds)", config=TrustedConfig, run=run_trusted, report=_report,
              quick=("overrides=[data.dataset=digits, backbone.epochs=6, outer.steps=20]", "sizes=[50, 100]",
                     "settings=[sym40, asym40]", "seeds=[0, 1, 2]", "variants=[adam_noguard]", "variant_sizes=[50]",
                     "name=trusted_quick"),
              threads_key=None, description=__doc__ or "")

if __name__ == "__main__":
    shim("trusted")
    sys.exit(0)
