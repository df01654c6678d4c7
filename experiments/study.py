"""What a study is: a config dataclass, a run function and a report, registered under a name.

Every reproducible experiment of CARROT is a :class:`Study` that the one command line runs::

    carrot <study> [--config F] [--quick] [--overwrite] [--threads N] [-v] [--dry-run] [--quiet] key=value ...

A study module (``experiments/<name>.py``) defines ``STUDY = Study(...)``; :data:`STUDIES` maps the
name to the module, imported only when that study runs (so ``carrot --help`` stays fast). The
command line loads the config (YAML file, the study's ``--quick`` overrides, then the user's dotted
overrides), validates it completely before any work, and calls ``study.run(cfg, ctx)``; the study
returns a result that ``study.report`` turns into the text printed at the end. Studies never parse
arguments, and never import one another: they build problems through :mod:`reweight.pipeline` and
read runs through :mod:`analysis`.

``python -m experiments.<name>`` stays as a thin shim (:func:`shim`) for one release.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

__all__ = ["Context", "STUDIES", "Study", "frame_markdown", "legacy_flags_to_overrides", "load_study", "shim", "table_report"]

#: study name -> module defining ``STUDY`` (imported on use).
STUDIES: Dict[str, str] = {
    "run": "experiments.main_job",
    "demo": "experiments.main_job",
    "noise_grid": "experiments.noise_grid",
    "hypergrad_accuracy": "experiments.hypergrad_accuracy",
    "sanity": "experiments.sanity",
    "faithfulness": "experiments.faithfulness",
    "staged": "experiments.staged",
    "bench_inner": "experiments.bench_inner",
    "bench_loo": "experiments.bench_loo",
    "bench_scale": "experiments.bench_scale",
    "bench_libraries": "experiments.bench_libraries",
    "bench_precond": "experiments.bench_precond",
    "dist_hypergrad": "experiments.dist_hypergrad",
    "bad_inputs": "experiments.bad_inputs",
    "trusted": "experiments.trusted",
    "paper": "experiments.paper",
}


@dataclass
class Context:
    """How a study is run (not what it computes): reuse of run directories, progress output, logging."""

    overwrite: bool = False
    progress: bool = True
    verbose: int = 0
    allow_unconverged: bool = False


@dataclass(frozen=True)
class Study:
    """A registered study.

    Attributes:
        name: the command (``carrot <name>``).
        summary: one line for ``carrot --help``.
        config: the config dataclass (fields with defaults and help texts).
        run: ``run(cfg, ctx) -> result``; a dict result may carry ``exit_code`` (the command's exit
            status, 0 when absent) for a study whose work partly failed.
        report: ``report(result) -> str`` printed when the study ends (nothing when empty).
        quick: dotted overrides applied by ``--quick`` (before the user's, so the user's win).
        default_config: YAML file loaded when ``--config`` is not given (``None`` = the dataclass defaults).
        threads_key: dotted config key that ``--threads N`` sets (``None``: only ``torch.set_num_threads``).
        legacy_flags: old per-study flags of ``python -m experiments.<name>`` -> the config key they set
            (read by the shim and the command line with a deprecation note).
        description: longer text for ``carrot <name> --help`` (the module docstring).
    """

    name: str
    summary: str
    config: type
    run: Callable[[Any, Context], Any]
    report: Callable[[Any], str] = str
    quick: Sequence[str] = ()
    default_config: Optional[Path] = None
    threads_key: Optional[str] = "threads"
    legacy_flags: Mapping[str, str] = field(default_factory=dict)
    description: str = ""


def frame_markdown(df: Any) -> str:
    """A pandas frame as a Markdown table (4 significant digits), plain text when ``tabulate`` is missing."""
    try:
        return df.to_markdown(index=False, floatfmt=".4g")
    except ImportError:  # tabulate is optional
        return df.to_string(index=False)


def table_report(res: Mapping[str, Any]) -> str:
    """The report of a study whose result holds ``table`` (text), ``run_dir`` and ``seconds``."""
    return f"{res['table']}\nrun directory: {res['run_dir']} ({res['seconds']:.1f}s)"


def load_study(name: str) -> Study:
    """The :class:`Study` registered as ``name`` (its module imported now).

    Raises:
        reweight.errors.ConfigError: for an unknown study name (listing the registered ones).
    """
    import importlib

    from reweight.errors import ConfigError

    if name not in STUDIES:
        import difflib

        close = difflib.get_close_matches(name, list(STUDIES), n=3)
        raise ConfigError(f"Unknown study {name!r}. Registered: {', '.join(sorted(STUDIES))}"
                          + (f" (did you mean {', '.join(close)}?)" if close else "") + ".")
    study = importlib.import_module(STUDIES[name]).STUDY
    return dataclasses.replace(study, name=name) if study.name != name else study


def legacy_flags_to_overrides(argv: Sequence[str], flags: Mapping[str, str]) -> List[str]:
    """Rewrite old per-study flags (``--seeds 0 1 2``, ``--out DIR``, ``--no-run``) as dotted overrides.

    ``flags`` maps a flag to its config key; a key ending in ``[]`` takes a list (``--seeds 0 1 2`` ->
    ``seeds=[0, 1, 2]``), a flag given without a value sets ``true``. Other arguments pass through
    unchanged. A deprecation note goes to stderr.
    """
    out: List[str] = []
    used = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        flag, eq, inline = argv[i].partition("=")
        if flag not in flags:
            out.append(argv[i])
            i += 1
            continue
        vals = [inline] if eq else []
        j = i + 1
        while not eq and j < len(argv) and not argv[j].startswith("-") and "=" not in argv[j]:
            vals.append(argv[j])
            j += 1
        key = flags[flag]
        if key.endswith("[]"):
            out.append(f"{key[:-2]}=[{', '.join(vals)}]")
        elif not vals:
            out.append(f"{key}=true")
        else:
            out.append(f"{key}={vals[0]}")
            out.extend(vals[1:])  # extra words were overrides or a mistake: let the parser judge them
        used.append(f"{flag} -> {key.rstrip('[]')}=...")
        i = j
    if used:
        print(f"note: deprecated flag spelling, read as override: {', '.join(used)}.", file=sys.stderr)
    return out


def shim(name: str) -> None:
    """``python -m experiments.<name> ARGS`` -> ``carrot <name> ARGS`` (the one command line), then exit."""
    from .cli import main

    os.environ.setdefault("CARROT_PROG", f"python -m experiments.{name}")
    sys.exit(main([name, *sys.argv[1:]]))
