r"""Paper tables built from loaded runs (:mod:`analysis.loading`), aggregated over seeds.

Every builder returns an :class:`analysis.export.Table` whose rows are in a deterministic order
and whose value columns are ``<v>_mean``/``<v>_std`` over the runs of a group (sample standard
deviation, ``ddof=1``: NaN for one seed) plus ``n_runs``. Groups are formed by the table's own keys
and by every config field that differs between runs of one such group other than seeds, names and
paths (:func:`analysis.loading.config_differences`), so runs of different settings are never
averaged together; the table then has those fields as key columns and a note saying so.

Display orders of methods come from the method registries (registration order):
:func:`method_order` (noise grid: ``oracle``, :data:`reweight.baselines.BASELINES`, then
``bilevel_<m>`` for :data:`reweight.hypergrad.HYPERGRAD`), :func:`estimator_order` (``exact_loo``,
then :data:`reweight.attribution.ATTRIBUTION`) and :func:`hypergrad_order`.

=================================  ============================================  ==================================
builder                            rows                                          source
=================================  ============================================  ==================================
:func:`per_class_ess_table`        stage (uniform/learned) x class               ``weights.pt`` (main job, grid)
:func:`main_job_table`             uniform vs learned weights                    main-job ``summary.json``
:func:`rank_correlation_table`     target x lambda x estimator vs exact LOO      ``experiments.sanity`` ``per_seed.csv``
:func:`method_comparison_table`    setting x method                              ``experiments.noise_grid`` run dirs
:func:`accuracy_pivot_table`       method x setting (test accuracy)              ``experiments.noise_grid`` run dirs
:func:`hypergrad_accuracy_table`   dataset x variant x budget                    ``experiments.hypergrad_accuracy``
:func:`staged_table`               staged-training strategy                      ``experiments.staged`` ``results.csv``
=================================  ============================================  ==================================

Per-class quantities (DESIGN section 2): :math:`\mathrm{ESS}_c = (\sum_{i\in c}\alpha_i)^2/\sum_{i\in c}\alpha_i^2`
(Kish 1965), reported with :math:`\mathrm{ESS}_c/n_c`, and the entropy
:math:`H_c = -\sum_{i\in c} p_i\log p_i`, :math:`p_i = \alpha_i/\sum_{j\in c}\alpha_j`; both from
:func:`reweight.weights.class_report`.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np

from reweight.errors import ConfigError, RunDirError

from .export import Column, Table
from .loading import IGNORED_CONFIG, RunSet, check_columns, config_differences

__all__ = [
    "accuracy_pivot_table",
    "aggregate",
    "attach_config",
    "estimator_order",
    "hypergrad_accuracy_table",
    "hypergrad_order",
    "main_job_table",
    "method_comparison_table",
    "method_order",
    "per_class_ess_table",
    "rank_correlation_table",
    "rank_correlations",
    "registration_order",
    "setting_label",
    "sort_rows",
    "staged_table",
    "varying_config",
]

SETTING_ORDER = ["sym20", "sym40", "sym60", "asym40", "lt10", "lt50"]
"""Display order of the noise grid's settings (names of ``experiments.noise_grid``, not a registry)."""


def registration_order(registry: Any) -> List[str]:
    """Names of a :class:`reweight.registry.Registry` in registration order.

    ``Registry.names()`` sorts alphabetically; the registration order (:meth:`Registry.ordered`: the
    order the methods are introduced in their module, cheapest/reference first) is the display order
    of the tables and legends.
    """
    return list(registry.ordered())


def hypergrad_order() -> List[str]:
    """Hypergradient methods in :data:`reweight.hypergrad.HYPERGRAD` registration order."""
    from reweight.hypergrad import HYPERGRAD

    return registration_order(HYPERGRAD)


def estimator_order() -> List[str]:
    """``exact_loo`` (the reference), then :data:`reweight.attribution.ATTRIBUTION` in registration order."""
    from reweight.attribution import ATTRIBUTION

    return ["exact_loo"] + registration_order(ATTRIBUTION)


