"""analysis/: loading run directories, seed aggregation and every paper table, on synthetic run dirs.

Every expected number below is computed by hand in the comment beside it (not by the code under
test), so a wrong ESS formula, a population-vs-sample std mix-up or a flipped correlation fails.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from analysis.export import Column, Table, escape_latex, export_table, format_cell, to_latex, to_markdown
from analysis.loading import flatten, get_dotted, load_runs
from analysis.tables import (
    accuracy_pivot_table,
    aggregate,
    hypergrad_accuracy_table,
    main_job_table,
    method_comparison_table,
    per_class_ess_table,
    rank_correlation_table,
    rank_correlations,
    setting_label,
    staged_table,
    varying_config,
)
from reweight.errors import ConfigError, RunDirError
from reweight.runs import save_checked

# ------------------------------------------------------------------------------------------------
# synthetic run directories (the layout of reweight.runs.RunDir / experiments.main_job)
# ------------------------------------------------------------------------------------------------

# Two classes. Class 0: samples 0,1,2; class 1: samples 3,4,5,6. Corrupted: 2 (class 0) and 5, 6 (class 1).
LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 1])
CORRUPTED = torch.tensor([False, False, True, False, False, True, True])
ALPHA = {0: torch.tensor([1.0, 2.0, 0.0, 2.0, 2.0, 0.0, 0.0]) * torch.tensor([1, 1, 1, 1, 1, 1, 1.0]),
         1: torch.tensor([1.5, 1.5, 0.0, 1.0, 3.0, 0.0, 0.0])}


def make_run(path: Path, config: dict, summary: dict | None, metrics: list | None = None, weights: dict | None = None,
             done: bool = True, failed: str | None = None) -> Path:
    """Write a run directory by hand: config.yaml, config_hash, env.json, summary, metrics, weights, DONE."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (path / "config_hash").write_text(f"hash-{path.name}\n")
    (path / "env.json").write_text(json.dumps({"git_commit": "abc123", "packages": {"torch": "x"}}))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    if metrics is not None:
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if weights is not None:
        save_checked(path / "weights.pt", weights)
    if done:
        (path / "DONE").write_text("x\n")
    if failed:
        (path / "FAILED").write_text(failed + "\n")
    return path


def main_config(seed: int, **data) -> dict:
    return {"name": f"seed{seed}", "seed": seed, "out_dir": "runs",
            "data": {"dataset": "digits", "noise": "symmetric", "noise_rate": 0.4, **data},
            "head": {"lam": 0.1}, "hypergrad": {"method": "cg", "options": {"tol": 1e-6}}}


def main_summary(seed: int) -> dict:
    acc = {0: 0.80, 1: 0.90}[seed]
    return {"dataset": "digits", "seed": seed, "method": "cg",
            "uniform": {"test_acc": 0.70, "val_acc": 0.71, "test_loss": 1.0, "val_loss": 1.0},
            "learned": {"test_acc": acc, "val_acc": acc + 0.01, "test_loss": 0.5, "val_loss": 0.5},
            "auroc": {0: 0.9, 1: 0.8}[seed], "ess_ratio_min": {0: 0.5, 1: 0.7}[seed],
            "mean_weight_clean": 1.5, "mean_weight_corrupted": 0.1,
            "seconds": {"uniform_head": 0.1 * (seed + 1), "learned": 10.0 + seed, "total": 12.0}}


def main_metrics(seed: int) -> list:
    return [{"step": t, "val_loss": 1.0 - 0.1 * t - 0.01 * seed, "auroc": 0.5 + 0.1 * t, "ess_ratio_min": 1 - 0.1 * t,
             "ess_ratio": [1 - 0.1 * t, 1 - 0.05 * t], "entropy": [1.0, 1.3], "test_acc": 0.7 + 0.05 * t}
            for t in range(3)]


def make_main_run(root: Path, seed: int) -> Path:
    w = {"s": torch.zeros(7), "alpha": ALPHA[seed], "labels": LABELS, "clean_labels": LABELS,
         "corrupted": CORRUPTED, "train_index": torch.arange(7)}
    return make_run(root / f"seed{seed}", main_config(seed), main_summary(seed), main_metrics(seed), w)


@pytest.fixture
def main_runs(tmp_path):
    root = tmp_path / "main"
    for s in (0, 1):
        make_main_run(root, s)
    return root


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


def test_flatten_and_get_dotted():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {"a.b": 1, "a.c": "[1, 2]", "d": "{}"}
    assert get_dotted({"a": {"b": 2}}, "a.b") == 2
    assert get_dotted({"a.b": 3}, "a.b") == 3
    assert get_dotted({"a": {}}, "a.x", None) is None
    with pytest.raises(KeyError):
        get_dotted({"a": {}}, "a.x")


