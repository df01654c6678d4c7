"""Run directories -> tidy pandas DataFrames, with loud handling of incomplete or outdated runs.

A run directory (DESIGN section 5, :mod:`reweight.runs`) holds ``config.yaml``, ``summary.json``,
``metrics.jsonl`` (one JSON row per outer step), optionally ``weights.pt`` (checksummed by
:func:`reweight.runs.save_checked`) and a ``DONE`` marker written last. :func:`load_runs` finds run
directories under any number of paths and returns a :class:`RunSet` whose frames are tidy
(one row per run, per (run, step) or per (run, sample)):

* :meth:`RunSet.frame` -- one row per run: ``run`` (path relative to the root it was found under),
  config fields flattened as ``cfg.<section>.<key>`` columns and summary fields flattened with dots
  (``learned.test_acc``, ``seconds.total``);
* :meth:`RunSet.metrics` -- one row per (run, step) with every scalar metric (lists such as the
  per-class ``ess_ratio`` are kept as Python lists; :meth:`RunSet.metrics_per_class` explodes them);
* :meth:`RunSet.weights` -- one row per (run, training sample): ``s``, ``alpha``, ``label``,
  ``clean_label``, ``corrupted``, ``train_index``.

Bad runs never vanish silently: a run without ``DONE`` (killed or still running), with a ``FAILED``
marker, marked unconverged in its summary (``"converged": false``), without ``summary.json``, with a
summary/metrics/weights file missing a required key (an older schema) or a corrupted ``weights.pt``
is reported with its path and what is missing. With ``strict=False`` (default) such runs are skipped
and one :class:`SkippedRunWarning` lists them all, one line ``<path>: <reason>`` each; with
``strict=True`` a :class:`reweight.errors.RunDirError` is raised. A load that ends with no usable
run is always an error that names the directories looked at. A run directory that holds other run
directories (a run made with an empty name inside ``out_dir``) is loaded together with them, with a
warning naming it.

Runs of different configs are never pooled silently: :func:`config_differences` lists the config
fields (other than seeds, names and paths: :data:`IGNORED_CONFIG`) that differ between runs, within
groups if asked; the tables group rows by them and say so, the figures refuse such a mix
(:meth:`RunSet.require_one_config`).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import yaml

from reweight.errors import ConfigError, RunDirError
from reweight.runs import load_checked, run_status

__all__ = [
    "IGNORED_CONFIG",
    "RunRecord",
    "RunSet",
    "Skipped",
    "SkippedRunWarning",
    "WEIGHT_KEYS",
    "check_columns",
    "config_differences",
    "discover_runs",
    "flatten",
    "get_dotted",
    "load_runs",
    "load_staged_study",
]

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

WEIGHT_KEYS = ("s", "alpha", "labels", "clean_labels", "corrupted", "train_index")
"""Keys of ``weights.pt`` (written by ``experiments.main_job.run_main``)."""

IGNORED_CONFIG = ("seed", "seeds", "feature_seed", "name", "out_dir", "cache_dir", "threads", "device")
"""Config fields (last dotted component) that may differ between runs that are pooled: seeds, names, paths."""


class SkippedRunWarning(UserWarning):
    """Some run directories were not loaded; the message lists each as ``<path>: <reason>``."""


def flatten(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> Dict[str, Any]:
    """Flatten nested mappings into dotted keys; lists/tuples become JSON strings (hashable, CSV-safe).

    Example:
        >>> flatten({"a": {"b": 1, "c": [1, 2]}, "d": None})
        {'a.b': 1, 'a.c': '[1, 2]', 'd': None}
    """
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            if v:
                out.update(flatten(v, key, sep))
            else:
                out[key] = "{}"
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(list(v), sort_keys=True, default=str)
        else:
            out[key] = v
    return out


_MISSING = object()


def get_dotted(d: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    """``d["a"]["b"]`` for ``key="a.b"`` (a literal key containing dots is tried first).

    Raises:
        KeyError: if the key is absent and no ``default`` is given.
    """
    if key in d:
        return d[key]
    node: Any = d
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            if default is _MISSING:
                raise KeyError(key)
            return default
    return node


_ABSENT = object()


def _has(d: Mapping[str, Any], key: str) -> bool:
    return get_dotted(d, key, _ABSENT) is not _ABSENT


@dataclass(frozen=True)
class Skipped:
    """A run directory that was not loaded and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class RunRecord:
    """One loaded run directory.

    Attributes:
        path: the directory.
        run: its path relative to the root it was found under (stable across machines/reruns).
        config: the resolved config (``config.yaml``), plain data.
        summary: ``summary.json``.
        env: ``env.json`` (package versions, git commit), ``{}`` if absent.
        config_hash: content of ``config_hash`` (or ``summary['config_hash']``), ``None`` if absent.
    """

    path: Path
    run: str
    config: Dict[str, Any]
    summary: Dict[str, Any]
    env: Dict[str, Any] = field(default_factory=dict)
    config_hash: Optional[str] = None
    _metrics: Optional[List[Dict[str, Any]]] = field(default=None, repr=False)
    _weights: Optional[Dict[str, Any]] = field(default=None, repr=False)

    def metrics_rows(self) -> List[Dict[str, Any]]:
        """Rows of ``metrics.jsonl`` (cached); ``[]`` if the file is absent."""
        if self._metrics is None:
            p = self.path / "metrics.jsonl"
            self._metrics = [json.loads(line) for line in p.read_text().splitlines() if line.strip()] \
                if p.is_file() else []
        return self._metrics

    def weights_dict(self) -> Optional[Dict[str, Any]]:
        """Content of ``weights.pt`` verified against its checksum (cached); ``None`` if absent."""
        if self._weights is None and (self.path / "weights.pt").is_file():
            self._weights = load_checked(self.path / "weights.pt")
        return self._weights


