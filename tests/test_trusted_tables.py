"""Tables and figure of the trusted-set study from hand-made run directories: paired statistics by hand."""

import math
from pathlib import Path

import pandas as pd
import pytest
from scipy.stats import t as student_t

from analysis.trusted import (
    load_trusted,
    paired_summary,
    trusted_detection_table,
    trusted_methods_table,
    trusted_paired_table,
    trusted_variants_table,
)

from .test_analysis import make_run

# per seed: test accuracy of each method (M = 50, setting sym40)
ACC = {
    0: {"uniform": 0.80, "carrot": 0.83, "clean_only": 0.81, "train_plus_clean": 0.82, "loss_filter": 0.80, "knn_clean": 0.79},
    1: {"uniform": 0.82, "carrot": 0.82, "clean_only": 0.84, "train_plus_clean": 0.83, "loss_filter": 0.81, "knn_clean": 0.80},
    2: {"uniform": 0.78, "carrot": 0.83, "clean_only": 0.80, "train_plus_clean": 0.81, "loss_filter": 0.79, "knn_clean": 0.78},
}
AUROC = {0: (0.95, 0.93), 1: (0.94, 0.94), 2: (0.96, 0.92)}  # (alpha, hypergrad_step0)


def make_trusted_study(root: Path) -> Path:
    for M, shift in ((50, 0.0), (100, 0.01)):
        for variant in ("default", "no_trusted_inner"):
            for seed in (0, 1, 2):
                cfg = {"name": f"seed{seed}", "seed": seed, "out_dir": str(root),
                       "data": {"dataset": "digits", "noise": "symmetric", "noise_rate": 0.4, "imbalance_factor": 1.0,
                                "trusted_size": M},
                       "guard": {"trusted_in_inner": variant == "default"}}
                acc = {k: v + shift for k, v in ACC[seed].items()}
                if variant != "default":
                    acc = {"uniform": acc["uniform"], "carrot": acc["carrot"] - 0.01}
                methods = {k: {"test_acc": v, "test_loss": 1 - v, "meta_val_acc": v} for k, v in acc.items()}
                a, s0 = AUROC[seed]
                det = {"alpha": {"auroc": a, "ap": a, "spearman_with_alpha": 1.0},
                       "hypergrad_step0": {"auroc": s0, "ap": s0, "spearman_with_alpha": 0.9}} if variant == "default" else {}
                make_run(root / "sym40" / f"M{M}" / variant / f"seed{seed}", cfg,
                         {"methods": methods, "detection": det, "n_meta_train": M // 2, "n_meta_val": M - M // 2})
    return root


def test_paired_summary_by_hand():
    d = [0.03, 0.0, 0.05]
    s = paired_summary(d)
    mean, sd = sum(d) / 3, pd.Series(d).std(ddof=1)
    half = student_t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert s["diff"] == pytest.approx(mean) and s["lo"] == pytest.approx(mean - half) and s["hi"] == pytest.approx(mean + half)
    assert (s["wins"], s["ties"], s["losses"], s["seeds"]) == (2, 1, 0, 3)
    assert math.isnan(paired_summary([0.1])["lo"])


def test_trusted_tables(tmp_path):
    f = load_trusted([make_trusted_study(tmp_path / "t")])
    p = trusted_paired_table(f).data
    row = p[(p.setting == "sym40") & (p.M == 50)].iloc[0]
    # best baseline by mean test accuracy: train_plus_clean (0.82) > clean_only (0.8167)
    assert row.best_baseline == "train_plus_clean"
    d_u = [0.03, 0.0, 0.05]
    assert row.u_diff == pytest.approx(sum(d_u) / 3) and (row.u_wins, row.u_ties, row.u_losses) == (2, 1, 0)
    d_b = [0.01, -0.01, 0.02]
    assert row.b_diff == pytest.approx(sum(d_b) / 3) and (row.b_wins, row.b_ties, row.b_losses) == (2, 0, 1)
    assert row.auroc_gain_step0 == pytest.approx((0.02 + 0.0 + 0.04) / 3)
    assert list(p.M) == [50, 100]
    m = trusted_methods_table(f)
    assert set(m.data.method) == {"uniform", "carrot", "clean_only", "train_plus_clean", "loss_filter", "knn_clean"}
    assert list(m.data.method[:2]) == ["uniform", "carrot"]
    dt = trusted_detection_table(f).data
    assert set(dt.detector) == {"alpha", "hypergrad_step0"}
    v = trusted_variants_table(f).data
    nti = v[(v.M == 50) & (v.variant == "no_trusted_inner")].iloc[0]
    assert nti.d_diff == pytest.approx(-0.01) and nti.u_wins + nti.u_losses <= 3


def test_trusted_figure(tmp_path):
    from paper_figs import draw_figure

    out = draw_figure("trusted_size", [make_trusted_study(tmp_path / "t")], tmp_path / "fig")
    assert [p.suffix for p in out] == [".pdf", ".png"] and all(p.is_file() for p in out)