def test_load_runs_frames(main_runs):
    rs = load_runs(main_runs)
    f = rs.frame()
    assert f["run"].tolist() == ["seed0", "seed1"]
    assert f["cfg.data.noise_rate"].tolist() == [0.4, 0.4]
    assert f["cfg.hypergrad.options.tol"].tolist() == [1e-6, 1e-6]
    assert f["learned.test_acc"].tolist() == [0.8, 0.9]
    assert f["config_hash"].tolist() == ["hash-seed0", "hash-seed1"]
    m = rs.metrics(require=["val_loss"])
    assert len(m) == 6 and m.loc[m.run == "seed1", "step"].tolist() == [0, 1, 2]
    pc = rs.metrics_per_class()
    assert len(pc) == 12 and pc.loc[(pc.run == "seed0") & (pc.step == 2) & (pc["class"] == 1), "ess_ratio"].item() \
        == pytest.approx(0.9)
    w = rs.weights()
    assert len(w) == 14 and w["corrupted"].sum() == 6
    assert w.loc[w.run == "seed1", "alpha"].tolist() == [1.5, 1.5, 0.0, 1.0, 3.0, 0.0, 0.0]
    assert rs.provenance()[0] == {"run": "seed0", "config_hash": "hash-seed0", "git_commit": "abc123"}
    assert varying_config(f) == []  # only seed/name differ


def test_incomplete_run_is_skipped_with_warning_or_rejected_when_strict(main_runs):
    make_run(main_runs / "killed", main_config(2), None, done=False)
    with pytest.warns(UserWarning, match=r"killed: incomplete: no DONE marker"):
        rs = load_runs(main_runs)
    assert [r.run for r in rs] == ["seed0", "seed1"]
    assert [Path(s.path).name for s in rs.skipped] == ["killed"]
    with pytest.raises(RunDirError, match=r"1 of 3 runs .* unusable:\n  .*killed: incomplete"):
        load_runs(main_runs, strict=True)


def test_failed_and_old_schema_and_missing_metric_are_named(main_runs):
    make_run(main_runs / "crashed", main_config(3), None, done=False, failed="NonFiniteError: boom")
    old = main_summary(0)
    del old["auroc"]
    make_run(main_runs / "old", main_config(4), old, main_metrics(0))
    make_run(main_runs / "nometric", main_config(5), main_summary(0), [{"step": 0, "val_loss": 1.0}])
    with pytest.warns(UserWarning) as rec:
        rs = load_runs(main_runs, require_summary=["auroc", "learned.test_acc"], require_metrics=["auroc"])
    msg = str(rec[0].message)
    assert "crashed: run failed (NonFiniteError: boom)" in msg
    assert "old: summary.json lacks 'auroc'" in msg
    assert "nometric: metrics.jsonl rows lack 'auroc'" in msg
    assert len(rs) == 2
    with pytest.raises(RunDirError, match=r"old: summary.json lacks 'auroc'"):
        load_runs(main_runs / "old", require_summary=["auroc"], strict=True)


def test_corrupted_or_old_weights_are_named(main_runs):
    p = main_runs / "seed1" / "weights.pt"
    p.write_bytes(p.read_bytes()[:-10])  # truncated: the checksum no longer matches
    save_checked(main_runs / "seed0" / "weights.pt", {"alpha": ALPHA[0]})  # older schema
    with pytest.raises(RunDirError) as e, pytest.warns(UserWarning, match="Skipping 2 of 2"):
        load_runs(main_runs, require_weights=True)
    text = str(e.value)
    assert "No usable runs found. Looked at: " + str(main_runs) in text
    assert "seed1: weights.pt unusable" in text and "corrupted or truncated" in text
    assert "seed0: weights.pt lacks 's', 'labels'" in text


def test_empty_and_missing_paths_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match=r"No usable runs found. Looked at: .*empty \(no directory with a config"):
        load_runs(tmp_path / "empty")
    with pytest.raises(RunDirError, match=r"The 'paths' parameter of load_runs must name existing directories"):
        load_runs(tmp_path / "nope")
    with pytest.raises(RunDirError, match=r"must name at least one directory"):
        load_runs([])


def test_missing_file_and_csv(main_runs):
    with pytest.warns(UserWarning, match=r"file\(s\) per_seed.csv missing"):
        with pytest.raises(RunDirError, match="No usable sanity runs"):
            load_runs(main_runs, require_files=["per_seed.csv"], what="sanity runs")
    rs = load_runs(main_runs)
    with pytest.raises(RunDirError, match=r"has no per_seed.csv"):
        rs.csv("per_seed.csv")


# ------------------------------------------------------------------------------------------------
# aggregation and correlations
# ------------------------------------------------------------------------------------------------


def test_aggregate_mean_and_sample_std():
    df = pd.DataFrame({"g": ["a", "a", "a", "b"], "v": [1.0, 2.0, 4.0, 5.0]})
    out = aggregate(df, ["g"], ["v"])
    # a: mean 7/3; sample variance ((1-7/3)^2+(2-7/3)^2+(4-7/3)^2)/2 = (16/9+1/9+25/9)/2 = 7/3
    assert out["v_mean"].tolist()[0] == pytest.approx(7 / 3)
    assert out["v_std"].tolist()[0] == pytest.approx(math.sqrt(7 / 3))
    assert math.isnan(out["v_std"].tolist()[1]) and out["n_runs"].tolist() == [3, 1]
    with pytest.raises(ConfigError, match=r"The 'df' parameter of aggregate must have columns \['w'\]"):
        aggregate(df, ["g"], ["w"])