def method_order(names: Sequence[str] = ()) -> List[str]:
    """Noise-grid methods: ``oracle``, the baselines, then ``bilevel_<hypergrad>[_suffix]`` in registry order.

    ``names`` not covered by this rule (other suffixes sort after their base method) follow by name.

    Example:
        >>> order = method_order(["bilevel_cg_balanced"])
        >>> order[:5], order.index("bilevel_cg_balanced") == order.index("bilevel_cg") + 1
        (['oracle', 'uniform', 'class_balanced', 'l2rw', 'mwn'], True)
    """
    from reweight.baselines import BASELINES

    base = ["oracle"] + registration_order(BASELINES)
    hg = hypergrad_order()
    order = base + [f"bilevel_{h}" for h in hg]

    def key(n: str) -> tuple:
        if n in order:
            return (order.index(n), "")
        for h in sorted(hg, key=len, reverse=True):  # bilevel_cg_balanced -> after bilevel_cg
            if n.startswith(f"bilevel_{h}_"):
                return (order.index(f"bilevel_{h}"), n)
        return (len(order), n)

    extra = sorted((n for n in names if n not in order), key=key)
    merged = order + extra
    return sorted(dict.fromkeys(merged), key=key) if extra else order


def sort_rows(df: Any, order: Dict[str, Sequence[Any]], by: Sequence[str]) -> Any:
    """Sort ``df`` by ``by``; columns in ``order`` follow the given value order (others sort naturally).

    Values missing from an order list come after the listed ones, in sorted order.
    """
    if df.empty:
        return df.reset_index(drop=True)
    keys = []
    for col in by:
        if col in order:
            pos = {v: i for i, v in enumerate(order[col])}
            keys.append(df[col].map(lambda v, pos=pos: (pos.get(v, len(pos)), str(v))))
        else:
            keys.append(df[col])
    tmp = df.assign(**{f"__k{i}": k for i, k in enumerate(keys)})
    tmp = tmp.sort_values([f"__k{i}" for i in range(len(keys))], kind="mergesort")
    return tmp.drop(columns=[f"__k{i}" for i in range(len(keys))]).reset_index(drop=True)


def aggregate(df: Any, by: Sequence[str], values: Sequence[str], ddof: int = 1) -> Any:
    r"""Mean and standard deviation of ``values`` over the rows of each ``by`` group.

    .. math:: \bar v = \frac1S\sum_s v_s, \qquad \mathrm{sd} = \sqrt{\tfrac{1}{S-\mathrm{ddof}}\sum_s (v_s-\bar v)^2}

    Args:
        df: tidy frame, one row per run (seed) and group.
        by: grouping columns (kept, in order of first appearance).
        values: numeric columns (non-numeric entries become NaN and are ignored by the mean).
        ddof: delta degrees of freedom of the std (1: sample std; NaN for a single run).

    Returns:
        ``by`` columns, then ``<v>_mean``, ``<v>_std`` for each value, then ``n_runs``.

    Raises:
        ConfigError: if a ``by`` or ``values`` column is missing.
    """
    import pandas as pd

    check_columns(df, list(by) + list(values), "aggregate")
    num = df[list(by)].copy()
    for v in values:
        num[v] = pd.to_numeric(df[v], errors="coerce").astype(float)
    g = num.groupby(list(by), sort=False, dropna=False)
    out = g.size().rename("n_runs").reset_index()
    stats = {}
    for v in values:
        stats[f"{v}_mean"] = g[v].mean().values
        stats[f"{v}_std"] = g[v].std(ddof=ddof).values
    cols = {c: out[c] for c in by}
    cols.update(stats)
    cols["n_runs"] = out["n_runs"].values
    return pd.DataFrame(cols)


