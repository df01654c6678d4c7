"""Public API hygiene: light import, import direction, every public name importable."""

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import reweight

ROOT = Path(__file__).resolve().parent.parent


def test_import_reweight_is_light():
    code = ("import sys, reweight, reweight.config, reweight.head, reweight.hypergrad, reweight.weights, "
            "reweight.bilevel, reweight.runs, reweight.data\n"
            "heavy = [m for m in ('timm', 'backpack', 'higher') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"import reweight pulled in {out.stdout.strip()}"


def test_library_never_imports_experiments_analysis_or_figures():
    bad = []
    for path in (ROOT / "reweight").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] in {"experiments", "analysis", "paper_figs"}]
    assert not bad, bad


def test_every_public_name_is_importable_and_sorted():
    for mod in pkgutil.walk_packages(reweight.__path__, "reweight."):
        m = importlib.import_module(mod.name)
        names = getattr(m, "__all__", None)
        assert names is not None, f"{mod.name} has no __all__"
        for n in names:
            assert hasattr(m, n), f"{mod.name}.{n} missing"