def test_rank_correlations_hand_computed():
    est, truth = [1, 2, 3, 4], [1, 3, 2, 4]
    r = rank_correlations(est, truth, top_frac=0.5)
    # Spearman: d = (0, -1, 1, 0), 1 - 6*2/(4*15) = 0.8; Kendall: 5 concordant, 1 discordant pair -> 4/6
    assert r["spearman"] == pytest.approx(0.8)
    assert r["kendall"] == pytest.approx(4 / 6)
    assert r["pearson"] == pytest.approx(0.8)  # ranks = values here
    # top-2 by estimate: samples {3, 2}; by truth: {3, 1} -> overlap 1/2
    assert r["top_overlap"] == pytest.approx(0.5)
    flipped = rank_correlations([-x for x in est], truth, top_frac=0.5)  # a sign error must show
    # flipped top-2 by estimate: samples {0, 1}; by truth {3, 1} -> 1/2
    assert flipped["spearman"] == pytest.approx(-0.8) and flipped["top_overlap"] == pytest.approx(0.5)
    assert rank_correlations([10 * x for x in est], truth)["spearman"] == pytest.approx(0.8)  # scale-free
    const = rank_correlations([1, 1, 1], [1, 2, 3])
    assert math.isnan(const["spearman"])
    with pytest.raises(ConfigError, match=r"same length >= 2. Got 2 and 3 instead"):
        rank_correlations([1, 2], [1, 2, 3])
    with pytest.raises(ConfigError, match=r"must be finite"):
        rank_correlations([1, float("nan")], [1, 2])
    with pytest.raises(ConfigError, match=r"'top_frac' parameter of rank_correlations must be in \(0, 1\]"):
        rank_correlations([1, 2], [1, 2], top_frac=0)


def test_setting_label():
    assert setting_label("asymmetric", 0.4, 1.0) == "asymmetric 40%"
    assert setting_label("none", 0.0, 10.0) == "long-tail 10x"
    assert setting_label("symmetric", 0.2, 10.0) == "symmetric 20%, long-tail 10x"
    assert setting_label("none", 0.0, 1.0) == "clean"


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------


def _row(t: Table, **keys):
    d = t.data
    m = pd.Series(True, index=d.index)
    for k, v in keys.items():
        m &= d[k] == v
    assert m.sum() == 1, keys
    return d[m].iloc[0]


def test_per_class_ess_table_hand_computed(main_runs):
    t = per_class_ess_table(load_runs(main_runs, require_weights=True))
    # seed 0, class 0: alpha (1, 2, 0): ESS = 3^2/(1+4) = 1.8; p = (1/3, 2/3, 0): H = ln3 - (2/3) ln2
    # seed 1, class 0: alpha (1.5, 1.5, 0): ESS = 9/4.5 = 2.0;  H = ln 2
    r = _row(t, stage="learned", **{"class": 0})
    assert r["ess_mean"] == pytest.approx(1.9) and r["ess_std"] == pytest.approx(0.2 / math.sqrt(2))
    assert r["ess_ratio_mean"] == pytest.approx(1.9 / 3)
    h0, h1 = math.log(3) - 2 / 3 * math.log(2), math.log(2)
    assert r["entropy_mean"] == pytest.approx((h0 + h1) / 2)
    assert r["entropy_std"] == pytest.approx(abs(h0 - h1) / math.sqrt(2))
    assert r["mean_w_clean_mean"] == pytest.approx(1.5) and r["mean_w_corrupted_mean"] == pytest.approx(0.0)
    assert r["corruption_rate_mean"] == pytest.approx(1 / 3) and r["n_c_mean"] == 3 and r["n_runs"] == 2
    # class 1, seed 0: alpha (2, 2, 0, 0): ESS = 16/8 = 2; seed 1: (1, 3, 0, 0): 16/10 = 1.6
    r = _row(t, stage="learned", **{"class": 1})
    assert r["ess_mean"] == pytest.approx(1.8) and r["ess_ratio_mean"] == pytest.approx(0.45)
    assert r["corruption_rate_mean"] == pytest.approx(0.5)
    # uniform weights: ESS_c = n_c, H_c = log n_c, std 0
    r = _row(t, stage="uniform", **{"class": 1})
    assert r["ess_mean"] == pytest.approx(4) and r["ess_std"] == 0 and r["entropy_mean"] == pytest.approx(math.log(4))
    assert t.data["stage"].tolist() == ["uniform", "uniform", "learned", "learned"]