def varying_config(frame: Any, ignore: Sequence[str] = IGNORED_CONFIG, prefix: str = "cfg.") -> List[str]:
    """Flattened config columns (``cfg.*``) whose values differ between runs, ignoring seeds/names/paths.

    A column is ignored when the last dotted component of its name is in ``ignore``.
    """
    return config_differences(frame, (), ignore, prefix)


def attach_config(rows: Any, runs: RunSet, prefix: str = "cfg.") -> Any:
    """``rows`` (with a ``run`` column, e.g. a concatenated per-run CSV) joined with each run's flattened config."""
    frame = runs.frame()
    cols = ["run"] + [c for c in frame.columns if str(c).startswith(prefix)]
    return rows.merge(frame[cols], on="run", how="left", validate="many_to_one")


def _group_note(keys: Sequence[str]) -> List[str]:
    if not keys:
        return []
    return [f"Runs whose configs differ are not pooled: rows are grouped by {', '.join(_pretty(k) for k in keys)}."]


def setting_label(noise: Any, noise_rate: Any, imbalance_factor: Any) -> str:
    """Readable setting name, e.g. ``symmetric 40%``, ``long-tail 50x``, ``clean``.

    Example:
        >>> setting_label("symmetric", 0.4, 1.0), setting_label("none", 0.0, 50.0)
        ('symmetric 40%', 'long-tail 50x')
    """
    parts = []
    try:
        rate = float(noise_rate)
    except (TypeError, ValueError):
        rate = 0.0
    if noise not in (None, "none") and rate > 0:
        parts.append(f"{noise} {rate * 100:.0f}%")
    try:
        imb = float(imbalance_factor)
    except (TypeError, ValueError):
        imb = 1.0
    if imb > 1:
        parts.append(f"long-tail {imb:g}x")
    return ", ".join(parts) if parts else "clean"


# ------------------------------------------------------------------------------------------------
# correlations
# ------------------------------------------------------------------------------------------------


def rank_correlations(estimate: Sequence[float], truth: Sequence[float], top_frac: float = 0.1) -> Dict[str, float]:
    r"""Agreement of an attribution estimate with exact leave-one-out values.

    Spearman's :math:`\rho` (Pearson correlation of ranks, ties averaged), Kendall's :math:`\tau_b`,
    Pearson's :math:`r`, and the top-:math:`k` overlap
    :math:`|\mathrm{top}_k(\hat\Delta)\cap\mathrm{top}_k(\Delta)|/k` with :math:`k=\max(1,\mathrm{round}(f\,m))`
    (the samples that help most by the estimate vs by exact LOO; sign convention of DESIGN section 2).

    Args:
        estimate: ``(m,)`` estimated :math:`\hat\Delta_i`.
        truth: ``(m,)`` exact :math:`\Delta_i = L(W^*_{-i}) - L(W^*)`.
        top_frac: :math:`f`.

    Returns:
        ``{"spearman", "kendall", "pearson", "top_overlap"}``; NaN where a vector is constant.

    Raises:
        ConfigError: if the vectors differ in length, have fewer than 2 entries, contain NaN/Inf,
            or ``top_frac`` is not in (0, 1].

    References:
        Kendall, "A new measure of rank correlation", Biometrika, 1938; Spearman, "The proof and
        measurement of association between two things", 1904.
    """
    from scipy.stats import kendalltau, pearsonr, spearmanr

    a = np.asarray(estimate, dtype=float).ravel()
    b = np.asarray(truth, dtype=float).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ConfigError(f"The 'estimate' and 'truth' parameters of rank_correlations must have the same length >= 2. "
                          f"Got {a.size} and {b.size} instead.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ConfigError("The 'estimate' and 'truth' parameters of rank_correlations must be finite. Got NaN/Inf instead.")
    if not 0 < top_frac <= 1:
        raise ConfigError(f"The 'top_frac' parameter of rank_correlations must be in (0, 1]. Got {top_frac!r} instead.")
    k = max(1, int(round(top_frac * a.size)))
    top = len(set(np.argsort(-a, kind="stable")[:k]) & set(np.argsort(-b, kind="stable")[:k])) / k
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"spearman": math.nan, "kendall": math.nan, "pearson": math.nan, "top_overlap": top}
    return {"spearman": float(spearmanr(a, b).statistic), "kendall": float(kendalltau(a, b).statistic),
            "pearson": float(pearsonr(a, b).statistic), "top_overlap": float(top)}


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------

