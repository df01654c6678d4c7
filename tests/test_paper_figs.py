"""paper_figs/ and experiments.paper on synthetic run directories (no experiment is run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_analysis import make_main_run, make_run

import matplotlib  # noqa: F401  (a hard dependency: a missing install must fail, not skip)


@pytest.fixture
def main_runs(tmp_path):
    root = tmp_path / "main"
    for s in (0, 1):
        make_main_run(root, s)
    return root


def _check(paths, stem: Path):
    assert [Path(p) for p in paths] == [stem.with_suffix(".pdf"), stem.with_suffix(".png")]
    png = stem.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert stem.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"


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


def test_main_job_figures(main_runs, tmp_path):
    from paper_figs.class_ess import plot_class_ess
    from paper_figs.trajectories import plot_trajectories
    from paper_figs.weight_hist import plot_weight_hist

    _check(plot_weight_hist([main_runs], tmp_path / "w"), tmp_path / "w")
    _check(plot_class_ess([main_runs], tmp_path / "c"), tmp_path / "c")
    _check(plot_trajectories([main_runs], tmp_path / "t"), tmp_path / "t")


def test_hypergrad_cost_figure(tmp_path):
    import pandas as pd

    from paper_figs.hypergrad_cost import plot_hypergrad_cost

    rows = [{"dataset": "digits", "method": m, "variant": v, "budget": b, "cost": c, "cosine": cos, "rel_error": 1 - cos}
            for m, v, b, c, cos in (("exact", "exact", 0, 0, 1.0), ("cg", "cg", 1, 1, 0.8), ("cg", "cg", 5, 5, 0.999),
                                    ("unrolled", "unrolled (last 2 steps)", 5, 25, 0.9),
                                    ("first_order", "first_order", 0, 0, 0.7))]
    run = make_run(tmp_path / "hg", {"name": "hg"}, {"points": 5})
    pd.DataFrame(rows).to_csv(run / "results.csv", index=False)
    _check(plot_hypergrad_cost([run], tmp_path / "h"), tmp_path / "h")


def test_figures_fail_clearly_without_runs(tmp_path):
    from paper_figs.weight_hist import plot_weight_hist
    from reweight.errors import RunDirError

    (tmp_path / "none").mkdir()
    with pytest.raises(RunDirError, match=r"No usable runs with weights.pt found. Looked at: .*none"):
        plot_weight_hist([tmp_path / "none"], tmp_path / "w")


def test_paper_plan_and_steps_validation(tmp_path, capsys):
    from experiments.paper import main, plan

    steps = plan(tmp_path, quick=True)
    names = [s.name for s in steps]
    assert names[0] == "main_job_seed0" and {"main_job_seed1", "main_job_seed2"} <= set(names)
    assert {"noise_grid", "hypergrad_accuracy", "sanity", "faithfulness", "staged"} <= set(names)
    for s in steps:
        if s.name.startswith("main_job"):
            assert "threads=1" in s.argv and "data.dataset=digits" in s.argv
            continue
        assert "--quick" in s.argv and str(tmp_path / "runs" / "quick") in " ".join(s.argv)
    assert all("runs/full" in " ".join(s.argv) for s in plan(tmp_path, quick=False))
    assert main(["--out", str(tmp_path), "--steps", "bogus"]) == 2
    assert "The '--steps' parameter must name steps from" in capsys.readouterr().err


def test_paper_no_run_builds_what_exists_and_indexes_the_rest(tmp_path, monkeypatch):
    """--no-run on an output folder that holds only main-job runs: their tables/figures are built, the
    others are listed as failed with the directory that was looked at, and INDEX.md names everything."""
    import experiments.paper as paper

    out = tmp_path / "out"
    for s in (0, 1):
        make_main_run(out / "runs" / "quick" / "main", s)
    real = paper._module_exists
    monkeypatch.setattr(paper, "_module_exists", lambda m: False if m == "experiments.faithfulness" else real(m))
    rc = paper.main(["--out", str(out), "--quick", "--no-run"])
    assert rc == 1  # the other experiments' tables could not be built
    for f in ("main_job.csv", "main_job_timing.csv", "main_job.md", "main_job.tex", "per_class_ess.csv",
              "provenance.json"):
        assert (out / "tables" / f).is_file(), f
    for f in ("weight_hist", "class_ess", "trajectories"):
        assert (out / "figures" / f"{f}.png").is_file(), f
    index = (out / "INDEX.md").read_text()
    assert "| faithfulness | skipped -- module experiments.faithfulness does not exist in this checkout |" in index
    assert "| main_job | built |" in index and "`tables/main_job.csv`" in index
    assert "| method_comparison | failed: RunDirError: " in index and "noise_grid" in index
    prov = json.loads((out / "tables" / "provenance.json").read_text())
    assert prov["grid"] == "quick" and prov["tables"]["main_job"]["sources"][0]["config_hash"] == "hash-seed0"
    assert prov["tables"]["main_job"]["files"] == ["main_job.csv", "main_job_timing.csv", "main_job.md", "main_job.tex"]
    first = (out / "tables" / "main_job.csv").read_bytes()
    assert paper.main(["--out", str(out), "--quick", "--no-run"]) == 1
    assert (out / "tables" / "main_job.csv").read_bytes() == first


def test_run_steps_records_failures_cpu_and_missing_modules(tmp_path):
    from experiments.paper import Step, run_steps

    steps = [Step("ok", "json.tool", ["--help"], "x", "d"), Step("bad", "json.tool", [str(tmp_path / "nope")], "x", "d"),
             Step("gone", "experiments.does_not_exist", [], "x", "d")]
    run_steps(steps, tmp_path / "logs", timeout=60, jobs=2)
    assert [s.status for s in steps] == ["done", "failed", "skipped"]
    assert steps[0].cpu_seconds >= 0 and (tmp_path / "logs" / "ok.log").is_file()
    assert steps[1].message.startswith("exit code 2: ") and "nope" in steps[1].message
    assert steps[2].message == "module experiments.does_not_exist does not exist in this checkout"
