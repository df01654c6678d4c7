"""End to end: the main job on digits (tiny budget) writes a complete, reproducible run directory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.cli import main
from reweight.runs import load_checked, run_status

ROOT = Path(__file__).resolve().parent.parent


# One warm-up epoch on digits stays at chance (a BatchNorm net needs a few epochs there): these tests check the
# run directory, not the features, so they go on (backbone.allow_chance=true).
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    args = ["run", "--quiet", "data.dataset=digits", "backbone.epochs=1", "backbone.allow_chance=true", "outer.steps=4",
            "outer.checkpoint_every=2",
            f"out_dir={base / 'runs'}", f"features.cache_dir={base / 'cache'}"]
    assert main(args + ["name=a"]) == 0
    assert main(args + ["name=b"]) == 0  # same config, other directory: features come from the cache
    return base / "runs"


def test_run_directory_is_complete(runs):
    d = runs / "a"
    for f in ("config.yaml", "config_hash", "env.json", "metrics.jsonl", "summary.json", "per_class_ess.csv",
              "weights.pt", "DONE"):
        assert (d / f).is_file(), f
    assert run_status(d) == "finished"
    s = json.loads((d / "summary.json").read_text())
    assert {"uniform", "learned", "auroc", "ess_ratio_min", "seconds"} <= set(s)
    assert 0 <= s["learned"]["test_acc"] <= 1 and 0 <= s["auroc"] <= 1
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert {"val_loss", "val_acc", "test_acc", "ess_ratio", "entropy", "hvps", "cg_rel_residual", "inner_iters",
            "hypergrad_seconds", "auroc"} <= set(rows[0])
    w = load_checked(d / "weights.pt")
    assert w["alpha"].shape == w["corrupted"].shape == w["labels"].shape
    env = json.loads((d / "env.json").read_text())
    assert env["packages"]["torch"] and env["seed"] == 0


def test_second_run_hits_cache_and_gives_identical_tables(runs):
    a, b = runs / "a", runs / "b"
    assert json.loads((b / "summary.json").read_text())["feature_cache_hit"] is True
    assert (a / "per_class_ess.csv").read_bytes() == (b / "per_class_ess.csv").read_bytes()
    assert load_checked(a / "weights.pt")["s"].equal(load_checked(b / "weights.pt")["s"])


def test_rerun_of_finished_run_resumes_from_last_checkpoint(runs, capsys):
    base = runs.parent
    args = ["run", "--quiet", "data.dataset=digits", "backbone.epochs=1", "backbone.allow_chance=true", "outer.steps=4",
            "outer.checkpoint_every=2",
            f"out_dir={runs}", f"features.cache_dir={base / 'cache'}", "name=a"]
    assert main(args) == 0
    assert json.loads((runs / "a" / "summary.json").read_text())["resumed_from"] == 4


def test_runs_list(runs, capsys):
    (runs / "broken").mkdir()
    (runs / "broken" / "config.yaml").write_text("{}")
    assert main(["runs", "list", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and "incomplete" in out and "auroc" in out


def test_cli_errors_are_clear_and_exit_2(tmp_path, capsys):
    assert main(["run", "--quiet", "head.lamda=1", f"out_dir={tmp_path}"]) == 2
    assert "Unknown config key 'head.lamda'" in capsys.readouterr().err
    assert main(["run", "--quiet", "head.lam=-1", f"out_dir={tmp_path}"]) == 2
    assert "'head.lam' parameter must be > 0" in capsys.readouterr().err
    assert main(["run", "--quiet", "hypergrad.method=nope", f"out_dir={tmp_path}"]) == 2
    assert "Unknown hypergradient method 'nope'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a config error must stop before any run directory is written"


@pytest.mark.parametrize("cmd", [[], ["demo"], ["run"], ["runs"], ["runs", "list"]])
def test_every_command_has_help(cmd):
    out = subprocess.run([sys.executable, "-m", "experiments", *cmd, "--help"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0 and "usage:" in out.stdout


def test_tensorboard_logging(tmp_path):
    args = ["run", "--quiet", "data.dataset=digits", "backbone.epochs=1", "backbone.allow_chance=true", "outer.steps=2", "tensorboard=true",
            f"out_dir={tmp_path / 'runs'}", f"features.cache_dir={tmp_path / 'cache'}", "name=tb"]
    assert main(args) == 0
    events = list((tmp_path / "runs" / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_summary_contract_methods_and_detection(runs):
    """`carrot run` writes every method of the comparison and the detection table (issue contract, checked by name)."""
    s = json.loads((runs / "a" / "summary.json").read_text())
    for m in ("uniform", "carrot", "clean_only", "train_plus_clean", "loss_filter", "knn_clean", "oracle"):
        assert {"test_acc", "test_loss", "meta_val_acc", "val_acc", "train_acc"} <= set(s["methods"][m]), m
    for d in ("alpha", "uniform_loss", "knn", "hypergrad_step0", "clean_only", "influence_cg", "representer", "tracin",
              "trak"):
        assert 0 <= s["detection"][d]["auroc"] <= 1, d
    assert s["detection"]["alpha"]["spearman_with_alpha"] == 1.0
    assert s["methods"]["carrot"]["test_acc"] == s["learned"]["test_acc"]
    assert s["methods"]["uniform"]["test_acc"] == s["uniform"]["test_acc"]
    assert s["guard"]["mode"] == "crossfit" and 0 <= s["guard"]["step"] <= 4
    assert s["n_meta_train"] > 0 and s["n_meta_val"] > 0
    assert s["auroc"] == s["detection"]["alpha"]["auroc"]
    assert (runs / "a" / "crossfit_b" / "metrics.jsonl").is_file()  # the second path of the cross-fit, resumable