def test_main_job_table_and_export(main_runs, tmp_path):
    t = main_job_table(load_runs(main_runs))
    r = _row(t, weights="learned")
    assert r["test_acc_mean"] == pytest.approx(0.85) and r["test_acc_std"] == pytest.approx(0.1 / math.sqrt(2))
    assert r["auroc_mean"] == pytest.approx(0.85) and r["seconds_mean"] == pytest.approx(10.5)
    u = _row(t, weights="uniform")
    assert u["test_acc_std"] == 0 and u["ess_ratio_min_mean"] == 1.0 and u["auroc_mean"] == 0.5
    paths = export_table(t, tmp_path / "a")
    names = [p.name for p in paths]
    assert names == ["main_job.csv", "main_job_timing.csv", "main_job.md", "main_job.tex"]
    csv = (tmp_path / "a" / "main_job.csv").read_text()
    assert "seconds" not in csv and csv.splitlines()[0].startswith("weights,test_acc_mean,test_acc_std")
    assert "0.0707107" in csv  # 0.1/sqrt(2) at %.6g
    timing = pd.read_csv(tmp_path / "a" / "main_job_timing.csv")
    assert timing.columns.tolist() == ["weights", "seconds_mean", "seconds_std"]
    md = (tmp_path / "a" / "main_job.md").read_text()
    assert "| learned | **0.850 ± 0.071** |" in md  # best test accuracy in bold
    # the validation accuracy is in-sample (the learned weights are fitted to it): labelled, never bold
    assert "| val acc (in-sample) |" in md and "| learned | **0.850 ± 0.071** | 0.860 ± 0.071 |" in md
    assert "*In-sample: measured on the clean validation split" in md
    tex = (tmp_path / "a" / "main_job.tex").read_text()
    assert r"val\\acc.\\(in-sample)" in tex and r"\mathbf{0.860}" not in tex
    # reruns give identical CSV bytes
    export_table(main_job_table(load_runs(main_runs)), tmp_path / "b")
    assert (tmp_path / "a" / "main_job.csv").read_bytes() == (tmp_path / "b" / "main_job.csv").read_bytes()


def test_tables_group_by_varying_config(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        for rate in (0.2, 0.4):
            make_run(root / f"r{rate}_s{seed}", main_config(seed, noise_rate=rate), main_summary(seed))
    t = main_job_table(load_runs(root))
    assert t.keys == ["cfg.data.noise_rate", "weights"]
    assert len(t.data) == 4 and set(t.data["n_runs"]) == {2}


def _sanity_rows():
    rows = []
    for seed, (sp_a, sp_b) in enumerate([(0.9, 0.5), (0.7, 0.6)]):
        rows.append({"target": "val", "lam": 0.1, "seed": seed, "method": "exact_loo", "seconds": 8.0})
        for m, sp in (("influence_cg", sp_a), ("tracin", sp_b)):
            rows.append({"target": "val", "lam": 0.1, "seed": seed, "method": m, "spearman": sp, "kendall": sp - 0.1,
                         "pearson": sp, "top_overlap": 0.5, "lds": 0.3 + seed * 0.1, "seconds": 0.5})
    return pd.DataFrame(rows)


def test_rank_correlation_table(tmp_path):
    t = rank_correlation_table(_sanity_rows())
    r = _row(t, method="influence_cg")
    assert r["spearman_mean"] == pytest.approx(0.8) and r["spearman_std"] == pytest.approx(0.2 / math.sqrt(2))
    assert r["lds_mean"] == pytest.approx(0.35)
    assert t.data["method"].tolist() == ["exact_loo", "influence_cg", "tracin"]
    best = t.best_mask(t.columns[0])
    assert best.tolist() == [False, True, False]  # exact_loo is never "best"
    md = to_markdown(t)
    assert "| val | 0.1 | exact_loo | -- |" in md and "**0.800 ± 0.141**" in md
    tex = to_latex(t)
    assert r"exact\_loo" in tex and r"$\mathbf{0.800}${\scriptsize$\,\pm\,$0.141}" in tex
    assert r"$\lambda$" in tex and r"Spearman\\$\rho$" in tex  # math headers
    with pytest.raises(ConfigError, match=r"rank_correlation_table must have columns \['lds'\]"):
        rank_correlation_table(_sanity_rows().drop(columns=["lds"]))
    # per_seed.csv of runs made before the column was renamed (top10 -> top_overlap) still reads
    old = rank_correlation_table(_sanity_rows().rename(columns={"top_overlap": "top10"}))
    assert old.data.equals(t.data)


def _grid_summary(method, seed, acc, setting="sym40", noise="symmetric", rate=0.4, imb=1.0):
    return {"method": method, "setting": setting, "dataset": "digits", "noise": noise, "noise_rate": rate,
            "imbalance_factor": imb, "seed": seed, "test_acc": acc, "auroc": None if method == "oracle" else 0.9,
            "ess_ratio_min": 0.5, "seconds": 1.0 + seed}


@pytest.fixture
def grid_runs(tmp_path):
    root = tmp_path / "noise_grid"
    accs = {("oracle", 0): 0.99, ("oracle", 1): 0.97, ("uniform", 0): 0.80, ("uniform", 1): 0.84,
            ("bilevel_cg", 0): 0.90, ("bilevel_cg", 1): 0.86}
    for (m, s), a in accs.items():
        make_run(root / "sym40" / f"seed{s}" / m, {"run": main_config(s), "method": m, "setting": "sym40"},
                 _grid_summary(m, s, a))
        make_run(root / "lt10" / f"seed{s}" / m, {"run": main_config(s), "method": m, "setting": "lt10"},
                 _grid_summary(m, s, a - 0.1, "lt10", "none", 0.0, 10.0))
    return root


def test_method_comparison_tables(grid_runs, tmp_path):
    rs = load_runs(grid_runs)
    t = method_comparison_table(rs)
    assert t.data["setting"].tolist()[:3] == ["symmetric 40%"] * 3  # SETTING_ORDER: sym40 before lt10
    assert t.data["method"].tolist()[:3] == ["oracle", "uniform", "bilevel_cg"]
    r = _row(t, setting="symmetric 40%", method="bilevel_cg")
    assert r["test_acc_mean"] == pytest.approx(0.88) and r["test_acc_std"] == pytest.approx(0.04 / math.sqrt(2))
    assert math.isnan(_row(t, setting="long-tail 10x", method="oracle")["auroc_mean"])
    best = t.best_mask(t.columns[0])  # best test accuracy per setting, oracle excluded
    assert t.data.loc[best, "method"].tolist() == ["bilevel_cg", "bilevel_cg"]
    p = accuracy_pivot_table(rs)
    assert p.data.columns.tolist()[:5] == ["method", "sym40_mean", "sym40_std", "lt10_mean", "lt10_std"]
    assert p.data.set_index("method").at["uniform", "lt10_mean"] == pytest.approx(0.72)
    tex = to_latex(p)
    assert r"symmetric 40\%" in tex and r"long-tail 10x" in tex
    paths = export_table(t, tmp_path / "x")
    assert "seconds" not in paths[0].read_text()
    assert pd.read_csv(paths[1])["seconds_mean"].tolist() == [1.5] * 6


def test_hypergrad_and_staged_tables():
    rows = [{"dataset": "digits", "method": m, "variant": m, "budget": b, "cost": c, "hvps": c, "inner_steps": 0,
             "cosine": cos, "rel_error": 1 - cos, "spearman_alpha": cos, "seconds": 0.002}
            for m, b, c, cos in (("exact", 0, 0, 1.0), ("cg", 5, 5, 0.99), ("cg", 1, 1, 0.8), ("first_order", 0, 0, 0.7))]
    t = hypergrad_accuracy_table(pd.DataFrame(rows))
    assert t.data["variant"].tolist() == ["exact", "cg", "cg", "first_order"]
    assert t.data["budget"].tolist() == [0, 1, 5, 0]
    assert t.data["seconds_mean"].tolist()[0] == pytest.approx(2.0)  # reported in ms
    assert "1.0e-02" in to_markdown(t)  # relative error in scientific notation
    st = pd.DataFrame({"strategy": ["a_head_only", "a_head_only", "b_focus"], "seed": [0, 1, 0],
                       "test_acc": [0.8, 0.9, 0.7], "val_acc": [0.8, 0.8, 0.7], "weights_auroc": [0.9, 0.9, None],
                       "epochs": [3, 3, 8]})
    s = staged_table(st)
    assert _row(s, strategy="a_head_only")["test_acc_mean"] == pytest.approx(0.85)
    assert s.best_mask(s.columns[0]).tolist() == [True, False]


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------


def test_latex_is_escaped_balanced_and_booktabs(main_runs):
    t = per_class_ess_table(load_runs(main_runs, require_weights=True))
    tex = to_latex(t, provenance={"git_commit": "abc", "sources_hash": "123"})
    assert tex.startswith("% git_commit: abc\n% sources_hash: 123\n")
    assert r"\begin{table*}" in tex and r"\end{table*}" in tex  # 9 columns: full width
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0]
    for line in body.strip().splitlines():
        if line.strip() != r"\midrule":
            assert line.count("&") == len(t.keys) + len(t.columns) - 1, line
    assert tex.count("{") == tex.count("}")
    assert tex.count("$") % 2 == 0
    text_mode = re.sub(r"\$[^$]*\$", "", tex.split(r"\toprule")[1])  # math ($\mathrm{ESS}_c$) may subscript
    assert re.search(r"(?<!\\)_", text_mode) is None  # every underscore of the text escaped
    assert r"$\mathrm{ESS}_c/n_c$" in tex and "$H_c$" in tex
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in tex
    assert escape_latex("a_b 50% & #1 {x} ~^\\") == r"a\_b 50\% \& \#1 \{x\} \textasciitilde{}\textasciicircum{}\textbackslash{}"


