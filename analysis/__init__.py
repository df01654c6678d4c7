"""Run directories -> tidy pandas tables (per-class ESS, rank correlations, method comparison).

Modules:

* :mod:`analysis.loading` -- :func:`~analysis.loading.load_runs`: find run directories, skip (with
  a warning naming each run and why) or reject (``strict=True``) incomplete / failed / unconverged /
  outdated ones, expose tidy frames of configs + summaries, metrics per outer step and learned
  weights per sample, and find config differences between runs
  (:func:`~analysis.loading.config_differences`);
* :mod:`analysis.tables` -- the paper tables, aggregated over seeds (mean ± sample std), grouped
  by config where runs differ; display orders from the method registries;
* :mod:`analysis.export` -- :class:`~analysis.export.Table` and its CSV (byte-stable, timings
  apart), Markdown and LaTeX (booktabs, math headers, fitted to the text width) renderings;
* :mod:`analysis.build` -- the registry :data:`TABLES` (name -> ``build(paths, strict=False) ->
  Table``) and :func:`build_table` (``python -m analysis <name> <dirs>``).

``analysis.TABLES`` and ``analysis.build_table`` are loaded on first access; importing
:mod:`analysis` itself loads no submodule. Nothing here is imported by :mod:`reweight`.
"""

from typing import Any

__all__ = ["TABLES", "build", "build_table", "export", "loading", "tables"]


def __getattr__(name: str) -> Any:
    if name in ("TABLES", "build_table"):
        from . import build

        return getattr(build, name)
    if name in ("build", "export", "loading", "tables"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