_CLASS_VALUES = ["n_c", "ess", "ess_ratio", "entropy", "mean_w_clean", "mean_w_corrupted", "corruption_rate"]


def _cfg_keys(frame: Any, by: Sequence[str] = (), ignore: Sequence[str] = IGNORED_CONFIG) -> List[str]:
    """Config columns that differ within a ``by`` group: they become extra group keys."""
    return config_differences(frame, by, ignore)


def _pretty(col: str) -> str:
    return col[4:] if col.startswith("cfg.") else col


def per_class_ess_table(runs: RunSet, name: str = "per_class_ess") -> Table:
    r"""Per-class ESS, entropy, mean weight of clean vs corrupted samples and corruption rate.

    For every run with ``weights.pt``, :func:`reweight.weights.class_report` is evaluated twice:
    with uniform weights (``stage = uniform``, :math:`\alpha_i = 1`: :math:`\mathrm{ESS}_c = n_c`,
    :math:`H_c = \log n_c`) and with the learned :math:`\alpha` (``stage = learned``); rows are
    then averaged over seeds per (varying config, stage, class).

    Raises:
        RunDirError: if a run has no usable ``weights.pt`` (load with ``require_weights=True`` to
            skip such runs instead).
    """
    import pandas as pd
    import torch

    from reweight.weights import class_report

    frame = runs.frame()
    keys = _cfg_keys(frame)
    rows = []
    for rec, (_, fr) in zip(runs.runs, frame.iterrows()):
        w = rec.weights_dict()
        if w is None:
            raise RunDirError(f"Run {rec.path} has no weights.pt: per-class ESS needs the learned weights.")
        labels = w["labels"].long()
        K = int(max(labels.max().item(), w["clean_labels"].max().item())) + 1
        alpha = w["alpha"].double()
        for stage, a in (("uniform", torch.ones_like(alpha)), ("learned", alpha)):
            for r in class_report(a, labels, K, w["corrupted"].bool()):
                rows.append({**{k: fr[k] for k in keys}, "stage": stage, **r, "run": rec.run})
    df = pd.DataFrame(rows)
    agg = aggregate(df, keys + ["stage", "class"], _CLASS_VALUES)
    agg = sort_rows(agg, {"stage": ["uniform", "learned"]}, keys + ["stage", "class"])
    cols = [Column("n_c", "n_c", digits=0, latex="$n_c$"), Column("ess", "ESS_c", digits=1, latex=r"$\mathrm{ESS}_c$"),
            Column("ess_ratio", "ESS_c/n_c", latex=r"$\mathrm{ESS}_c/n_c$"),
            Column("entropy", "entropy H_c", latex="$H_c$"),
            Column("mean_w_clean", "mean weight clean", latex=r"mean $\alpha_i$\\clean"),
            Column("mean_w_corrupted", "mean weight corrupted", latex=r"mean $\alpha_i$\\corrupted"),
            Column("corruption_rate", "corruption rate", latex=r"corrupted\\fraction")]
    n = int(agg["n_runs"].max())
    return Table(name, agg, keys + ["stage", "class"], cols,
                 f"Per-class effective sample size before (uniform) and after learning the weights "
                 f"(mean ± std over {n} run(s)).",
                 best_within=keys + ["stage"], key_labels={k: _pretty(k) for k in keys}, sources=runs.provenance(),
                 notes=_group_note(keys), key_latex={"class": "$c$"}, span_keys=list(keys))