def test_format_cell():
    assert format_cell(0.9016, 0.0041) == "0.902 ± 0.004"
    assert format_cell(0.9016, 0.0041, latex=True) == r"$0.902${\scriptsize$\,\pm\,$0.004}"
    assert format_cell(0.9, float("nan")) == "0.900"
    assert format_cell(float("nan"), 0.1) == "--"
    assert format_cell(1.2345e-5, None, digits=2, sci=True) == "1.2e-05"
    assert format_cell("a_b", latex=True) == r"a\_b"


def test_table_validation_errors():
    df = pd.DataFrame({"k": ["a"], "v": [1.0]})
    with pytest.raises(ConfigError, match=r"The 'data' parameter of Table 't' must have columns \['w'\]"):
        Table("t", df, ["k"], [Column("w", "w")], "c")
    with pytest.raises(ConfigError, match=r"must have at least one row"):
        Table("t", df.iloc[:0], ["k"], [Column("v", "v")], "c")
    with pytest.raises(ConfigError, match=r"The 'better' parameter of Column must be 'max', 'min' or None"):
        Column("v", "v", better="largest")


def test_build_table_by_name_and_cli(main_runs, tmp_path, capsys):
    from analysis.__main__ import main
    from analysis.build import TABLES, build_table

    assert {"main_job", "per_class_ess", "method_comparison", "rank_correlations", "hypergrad_accuracy"} <= set(TABLES)
    assert build_table("per_class_ess", [main_runs]).name == "per_class_ess"
    with pytest.raises(ConfigError, match=r"The 'name' parameter of build_table must be one of main_job, .*Got 'bogus'"):
        build_table("bogus", [main_runs])
    with pytest.raises(RunDirError, match=r"No staged study at .*results.csv is missing"):
        build_table("staged", [main_runs])
    assert main(["main_job", str(main_runs), "--out", str(tmp_path / "t")]) == 0
    assert "| learned | **0.850 ± 0.071** |" in capsys.readouterr().out
    assert (tmp_path / "t" / "main_job.tex").is_file()
    assert main(["main_job", str(tmp_path / "missing"), "--out", str(tmp_path / "t")]) == 2
    assert "must name existing directories" in capsys.readouterr().err