def discover_runs(paths: Union[PathLike, Sequence[PathLike]]) -> List[tuple]:
    """``(root, run_dir)`` pairs: every directory holding ``config.yaml`` at or below each path, sorted.

    Directories whose name starts with ``.`` (caches, temporaries) and ``checkpoints`` folders are not
    searched.

    Raises:
        RunDirError: if a path does not exist.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: List[tuple] = []
    seen = set()
    for p in paths:
        root = Path(p)
        if not root.exists():
            raise RunDirError(f"The 'paths' parameter of load_runs must name existing directories. "
                              f"Got {str(root)!r} instead (it does not exist).")
        nested = sorted(q.parent for q in root.rglob("config.yaml")
                        if q.parent != root and not any(part.startswith(".") or part == "checkpoints"
                                                        for part in q.relative_to(root).parts[:-1]))
        if (root / "config.yaml").is_file():
            base = root.parent
            cands = [root] + nested
            if nested:
                warnings.warn(f"Run directory {root} holds {len(nested)} other run directories (was it made with "
                              f"an empty name inside out_dir?); loading it and every run below it.",
                              UserWarning, stacklevel=3)
        else:
            base = root
            cands = nested
        for c in cands:
            key = c.resolve()
            if key not in seen:
                seen.add(key)
                found.append((base, c))
    return found


def _read_json(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text())


def _check_run(d: Path, require_summary: Sequence[str], require_metrics: Sequence[str], require_weights: bool,
               allow_incomplete: bool, require_files: Sequence[str] = (), allow_unconverged: bool = False) -> tuple:
    """Return ``(record_parts, None)`` or ``(None, reason)``."""
    status = run_status(d)
    if status == "failed":
        msg = (d / "FAILED").read_text().strip()
        return None, f"run failed ({msg})"
    if status != "finished" and not allow_incomplete:
        return None, "incomplete: no DONE marker (the run was killed or is still running)"
    try:
        config = yaml.safe_load((d / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        return None, f"config.yaml is not valid YAML ({e.__class__.__name__})"
    if not (d / "summary.json").is_file():
        return None, "summary.json is missing"
    try:
        summary = _read_json(d / "summary.json")
    except json.JSONDecodeError as e:
        return None, f"summary.json is not valid JSON ({e})"
    absent = [f for f in require_files if not (d / f).is_file()]
    if absent:
        return None, f"file(s) {', '.join(absent)} missing"
    if summary.get("converged") is False and not allow_unconverged:
        worst = summary.get("worst_residual", summary.get("worst_rel_residual"))
        return None, "not converged" + (f" (worst residual {worst:.3g})" if isinstance(worst, (int, float)) else "") \
            + "; pass allow_unconverged=True to load it"
    missing = [k for k in require_summary if not _has(summary, k)]
    if missing:
        return None, f"summary.json lacks {', '.join(repr(m) for m in missing)} (older schema or other experiment?)"
    metrics = None
    if require_metrics:
        p = d / "metrics.jsonl"
        if not p.is_file():
            return None, "metrics.jsonl is missing"
        try:
            metrics = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            return None, f"metrics.jsonl is not valid JSON lines ({e})"
        if not metrics:
            return None, "metrics.jsonl is empty"
        lacking = sorted({k for k in require_metrics for r in metrics if k not in r})
        if lacking:
            return None, f"metrics.jsonl rows lack {', '.join(repr(m) for m in lacking)}"
    weights = None
    if require_weights:
        try:
            weights = load_checked(d / "weights.pt")
        except RunDirError as e:
            return None, f"weights.pt unusable: {e}"
        except Exception as e:  # noqa: BLE001 -- a torch.load failure on a corrupt file
            return None, f"weights.pt unreadable ({type(e).__name__}: {e})"
        lacking = [k for k in WEIGHT_KEYS if k not in weights]
        if lacking:
            return None, f"weights.pt lacks {', '.join(repr(m) for m in lacking)} (older schema?)"
    env = {}
    if (d / "env.json").is_file():
        try:
            env = _read_json(d / "env.json")
        except json.JSONDecodeError:
            env = {}
    ch = (d / "config_hash").read_text().strip() if (d / "config_hash").is_file() else summary.get("config_hash")
    return (config, summary, env, ch, metrics, weights), None


def load_runs(paths: Union[PathLike, Sequence[PathLike]], *, require_summary: Sequence[str] = (),
              require_metrics: Sequence[str] = (), require_weights: bool = False,
              require_files: Sequence[str] = (), strict: bool = False, allow_incomplete: bool = False,
              allow_unconverged: bool = False, what: str = "runs") -> "RunSet":
    """Load every run directory at or below ``paths``.

    Args:
        paths: run directories and/or folders containing them (searched recursively).
        require_summary: dotted keys that ``summary.json`` must hold (e.g. ``"learned.test_acc"``).
        require_metrics: keys every ``metrics.jsonl`` row must hold (e.g. ``"ess_ratio_min"``).
        require_files: files that must exist in the run directory (e.g. ``"per_seed.csv"``).
        require_weights: ``weights.pt`` must exist, verify against its checksum and hold :data:`WEIGHT_KEYS`.
        strict: raise on the first load with any unusable run instead of skipping it with a warning.
        allow_incomplete: also load runs without ``DONE`` (they must still have a summary).
        allow_unconverged: also load runs whose summary says ``"converged": false``.
        what: a name for the runs in messages (e.g. ``"noise-grid runs"``).

    Returns:
        A :class:`RunSet` (runs sorted by their relative path) with the skipped runs in ``skipped``.

    Raises:
        RunDirError: if a path does not exist; if ``strict`` and any run is unusable (the message
            lists every such run and what it lacks); or if no usable run remains (the message names
            the directories looked at and why each run was skipped).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise RunDirError("The 'paths' parameter of load_runs must name at least one directory. Got [] instead.")
    pairs = discover_runs(paths)
    records: List[RunRecord] = []
    skipped: List[Skipped] = []
    for base, d in pairs:
        parts, reason = _check_run(d, require_summary, require_metrics, require_weights, allow_incomplete,
                                    require_files, allow_unconverged)
        if reason is not None:
            skipped.append(Skipped(str(d), reason))
            continue
        config, summary, env, ch, metrics, weights = parts
        rel = d.relative_to(base).as_posix() if d != base else d.name
        records.append(RunRecord(d, rel, config, summary, env, ch, metrics, weights))
    looked = ", ".join(str(p) for p in paths)
    if skipped:
        listing = "\n  ".join(str(s) for s in skipped)
        if strict:
            raise RunDirError(f"{len(skipped)} of {len(pairs)} {what} under {looked} are unusable:\n  {listing}")
        msg = f"Skipping {len(skipped)} of {len(pairs)} {what} under {looked}:\n  {listing}"
        log.debug(msg)
        warnings.warn(msg, SkippedRunWarning, stacklevel=2)
    names = [r.run for r in records]
    if len(set(names)) < len(names):  # the same relative name under two roots: name runs from the roots' parent
        import os

        common = Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths]))
        for r in records:
            r.run = r.path.resolve().relative_to(common).as_posix()
    if not records:
        detail = ("; skipped: " + "; ".join(str(s) for s in skipped)) if skipped else \
            " (no directory with a config.yaml found)"
        raise RunDirError(f"No usable {what} found. Looked at: {looked}{detail}.")
    records.sort(key=lambda r: r.run)
    return RunSet(records, skipped, [str(p) for p in paths])


