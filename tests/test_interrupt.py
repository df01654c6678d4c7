"""Ctrl-C / SIGTERM stop multi-step studies within seconds: children ended, one line, exit 130, resumable."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not running: read its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _children_of(pid: int):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _descendants(pid: int):
    out, todo = [], [pid]
    while todo:
        kids = _children_of(todo.pop())
        out += kids
        todo += kids
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_paper_stops_within_seconds_and_exits_130(tmp_path, sig):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CI="1")
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", "paper", "--quick", f"out={tmp_path / 'p'}",
                             "jobs=2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell's background job inherits SIGINT ignored; a terminal's Ctrl-C is not ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    kids = []
    t_end = time.time() + 120
    while time.time() < t_end and len(kids) < 2:  # wait until both workers have started a step
        kids = _children_of(proc.pid)
        time.sleep(0.2)
    assert len(kids) >= 1, "no step started"
    time.sleep(3.0)  # the trusted step has started its own cells by now
    kids = _descendants(proc.pid)
    t0 = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    took = time.time() - t0
    assert proc.returncode == 130, (out, err)
    assert took < 5.0, took
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert lines and lines[-1].startswith("interrupted:"), err
    assert "Traceback" not in err
    time.sleep(0.5)
    assert not [k for k in kids if _alive(k)], "a step outlived the interrupt"
    assert "start main_job_seed0" in out
