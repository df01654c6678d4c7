r"""Tables of the trusted-set study (``carrot trusted``): paired differences, accuracy per method, detection, variants.

The study's run directories are ``<root>/<setting>/M<size>/<variant>/seed<k>/`` (main-job runs whose
summaries hold ``methods`` and ``detection``, :func:`reweight.pipeline.compare_methods`). Every
comparison is **paired per seed**: two methods of one cell share features, splits, noise and trusted
set, so the per-seed differences :math:`d_s = a_s - b_s` are summarised by their mean and the 95 %
Student-t interval

.. math:: \bar d \pm t_{0.975,\,S-1}\, s_d/\sqrt S,

and by wins / ties / losses over the seeds (a tie is an identical test accuracy). The best baseline of
a cell is the one of ``clean_only``, ``train_plus_clean``, ``loss_filter``, ``knn_clean`` with the
highest mean test accuracy there (the strongest competitor, picked on test: a conservative comparison).

Reference: Student, "The probable error of a mean", Biometrika 1908.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

from reweight.data import NOISE_SETTINGS
from reweight.errors import RunDirError

from .export import Column, Table

__all__ = ["BASELINES", "TRUSTED_TABLES", "TrustedFrame", "load_trusted", "order_rows", "paired_summary", "trusted_detection_table",
           "trusted_methods_table", "trusted_paired_table", "trusted_variants_table"]

BASELINES = ("clean_only", "train_plus_clean", "loss_filter", "knn_clean")
METHOD_ORDER = ("uniform", "carrot", *BASELINES, "oracle")
DETECTOR_ORDER = ("alpha", "hypergrad_step0", "uniform_loss", "clean_only", "knn", "influence_cg", "representer",
                  "tracin", "trak")


@dataclass
class TrustedFrame:
    """The study's results in long form: ``methods`` (one row per cell, variant, seed, method) and ``detection``
    (one row per cell, seed, detector; default variant), and the runs' provenance."""

    methods: Any
    detection: Any
    sources: List[Dict[str, Any]] = field(default_factory=list)


def _setting(noise: str, rate: float, imb: float) -> str:
    for name, (n, r, i) in NOISE_SETTINGS.items():
        if n == noise and math.isclose(r, rate) and math.isclose(i, imb):
            return name
    return f"{noise}{rate:g}" + (f"_lt{imb:g}" if imb != 1 else "")


def load_trusted(paths: Sequence[Path], strict: bool = False) -> TrustedFrame:
    """Every finished cell under ``paths`` (skipped runs are named by :func:`analysis.loading.load_runs`).

    Raises:
        RunDirError: when no run holds ``methods`` in its summary.
    """
    import pandas as pd

    from .loading import load_runs

    rs = load_runs(paths, require_summary=["methods.uniform.test_acc", "methods.carrot.test_acc"], strict=strict,
                   what="trusted-study runs")
    mrows, drows = [], []
    for r in rs:
        d = r.config["data"]
        parts = Path(r.run).parts
        variant = parts[-2] if len(parts) >= 2 and not parts[-2].startswith("M") else "default"
        cell = {"setting": _setting(d["noise"], float(d["noise_rate"]), float(d["imbalance_factor"])),
                "M": int(r.summary.get("n_meta_train", 0)) + int(r.summary.get("n_meta_val", 0)),
                "variant": variant, "seed": int(r.config["seed"])}
        for m, v in r.summary["methods"].items():
            mrows.append({**cell, "method": m, "test_acc": v.get("test_acc"), "test_loss": v.get("test_loss"),
                          "meta_val_acc": v.get("meta_val_acc"), "guard_step": (v.get("guard") or {}).get("step")})
        for det, v in (r.summary.get("detection") or {}).items():
            drows.append({**cell, "detector": det, "auroc": v.get("auroc"), "ap": v.get("ap"),
                          "spearman_with_alpha": v.get("spearman_with_alpha")})
    if not mrows:
        raise RunDirError(f"No trusted-study runs with 'methods' under {', '.join(map(str, paths))}.")
    return TrustedFrame(pd.DataFrame(mrows), pd.DataFrame(drows), rs.provenance())


def paired_summary(d: Sequence[float]) -> Dict[str, float]:
    r"""Mean, 95 % t-interval and wins/ties/losses of paired differences ``d`` (NaN interval for one seed)."""
    import numpy as np
    from scipy.stats import t as student_t

    x = np.asarray(d, dtype=float)
    n = x.size
    mean = float(x.mean()) if n else math.nan
    half = float(student_t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"diff": mean, "lo": mean - half, "hi": mean + half, "wins": int((x > 1e-9).sum()),
            "ties": int((abs(x) <= 1e-9).sum()), "losses": int((x < -1e-9).sum()), "seeds": int(n)}


