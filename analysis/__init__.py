"""Run directories -> tidy pandas tables (per-class ESS, rank correlations, method comparison).

Modules:

* :mod:`analysis.loading` -- :func:`~analysis.loading.load_runs`: find run directories, skip (with
  a warning naming them) or reject (``strict=True``) incomplete / failed / outdated ones, and expose
  tidy frames of configs + summaries, metrics per outer step and learned weights per sample;
* :mod:`analysis.tables` -- the paper tables, aggregated over seeds (mean ± sample std);
* :mod:`analysis.export` -- :class:`~analysis.export.Table` and its CSV (byte-stable, timings
  apart), Markdown and LaTeX (booktabs, best in bold) renderings;
* :mod:`analysis.build` -- a table by name from run directories (``python -m analysis <name> <dirs>``).

Nothing here is imported by :mod:`reweight`; importing :mod:`analysis` itself loads no submodule.
"""

__all__ = ["build", "export", "loading", "tables"]