def test_runset_accessors_name_the_run_that_lacks_data(tmp_path):
    root = tmp_path / "runs"
    make_run(root / "bare", main_config(0), {"dataset": "digits"})  # no metrics, no weights, old summary
    rs = load_runs(root)
    with pytest.raises(RunDirError, match=r"bare has no metrics.jsonl rows"):
        rs.metrics()
    with pytest.raises(RunDirError, match=r"No per-class metrics \['ess_ratio', 'entropy'\] in the runs under"):
        rs.metrics_per_class()
    with pytest.raises(RunDirError, match=r"bare has no weights.pt"):
        rs.weights()
    with pytest.raises(RunDirError, match=r"bare has no weights.pt: per-class ESS needs the learned weights"):
        per_class_ess_table(rs)
    with pytest.raises(ConfigError, match=r"main_job_table must have columns \['uniform.test_acc'"):
        main_job_table(rs)
    make_run(root / "bare", main_config(0), {"dataset": "digits"}, [{"step": 0}])
    with pytest.raises(RunDirError, match=r"bare: metrics.jsonl rows lack 'val_loss'"):
        load_runs(root).metrics(require=["val_loss"])


@pytest.mark.parametrize("name", ["analysis", "analysis.loading", "analysis.tables", "analysis.export", "analysis.build",
                                  "analysis.__main__", "paper_figs", "paper_figs.style", "paper_figs.weight_hist",
                                  "paper_figs.class_ess", "paper_figs.hypergrad_cost", "paper_figs.trajectories",
                                  "paper_figs.staged_curves", "paper_figs.loo_scatter", "paper_figs.faithfulness",
                                  "paper_figs.representer", "paper_figs._shim", "experiments.paper"])
def test_public_names_sorted_and_importable(name):
    import importlib

    m = importlib.import_module(name)
    assert m.__all__ == sorted(m.__all__)
    assert all(hasattr(m, n) for n in m.__all__)


# ------------------------------------------------------------------------------------------------
# registry, display orders, config pooling, skipped runs, LaTeX width
# ------------------------------------------------------------------------------------------------


def test_in_sample_column_is_never_bold_and_must_not_ask_for_it():
    df = pd.DataFrame({"k": ["a", "b"], "v": [1.0, 2.0]})
    t = Table("t", df, ["k"], [Column("v", "val acc", in_sample=True)], "c")
    assert not t.best_mask(t.columns[0]).any()
    assert "| val acc (in-sample) |" in to_markdown(t) and "(in-sample)" in to_latex(t)
    with pytest.raises(ConfigError, match=r"'better' parameter of Column 'v' must be None for an in-sample column"):
        Column("v", "val acc", "max", in_sample=True)


def test_display_orders_come_from_the_method_registries(monkeypatch):
    from analysis.tables import estimator_order, hypergrad_order, method_order, registration_order
    from reweight.attribution import ATTRIBUTION
    from reweight.baselines import BASELINES
    from reweight.hypergrad import HYPERGRAD

    assert hypergrad_order() == registration_order(HYPERGRAD) and hypergrad_order()[0] == "exact"
    assert estimator_order() == ["exact_loo"] + registration_order(ATTRIBUTION)
    assert method_order()[:1 + len(BASELINES)] == ["oracle"] + registration_order(BASELINES)
    # a newly registered baseline appears in the tables' order without touching analysis/
    monkeypatch.setattr(BASELINES, "_items", {"zeta_new": object(), **BASELINES._items})
    assert method_order()[1] == "zeta_new"
    o = method_order(["bilevel_cg_balanced", "unknown_method"])
    assert o.index("bilevel_cg_balanced") == o.index("bilevel_cg") + 1 and o[-1] == "unknown_method"


def _per_seed_run(root: Path, name: str, noise_rate: float = 0.4) -> Path:
    run = make_run(root / name, {"name": name, "seeds": [0, 1], "lams": [0.1],
                                 "base": {"seed": 0, "data": {"noise_rate": noise_rate}}}, {"lams": [0.1]})
    _sanity_rows().to_csv(run / "per_seed.csv", index=False)
    return run


def _hg_run(root: Path, name: str, seed: int, warm_steps: int = 5) -> Path:
    rows = [{"dataset": "digits", "method": m, "variant": m, "budget": b, "cost": c, "hvps": c, "inner_steps": 0,
             "cosine": cos, "rel_error": 1 - cos, "spearman_alpha": cos, "seconds": 0.002}
            for m, b, c, cos in (("exact", 0, 0, 1.0), ("cg", 5, 5, 0.99 - 0.01 * seed), ("first_order", 0, 0, 0.7))]
    run = make_run(root / name, {"name": name, "seed": seed, "warm_steps": warm_steps}, {"points": 3})
    pd.DataFrame(rows).to_csv(run / "results.csv", index=False)
    return run


