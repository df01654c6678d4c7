"""The table of bad inputs and the error each gives (one list: tests check it, docs print it).

Run ``carrot bad_inputs out=docs/bad_inputs.md`` (from the repository root) to regenerate the table;
``tests/test_bad_inputs.py`` runs every case and checks the documented exception type and message.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from reweight.config import help_field as _f

from .study import Context, Study, shim

__all__ = ["BadInputsConfig", "CASES", "CLI_CASES", "Case", "CliCase", "STUDY", "render_markdown", "run_case",
           "run_cli_case", "write_table"]


@dataclass(frozen=True)
class Case:
    """One bad input: what it is, how to trigger it, the exception type and a regex of its message."""

    what: str
    trigger: Callable[[], object]
    error: type
    message: str


def _X(n=6, d=3):
    from reweight.head import add_bias

    return add_bias(torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))


def _obj():
    from reweight.head import HeadObjective

    return HeadObjective(_X(), torch.tensor([0, 1, 0, 1, 0, 1]), 2, 0.1)


def _nan_features():
    from reweight.head import HeadObjective

    X = _X()
    X[2, 0] = float("nan")
    return HeadObjective(X, torch.tensor([0, 1, 0, 1, 0, 1]), 2, 0.1)


def _problem(y_val):
    from reweight.hypergrad import BilevelProblem
    from reweight.weights import WeightModel

    obj = _obj()
    return BilevelProblem(obj, _X(4), torch.tensor(y_val), WeightModel(obj.y, 2))


def _cases() -> List[Case]:
    import numpy as np

    from reweight.config import load_config
    from reweight.data import check_splits, load_dataset, symmetric_noise
    from reweight.errors import ConfigError, DataError, NonFiniteError, RunDirError
    from reweight.head import HeadObjective, solve_head
    from reweight.hypergrad import make_method
    from reweight.linalg import conjugate_gradient
    from reweight.weights import WeightModel

    y6 = torch.tensor([0, 1, 0, 1, 0, 1])
    return [
        Case("features with NaN/Inf", _nan_features, DataError, r"NaN/Inf in 1 row\(s\); first offending rows: \[2\]"),
        Case("features of the wrong rank", lambda: HeadObjective(torch.zeros(6), y6, 2, 0.1), DataError,
             r"Expected training features of shape \(n, d\)"),
        Case("integer features", lambda: HeadObjective(torch.zeros(6, 2, dtype=torch.long), y6, 2, 0.1), DataError,
             r"Expected floating-point training features"),
        Case("labels out of range", lambda: HeadObjective(_X(), torch.tensor([0, 1, 2, 1, 0, 1]), 2, 0.1), DataError,
             r"must lie in 0..1; out of range at indices \[2\]"),
        Case("float labels", lambda: HeadObjective(_X(), y6.double(), 2, 0.1), DataError, r"Expected integer training labels"),
        Case("length mismatch features/labels", lambda: HeadObjective(_X(), y6[:5], 2, 0.1), DataError,
             r"Length mismatch: 6 feature rows but 5 training labels"),
        Case("a class absent from the training split", lambda: WeightModel(torch.tensor([0, 0, 0]), 2), DataError,
             r"Class\(es\) \[1\] have no sample in training labels"),
        Case("a class absent from the validation split", lambda: _problem([0, 0, 0, 0]), DataError,
             r"Class\(es\) \[1\] have no sample in validation labels"),
        Case("validation features of another width", lambda: __import__("reweight.hypergrad", fromlist=["x"]).BilevelProblem(
            _obj(), torch.zeros(4, 2, dtype=torch.float64), torch.tensor([0, 1, 0, 1]), WeightModel(y6, 2)), DataError,
             r"Expected validation features with 4 columns"),
        Case("lambda <= 0", lambda: HeadObjective(_X(), y6, 2, 0.0), ConfigError,
             r"'lam' parameter of HeadObjective must be a finite number > 0"),
        Case("negative or non-finite alpha", lambda: solve_head(_obj(), -torch.ones(6, dtype=torch.float64)), DataError,
             r"alpha must be finite and >= 0"),
        Case("overlapping splits (leakage)", lambda: check_splits({"train": np.array([0, 1]), "test": np.array([1])}),
             DataError, r"Sample 1 is in both split 'train' and split 'test' \(leakage\)"),
        Case("noise rate outside [0, 1)", lambda: symmetric_noise(np.array([0, 1]), 1.2, 2, np.random.default_rng(0)),
             DataError, r"'rate' of symmetric noise must be in \[0, 1\)"),
        Case("unknown dataset", lambda: load_dataset("imagenet"), DataError, r"Unknown dataset 'imagenet'. Valid: digits, mnist5k"),
        Case("unknown config key", lambda: load_config(None, ["head.lamda=1"]), ConfigError,
             r"Unknown config key 'head.lamda'. Valid keys under 'head': lam, bias, grad_tol, max_iter, dtype"),
        Case("config value of the wrong type", lambda: load_config(None, ["outer.steps=ten"]), ConfigError,
             r"'outer.steps' parameter must be int. Got 'ten' instead"),
        Case("config value out of range", lambda: load_config(None, ["data.noise_rate=1.5"]), ConfigError,
             r"'data.noise_rate' parameter must be in \[0, 1\)"),
        Case("malformed override", lambda: load_config(None, ["head.lam"]), ConfigError,
             r"Expected an override of the form section.key=value"),
        Case("unknown hypergradient method", lambda: make_method("newton"), ConfigError,
             r"Unknown hypergradient method 'newton'. Registered: "),
        Case("unknown method option", lambda: make_method("cg", {"iters": 3}), ConfigError,
             r"Unknown option 'iters' for hypergradient method 'cg'. Valid options: "),
        Case("CG budget <= 0", lambda: make_method("cg", {"max_iter": 0}), ConfigError,
             r"'max_iter' parameter of cg must be an int >= 1"),
        Case("CG tolerance <= 0", lambda: conjugate_gradient(lambda v: v, torch.ones(2), rtol=0.0), ConfigError,
             r"'rtol' parameter of conjugate_gradient must be a finite number > 0"),
        Case("non-finite hypergradient", _nonfinite_hypergradient, NonFiniteError,
             r"Hypergradient method 'broken' produced a non-finite dL_val/dalpha"),
        Case("run directory of another config", _other_config_run_dir, RunDirError,
             r"holds a run of a different config"),
        Case("corrupted checkpoint/cache file", _corrupted_file, RunDirError, r"corrupted or truncated \(checksum mismatch\)"),
    ]


def _nonfinite_hypergradient():
    from reweight.head import solve_head
    from reweight.hypergrad import ValAlphaGrad, hypergradient

    p = _problem([0, 1, 0, 1])

    class Broken:
        def val_alpha_grad(self, problem, W, alpha, v0=None):
            return ValAlphaGrad(torch.full_like(alpha, float("nan")))

    s = torch.zeros(6, dtype=torch.float64)
    return hypergradient(Broken(), p, s, solve_head(p.inner, p.weights.alpha(s)).W, name="broken")


def _other_config_run_dir():
    import tempfile

    from reweight.config import RunConfig
    from reweight.runs import RunDir

    d = Path(tempfile.mkdtemp()) / "run"
    RunDir(d, RunConfig())
    return RunDir(d, RunConfig(seed=1))


def _corrupted_file():
    import tempfile

    from reweight.runs import load_checked, save_checked

    p = Path(tempfile.mkdtemp()) / "x.pt"
    save_checked(p, {"a": torch.ones(3)})
    p.write_bytes(p.read_bytes()[:-5])
    return load_checked(p)


CASES: List[Case] = []


def run_case(case: Case) -> str:
    """Trigger ``case``; return the message of the raised error (raises AssertionError if it did not match)."""
    try:
        case.trigger()
    except case.error as e:
        msg = str(e)
        if not re.search(case.message, msg):
            raise AssertionError(f"{case.what}: message {msg!r} does not match {case.message!r}") from e
        return msg
    raise AssertionError(f"{case.what}: no {case.error.__name__} raised")


def render_markdown() -> str:
    """The bad-input table as Markdown (the message column is what the error actually says)."""
    lines = ["| bad input | error | message |", "|---|---|---|"]
    for c in CASES:
        msg = re.sub(re.escape(tempfile.gettempdir()) + r"/[^/\s]+", "<tmp>", run_case(c)).replace("|", "\\|")
        lines.append(f"| {c.what} | `{c.error.__name__}` | {msg} |")
    lines += ["", "## On the command line", "",
              "Each command exits with code 2 and one line on stderr, before any work: no run directory is created "
              "and no file changes (checked by the tests).", "", "| bad input | command | message |", "|---|---|---|"]
    for k in CLI_CASES:
        cmd = " ".join(["carrot", *k.argv]).replace("{tmp}", "<tmp>").replace("|", "\\|")
        msg = run_cli_case(k).replace("|", "\\|")
        lines.append(f"| {k.what} | `{cmd}` | {msg} |")
    return "\n".join(lines) + "\n"


CASES.extend(_cases())


@dataclass(frozen=True)
class CliCase:
    """A bad command line: ``carrot ARGV`` (``{tmp}`` = a fresh folder holding the ``files`` given) must exit 2 with
    one line ``error: ...`` matching ``message``, before any work: no run directory created, no file changed."""

    what: str
    argv: List[str]
    message: str
    files: Dict[str, str] = field(default_factory=dict)


_RUN = ["run", "--quiet", "out_dir={tmp}/runs", "features.cache_dir={tmp}/cache", "name=x"]

CLI_CASES: List[CliCase] = [
    CliCase("YAML syntax error (file, line, column named)", ["run", "--config", "{tmp}/bad.yaml", "out_dir={tmp}/runs"],
            r"bad\.yaml.*line \d+, column \d+", {"bad.yaml": "head:\n  lam: [0.1\n"}),
    CliCase("config file that does not exist", ["run", "--config", "{tmp}/nope.yaml"], r"nope\.yaml"),
    CliCase("unknown study", ["trusetd"], r"invalid choice: 'trusetd'"),
    CliCase("unknown config key", _RUN + ["data.trusted=50"], r"Unknown config key 'data.trusted'"),
    CliCase("string where a number is needed, in method options", _RUN + ["hypergrad.options={rtol: '1e-6'}"], r"rtol"),
    CliCase("float for an int (no silent 2.5 -> 2)", _RUN + ["outer.steps=2.5"], r"'outer.steps'.*int.*2\.5"),
    CliCase("float for an int in the head", _RUN + ["head.max_iter=2.5"], r"'head.max_iter'.*2\.5"),
    CliCase("non-boolean for a boolean option", _RUN + ["hypergrad.options={warm_start: maybe}"], r"warm_start.*maybe"),
    CliCase("infinite lambda", _RUN + ["head.lam=.inf"], r"'head.lam'.*finite"),
    CliCase("negative lambda", _RUN + ["head.lam=-1"], r"'head.lam'"),
    CliCase("infinite gradient tolerance", _RUN + ["head.grad_tol=.inf"], r"'head.grad_tol'.*finite"),
    CliCase("NaN step size", _RUN + ["outer.lr=.nan"], r"'outer.lr'"),
    CliCase("zero step size", _RUN + ["outer.lr=0"], r"'outer.lr'"),
    CliCase("zero threads", ["run", "--threads", "0", "out_dir={tmp}/runs"], r"--threads: must be an int >= 1, got 0"),
    CliCase("negative threads", ["run", "--threads", "-3", "out_dir={tmp}/runs"], r"--threads: must be an int >= 1"),
    CliCase("seed beyond 64 bits", _RUN + ["seed=1180591620717411303424"], r"'seed'"),
    CliCase("negative seed", _RUN + ["seed=-1"], r"'seed'"),
    CliCase("unknown device", _RUN + ["device=gpu"], r"'device'.*gpu"),
    CliCase("empty run name", ["run", "--quiet", "out_dir={tmp}/runs", "name="], r"'name'"),
    CliCase("run name that climbs out of out_dir", ["run", "--quiet", "out_dir={tmp}/runs", "name=../escape"], r"'name'"),
    CliCase("out_dir that is a file", ["run", "--quiet", "out_dir={tmp}/afile", "name=x"], r"out_dir.*not a directory|out_dir",
            {"afile": "x"}),
    CliCase("cache_dir that is a file", ["run", "--quiet", "out_dir={tmp}/runs", "features.cache_dir={tmp}/afile", "name=x"],
            r"features.cache_dir", {"afile": "x"}),
    CliCase("backbone name unknown to timm (close matches)", _RUN + ["backbone.model=resnet188"], r"resnet188.*resnet18"),
    CliCase("backbone weights file that does not exist", _RUN + ["backbone.pretrained_file={tmp}/w.pth"], r"w\.pth"),
    CliCase("unknown dataset", _RUN + ["data.dataset=imagenet"], r"'data.dataset'.*imagenet"),
    CliCase("imagefolder without its folders", _RUN + ["data.dataset=imagefolder"], r"train_dir"),
    CliCase("embeddings file that does not exist", _RUN + ["data.dataset=embeddings", "data.train_file={tmp}/f.npz",
                                                          "data.trusted_file={tmp}/t.npz"], r"f\.npz"),
    CliCase("labels file without a user source", _RUN + ["data.labels_file={tmp}/noisy.npy", "data.noise=none"],
            r"'data.labels_file'.*user source"),
    CliCase("unknown noise type", _RUN + ["data.noise=gaussian"], r"'data.noise'.*gaussian"),
    CliCase("noise rate below 0", _RUN + ["data.noise_rate=-0.1"], r"'data.noise_rate'"),
    CliCase("trusted set smaller than 2", _RUN + ["data.trusted_size=1"], r"'data.trusted_size'"),
    CliCase("trusted set larger than the clean pool", _RUN + ["data.trusted_size=100000"], r"trusted_size.*100000"),
    CliCase("meta-val fraction above 0.9", _RUN + ["data.meta_val_fraction=0.95"], r"'data.meta_val_fraction'"),
    CliCase("guard without a meta-val split", _RUN + ["data.meta_val_fraction=0"], r"meta_val_fraction"),
    CliCase("unknown guard mode", _RUN + ["guard.mode=sometimes"], r"'guard.mode'.*sometimes"),
    CliCase("negative guard z", _RUN + ["guard.z=-1"], r"'guard.z'"),
    CliCase("unknown outer optimizer", _RUN + ["outer.optimizer=rmsprop"], r"'outer.optimizer'.*rmsprop"),
    CliCase("unknown baseline name", _RUN + ["compare.baselines=[knn_clen]"], r"knn_clen"),
    CliCase("unknown attribution method", _RUN + ["compare.attribution=[influence_xx]"], r"influence_xx"),
    CliCase("unknown hypergradient method", _RUN + ["hypergrad.method=newton"], r"newton"),
    CliCase("unknown class-mass rule", _RUN + ["weights.class_mass=weird"], r"'weights.class_mass'.*weird"),
    CliCase("trusted study: size below 2", ["trusted", "sizes=[1]", "out_dir={tmp}/runs"], r"'sizes'"),
    CliCase("trusted study: unknown setting", ["trusted", "settings=[sym99]", "out_dir={tmp}/runs"], r"sym99"),
    CliCase("paper: unknown step", ["paper", "steps=[nope]", "out={tmp}/paper"], r"'steps'.*nope"),
]
"""Bad command lines (``tests/test_bad_inputs.py`` runs each one; ``docs/bad_inputs.md`` prints them)."""


def run_cli_case(case: CliCase) -> str:
    """Run ``carrot`` on ``case``; return its one error line (AssertionError if the exit code, the line, the
    message or the untouched folder are not as promised)."""
    import contextlib
    import io
    import os

    from .cli import main

    with tempfile.TemporaryDirectory() as tmp:
        for name, text in case.files.items():
            Path(tmp, name).write_text(text)
        before = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*"))
        contents = {p: Path(tmp, p).read_bytes() for p in before if Path(tmp, p).is_file()}
        err, out = io.StringIO(), io.StringIO()
        cwd = os.getcwd()
        try:
            os.chdir(tmp)
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    rc = main([a.replace("{tmp}", tmp) for a in case.argv])
                except SystemExit as e:  # argparse
                    rc = e.code
        finally:
            os.chdir(cwd)
        after = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*"))
        lines = [x for x in err.getvalue().splitlines() if x.strip()]
        msg = lines[-1] if lines else ""
        if rc != 2:
            raise AssertionError(f"{case.what}: exit code {rc}, expected 2 (stderr {err.getvalue()!r})")
        if len([x for x in lines if re.match(r"^(carrot[\w ]*: )?error:", x)]) != 1 or "Traceback" in err.getvalue():
            raise AssertionError(f"{case.what}: expected one 'error:' line, got {err.getvalue()!r}")
        if not re.search(case.message, msg):
            raise AssertionError(f"{case.what}: message {msg!r} does not match {case.message!r}")
        if after != before or any(Path(tmp, p).read_bytes() != b for p, b in contents.items()):
            raise AssertionError(f"{case.what}: the command created or changed files: {sorted(set(after) - set(before))}")
        return msg.replace(tmp, "<tmp>")


@dataclass(frozen=True)
class BadInputsConfig:
    """Where the bad-input table goes."""

    out: str = _f("docs/bad_inputs.md", "Markdown file written (relative to the working directory)")


COMMAND = "carrot bad_inputs out=docs/bad_inputs.md"


def write_table(cfg: BadInputsConfig, ctx: Context) -> Dict[str, Any]:
    """Run every case and write the table to ``cfg.out``."""
    from reweight.runs import atomic_write_text

    out = Path(cfg.out)
    atomic_write_text(out, f"# Bad inputs and the errors they give\n\nGenerated by `{COMMAND}`; "
                      "`tests/test_bad_inputs.py` checks every row.\n\n" + render_markdown())
    return {"out": str(out), "cases": len(CASES) + len(CLI_CASES)}


STUDY = Study(name="bad_inputs", summary="the table of bad inputs and the error each gives (docs/bad_inputs.md)",
              config=BadInputsConfig, run=write_table, report=lambda r: f"wrote {r['out']} ({r['cases']} cases)",
              threads_key=None, description=__doc__ or "")

if __name__ == "__main__":
    shim("bad_inputs")
