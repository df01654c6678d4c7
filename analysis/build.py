"""Build a paper table by name from run directories (used by ``python -m analysis`` and ``experiments.paper``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from reweight.errors import ConfigError, RunDirError

from . import tables as T
from .loading import load_runs

__all__ = ["TABLES", "build_table"]

TABLES = ["main_job", "per_class_ess", "method_comparison", "method_comparison_acc", "rank_correlations",
          "hypergrad_accuracy", "staged"]


def build_table(name: str, paths: Sequence[str | Path], strict: bool = False) -> "T.Table":
    """The table ``name`` from the runs under ``paths`` (see :data:`TABLES`).

    Raises:
        ConfigError: on an unknown table name (listing the valid ones).
        RunDirError: when no usable run is found (naming the directories looked at) or, with
            ``strict``, when any run is incomplete or outdated.
    """
    import pandas as pd

    if name in ("main_job", "per_class_ess"):
        rs = load_runs(paths, require_summary=["learned.test_acc", "uniform.test_acc", "auroc", "ess_ratio_min"],
                       require_weights=name == "per_class_ess", strict=strict, what="main-job runs")
        return T.main_job_table(rs) if name == "main_job" else T.per_class_ess_table(rs)
    if name in ("method_comparison", "method_comparison_acc"):
        rs = load_runs(paths, require_summary=["method", "noise", "noise_rate", "imbalance_factor", "seed", "test_acc",
                                               "auroc", "ess_ratio_min", "seconds"], strict=strict,
                       what="noise-grid runs")
        return T.method_comparison_table(rs) if name == "method_comparison" else T.accuracy_pivot_table(rs)
    if name == "rank_correlations":
        rs = load_runs(paths, require_files=["per_seed.csv"], strict=strict, what="sanity runs")
        df = rs.csv("per_seed.csv")
        if "seconds" not in df.columns and all((r.path / "timings.csv").is_file() for r in rs):
            keys = ["run", "lam", "seed", "method", "target"]
            df = df.merge(rs.csv("timings.csv")[keys + ["seconds"]], on=keys, how="left")
        return T.rank_correlation_table(df, sources=rs.provenance())
    if name == "hypergrad_accuracy":
        rs = load_runs(paths, require_files=["results.csv"], strict=strict, what="hypergradient-accuracy runs")
        return T.hypergrad_accuracy_table(rs.csv("results.csv"), sources=rs.provenance())
    if name == "staged":
        frames = []
        for p in paths:
            if not (Path(p) / "results.csv").is_file():
                raise RunDirError(f"No staged study at {p}: results.csv is missing (run python -m experiments.staged).")
            df = pd.read_csv(Path(p) / "results.csv")
            tp = Path(p) / "results_timing.csv"
            if tp.is_file():
                df = df.merge(pd.read_csv(tp)[["strategy", "seed", "seconds"]], on=["strategy", "seed"], how="left")
            frames.append(df)
        rs = load_runs(paths, strict=strict, what="staged runs")
        return T.staged_table(pd.concat(frames, ignore_index=True), sources=rs.provenance())
    raise ConfigError(f"The 'name' parameter of build_table must be one of {', '.join(TABLES)}. Got {name!r} instead.")
