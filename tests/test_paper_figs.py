"""paper_figs/ and experiments.paper on synthetic run directories (no experiment is run).

Every registered figure is drawn from small hand-made run directories through the one signature
``FIGURES.get(name)(runs, stem)``; the saved files are checked for the house width (3.25 or 6.75 in,
read back from the PNG header and the PDF MediaBox) and every text artist for a font of at least
7 pt (``paper_figs.style.check_figure``, which ``save_figure`` runs on every figure and which is
shown below to reject a smaller font and another width).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import matplotlib  # noqa: F401  (a hard dependency: a missing install must fail, not skip)
import pandas as pd
import pytest
import torch
import yaml

from tests.test_analysis import main_config, make_main_run, make_run


@pytest.fixture
def main_runs(tmp_path):
    root = tmp_path / "main"
    for s in (0, 1):
        make_main_run(root, s)
    return root


# ------------------------------------------------------------------------------------------------
# synthetic studies, one per figure source
# ------------------------------------------------------------------------------------------------


def make_hypergrad_runs(root: Path, seeds=(0, 1), **cfg) -> Path:
    """Two hypergrad_accuracy runs (seeds) with every rung, including unrolled T=1 == one_step and a zero-cost point."""
    for seed in seeds:
        pts = [("exact", "exact (dense Cholesky)", 0, 0, 1.0), ("cg", "cg", 1, 1, 0.8), ("cg", "cg", 5, 5, 0.999),
               ("neumann", "neumann", 1, 1, 0.5), ("neumann", "neumann", 10, 10, 0.9),
               ("unrolled", "unrolled", 1, 1, 0.6), ("unrolled", "unrolled", 10, 10, 0.95),
               ("unrolled", "unrolled (last 2 steps)", 10, 10, 0.7), ("one_step", "one_step", 1, 1, 0.6),
               ("first_order", "first_order", 0, 0, 0.3)]
        rows = [{"dataset": "digits", "method": m, "variant": v, "budget": b, "cost": c, "hvps": c, "inner_steps": 0,
                 "cosine": cos - 0.01 * seed, "rel_error": 1 - cos + 0.01 * seed, "spearman_alpha": cos,
                 "seconds": 0.001} for m, v, b, c, cos in pts]
        run = make_run(root / f"s{seed}", {"name": f"s{seed}", "seed": seed, "warm_steps": 5, **cfg}, {"points": 10})
        pd.DataFrame(rows).to_csv(run / "results.csv", index=False)
    return root


def make_staged_study(root: Path, seeds=(0, 1), lr=0.01) -> Path:
    rows = []
    for seed in seeds:
        for st in ("a_head_only", "b_focus"):
            name = f"{st}_s{seed}"
            metrics = None if st == "a_head_only" else [
                {"global_epoch": e, "stage": "warmup" if e < 2 else "focus", "test_acc": 0.5 + 0.05 * e + 0.01 * seed,
                 "val_acc": 0.55 + 0.05 * e} for e in range(4)]
            make_run(root / name, {"name": name, "seed": seed, "strategy": st, "backbone": {"lr": lr}},
                     {"test_acc": 0.7}, metrics)
            rows.append({"strategy": st, "seed": seed, "run_dir": str(root / name), "test_acc": 0.7 + 0.02 * seed,
                         "val_acc": 0.75, "weights_auroc": 0.8 if st == "a_head_only" else None, "epochs": 4})
    pd.DataFrame(rows).to_csv(root / "results.csv", index=False)
    return root


def sanity_config(name="main", **kw) -> dict:
    """The config.yaml of a sanity run (experiments.sanity.SanityConfig: the features' settings under ``base``)."""
    from reweight.config import DataConfig, RunConfig, to_dict

    return {"name": name, "out_dir": "runs", "base": to_dict(RunConfig(data=DataConfig(dataset="digits"))),
            "seeds": [0], "lams": [0.1], "subset_size": 20, "n_queries": 3, "loo_tol": 1e-10, **kw}


def make_sanity_run(root: Path, name="main") -> Path:
    run = make_run(root / name, sanity_config(name), {"lams": [0.1]})
    g = torch.Generator().manual_seed(0)
    rows = []
    for m in ("tracin", "influence_exact", "representer", "hypergrad_cg"):
        loo = torch.randn(20, generator=g, dtype=torch.float64) * 1e-3
        est = loo + torch.randn(20, generator=g, dtype=torch.float64) * 3e-4
        rows += [{"lam": 0.1, "seed": 0, "method": m, "train_index": i, "corrupted": i % 4 == 0,
                  "loo": float(loo[i]), "estimate": float(est[i])} for i in range(20)]
    pd.DataFrame(rows).to_csv(run / "loo_scores.csv", index=False)
    return run


def make_faithfulness_run(root: Path) -> Path:
    run = make_run(root / "main", {"name": "main", "n_queries": 4, "ks": [1, 5, 20]}, {"n_queries": 4})
    rows = []
    for mode in ("remove", "keep"):
        for sel, methods in (("top", ("influence_exact", "representer", "tracin", "trak", "hypergrad_cg")),
                             ("random", ("influence_exact", "representer"))):
            for j, m in enumerate(methods):
                for k in (1, 5, 20):
                    base = -0.01 * k * (j + 1) if mode == "remove" else 0.3 + 0.02 * k
                    rows.append({"mode": mode, "selection": sel, "method": m, "k": k, "conf_mean": 0.5 + base,
                                 "conf_std": 0.05, "acc_mean": 0.8, "acc_std": 0.1, "d_conf_mean": base,
                                 "d_conf_std": 0.02})
    pd.DataFrame(rows).to_csv(run / "curves.csv", index=False)
    return run


@pytest.fixture
def digits_features(monkeypatch):
    """The representer figure rebuilds features with reweight.pipeline.features: serve raw pixels instead."""
    import reweight.features
    import reweight.pipeline
    from reweight.data import load_dataset, prepare_data
    from reweight.features import FeatureSet

    calls = []

    def fake(data, backbone, feats, seed, **kw):
        calls.append((data.dataset, seed))
        ds = load_dataset(data.dataset)
        sp = prepare_data(ds, data.val_fraction, data.test_fraction, data.noise, data.noise_rate,
                          data.imbalance_factor, seed)
        flat = torch.from_numpy(ds.images.reshape(len(ds.images), -1))
        return FeatureSet(X_train=flat[sp.train], y_train=torch.from_numpy(sp.train_labels),
                          y_train_clean=torch.from_numpy(sp.train_clean_labels),
                          corrupted=torch.from_numpy(sp.corrupted), X_val=flat[sp.val],
                          y_val=torch.from_numpy(ds.labels[sp.val]), X_test=flat[sp.test],
                          y_test=torch.from_numpy(ds.labels[sp.test]), num_classes=ds.num_classes,
                          train_index=torch.from_numpy(sp.train), meta={"cache_hit": True})

    monkeypatch.setattr(reweight.features, "build_features", fake)
    monkeypatch.setattr(reweight.pipeline, "build_features", fake)
    return calls


@pytest.fixture
def sources(tmp_path, main_runs, digits_features):
    """Source folders for every registered figure, keyed by the study each figure declares."""
    from .test_trusted_tables import make_trusted_study

    return {"main_job": [main_runs], "hypergrad_accuracy": [make_hypergrad_runs(tmp_path / "hg")],
            "staged": [make_staged_study(tmp_path / "staged")], "sanity": [make_sanity_run(tmp_path / "sanity")],
            "faithfulness": [make_faithfulness_run(tmp_path / "faith")],
            "trusted": [make_trusted_study(tmp_path / "trusted")]}


# ------------------------------------------------------------------------------------------------
# saved files
# ------------------------------------------------------------------------------------------------


def png_size_px(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def pdf_size_pt(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:5] == b"%PDF-"
    m = re.search(rb"/MediaBox\s*\[\s*0\s+0\s+([\d.]+)\s+([\d.]+)\s*\]", data)
    assert m, "no MediaBox"
    return float(m.group(1)), float(m.group(2))


def _check_files(paths, stem: Path, width_in: float):
    assert [Path(p) for p in paths] == [stem.with_suffix(".pdf"), stem.with_suffix(".png")]
    w_px, h_px = png_size_px(stem.with_suffix(".png"))
    assert w_px == round(width_in * 300), (w_px, width_in)  # saved at 300 dpi, never cropped
    w_pt, _ = pdf_size_pt(stem.with_suffix(".pdf"))
    assert w_pt == pytest.approx(width_in * 72, abs=0.01)
    assert h_px > 200 and stem.with_suffix(".png").stat().st_size > 5000


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


def test_registry_lists_every_figure_module_with_one_signature():
    import inspect

    import paper_figs
    from paper_figs import FIGURES, FigureSpec
    from paper_figs.style import DOUBLE_COL, SINGLE_COL

    modules = sorted(p.stem for p in Path(paper_figs.__file__).parent.glob("*.py")
                     if not p.stem.startswith("_") and p.stem != "style")
    assert sorted(FIGURES.names()) == modules
    for name in FIGURES.names():
        spec = FIGURES.get(name)
        assert isinstance(spec, FigureSpec) and spec.name == name and spec.description and spec.study
        assert spec.width in (SINGLE_COL, DOUBLE_COL)
        module, fn = spec.target.split(":")
        params = list(inspect.signature(getattr(__import__(module, fromlist=[fn]), fn)).parameters.values())
        assert [p.name for p in params[:2]] == ["runs", "stem"]
        assert all(p.default is not inspect.Parameter.empty for p in params[2:])  # callable as draw(runs, stem)


def test_every_registered_figure_draws_at_house_width_with_fonts_of_7pt(sources, tmp_path, monkeypatch):
    from paper_figs import FIGURES, draw_figure, style

    checked = {}
    real = style.check_figure

    def record(fig, min_font=style.MIN_FONT_PT):
        info = real(fig, min_font)
        checked[len(checked)] = info
        return info

    monkeypatch.setattr(style, "check_figure", record)
    for name in FIGURES.names():
        spec = FIGURES.get(name)
        stem = tmp_path / "figs" / name
        before = len(checked)
        paths = draw_figure(name, sources[spec.study], stem)
        assert len(checked) == before + 1, name  # save_figure ran the house-rule check on this figure
        info = checked[before]
        assert info["width"] == spec.width and info["min_font"] >= 7.0 and info["n_texts"] > 3, (name, info)
        _check_files(paths, stem, spec.width)


def test_check_figure_rejects_small_fonts_and_other_widths(tmp_path):
    import matplotlib.pyplot as plt

    from paper_figs.style import DOUBLE_COL, SINGLE_COL, apply_style, check_figure, save_figure

    apply_style()
    fig, ax = plt.subplots(figsize=(SINGLE_COL, 2))
    ax.plot([0, 1], [0, 1])
    assert check_figure(fig)["min_font"] == 7.0  # tick labels
    ax.text(0.5, 0.5, "tiny note", fontsize=6)
    with pytest.raises(ValueError, match=r"at least 7 pt.*'tiny note' at 6 pt"):
        save_figure(fig, tmp_path / "x")
    assert not (tmp_path / "x.pdf").exists()
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(10.2, 3))
    with pytest.raises(ValueError, match=rf"must be {SINGLE_COL} or {DOUBLE_COL} in wide. Got 10.2 in"):
        check_figure(fig)
    plt.close(fig)


def test_save_figure_is_deterministic(tmp_path):
    import matplotlib.pyplot as plt

    from paper_figs.style import SINGLE_COL, apply_style, save_figure

    apply_style()
    out = []
    for k in range(2):
        fig, ax = plt.subplots(figsize=(SINGLE_COL, 2))
        ax.plot([0, 1], [1, 0], label="x")
        ax.legend()
        out.append([p.read_bytes() for p in save_figure(fig, tmp_path / f"f{k}.png")])  # suffix replaced
        plt.close(fig)
    assert out[0] == out[1]
    assert (tmp_path / "f0.pdf").is_file()


def test_series_styles_differ_in_marker_and_line_style():
    from paper_figs.style import series_style

    styles = [series_style(i) for i in range(9)]
    assert len({s["marker"] for s in styles}) == 9 and len({str(s["linestyle"]) for s in styles}) == 9
    assert len({s["color"] for s in styles}) == 9


def test_trajectories_start_at_step_0_with_a_std_band(main_runs, tmp_path, monkeypatch):
    """metrics.jsonl row step=0 is the state before any update: it is drawn at x = 0, not 'step 1'."""
    import matplotlib.pyplot as plt

    from paper_figs import FIGURES, style

    figs = []
    monkeypatch.setattr(style, "check_figure", lambda fig, *a: figs.append(fig) or {})
    monkeypatch.setattr(plt, "close", lambda *a: None)
    FIGURES.get("trajectories")([main_runs], tmp_path / "t")
    ax = figs[0].axes[0]
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [0, 1, 2]
    # val_loss of seed 0 / seed 1 at step 0: 1.0 and 0.99 -> mean 0.995 (main_metrics)
    assert line.get_ydata()[0] == pytest.approx(0.995)
    assert len(ax.collections) == 1  # the mean ± std band (two runs)
    assert "outer step" in ax.get_xlabel() and "1" not in ax.get_xlabel()


def test_hypergrad_cost_keeps_one_step_and_unrolled_T1_apart_and_zero_cost_visible(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from paper_figs import FIGURES, style

    figs = []
    monkeypatch.setattr(style, "check_figure", lambda fig, *a: figs.append(fig) or {})
    monkeypatch.setattr(plt, "close", lambda *a: None)
    FIGURES.get("hypergrad_cost")([make_hypergrad_runs(tmp_path / "hg")], tmp_path / "h")
    ax = figs[0].axes[0]
    assert ax.get_xscale() == "symlog"  # first_order's zero cost is on the axis, at 0
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar containers: label -> data line
    assert lines["first_order"].get_xdata()[0] == 0
    one, unr = lines["one_step"], lines["unrolled"]
    assert one.get_marker() != unr.get_marker() and one.get_markersize() > unr.get_markersize()
    assert one.get_zorder() < unr.get_zorder()  # the big open one_step marker sits under unrolled's point
    assert any("one_step = unrolled $T$=1" in t.get_text() for t in ax.texts)


def test_loo_scatter_draws_the_y_equals_x_reference(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from paper_figs import FIGURES, style

    figs = []
    monkeypatch.setattr(style, "check_figure", lambda fig, *a: figs.append(fig) or {})
    monkeypatch.setattr(plt, "close", lambda *a: None)
    FIGURES.get("loo_scatter")([make_sanity_run(tmp_path / "sanity")], tmp_path / "l")
    axes = [a for a in figs[0].axes if a.get_visible()]
    # panels in ATTRIBUTION registration order
    assert [a.get_title() for a in axes] == ["hypergrad_cg", "influence_exact", "representer", "tracin"]
    for ax in axes:
        ref = [ln for ln in ax.get_lines() if ln.get_label() == "$y = x$ (exact)"]
        assert len(ref) == 1


def test_figures_refuse_runs_of_different_configs(tmp_path):
    from paper_figs import draw_figure
    from reweight.errors import ConfigError

    root = tmp_path / "mixed"
    make_main_run(root, 0)
    r1 = make_main_run(root, 1)
    cfg = main_config(1)
    cfg["head"]["lam"] = 0.3
    (r1 / "config.yaml").write_text(yaml.safe_dump(cfg))
    for name in ("weight_hist", "class_ess", "trajectories"):
        with pytest.raises(ConfigError, match=r"pools runs of one config only .* differ in: head.lam "
                                              r"\(0.1: seed0; 0.3: seed1\)"):
            draw_figure(name, [root], tmp_path / name)
    make_hypergrad_runs(tmp_path / "hg", seeds=(0,))
    make_hypergrad_runs(tmp_path / "hg2", seeds=(1,), warm_steps=9)
    with pytest.raises(ConfigError, match=r"differ in: warm_steps"):
        draw_figure("hypergrad_cost", [tmp_path / "hg", tmp_path / "hg2"], tmp_path / "h")
    make_sanity_run(tmp_path / "sanity", "a")
    make_sanity_run(tmp_path / "sanity", "b")
    with pytest.raises(ConfigError, match=r"loo_scatter figure draws one run, but 2 sanity runs were found"):
        draw_figure("loo_scatter", [tmp_path / "sanity"], tmp_path / "l")


def test_figures_fail_clearly_without_runs(tmp_path):
    from paper_figs import draw_figure
    from reweight.errors import ConfigError, RunDirError

    (tmp_path / "none").mkdir()
    with pytest.raises(RunDirError, match=r"No usable runs with weights.pt found. Looked at: .*none"):
        draw_figure("weight_hist", [tmp_path / "none"], tmp_path / "w")
    with pytest.raises(ConfigError, match=r"Unknown figure 'bogus'. Registered: class_ess, faithfulness"):
        draw_figure("bogus", [tmp_path / "none"], tmp_path / "w")
    with pytest.raises(ConfigError, match=r"must name at least one run directory"):
        draw_figure("weight_hist", [], tmp_path / "w")


def test_representer_rebuilds_its_problem_from_the_run_config_only(tmp_path, digits_features):
    """No experiment import: the features come from reweight.pipeline.features with the run's config."""
    import subprocess
    import sys

    from paper_figs import draw_figure
    from paper_figs.representer import load_sanity_problem
    from reweight.config import BackboneConfig, DataConfig, FeatureConfig, to_dict

    run = make_sanity_run(tmp_path / "sanity")
    paths = draw_figure("representer", [run], tmp_path / "rep")
    assert digits_features == [("digits", 0)] and all(p.is_file() for p in paths)
    # a sanity run made before the studies were unified (features' settings at top level) gives the same head
    old = {"feature_seed": 0, "lams": [0.1], "loo_tol": 1e-10, "data": to_dict(DataConfig(dataset="digits")),
           "backbone": to_dict(BackboneConfig()), "features": to_dict(FeatureConfig())}
    new = yaml.safe_load((run / "config.yaml").read_text())
    torch.testing.assert_close(load_sanity_problem(old, 0.1)[0].W, load_sanity_problem(new, 0.1)[0].W, rtol=0, atol=0)
    code = ("import sys, paper_figs, paper_figs.representer, paper_figs.loo_scatter; "
            "print(any(m.split('.')[0] == 'experiments' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, check=True)
    assert out.stdout.strip() == "False"


def test_no_figure_or_analysis_module_imports_an_experiment():
    import ast

    root = Path(__file__).resolve().parent.parent
    bad = []
    for pkg in ("paper_figs", "analysis"):
        for path in (root / pkg).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "experiments"]
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ArgumentParser":
                    bad.append(f"{path.name}: an argparse parser")
    assert not bad, bad


def test_deprecated_module_entry_points_forward_to_the_one_command_line(tmp_path, monkeypatch, capsys):
    import os
    import sys

    import paper_figs._shim as shim

    seen = []
    monkeypatch.setattr(os, "execvp", lambda prog, argv: seen.append(argv))
    monkeypatch.setattr(sys, "argv", ["x", "runs/readme", "--out", "f"])
    shim.deprecated_main("weight_hist")
    assert seen == [[sys.executable, "-m", "experiments.cli", "figure", "weight_hist", "runs/readme", "--out", "f"]]
    assert "deprecated" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# experiments.paper (the plan, the step runner on cheap studies, artefact building)
# ------------------------------------------------------------------------------------------------


def test_paper_plan_and_steps_validation(tmp_path, capsys):
    """Every step is a registered study run through the one command line; its overrides resolve to a valid config."""
    from experiments.cli import main
    from experiments.paper import plan
    from experiments.study import STUDIES

    steps = plan(tmp_path, quick=True)
    names = [s.name for s in steps]
    assert names[0] == "main_job_seed0" and {"main_job_seed1", "main_job_seed2"} <= set(names)
    assert {"noise_grid", "hypergrad_accuracy", "sanity", "faithfulness", "staged"} <= set(names)
    for s in steps:
        assert s.study in STUDIES and s.command().startswith(f"python -m experiments.cli {s.study} --threads 1 ")
        if s.name.startswith("main_job"):
            assert "data.dataset=digits" in s.argv and "--quick" not in s.argv
        else:
            assert "--quick" in s.argv and str(tmp_path / "runs" / "quick") in " ".join(s.argv)
        assert any(a.endswith(f"cache_dir={tmp_path / '.feature_cache'}") for a in s.argv)
        # the grid's override names exist in the study's config (a renamed key would fail here, not mid-run)
        assert main([s.study, "--dry-run", *s.argv]) == 0, (s.name, capsys.readouterr().err)
    capsys.readouterr()
    assert all("runs/full" in " ".join(s.argv) for s in plan(tmp_path, quick=False))
    for s in plan(tmp_path, quick=False):
        assert main([s.study, "--dry-run", *s.argv]) == 0, (s.name, capsys.readouterr().err)
    assert main(["paper", f"out={tmp_path}", "steps=[bogus]"]) == 2
    assert "The 'steps' parameter must name steps from" in capsys.readouterr().err
    # the old flags (Makefile, docs) still read
    assert main(["paper", "--out", str(tmp_path), "--steps", "bogus"]) == 2
    assert "The 'steps' parameter must name steps from" in capsys.readouterr().err


def test_paper_no_run_builds_what_exists_and_indexes_the_rest(tmp_path, monkeypatch):
    """--no-run on an output folder that holds only main-job runs: their tables/figures are built, the
    others are listed as failed with the directory that was looked at, and INDEX.md names everything."""
    import experiments.paper as paper
    from analysis import TABLES
    from paper_figs import FIGURES

    out = tmp_path / "out"
    for s in (0, 1):
        make_main_run(out / "runs" / "quick" / "main", s)
    make_run(out / "runs" / "quick" / "main" / "killed", main_config(5), None, done=False)
    real = paper._study_exists
    monkeypatch.setattr(paper, "_study_exists", lambda m: False if m == "faithfulness" else real(m))
    rc = paper.main(["--out", str(out), "--quick", "--no-run"])
    assert rc == 1  # the other experiments' tables could not be built
    for f in ("main_job.csv", "main_job_timing.csv", "main_job.md", "main_job.tex", "per_class_ess.csv",
              "provenance.json"):
        assert (out / "tables" / f).is_file(), f
    for f in ("weight_hist", "class_ess", "trajectories"):
        assert (out / "figures" / f"{f}.png").is_file(), f
    index = (out / "INDEX.md").read_text()
    assert "| faithfulness | skipped -- study 'faithfulness' is not registered in this checkout |" in index
    assert "Made by `carrot paper --quick out=" in index
    assert "| main_job | built (skipped runs: " in index and "killed: incomplete: no DONE marker" in index
    assert "`tables/main_job.csv`" in index
    assert "| method_comparison | failed: RunDirError: " in index and "noise_grid" in index
    # every registered table and figure has its line, in registry order
    for name in list(TABLES.names()) + list(FIGURES.names()):
        assert f"| {name} | " in index, name
    prov = json.loads((out / "tables" / "provenance.json").read_text())
    assert prov["grid"] == "quick" and prov["tables"]["main_job"]["sources"][0]["config_hash"] == "hash-seed0"
    assert prov["tables"]["main_job"]["files"] == ["main_job.csv", "main_job_timing.csv", "main_job.md", "main_job.tex"]
    figs = json.loads((out / "figures" / "provenance.json").read_text())["figures"]
    assert figs["weight_hist"]["command"].startswith("carrot figure weight_hist ")
    assert figs["faithfulness"]["status"] == "skipped"
    first = (out / "tables" / "main_job.csv").read_bytes()
    assert paper.main(["--out", str(out), "--quick", "--no-run"]) == 1
    assert (out / "tables" / "main_job.csv").read_bytes() == first


def test_run_steps_records_failures_cpu_and_missing_modules(tmp_path):
    """Steps run as ``python -m experiments.cli <study>`` processes: exit codes, CPU time and logs are recorded."""
    from experiments.paper import Step, run_steps

    out = tmp_path / "bad_inputs.md"
    steps = [Step("ok", "bad_inputs", [f"out={out}"], str(out), "d"),
             Step("bad", "bad_inputs", ["nope=1"], "x", "d"),
             Step("gone", "does_not_exist", [], "x", "d")]
    run_steps(steps, tmp_path / "logs", timeout=120, jobs=2)
    assert [s.status for s in steps] == ["done", "failed", "skipped"]
    assert steps[0].cpu_seconds >= 0 and (tmp_path / "logs" / "ok.log").is_file() and out.is_file()
    assert steps[1].message.startswith("exit code 2: ") and "Unknown config key 'nope'" in steps[1].message
    assert steps[2].message == "study 'does_not_exist' is not registered in this checkout"