def _staged_study(root: Path, lr: float = 0.01, seeds=(0, 1)) -> Path:
    rows = []
    for seed in seeds:
        for st in ("a_head_only", "b_focus"):
            name = f"{st}_s{seed}"
            make_run(root / name, {"name": name, "seed": seed, "strategy": st, "backbone": {"lr": lr}},
                     {"test_acc": 0.7}, [{"global_epoch": 0, "stage": "s", "test_acc": 0.6, "val_acc": 0.6}])
            rows.append({"strategy": st, "seed": seed, "run_dir": str(root / name), "test_acc": 0.7 + 0.1 * seed,
                         "val_acc": 0.8, "weights_auroc": 0.9, "epochs": 3})
    pd.DataFrame(rows).to_csv(root / "results.csv", index=False)
    return root


@pytest.fixture
def every_source(tmp_path, main_runs, grid_runs):
    """A source folder per study, for every registered table."""
    from .test_trusted_tables import make_trusted_study

    hg = tmp_path / "hg"
    for seed in (0, 1):
        _hg_run(hg, f"s{seed}", seed)
    return {"main_job": main_runs, "noise_grid": grid_runs, "sanity": _per_seed_run(tmp_path / "sanity", "main"),
            "hypergrad_accuracy": hg, "staged": _staged_study(tmp_path / "staged"),
            "trusted": make_trusted_study(tmp_path / "trusted")}


def _pdflatex_width(tex: str, tmp: Path) -> float:
    """Width (pt) of the tabular of ``tex`` typeset by pdflatex at \\small in a 10-pt article."""
    import subprocess

    tab = tex[tex.index(r"\begin{tabular}"):tex.rindex(r"\end{tabular}") + len(r"\end{tabular}")]
    sep = re.search(r"\\setlength\{\\tabcolsep\}\{[^}]*\}", tex)
    doc = (r"\documentclass[10pt]{article}\usepackage{booktabs}\begin{document}" "\n"
           r"\newsavebox\tb\sbox\tb{\small " + (sep.group(0) if sep else "") + tab + "}\n"
           r"\typeout{TABWIDTH=\the\wd\tb}\usebox\tb\end{document}")
    (tmp / "t.tex").write_text(doc)
    out = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp,
                         capture_output=True, text=True, timeout=120)
    m = re.search(r"TABWIDTH=([\d.]+)pt", out.stdout)
    assert out.returncode == 0 and m, out.stdout[-3000:]
    return float(m.group(1))


def test_every_registered_table_builds_and_fits_the_text_width(every_source, tmp_path):
    """TABLES: one signature build(paths, strict=False) -> Table; every LaTeX rendering fits 6.75 in at 9 pt.

    The width check is a documented heuristic (analysis.export.latex_width: Computer Modern glyph
    widths plus a 6 % margin). Where pdflatex is installed, each table is also typeset and its real
    width must fit and stay below the estimate (the estimate errs on the wide side).
    """
    import inspect
    import shutil
    import warnings

    from analysis import TABLES
    from analysis.build import TableSpec, build_table
    from analysis.export import DOUBLE_COL_PT, TableWidthWarning, latex_width

    assert len(TABLES) == 11
    for name in TABLES.names():
        spec = TABLES.get(name)
        assert isinstance(spec, TableSpec) and spec.description and spec.study in every_source
        assert list(inspect.signature(spec.__call__).parameters) == ["paths", "strict"]
        t = spec([every_source[spec.study]])
        assert t.name == name and len(t.data) > 0 and t.sources
        assert build_table(name, [every_source[spec.study]], strict=True).name == name
        with warnings.catch_warnings():
            warnings.simplefilter("error", TableWidthWarning)
            tex = to_latex(t)
        est = float(re.search(r"% estimated width: ([\d.]+) in", tex).group(1)) * 72.27
        assert est <= DOUBLE_COL_PT, (name, est)
        assert (r"\begin{table}" in tex) == (est <= 3.25 * 72.27)
        assert r"\toprule" in tex and r"\bottomrule" in tex
        if shutil.which("pdflatex"):
            real = _pdflatex_width(tex, tmp_path)
            assert real <= DOUBLE_COL_PT and real <= est + 1.0, (name, real, est)
    assert latex_width(TABLES.get("main_job")([every_source["main_job"]]), size=9) > 0


def test_latex_width_warns_when_a_table_cannot_fit():
    from analysis.export import TableWidthWarning

    df = pd.DataFrame({"k": ["a"], **{f"c{i}_mean": [0.123456] for i in range(14)},
                       **{f"c{i}_std": [0.01] for i in range(14)}})
    t = Table("wide", df, ["k"], [Column(f"c{i}", f"a long column header {i}") for i in range(14)], "c")
    with pytest.warns(TableWidthWarning, match=r"'wide' is about .* in wide at 9 pt, more than the 6.75 in"):
        to_latex(t)


