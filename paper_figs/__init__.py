"""Paper figures as a registry: name -> ``draw(runs, stem) -> List[Path]``.

:data:`FIGURES` maps a figure name to a :class:`FigureSpec`, callable as ``spec(runs, stem)``:
``runs`` are run directories or study folders (searched recursively), ``stem`` the output path
without suffix; it writes ``<stem>.pdf`` and ``<stem>.png`` at the house width and returns their
paths. Each entry also names the study (``experiments.paper`` step) whose runs it draws and its
width, so ``experiments.paper`` iterates the registry. The command line is
``carrot figure NAME RUN_DIR... --out STEM`` (:func:`draw_figure`).

Figure modules are imported on first use (``import paper_figs`` stays light); no figure imports
an experiment.

Example:
    >>> from paper_figs import FIGURES
    >>> FIGURES.get("weight_hist").study, FIGURES.get("weight_hist").width
    ('main_job', 3.25)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Union

from reweight.errors import ConfigError
from reweight.registry import Registry

from .style import DOUBLE_COL, SINGLE_COL

__all__ = ["FIGURES", "FigureSpec", "draw_figure"]

PathLike = Union[str, Path]


@dataclass(frozen=True)
class FigureSpec:
    """One registered figure.

    Attributes:
        name: registry name (and default file stem).
        description: one line for ``INDEX.md`` and ``--help``.
        study: the study (``experiments.paper`` step) whose runs the figure draws.
        width: print width in inches (``SINGLE_COL`` or ``DOUBLE_COL``).
        target: ``"module:function"`` of the draw function, imported on first call.
    """

    name: str
    description: str
    study: str
    width: float
    target: str

    def __call__(self, runs: Sequence[PathLike], stem: PathLike) -> List[Path]:
        """Draw the figure from ``runs`` into ``<stem>.pdf``/``.png``; returns the written paths."""
        if isinstance(runs, (str, Path)):
            runs = [runs]
        runs = [Path(r) for r in runs]
        if not runs:
            raise ConfigError(f"The 'runs' parameter of figure {self.name!r} must name at least one run directory "
                              f"or study folder. Got [] instead.")
        module, fn = self.target.split(":")
        draw = getattr(importlib.import_module(module), fn)
        return [Path(p) for p in draw(runs, Path(stem))]


FIGURES: Registry = Registry("figure")
"""Every paper figure, in display order (registration order)."""

for _spec in (
    FigureSpec("weight_hist", "histogram of learned weights, clean vs corrupted samples (mean ± std over runs)",
               "main_job", SINGLE_COL, "paper_figs.weight_hist:draw"),
    FigureSpec("class_ess", "per-class ESS/n_c, learned vs uniform, with the clean fraction", "main_job",
               SINGLE_COL, "paper_figs.class_ess:draw"),
    FigureSpec("trajectories", "validation loss, AUROC, min ESS ratio and test accuracy per outer step (step 0 = "
               "before any update)", "main_job", DOUBLE_COL, "paper_figs.trajectories:draw"),
    FigureSpec("hypergrad_cost", "hypergradient cosine / relative error vs cost (HVPs + inner steps)",
               "hypergrad_accuracy", DOUBLE_COL, "paper_figs.hypergrad_cost:draw"),
    FigureSpec("staged_curves", "accuracy per epoch per staged strategy, stage boundaries", "staged", DOUBLE_COL,
               "paper_figs.staged_curves:draw"),
    FigureSpec("loo_scatter", "exact LOO vs estimate per estimator, y = x reference", "sanity", DOUBLE_COL,
               "paper_figs.loo_scatter:draw"),
    FigureSpec("representer", "test queries with their supporting / inhibiting training images", "sanity",
               DOUBLE_COL, "paper_figs.representer:draw"),
    FigureSpec("trusted_size", "test accuracy vs trusted-set size per noise setting, every method (95 % intervals)",
               "trusted", DOUBLE_COL, "paper_figs.trusted_size:draw"),
    FigureSpec("faithfulness", "query confidence after removing / keeping the top-K supporters (± std over queries)",
               "faithfulness", DOUBLE_COL, "paper_figs.faithfulness:draw"),
):
    FIGURES.register(_spec.name)(_spec)
del _spec


def draw_figure(name: str, runs: Sequence[PathLike], stem: PathLike) -> List[Path]:
    """Draw the registered figure ``name`` from ``runs`` into ``<stem>.pdf``/``.png`` (``FIGURES.get(name)``).

    This is what ``carrot figure NAME RUN_DIR... --out STEM`` calls.

    Raises:
        ConfigError: for an unknown name (listing the registered ones), runs of different configs
            that the figure would pool, or a figure that draws one run given several.
        RunDirError: when no usable run is found under ``runs`` (naming the directories looked at).
    """
    return FIGURES.get(name)(runs, stem)
