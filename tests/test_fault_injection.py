"""Fault injection: SIGKILL a run at random points, resume, compare; corrupt files, check detection."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reweight.config import RunConfig
from reweight.errors import RunDirError
from reweight.runs import RunDir, load_checked, save_checked

ROOT = Path(__file__).resolve().parent.parent
STEPS = 14
VOLATILE = {"inner_seconds", "hypergrad_seconds"}


def _run(run_dir, kill_after_step=None, delay=0.0):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "tests._fault_driver", str(run_dir), str(STEPS)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after_step is None:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        return
    for line in p.stdout:
        if line.strip() == f"step {kill_after_step}":
            break
    import time

    time.sleep(delay)  # land anywhere: mid-solve, mid-checkpoint write, between files
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)


def _visible_files_are_whole(run_dir: Path):
    for f in run_dir.rglob("*"):
        if f.name.startswith(".") and f.name.endswith(".tmp"):
            continue  # a killed writer's temporary: never read, removed on resume
        if f.name == "metrics.jsonl":
            for line in f.read_text().splitlines():
                json.loads(line)  # every line is complete JSON
        if f.suffix == ".pt" and Path(str(f) + ".sha256").exists():
            load_checked(f)


def _result(run_dir: Path):
    metrics = [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return (run_dir / "weights.txt").read_text(), metrics


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref") / "run"
    _run(d)
    return _result(d)


def test_sigkill_at_random_points_resumes_to_identical_results(tmp_path, reference):
    rng = random.Random(1234)
    kill_points = sorted(rng.sample(range(1, STEPS - 1), 5))
    for i, k in enumerate(kill_points):
        d = tmp_path / f"run{i}"
        _run(d, kill_after_step=k, delay=rng.uniform(0.0, 0.03))
        assert not (d / "DONE").exists()
        _visible_files_are_whole(d)
        # a second kill of the resumed run, then resume to the end
        _run(d, kill_after_step=min(k + 2, STEPS - 1), delay=rng.uniform(0.0, 0.03))
        _visible_files_are_whole(d)
        _run(d)
        assert (d / "DONE").exists()
        assert not list(d.rglob(".*.tmp")), "stale temporaries must be cleaned on resume"
        summary = json.loads((d / "summary.json").read_text())
        assert summary["resumed_from"] is not None and summary["resumed_from"] >= 1
        assert _result(d) == reference, f"kill after step {k} did not resume to the same result"


def test_corrupted_checkpoint_falls_back_to_previous(tmp_path, caplog):
    run = RunDir(tmp_path / "r", RunConfig())
    run.save_checkpoint(1, {"step": 1, "x": torch.ones(3)})
    run.save_checkpoint(2, {"step": 2, "x": torch.ones(3) * 2})
    p = run.ckpt_dir / "step_000002.pt"
    p.write_bytes(p.read_bytes()[:-20])  # truncated
    with caplog.at_level("WARNING"):
        ck = run.load_latest_checkpoint()
    assert ck["step"] == 1 and "checksum mismatch" in caplog.text
    with pytest.raises(RunDirError, match="corrupted or truncated"):
        load_checked(p)


def test_corrupted_feature_cache_is_detected_and_recomputed(tmp_path, caplog):
    from reweight.features import FeatureCache

    cache = FeatureCache(tmp_path)
    key = cache.key({"a": 1})
    cache.save(key, {"features": torch.arange(6.0).reshape(3, 2)})
    torch.testing.assert_close(cache.load(key)["features"], torch.arange(6.0).reshape(3, 2))
    raw = bytearray(cache.path(key).read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 8] = bytes(b ^ 0xFF for b in raw[mid:mid + 8])  # flip bits in the middle
    cache.path(key).write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        assert cache.load(key) is None
    assert "recomputing" in caplog.text


def test_run_dir_refuses_other_config_and_keeps_files(tmp_path):
    run = RunDir(tmp_path / "r", RunConfig())
    run.finish({"x": 1})
    with pytest.raises(RunDirError, match="different config"):
        RunDir(tmp_path / "r", RunConfig(seed=5))
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == {"x": 1}
    RunDir(tmp_path / "r", RunConfig(seed=5), overwrite=True)
    assert not (tmp_path / "r" / "DONE").exists()


def test_atomic_write_leaves_no_partial_file_on_error(tmp_path):
    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_checked(tmp_path / "x.pt", {"bad": Boom()})
    assert list(tmp_path.iterdir()) == []
