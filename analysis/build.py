"""The paper tables as a registry: name -> builder with one signature, ``build(paths, strict=False) -> Table``.

:data:`TABLES` maps a table name to a :class:`TableSpec`: a callable ``spec(paths, strict=False)``
that loads the runs under ``paths`` (run directories or folders holding them, searched
recursively) and returns an :class:`analysis.export.Table`, plus a description and the study
whose runs it reads (``experiments.paper`` finds the source folder of each study in its plan and
iterates the registry). :func:`build_table` is the entry used by ``python -m analysis``.

Example:
    >>> from analysis.build import TABLES
    >>> TABLES.get("main_job").study
    'main_job'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

from reweight.errors import ConfigError
from reweight.registry import Registry

from . import tables as T
from .export import Table
from .loading import load_runs, load_staged_study

__all__ = ["TABLES", "TableSpec", "build_table"]

PathLike = Union[str, Path]


@dataclass(frozen=True)
class TableSpec:
    """One registered table.

    Attributes:
        name: file stem of the exported table.
        description: one line for ``INDEX.md`` and ``--help``.
        study: the study (``experiments.paper`` step) whose runs the table reads.
        build: ``build(paths, strict) -> Table``.
    """

    name: str
    description: str
    study: str
    build: Callable[[Sequence[Path], bool], Table]

    def __call__(self, paths: Sequence[PathLike], strict: bool = False) -> Table:
        if isinstance(paths, (str, Path)):
            paths = [paths]
        return self.build([Path(p) for p in paths], strict)


TABLES: Registry = Registry("table")
"""Every paper table, in display order (see :func:`analysis.tables.registration_order`)."""


def _register(name: str, description: str, study: str):
    def deco(fn: Callable[[Sequence[Path], bool], Table]) -> Callable[[Sequence[Path], bool], Table]:
        TABLES.register(name)(TableSpec(name, description, study, fn))
        return fn

    return deco


_MAIN_KEYS = ["learned.test_acc", "uniform.test_acc", "auroc", "ess_ratio_min"]
_GRID_KEYS = ["method", "noise", "noise_rate", "imbalance_factor", "seed", "test_acc", "auroc", "ess_ratio_min",
              "seconds"]


@_register("main_job", "uniform vs learned weights (main job, mean ± std over seeds)", "main_job")
def _main_job(paths: Sequence[Path], strict: bool) -> Table:
    return T.main_job_table(load_runs(paths, require_summary=_MAIN_KEYS, strict=strict, what="main-job runs"))


@_register("per_class_ess", "per-class ESS, entropy, clean/corrupted mean weight, before/after learning", "main_job")
def _per_class_ess(paths: Sequence[Path], strict: bool) -> Table:
    return T.per_class_ess_table(load_runs(paths, require_summary=_MAIN_KEYS, require_weights=True, strict=strict,
                                           what="main-job runs"))


@_register("method_comparison", "method x setting: test accuracy, AUROC, min ESS ratio", "noise_grid")
def _method_comparison(paths: Sequence[Path], strict: bool) -> Table:
    return T.method_comparison_table(load_runs(paths, require_summary=_GRID_KEYS, strict=strict,
                                               what="noise-grid runs"))


@_register("method_comparison_acc", "test accuracy pivot: methods x settings", "noise_grid")
def _method_comparison_acc(paths: Sequence[Path], strict: bool) -> Table:
    return T.accuracy_pivot_table(load_runs(paths, require_summary=_GRID_KEYS, strict=strict,
                                            what="noise-grid runs"))


@_register("rank_correlations", "estimators vs exact LOO: Spearman, Kendall, Pearson, top-10%, LDS", "sanity")
def _rank_correlations(paths: Sequence[Path], strict: bool) -> Table:
    rs = load_runs(paths, require_files=["per_seed.csv"], strict=strict, what="sanity runs")
    df = rs.csv("per_seed.csv")
    if "seconds" not in df.columns and all((r.path / "timings.csv").is_file() for r in rs):
        keys = ["run", "lam", "seed", "method", "target"]
        df = df.merge(rs.csv("timings.csv")[keys + ["seconds"]], on=keys, how="left")
    return T.rank_correlation_table(T.attach_config(df, rs), sources=rs.provenance())


@_register("hypergrad_accuracy", "hypergradient ladder: cosine / relative error vs cost", "hypergrad_accuracy")
def _hypergrad_accuracy(paths: Sequence[Path], strict: bool) -> Table:
    rs = load_runs(paths, require_files=["results.csv"], strict=strict, what="hypergradient-accuracy runs")
    return T.hypergrad_accuracy_table(T.attach_config(rs.csv("results.csv"), rs), sources=rs.provenance())


@_register("staged", "staged-training strategies: accuracy, AUROC, epochs", "staged")
def _staged(paths: Sequence[Path], strict: bool) -> Table:
    df, rs = load_staged_study(paths, strict)
    return T.staged_table(df, sources=rs.provenance())


def _trusted(build: Callable[..., Table]) -> Callable[[Sequence[Path], bool], Table]:
    def go(paths: Sequence[Path], strict: bool) -> Table:
        from .trusted import load_trusted

        return build(load_trusted(paths, strict))

    return go


def _register_trusted() -> None:
    from . import trusted as TR

    for fn, what in ((TR.trusted_paired_table, "learned weights vs uniform and the best baseline per trusted size "
                      "and noise: paired differences, 95 % intervals, W/T/L"),
                     (TR.trusted_methods_table, "test accuracy / loss of every method per trusted size and noise"),
                     (TR.trusted_detection_table, "noise detection: AUROC / AP of the learned ranking, trivial "
                      "detectors and attribution scores"),
                     (TR.trusted_variants_table, "variants of the learned weights (trusted samples in the head, no "
                      "guard) vs uniform and the defaults")):
        name = fn.__name__.removesuffix("_table")
        TABLES.register(name)(TableSpec(name, what, "trusted", _trusted(fn)))


_register_trusted()


def build_table(name: str, paths: Sequence[PathLike], strict: bool = False) -> Table:
    """The table ``name`` from the runs under ``paths``: ``TABLES.get(name)(paths, strict)``.

    Raises:
        ConfigError: on an unknown table name (listing the valid ones), or when the runs' configs
            cannot be kept apart in this table.
        RunDirError: when no usable run is found (naming the directories looked at) or, with
            ``strict``, when any run is unusable.
    """
    if name not in TABLES:
        raise ConfigError(f"The 'name' parameter of build_table must be one of "
                          f"{', '.join(T.registration_order(TABLES))}. Got {name!r} instead.")
    return TABLES.get(name)(paths, strict)