@dataclass
class RunSet:
    """Loaded runs plus the ones that were skipped (see :func:`load_runs`)."""

    runs: List[RunRecord]
    skipped: List[Skipped] = field(default_factory=list)
    looked_at: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self):
        return iter(self.runs)

    def frame(self, config_prefix: str = "cfg.") -> "Any":
        """One row per run: ``run``, flattened config (``cfg.``-prefixed) and flattened summary columns."""
        import pandas as pd

        rows = []
        for r in self.runs:
            row: Dict[str, Any] = {"run": r.run, "config_hash": r.config_hash}
            row.update(flatten(r.config, config_prefix.rstrip(".")) if config_prefix else flatten(r.config))
            row.update({k: v for k, v in flatten(r.summary).items() if k not in ("run", "config_hash")})
            rows.append(row)
        return pd.DataFrame(rows)

    def metrics(self, require: Sequence[str] = ()) -> "Any":
        """One row per (run, outer step): ``run`` plus every key of the metrics rows.

        Raises:
            RunDirError: if a run has no metrics rows or lacks a key in ``require`` (names the run).
        """
        import pandas as pd

        frames = []
        for r in self.runs:
            rows = r.metrics_rows()
            if not rows:
                raise RunDirError(f"Run {r.path} has no metrics.jsonl rows.")
            lacking = sorted({k for k in require for row in rows if k not in row})
            if lacking:
                raise RunDirError(f"Run {r.path}: metrics.jsonl rows lack {', '.join(map(repr, lacking))}.")
            df = pd.DataFrame(rows)
            df.insert(0, "run", r.run)
            frames.append(df)
        return pd.concat(frames, ignore_index=True)

    def metrics_per_class(self, keys: Sequence[str] = ("ess_ratio", "entropy")) -> "Any":
        """Long form of per-class list metrics: one row per (run, step, class) with columns ``keys``."""
        import pandas as pd

        rows = []
        for r in self.runs:
            for m in r.metrics_rows():
                lists = [m.get(k) for k in keys]
                if any(not isinstance(v, list) for v in lists):
                    continue
                for c in range(len(lists[0])):
                    rows.append({"run": r.run, "step": m.get("step"), "class": c,
                                 **{k: v[c] for k, v in zip(keys, lists)}})
        if not rows:
            raise RunDirError(f"No per-class metrics {list(keys)} in the runs under {', '.join(self.looked_at)}.")
        return pd.DataFrame(rows)

    def weights(self) -> "Any":
        """One row per (run, training sample) from ``weights.pt``.

        Raises:
            RunDirError: if a run has no (valid) ``weights.pt`` or it lacks a key of :data:`WEIGHT_KEYS`.
        """
        import pandas as pd

        frames = []
        for r in self.runs:
            w = r.weights_dict()
            if w is None:
                raise RunDirError(f"Run {r.path} has no weights.pt.")
            lacking = [k for k in WEIGHT_KEYS if k not in w]
            if lacking:
                raise RunDirError(f"Run {r.path}: weights.pt lacks {', '.join(map(repr, lacking))}.")
            frames.append(pd.DataFrame({
                "run": r.run,
                "sample": range(int(w["alpha"].numel())),
                "train_index": w["train_index"].numpy(),
                "label": w["labels"].numpy(),
                "clean_label": w["clean_labels"].numpy(),
                "corrupted": w["corrupted"].bool().numpy(),
                "s": w["s"].double().numpy(),
                "alpha": w["alpha"].double().numpy(),
            }))
        return pd.concat(frames, ignore_index=True)

    def csv(self, name: str) -> "Any":
        """Concatenation of ``<run>/<name>`` CSV files, with a leading ``run`` column.

        Raises:
            RunDirError: if a run lacks the file (names the run) or every file is empty.
        """
        import pandas as pd

        frames = []
        for r in self.runs:
            p = r.path / name
            if not p.is_file():
                raise RunDirError(f"Run {r.path} has no {name}.")
            df = pd.read_csv(p)
            df.insert(0, "run", r.run)
            frames.append(df)
        out = pd.concat(frames, ignore_index=True)
        if out.empty:
            raise RunDirError(f"Every {name} under {', '.join(self.looked_at)} is empty.")
        return out

    def require_one_config(self, what: str) -> None:
        """Raise :class:`ConfigError` if the runs' configs differ in anything but :data:`IGNORED_CONFIG`.

        Used by figures that pool runs (seeds): the message names every differing field and the
        runs holding each value, so the caller can pass the runs of one config only.
        """
        diffs = config_differences(self.frame())
        if diffs:
            raise ConfigError(f"{what} pools runs of one config only (seeds may differ), but the runs under "
                              f"{', '.join(self.looked_at)} differ in: {_describe(self.frame(), diffs)}. "
                              f"Pass the run directories of one config.")

    def provenance(self) -> List[Dict[str, Any]]:
        """``[{run, config_hash, git_commit}]`` of every loaded run (sorted by run)."""
        return [{"run": r.run, "config_hash": r.config_hash, "git_commit": r.env.get("git_commit")} for r in self.runs]


