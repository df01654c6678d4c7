"""Figure: test queries with their supporting and inhibiting training images (representer points).

Takes one finished sanity run directory and rebuilds what it needs from the library alone: the
run's ``config.yaml`` gives its ``base`` RunConfig (data, backbone, features, seed), so
:func:`reweight.pipeline.features` returns the same features (from the feature cache when it is
still there, else recomputed), and :func:`reweight.pipeline.attribution_problem` fits the L2 head
at the run's middle ``lam``. Each query row (two test rows, at 15 % and 62 % of the
class-sorted test split) is explained with :func:`reweight.attribution.explain`: the ``k``
training samples with the largest representer contributions :math:`r_{i,c}\\,k(i,x)` (support) and
the ``k`` most negative (inhibit), shown as images with their observed training label (magenta
when that label is corrupted) and contribution. Training rows map to dataset images via
``FeatureSet.train_index``; test rows via the deterministic split of
:func:`reweight.data.prepare_data`. Full text width.

Command line: ``carrot figure representer SANITY_RUN_DIR --out STEM``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

__all__ = ["QUERY_FRACTIONS", "draw", "load_sanity_problem"]

QUERY_FRACTIONS = (0.15, 0.62)
"""Positions of the explained queries in the (class-sorted) test split."""


def load_sanity_problem(config: Dict[str, Any], lam: float) -> Tuple[Any, Any, Any, Any]:
    """``(problem, features, dataset, splits)`` of a sanity run's ``config`` at ``lam``, from the library only.

    The features and the float64 head on bias-augmented features come from :mod:`reweight.pipeline`, as
    in the sanity study. ``config`` is the run's ``config.yaml``: its ``base`` RunConfig, or (runs made
    before the studies were unified) top-level ``data``/``backbone``/``features``/``feature_seed``.
    """
    from reweight.config import RunConfig, from_dict
    from reweight.data import load_dataset, prepare_data
    from reweight.pipeline import attribution_problem, features

    if "base" in config:
        rc = from_dict(RunConfig, config["base"], "base")
    else:
        rc = from_dict(RunConfig, {**{k: config[k] for k in ("data", "backbone", "features") if k in config},
                                   "seed": int(config.get("feature_seed", 0))})
    fs = features(rc)
    pr, _ = attribution_problem(rc, fs, lam=lam, grad_tol=float(config.get("loo_tol", 1e-10)))
    data = rc.data
    ds = load_dataset(data.dataset)
    split = prepare_data(ds, data.val_fraction, data.test_fraction, data.noise, data.noise_rate,
                         data.imbalance_factor, rc.seed)
    return pr, fs, ds, split


def draw(runs: Sequence[Path], stem: Path, k: int = 4) -> List[Path]:
    """Draw one row per query from the one sanity run under ``runs``: the query, ``k`` supporters, ``k`` inhibitors."""
    import matplotlib.pyplot as plt
    import torch

    from reweight.attribution import explain
    from reweight.head import add_bias

    from .loo_scatter import one_run
    from .style import DOUBLE_COL, PALETTE, apply_style, finish

    run = one_run(runs, [], "representer", "sanity runs")
    lams = sorted(float(x) for x in run.config.get("lams", [0.1]))
    lam = lams[len(lams) // 2]
    pr, fs, ds, split = load_sanity_problem(run.config, lam)
    n_test = int(fs.X_test.shape[0])
    q = torch.as_tensor(sorted({min(n_test - 1, int(f * n_test)) for f in QUERY_FRACTIONS}))
    ex = explain(pr, add_bias(fs.X_test.to(torch.float64))[q], k=k)
    apply_style()
    ncol = 1 + 2 * k
    fig, axes = plt.subplots(len(q), ncol, figsize=(DOUBLE_COL, 1.05 * len(q) + 0.35), squeeze=False)
    for r, qi in enumerate(q.tolist()):
        axes[r, 0].imshow(ds.images[split.test[qi], 0], cmap="gray_r")
        pred, true = int(ex.cls[r]), int(fs.y_test[qi])
        axes[r, 0].set_title(f"query: pred {pred}\n(true {true})", fontsize=7)
        for j in range(2 * k):
            support = j < k
            row = int((ex.support_idx if support else ex.inhibit_idx)[r, j % k])
            val = float((ex.support_val if support else ex.inhibit_val)[r, j % k])
            ax = axes[r, 1 + j]
            ax.imshow(ds.images[int(fs.train_index[row]), 0], cmap="gray_r")
            corrupted = bool(fs.corrupted[row])
            ax.set_title(f"y={int(fs.y_train[row])}{'*' if corrupted else ''}\n{val:+.2f}", fontsize=7,
                         color=PALETTE["corrupted"] if corrupted else "black")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            for side in ax.spines.values():
                side.set_visible(False)
    fig.suptitle(f"left: query; then {k} supporting (largest $r_{{i,c}}\\,k(i,x)$, $c$ = predicted class) and {k} "
                 f"inhibiting training images ($\\lambda$ = {lam:g}; * = corrupted label)", fontsize=7)
    return finish(fig, stem)


if __name__ == "__main__":
    from paper_figs._shim import deprecated_main

    deprecated_main("representer")
