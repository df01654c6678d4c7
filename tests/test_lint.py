"""Lint as part of the suite: ruff over the repository (configured in pyproject.toml) and mypy on the core
modules (head, weights, hypergrad, linalg, pipeline, plus the validators and row sources they stand on)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ["reweight/head.py", "reweight/precond.py", "reweight/weights.py", "reweight/hypergrad.py", "reweight/linalg.py",
        "reweight/pipeline.py", "reweight/guard.py", "reweight/bilevel.py", "reweight/validate.py", "reweight/rows.py"]


def _tool(name: str) -> list:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return [str(exe)]
    found = shutil.which(name)
    assert found, f"{name} is a dev dependency (setup.cfg [dev]); install it with pip install -e .[dev]"
    return [found]


def test_ruff_is_clean():
    out = subprocess.run(_tool("ruff") + ["check", "--output-format", "concise", "."], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_is_clean_on_the_core_modules():
    out = subprocess.run(_tool("mypy") + CORE, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