def main_job_table(runs: RunSet, name: str = "main_job") -> Table:
    """Uniform vs learned weights of the main job: accuracies, losses, AUROC, min ESS ratio, time.

    Needs summary keys ``uniform.*``, ``learned.*`` (``test_acc``, ``val_acc``, ``test_loss``),
    ``auroc``, ``ess_ratio_min``, ``mean_weight_clean``, ``mean_weight_corrupted`` and ``seconds``.
    Uniform weights are all tied, so their AUROC is 0.5 (as in the noise grid), their min ESS ratio is 1
    and their mean weights are 1.

    Raises:
        ConfigError: if a summary lacks one of the keys (load with ``require_summary`` to skip them).
    """
    import pandas as pd

    frame = runs.frame()
    need = ["uniform.test_acc", "learned.test_acc", "uniform.val_acc", "learned.val_acc", "uniform.test_loss",
            "learned.test_loss", "auroc", "ess_ratio_min"]
    check_columns(frame, need, "main_job_table")
    keys = _cfg_keys(frame)
    rows = []
    for _, fr in frame.iterrows():
        base = {k: fr[k] for k in keys}
        rows.append({**base, "weights": "uniform", "test_acc": fr["uniform.test_acc"], "val_acc": fr["uniform.val_acc"],
                     "test_loss": fr["uniform.test_loss"], "auroc": 0.5, "ess_ratio_min": 1.0,
                     "mean_weight_clean": 1.0, "mean_weight_corrupted": 1.0,
                     "seconds": fr.get("seconds.uniform_head", math.nan)})
        rows.append({**base, "weights": "learned", "test_acc": fr["learned.test_acc"], "val_acc": fr["learned.val_acc"],
                     "test_loss": fr["learned.test_loss"], "auroc": fr["auroc"], "ess_ratio_min": fr["ess_ratio_min"],
                     "mean_weight_clean": fr.get("mean_weight_clean", math.nan),
                     "mean_weight_corrupted": fr.get("mean_weight_corrupted", math.nan),
                     "seconds": fr.get("seconds.learned", math.nan)})
    vals = ["test_acc", "val_acc", "test_loss", "auroc", "ess_ratio_min", "mean_weight_clean", "mean_weight_corrupted",
            "seconds"]
    agg = sort_rows(aggregate(pd.DataFrame(rows), keys + ["weights"], vals), {"weights": ["uniform", "learned"]},
                    keys + ["weights"])
    cols = [Column("test_acc", "test acc", "max", latex=r"test\\acc."),
            Column("val_acc", "val acc", latex=r"val\\acc.", in_sample=True),
            Column("test_loss", "test loss", "min", latex=r"test\\loss"),
            Column("auroc", "AUROC clean vs corrupted", latex=r"AUROC\\clean/corr."),
            Column("ess_ratio_min", "min ESS_c/n_c", latex=r"$\min_c$\\$\mathrm{ESS}_c/n_c$"),
            Column("mean_weight_clean", "mean weight clean", digits=2, latex=r"mean $\alpha_i$\\clean"),
            Column("mean_weight_corrupted", "mean weight corrupted", digits=2, latex=r"mean $\alpha_i$\\corrupted"),
            Column("seconds", "time (s)", digits=1, timing=True, latex=r"time\\(s)")]
    n = int(agg["n_runs"].max())
    return Table(name, agg, keys + ["weights"], cols,
                 f"Main job: L2 head with uniform vs learned weights (mean ± std over {n} seed(s)).",
                 best_within=keys, key_labels={k: _pretty(k) for k in keys}, sources=runs.provenance(),
                 notes=_group_note(keys), span_keys=list(keys))


_CORR = ["spearman", "kendall", "pearson", "top_overlap", "lds"]