def order_rows(df: Any, extra: Tuple[str, Sequence[str]] = ("", ())) -> Any:
    """Rows by setting (:data:`reweight.data.NOISE_SETTINGS` order), trusted size, then ``extra = (column, order)``."""
    from .tables import sort_rows

    order: Dict[str, Sequence[Any]] = {"setting": list(NOISE_SETTINGS)}
    if extra[0]:
        order[extra[0]] = extra[1]
    return sort_rows(df, order, ["setting", "M"] + ([extra[0]] if extra[0] else []))


def _pivot(frame: TrustedFrame, variant: str = "default") -> Any:
    m = frame.methods[frame.methods["variant"] == variant]
    return m.pivot_table(index=["setting", "M", "seed"], columns="method", values="test_acc")


def trusted_paired_table(frame: TrustedFrame, name: str = "trusted_paired") -> Table:
    """Per cell: the learned weights' test accuracy, paired differences to uniform and to the best baseline
    (mean, 95 % interval, W/T/L), and the AUROC of the learned ranking minus the step-0 hypergradient's."""
    import pandas as pd

    piv = _pivot(frame)
    det = frame.detection
    rows = []
    for (setting, M), g in piv.groupby(level=[0, 1], sort=False):
        g = g.droplevel([0, 1])
        base = [b for b in BASELINES if b in g]
        best = max(base, key=lambda b: float(g[b].mean())) if base else None
        u = paired_summary(g["carrot"] - g["uniform"])
        row: Dict[str, Any] = {"setting": setting, "M": int(M), "carrot_acc": float(g["carrot"].mean()),
                               "uniform_acc": float(g["uniform"].mean()), "best_baseline": best or "--",
                               "best_acc": float(g[best].mean()) if best else math.nan,
                               **{f"u_{k}": v for k, v in u.items() if k != "seeds"}, "seeds": u["seeds"]}
        b = paired_summary(g["carrot"] - g[best]) if best else {}
        row.update({f"b_{k}": b.get(k, math.nan) for k in ("diff", "lo", "hi", "wins", "ties", "losses")})
        if not det.empty:
            dd = det[(det.setting == setting) & (det.M == M) & (det.variant == "default")]
            a = dd[dd.detector == "alpha"].set_index("seed")["auroc"]
            s0 = dd[dd.detector == "hypergrad_step0"].set_index("seed")["auroc"]
            common = a.index.intersection(s0.index)
            ds = paired_summary((a[common] - s0[common]).astype(float)) if len(common) else {}
            row.update(auroc_alpha=float(a.mean()) if len(a) else math.nan, auroc_gain_step0=ds.get("diff", math.nan),
                       auroc_gain_step0_lo=ds.get("lo", math.nan))
        rows.append(row)
    df = order_rows(pd.DataFrame(rows))
    cols = [Column("carrot_acc", "carrot acc", latex=r"carrot\\acc."),
            Column("u_diff", "Δ uniform", latex=r"$\Delta$\\unif."), Column("u_lo", "95% lo", latex=r"95\%\\lo"),
            Column("u_wins", "W", digits=0), Column("u_ties", "T", digits=0), Column("u_losses", "L", digits=0),
            Column("b_diff", "Δ best baseline", latex=r"$\Delta$\\best b."), Column("b_lo", "95% lo ", latex=r"95\%\\lo"),
            Column("b_hi", "95% hi", latex=r"95\%\\hi"), Column("b_wins", "W ", digits=0), Column("b_ties", "T ", digits=0),
            Column("b_losses", "L ", digits=0)]
    if "auroc_alpha" in df:
        cols += [Column("auroc_gain_step0", "Δ AUROC α vs step-0 hypergrad", latex=r"$\Delta$AUROC\\vs step 0")]
    return Table(name, df, ["setting", "M", "best_baseline"], cols,
                 caption="Learned weights (carrot) vs uniform and the best baseline, paired per seed",
                 key_labels={"M": "trusted M", "best_baseline": "best baseline"},
                 notes=["Δ: mean paired test-accuracy difference over seeds with its 95 % t-interval; W/T/L: seeds "
                        "won/tied/lost. Best baseline: the highest mean test accuracy among clean_only, "
                        "train_plus_clean, loss_filter, knn_clean in that cell."],
                 sources=frame.sources)


