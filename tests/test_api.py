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


# ---- import direction (parsed with ast: every import statement, also those inside functions) ----------------

PACKAGES = ("reweight", "experiments", "analysis", "paper_figs")
#: the command-line infrastructure that every study may import, and the third-party contenders the benchmarks share
STUDY_INFRASTRUCTURE = {"experiments", "experiments.study", "experiments.cli", "experiments.children",
                        "experiments.contenders"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list:
    """Absolute names of every module ``path`` imports (relative imports resolved; ``from a import b`` gives
    ``a`` and ``a.b``, so a submodule imported by name is seen)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                where = ".".join(base + ([node.module] if node.module else []))
            else:
                where = node.module or ""
            out += [where] + [f"{where}.{a.name}" for a in node.names]
    return out


def _sources(package: str) -> list:
    return sorted((ROOT / package).rglob("*.py"))


def test_library_never_imports_experiments_analysis_or_figures():
    bad = [f"{p.relative_to(ROOT)}: {n}" for p in _sources("reweight") for n in _imports(p)
           if n.split(".")[0] in {"experiments", "analysis", "paper_figs"}]
    assert not bad, bad


def _internal_imports(path: Path, package: str) -> set:
    """The modules of ``package`` that ``path`` imports (``from .study import Study`` -> ``experiments.study``)."""
    mods = {_module_name(p) for p in _sources(package)}
    out = set()
    for name in _imports(path):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name and name != _module_name(path):
            out.add(name)
    return out


def test_no_experiment_imports_another_experiment():
    """Studies share code through reweight.pipeline (and analysis), never through each other; the command line
    and the study registry import study modules by name, on use, never statically."""
    bad = [f"{p.name}: {n}" for p in _sources("experiments") for n in _internal_imports(p, "experiments")
           if n not in STUDY_INFRASTRUCTURE]
    assert not bad, bad
    assert _internal_imports(ROOT / "experiments" / "sanity.py", "experiments") == {"experiments.study"}  # not vacuous


def test_no_figure_imports_an_experiment():
    bad = [f"{p.name}: {n}" for p in _sources("paper_figs") for n in _imports(p) if n.split(".")[0] == "experiments"]
    assert not bad, bad


def test_no_import_cycles_in_the_library():
    """The import graph of reweight/ (module -> modules it imports anywhere) has no cycle."""
    graph = {_module_name(p): _internal_imports(p, "reweight") for p in _sources("reweight")}
    state: dict = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [m, n]))
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "reweight.pipeline" in graph and graph["reweight.pipeline"]  # the graph is not trivially empty


def test_at_most_two_argument_parsers():
    """One command line (experiments/cli.py: carrot) and python -m analysis; nothing else builds a parser."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if ".venv" in path.parts or "site-packages" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if name == "ArgumentParser":
                    found.append(str(path.relative_to(ROOT)))
    assert sorted(found) == ["analysis/__main__.py", "experiments/cli.py"], found


def test_every_public_name_is_importable_and_sorted():
    for mod in pkgutil.walk_packages(reweight.__path__, "reweight."):
        m = importlib.import_module(mod.name)
        names = getattr(m, "__all__", None)
        assert names is not None, f"{mod.name} has no __all__"
        for n in names:
            assert hasattr(m, n), f"{mod.name}.{n} missing"