def rank_correlation_table(per_seed: Any, name: str = "rank_correlations", sources: Sequence[Dict[str, Any]] = ()
                           ) -> Table:
    """Estimator x (Spearman, Kendall, Pearson, top-10% overlap, LDS, time) vs exact LOO, over seeds.

    Args:
        per_seed: rows of ``experiments.sanity``'s ``per_seed.csv`` (one per target, lambda, seed,
            method; the columns of :func:`rank_correlations` plus ``lds``; a ``top10`` column of older
            runs is read as ``top_overlap``), optionally joined with its ``timings.csv`` (column
            ``seconds``: fit + score time; the ``exact_loo`` rows carry only their time and are kept
            as the reference) and with
            the runs' configs (``cfg.*`` columns, :func:`attach_config`): rows of runs whose configs
            differ are kept apart.
        name: file stem.
        sources: provenance rows.

    Raises:
        ConfigError: if a column is missing (``seconds`` is optional: no time column without it).
    """
    if "top10" in per_seed.columns and "top_overlap" not in per_seed.columns:  # runs made before the rename
        per_seed = per_seed.rename(columns={"top10": "top_overlap"})
    check_columns(per_seed, ["target", "lam", "seed", "method"] + _CORR, "rank_correlation_table")
    timed = "seconds" in per_seed.columns
    by = ["target", "lam", "method"]
    keys = _cfg_keys(per_seed, by, IGNORED_CONFIG + ("lams", "methods", "method_options"))
    agg = aggregate(per_seed, keys + by, _CORR + (["seconds"] if timed else []))
    agg = sort_rows(agg, {"target": ["val", "query"], "method": estimator_order()}, keys + by)
    if not timed:  # without timings the exact-LOO rows carry nothing
        agg = agg[agg["method"] != "exact_loo"].reset_index(drop=True)
    cols = [Column("spearman", "Spearman", "max", latex=r"Spearman\\$\rho$"),
            Column("kendall", "Kendall", "max", latex=r"Kendall\\$\tau$"),
            Column("pearson", "Pearson", "max", latex=r"Pearson\\$r$"),
            Column("top_overlap", "top-10% overlap", "max", digits=2, latex=r"top-10\%\\overlap"),
            Column("lds", "LDS", "max")] + \
        ([Column("seconds", "time (s)", digits=2, timing=True, latex=r"time\\(s)")] if timed else [])
    n = int(agg["n_runs"].max())
    return Table(name, agg, keys + ["target", "lam", "method"], cols,
                 f"Attribution estimators vs exact leave-one-out (mean ± std over {n} seed(s); target val = mean "
                 f"validation loss, query = per-query loss averaged over queries).",
                 best_within=keys + ["target", "lam"], exclude_from_best={"method": ["exact_loo"]},
                 key_labels={"lam": "λ", "method": "estimator", **{k: _pretty(k) for k in keys}},
                 key_latex={"lam": r"$\lambda$"}, sources=list(sources), notes=_group_note(keys),
                 span_keys=list(keys))


_GRID_NEED = ["method", "noise", "noise_rate", "imbalance_factor", "seed", "test_acc", "auroc", "ess_ratio_min",
              "seconds"]


def _grid_frame(runs: RunSet) -> Any:
    frame = runs.frame()
    check_columns(frame, _GRID_NEED, "method_comparison_table")
    frame = frame.copy()
    if "setting" not in frame.columns:
        frame["setting"] = [setting_label(a, b, c) for a, b, c in
                            zip(frame["noise"], frame["noise_rate"], frame["imbalance_factor"])]
    frame["setting_label"] = [setting_label(a, b, c) for a, b, c in
                              zip(frame["noise"], frame["noise_rate"], frame["imbalance_factor"])]
    return frame


