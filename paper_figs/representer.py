"""Figure: a query image with its supporting and inhibiting training images (representer points).

Fits the L2 head on the default cached features (``experiments.sanity.load_problem``; seconds) and
explains the predicted logit of each query with :func:`reweight.attribution.explain`: the ``k``
training samples with the largest representer contributions :math:`r_{i,c}\\,k(i,x)` (support) and
the ``k`` most negative (inhibit), shown as MNIST images with their observed training label
(magenta when that label is corrupted) and contribution. Training rows map to dataset images via
``FeatureSet.train_index``; test rows via the deterministic split of ``reweight.data.prepare_data``.
Saves ``<stem>.pdf`` and ``<stem>.png``.

Usage::

    .venv/bin/python -m paper_figs.representer [--lam 0.1] [--queries 150 620] [--k 4] [--out STEM]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["main", "plot_representer"]


def plot_representer(lam: float = 0.1, queries: Sequence[int] = (150, 620), k: int = 4,
                     out: str | Path = "runs/figures/representer") -> List[Path]:
    """Draw one row per test query: the query, its ``k`` supporters and its ``k`` inhibitors."""
    import matplotlib.pyplot as plt
    import torch

    from experiments.sanity import SanityConfig, load_problem
    from reweight.attribution import explain
    from reweight.data import load_dataset, prepare_data

    from .style import DOUBLE_COL, PALETTE, apply_style, save_figure

    cfg = SanityConfig(lams=[lam])
    pr, fs, sp = load_problem(cfg, lam)
    ds = load_dataset(cfg.data.dataset)
    split = prepare_data(ds, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.noise, cfg.data.noise_rate,
                         cfg.data.imbalance_factor, cfg.feature_seed)
    q = torch.as_tensor(list(queries))
    ex = explain(pr, sp["X_test"][q], k=k)
    apply_style()
    ncol = 1 + 2 * k
    fig, axes = plt.subplots(len(q), ncol, figsize=(DOUBLE_COL, 0.95 * len(q) + 0.3), squeeze=False)
    for r, qi in enumerate(q.tolist()):
        img = ds.images[split.test[qi], 0]
        axes[r, 0].imshow(img, cmap="gray_r")
        pred, true = int(ex.cls[r]), int(sp["y_test"][qi])
        axes[r, 0].set_title(f"query: pred {pred}\n(true {true})", fontsize=7)
        for j in range(2 * k):
            support = j < k
            row = int((ex.support_idx if support else ex.inhibit_idx)[r, j % k])
            val = float((ex.support_val if support else ex.inhibit_val)[r, j % k])
            ax = axes[r, 1 + j]
            ax.imshow(ds.images[int(fs.train_index[row]), 0], cmap="gray_r")
            corrupted = bool(fs.corrupted[row])
            ax.set_title(f"y={int(fs.y_train[row])} {val:+.2f}", fontsize=6,
                         color=PALETTE["corrupted"] if corrupted else "black")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            for side in ax.spines.values():
                side.set_visible(False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    x0, x1 = axes[0, 1].get_position().x0, axes[0, 1 + k].get_position().x0
    fig.text(x0, 0.95, "supporting: largest $r_{i,c}\\,k(i,x)$, c = predicted class", fontsize=7)
    fig.text(x1, 0.95, "inhibiting: most negative", fontsize=7)
    paths = save_figure(fig, out)
    plt.close(fig)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paper_figs.representer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--queries", type=int, nargs="+", default=[150, 620],
                   help="test-split rows to explain (the split is sorted by class)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--out", default="runs/figures/representer", help="output stem (default %(default)s)")
    args = p.parse_args(argv)
    for path in plot_representer(args.lam, args.queries, args.k, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