def check_columns(df: "Any", columns: Iterable[str], where: str) -> None:
    """Raise a :class:`ConfigError` naming the missing columns of ``df`` (used by the table builders)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(f"The 'df' parameter of {where} must have columns {missing}. "
                          f"Got columns {sorted(map(str, df.columns))} instead.")



def config_differences(frame: "Any", by: Sequence[str] = (), ignore: Sequence[str] = IGNORED_CONFIG,
                       prefix: str = "cfg.") -> List[str]:
    """Flattened config columns (``cfg.*``) whose values differ between rows of one ``by`` group.

    With ``by=()`` the whole frame is one group. A column is ignored when the last dotted component
    of its name is in ``ignore`` (seeds, names, paths) or when it is itself in ``by``.

    Example:
        >>> import pandas as pd
        >>> f = pd.DataFrame({"run": ["a", "b"], "cfg.seed": [0, 1], "cfg.head.lam": [0.1, 0.3]})
        >>> config_differences(f)
        ['cfg.head.lam']
    """
    cols = [c for c in frame.columns if str(c).startswith(prefix) and str(c).split(".")[-1] not in ignore
            and c not in by]
    if not cols or frame.empty:
        return []
    text = frame[cols].astype(str)
    if by:
        n = text.join(frame[list(by)].astype(str).rename(columns=lambda c: f"__by_{c}")) \
            .groupby([f"__by_{c}" for c in by], sort=False, dropna=False).nunique(dropna=False)
        return [c for c in cols if int(n[c].max()) > 1]
    return [c for c in cols if text[c].nunique(dropna=False) > 1]


def _describe(frame: "Any", cols: Sequence[str], limit: int = 4) -> str:
    """``key (value: runs; value: runs)`` for each differing column (at most ``limit`` runs per value)."""
    parts = []
    for c in cols:
        vals = []
        for v, g in frame.groupby(frame[c].astype(str), sort=True):
            runs = g["run"].tolist()
            more = f", +{len(runs) - limit} more" if len(runs) > limit else ""
            vals.append(f"{v}: {', '.join(runs[:limit])}{more}")
        parts.append(f"{c[4:] if c.startswith('cfg.') else c} ({'; '.join(vals)})")
    return "; ".join(parts)


def load_staged_study(paths: Union[PathLike, Sequence[PathLike]], strict: bool = False) -> tuple:
    """``(results, runs)`` of ``experiments.staged`` study folders (each holding ``results.csv``).

    ``results`` concatenates every ``results.csv`` (joined with ``results_timing.csv`` when present)
    with a ``run`` column and the run's flattened config (``cfg.*``), so runs of one strategy whose
    configs differ can be kept apart; ``runs`` is the :class:`RunSet` of the strategies' run
    directories. A row whose run directory was skipped (see the :class:`SkippedRunWarning`) or is
    missing is dropped with a warning naming it (``strict``: an error).

    Raises:
        RunDirError: if a folder has no ``results.csv``, no run directory is usable, or (``strict``)
            a listed run is unusable.
    """
    import pandas as pd

    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames = []
    for p in paths:
        p = Path(p)
        if not (p / "results.csv").is_file():
            raise RunDirError(f"No staged study at {p}: results.csv is missing (run the staged study first).")
        df = pd.read_csv(p / "results.csv")
        tp = p / "results_timing.csv"
        if tp.is_file() and "seconds" not in df.columns:
            df = df.merge(pd.read_csv(tp)[["strategy", "seed", "seconds"]], on=["strategy", "seed"], how="left")
        df["study_dir__"] = str(p)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    rs = load_runs(paths, strict=strict, what="staged runs")
    by_path = {r.path.resolve(): r.run for r in rs}
    runs, dropped = [], []
    for row in df.itertuples():
        d = Path(str(row.run_dir)) if "run_dir" in df.columns else None
        cands = [] if d is None else [d, Path(row.study_dir__) / d.name]
        hit = next((by_path[c.resolve()] for c in cands if c.exists() and c.resolve() in by_path), None)
        runs.append(hit)
        if hit is None:
            dropped.append(f"{row.study_dir__}: {row.strategy} seed {row.seed} ({d}): run directory missing or skipped")
    df["run"] = runs
    if dropped:
        msg = f"Leaving out {len(dropped)} row(s) of results.csv whose run is not usable:\n  " + "\n  ".join(dropped)
        if strict:
            raise RunDirError(msg)
        warnings.warn(msg, SkippedRunWarning, stacklevel=2)
        df = df[df["run"].notna()].reset_index(drop=True)
    if df.empty:
        raise RunDirError(f"No usable staged runs under {', '.join(str(p) for p in paths)}.")
    frame = rs.frame()
    cfg = ["run"] + [c for c in frame.columns if str(c).startswith("cfg.")]
    df = df.drop(columns=["study_dir__"]).merge(frame[cfg], on="run", how="left", validate="many_to_one")
    return df, rs