def method_comparison_table(runs: RunSet, name: str = "method_comparison") -> Table:
    """Method x setting (noise type/rate, imbalance): test accuracy, AUROC, min per-class ESS ratio, time.

    Best test accuracy and AUROC per setting in bold; the ``oracle`` (trained on the true labels)
    is a reference and never bold. Config fields that differ between runs of one (setting,
    method) other than seeds become extra key columns (named in a note).
    """
    frame = _grid_frame(runs)
    extra = _cfg_keys(frame, ["setting", "method"])
    keys = ["setting", "setting_label"] + extra + ["method"]
    agg = aggregate(frame, keys, ["test_acc", "auroc", "ess_ratio_min", "seconds"])
    agg = sort_rows(agg, {"setting": SETTING_ORDER, "method": method_order(agg["method"].unique())}, keys)
    agg = agg.drop(columns=["setting"]).rename(columns={"setting_label": "setting"})
    keys = ["setting"] + extra + ["method"]
    cols = [Column("test_acc", "test acc", "max", latex=r"test\\acc."),
            Column("auroc", "AUROC clean vs corrupted", "max", latex=r"AUROC\\clean/corr."),
            Column("ess_ratio_min", "min ESS_c/n_c", latex=r"$\min_c$\\$\mathrm{ESS}_c/n_c$"),
            Column("seconds", "time (s)", digits=1, timing=True, latex=r"time\\(s)")]
    n = int(agg["n_runs"].max())
    return Table(name, agg, keys, cols,
                 f"Reweighting methods under label noise and class imbalance (mean ± std over {n} seed(s); "
                 f"best per setting in bold, oracle excluded).",
                 best_within=["setting"] + extra, exclude_from_best={"method": ["oracle"]},
                 key_labels={k: _pretty(k) for k in extra}, sources=runs.provenance(), notes=_group_note(extra),
                 span_keys=list(extra))


def accuracy_pivot_table(runs: RunSet, name: str = "method_comparison_acc") -> Table:
    """Test accuracy, methods as rows and settings as columns (mean ± std); best per column in bold.

    Raises:
        ConfigError: if runs of one (setting, method) differ in a config field other than seeds
            (the pivot has no room for more keys: build :func:`method_comparison_table` instead,
            or pass the runs of one config).
    """
    import pandas as pd

    frame = _grid_frame(runs)
    extra = _cfg_keys(frame, ["setting", "method"])
    if extra:
        raise ConfigError(f"accuracy_pivot_table pools the seeds of one (setting, method) only, but their configs "
                          f"differ in {', '.join(_pretty(k) for k in extra)}: pass the runs of one config or build "
                          f"the method_comparison table, which keeps them apart.")
    agg = aggregate(frame, ["setting", "setting_label", "method"], ["test_acc"])
    settings = sort_rows(agg[["setting", "setting_label"]].drop_duplicates(), {"setting": SETTING_ORDER}, ["setting"])
    methods = sort_rows(agg[["method"]].drop_duplicates(), {"method": method_order(agg["method"].unique())},
                        ["method"])["method"].tolist()
    data: Dict[str, List[Any]] = {"method": methods}
    cols = []
    for s, lab in zip(settings["setting"], settings["setting_label"]):
        sub = agg[agg["setting"] == s].set_index("method")
        data[f"{s}_mean"] = [float(sub.at[m, "test_acc_mean"]) if m in sub.index else math.nan for m in methods]
        data[f"{s}_std"] = [float(sub.at[m, "test_acc_std"]) if m in sub.index else math.nan for m in methods]
        cols.append(Column(str(s), lab, "max"))
    n = int(agg["n_runs"].max())
    return Table(name, pd.DataFrame(data), ["method"], cols,
                 f"Test accuracy per method and setting (mean ± std over {n} seed(s); best per column in bold, "
                 f"oracle excluded).", exclude_from_best={"method": ["oracle"]}, sources=runs.provenance())


_HG = ["cost", "hvps", "inner_steps", "cosine", "rel_error", "spearman_alpha"]


