"""Every runnable module (``python -m ...``) answers ``--help`` with a usage line and exit code 0."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__main__")
    for pkg in ("experiments", "analysis", "paper_figs")
    for p in (ROOT / pkg).glob("*.py")
    if 'if __name__ == "__main__"' in p.read_text() or p.name == "__main__.py"
)


def test_runnable_modules_found():
    assert {"experiments.noise_grid", "experiments.sanity", "experiments.paper", "paper_figs.class_ess"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_help(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