def test_tables_keep_runs_of_different_configs_apart_and_say_so(tmp_path, every_source):
    from analysis.build import build_table

    # main job: two noise rates x two seeds -> grouped, with a note
    root = tmp_path / "runs"
    for seed in (0, 1):
        for rate in (0.2, 0.4):
            make_run(root / f"r{rate}_s{seed}", main_config(seed, noise_rate=rate), main_summary(seed))
    t = build_table("main_job", [root])
    assert t.keys == ["cfg.data.noise_rate", "weights"] and set(t.data["n_runs"]) == {2}
    tex = to_latex(t)  # the config field is a spanning group line, not a column: the table keeps its width
    assert "rows are grouped by data.noise_rate" in to_markdown(t) and "grouped by data.noise\\_rate" in tex
    assert r"\multicolumn{9}{l}{\emph{data.noise\_rate = 0.2}}" in tex and "| data.noise_rate |" in to_markdown(t)
    # sanity: two runs at different noise rates are not averaged together
    _per_seed_run(tmp_path / "sanity2", "a", 0.4)
    _per_seed_run(tmp_path / "sanity2", "b", 0.2)
    t = build_table("rank_correlations", [tmp_path / "sanity2"])
    assert t.keys[0] == "cfg.base.data.noise_rate" and set(t.data["n_runs"]) == {2}  # 2 seeds each, not 4
    assert any("grouped by base.data.noise_rate" in n for n in t.notes)
    # hypergradient accuracy: runs of a different warm-up are kept apart
    _hg_run(tmp_path / "hg2", "x", 0, warm_steps=5)
    _hg_run(tmp_path / "hg2", "y", 1, warm_steps=9)
    t = build_table("hypergrad_accuracy", [tmp_path / "hg2"])
    assert t.keys[0] == "cfg.warm_steps" and set(t.data["n_runs"]) == {1}
    # staged: two studies of a different learning rate, grouped per strategy
    t = build_table("staged", [_staged_study(tmp_path / "st1", 0.01), _staged_study(tmp_path / "st2", 0.1)])
    assert t.keys == ["cfg.backbone.lr", "strategy"] and set(t.data["n_runs"]) == {2}
    # same configs (seeds only differ): one group, no note
    t = build_table("staged", [every_source["staged"]])
    assert t.keys == ["strategy"] and not t.notes
    # the accuracy pivot has no room for config keys: it refuses
    cfg = yaml.safe_load((every_source["noise_grid"] / "sym40" / "seed1" / "uniform" / "config.yaml").read_text())
    cfg["run"]["head"]["lam"] = 0.5
    (every_source["noise_grid"] / "sym40" / "seed1" / "uniform" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"pools the seeds of one \(setting, method\) only.*run.head.lam"):
        build_table("method_comparison_acc", [every_source["noise_grid"]])
    t = build_table("method_comparison", [every_source["noise_grid"]])
    assert "cfg.run.head.lam" in t.keys and any("run.head.lam" in n for n in t.notes)


def test_every_skipped_run_is_named_with_its_reason(tmp_path, main_runs):
    from analysis.build import build_table
    from analysis.loading import SkippedRunWarning

    s = main_summary(0)
    s["converged"] = False
    s["worst_residual"] = 3e8
    make_run(main_runs / "diverged", main_config(7), s, main_metrics(0))
    make_run(main_runs / "killed", main_config(8), None, done=False)
    with pytest.warns(SkippedRunWarning) as rec:
        t = build_table("main_job", [main_runs])
    msg = str(rec[0].message)
    assert f"{main_runs / 'diverged'}: not converged (worst residual 3e+08)" in msg
    assert f"{main_runs / 'killed'}: incomplete: no DONE marker" in msg
    assert set(t.data["n_runs"]) == {2}
    with pytest.warns(SkippedRunWarning, match="killed"):
        assert len(load_runs(main_runs, allow_unconverged=True)) == 3  # diverged loaded only when asked
    # a run directory that holds runs (made with name='') is loaded with everything below it, loudly
    outer = tmp_path / "out"
    make_run(outer, main_config(0), main_summary(0))
    for seed in (0, 1):
        make_main_run(outer, seed)
    with pytest.warns(UserWarning, match=r"holds 2 other run directories \(was it made with an empty name"):
        rs = load_runs(outer)
    assert sorted(r.run for r in rs) == ["out", "out/seed0", "out/seed1"]
    # a staged results row whose run was skipped is left out by name
    study = _staged_study(tmp_path / "st")
    (study / "b_focus_s1" / "DONE").unlink()
    with pytest.warns(SkippedRunWarning) as rec:
        t = build_table("staged", [study])
    text = " ".join(str(r.message) for r in rec)
    assert "b_focus_s1: incomplete" in text and "b_focus seed 1" in text and "missing or skipped" in text
    assert _row(t, strategy="b_focus")["n_runs"] == 1
    with pytest.raises(RunDirError, match=r"b_focus_s1: incomplete"):
        build_table("staged", [study], strict=True)


def test_config_differences_within_groups():
    from analysis.loading import config_differences

    f = pd.DataFrame({"run": list("abcd"), "method": ["x", "x", "y", "y"], "cfg.seed": [0, 1, 0, 1],
                      "cfg.opt": [1, 1, 2, 2], "cfg.lr": [0.1, 0.1, 0.1, 0.3]})
    assert config_differences(f) == ["cfg.opt", "cfg.lr"]
    assert config_differences(f, ["method"]) == ["cfg.lr"]  # opt is constant within each method