def hypergrad_accuracy_table(results: Any, name: str = "hypergrad_accuracy", sources: Sequence[Dict[str, Any]] = ()
                             ) -> Table:
    """Hypergradient accuracy vs cost: every rung/budget vs the exact (dense) hypergradient.

    Args:
        results: rows of ``experiments.hypergrad_accuracy``'s ``results.csv`` (columns dataset,
            method, variant, budget, cost, hvps, inner_steps, cosine, rel_error, spearman_alpha,
            seconds), one or several runs (seeds are averaged), optionally with the runs' configs
            (``cfg.*`` columns, :func:`attach_config`): runs whose configs differ are kept apart.
    """
    check_columns(results, ["dataset", "method", "variant", "budget"] + _HG, "hypergrad_accuracy_table")
    timed = "seconds" in results.columns
    by = ["dataset", "method", "variant", "budget"]
    keys = _cfg_keys(results, by, IGNORED_CONFIG + _SWEEP_LISTS)
    agg = aggregate(results, keys + by, _HG + (["seconds"] if timed else []))
    agg = sort_rows(agg, {"method": hypergrad_order()}, keys + by)
    agg = agg.drop(columns=["method"])
    cols = [Column("cost", "cost (HVPs + inner steps)", digits=0, latex=r"cost\\(HVPs + steps)"),
            Column("cosine", "cosine to exact", digits=4, latex=r"cosine\\to exact"),
            Column("rel_error", "relative error", sci=True, digits=2, latex=r"relative\\error"),
            Column("spearman_alpha", "Spearman of dL/dα", digits=4,
                   latex=r"Spearman of\\$\partial L/\partial\alpha$")]
    if timed:
        cols.append(Column("seconds", "time (ms)", digits=2, timing=True, latex=r"time\\(ms)"))
        agg["seconds_mean"] = agg["seconds_mean"] * 1e3
        agg["seconds_std"] = agg["seconds_std"] * 1e3
    return Table(name, agg, keys + ["dataset", "variant", "budget"], cols,
                 "Hypergradient methods vs the exact implicit hypergradient (dense solve) as their budget grows.",
                 key_labels={k: _pretty(k) for k in keys}, sources=list(sources), notes=_group_note(keys),
                 span_keys=list(keys))


_SWEEP_LISTS = ("datasets", "cg_iters", "neumann_orders", "unroll_steps", "unroll_truncated", "repeats")
"""Config lists of ``experiments.hypergrad_accuracy`` whose element is a row key (dataset, budget)."""


def staged_table(results: Any, name: str = "staged", sources: Sequence[Dict[str, Any]] = ()) -> Table:
    """Staged-training strategies (``experiments.staged`` ``results.csv``): accuracy, AUROC, epochs, time.

    ``results`` may carry the runs' configs (``cfg.*`` columns): runs of one strategy whose configs
    differ (other than seeds) are kept apart. The validation accuracy is in-sample: every strategy
    picks its best epochs on it and the learned weights are fitted to it.
    """
    check_columns(results, ["strategy", "seed", "test_acc", "val_acc"], "staged_table")
    df = results.copy()
    for c in ("weights_auroc", "epochs", "seconds"):
        if c not in df.columns:
            df[c] = math.nan
    keys = _cfg_keys(df, ["strategy"])
    agg = aggregate(df, keys + ["strategy"], ["test_acc", "val_acc", "weights_auroc", "epochs", "seconds"])
    agg = sort_rows(agg, {}, keys + ["strategy"])
    cols = [Column("test_acc", "test acc", "max", latex=r"test\\acc."),
            Column("val_acc", "val acc", latex=r"val\\acc.", in_sample=True),
            Column("weights_auroc", "AUROC of weights", latex=r"AUROC\\of $\alpha$"),
            Column("epochs", "epochs", digits=1), Column("seconds", "time (s)", digits=1, timing=True,
                                                           latex=r"time\\(s)")]
    n = int(agg["n_runs"].max())
    return Table(name, agg, keys + ["strategy"], cols, f"Staged training strategies (mean ± std over {n} seed(s)).",
                 key_labels={k: _pretty(k) for k in keys}, sources=list(sources), notes=_group_note(keys),
                 span_keys=list(keys))