def trusted_methods_table(frame: TrustedFrame, name: str = "trusted_methods") -> Table:
    """Test accuracy and loss of every method per cell (mean ± std over seeds; default variant)."""
    from .tables import aggregate

    m = frame.methods[frame.methods["variant"] == "default"]
    agg = aggregate(m, ["setting", "M", "method"], ["test_acc", "test_loss"])
    agg = order_rows(agg, ("method", METHOD_ORDER))
    return Table(name, agg, ["setting", "M", "method"],
                 [Column("test_acc", "test acc", "max", latex=r"test\\acc."),
                  Column("test_loss", "test loss", "min", latex=r"test\\loss")],
                 caption="Test accuracy and loss of every method, mean ± std over seeds",
                 best_within=["setting", "M"], exclude_from_best={"method": ["oracle"]},
                 key_labels={"M": "trusted M"}, sources=frame.sources,
                 notes=["oracle: the head on the true labels (a reference, never bold)."])


def trusted_detection_table(frame: TrustedFrame, name: str = "trusted_detection") -> Table:
    """Noise detection per cell and detector: AUROC, average precision, Spearman with the learned ranking."""
    from .tables import aggregate

    d = frame.detection
    if d.empty:
        raise RunDirError("No trusted-study run holds a detection table (the corruption is unknown).")
    d = d[d["variant"] == "default"]
    agg = order_rows(aggregate(d, ["setting", "M", "detector"], ["auroc", "ap", "spearman_with_alpha"]),
                 ("detector", DETECTOR_ORDER))
    return Table(name, agg, ["setting", "M", "detector"],
                 [Column("auroc", "AUROC", "max"), Column("ap", "AP", "max"),
                  Column("spearman_with_alpha", "Spearman with α", latex=r"Spearman\\with $\alpha$")],
                 caption="Detecting corrupted labels: learned weights vs trivial detectors and attribution scores",
                 best_within=["setting", "M"], key_labels={"M": "trusted M"}, sources=frame.sources,
                 notes=["alpha: the learned ranking; hypergrad_step0: -dL/dalpha at uniform weights on the whole "
                        "trusted set; uniform_loss: the uniform head's per-sample loss; clean_only: the clean head's "
                        "probability of the given label; knn: neighbour label agreement; influence_cg, representer, "
                        "tracin, trak: attribution to the trusted loss."])


def trusted_variants_table(frame: TrustedFrame, name: str = "trusted_variants") -> Table:
    """Each variant (and the default) vs uniform, and each variant vs the default, paired per seed."""
    import pandas as pd

    m = frame.methods
    variants = ["default"] + sorted(set(m["variant"]) - {"default"})
    if len(variants) < 2:
        raise RunDirError("No variant runs in the trusted study (variants=[]).")
    piv = m[m.method.isin(["carrot", "uniform"])].pivot_table(index=["setting", "M", "seed"],
                                                                columns=["variant", "method"], values="test_acc")
    cells = sorted({k[:2] for k in piv.index if all(not math.isnan(piv.loc[k].get((v, "carrot"), math.nan))
                                                    for v in variants)})
    rows = []
    for setting, M in cells:
        g = piv.loc[(setting, M)]
        for v in variants:
            u = paired_summary(g[(v, "carrot")] - g[(v, "uniform")])
            dflt = paired_summary(g[(v, "carrot")] - g[("default", "carrot")])
            rows.append({"setting": setting, "M": int(M), "variant": v, "acc": float(g[(v, "carrot")].mean()),
                         "u_diff": u["diff"], "u_lo": u["lo"], "u_wins": u["wins"], "u_losses": u["losses"],
                         "d_diff": dflt["diff"], "d_lo": dflt["lo"], "d_hi": dflt["hi"], "seeds": u["seeds"]})
    df = order_rows(pd.DataFrame(rows), ("variant", variants))
    return Table(name, df, ["setting", "M", "variant"],
                 [Column("acc", "test acc", "max"), Column("u_diff", "Δ uniform", latex=r"$\Delta$\\unif."),
                  Column("u_lo", "95% lo", latex=r"95\%\\lo"), Column("u_wins", "W", digits=0),
                  Column("u_losses", "L", digits=0), Column("d_diff", "Δ default", latex=r"$\Delta$\\default"),
                  Column("d_lo", "95% lo ", latex=r"95\%\\lo"), Column("d_hi", "95% hi", latex=r"95\%\\hi")],
                 caption="Variants of the learned weights vs uniform and vs the defaults, paired per seed",
                 best_within=["setting", "M"], key_labels={"M": "trusted M"}, sources=frame.sources,
                 notes=["no_trusted_inner: the final head trains on the training rows only; adam_noguard: the first "
                        "release (60 Adam steps on the whole trusted set, no guard)."])


TRUSTED_TABLES: List[Callable[[TrustedFrame], Table]] = [trusted_paired_table, trusted_methods_table,
                                                         trusted_detection_table, trusted_variants_table]
"""The study's tables, in display order (the variants table needs variant runs)."""
