"""Run directories that protect themselves: atomic writes, checksummed checkpoints, a DONE marker.

Layout of a run directory::

    config.yaml        the resolved config (written first)
    config_hash        hash of the config (and of the identity); a rerun with another config is refused
    identity.json      content hashes the numbers depend on beyond the config (data, labels file, backbone
                       weights), when there are any; a rerun on other content is refused
    env.json           package versions, git commit, python, platform, device, seed
    metrics.jsonl      one JSON line per outer step (rewritten atomically each step)
    checkpoints/       step_XXXXXX.pt + step_XXXXXX.pt.sha256 (the last ``keep`` of them)
    summary.json       final numbers
    DONE               written last; analysis ignores runs without it
    FAILED             written when the run stopped on an error (with the message)

Every file is written to a temporary name in the same directory, flushed, fsynced and renamed,
so a reader (or a killed run) never sees a half-written file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch
import yaml

from .config import config_hash, to_dict
from .errors import RunDirError

__all__ = [
    "RunDir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "config_diff",
    "environment_info",
    "file_sha256",
    "load_checked",
    "run_status",
    "save_checked",
    "sha256_bytes",
]

log = logging.getLogger(__name__)


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's content, streamed (a weights file replaced in place changes it; its path does not)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomic text write (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write (sorted keys, indented, trailing newline) -- byte-identical for equal objects."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serialisable")


def save_checked(path: str | Path, obj: Any) -> str:
    """``torch.save`` ``obj`` atomically with a ``.sha256`` sidecar; returns the checksum."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    digest = sha256_bytes(data)
    atomic_write_bytes(path, data)
    atomic_write_text(str(path) + ".sha256", digest + "\n")
    return digest


def load_checked(path: str | Path) -> Any:
    """Load a file written by :func:`save_checked`, verifying its checksum.

    Raises:
        RunDirError: if the file or its checksum is missing, or the checksum does not match
            (truncated or corrupted file).
    """
    path = Path(path)
    side = Path(str(path) + ".sha256")
    if not path.is_file() or not side.is_file():
        raise RunDirError(f"{path} or its checksum file is missing.")
    data = path.read_bytes()
    if sha256_bytes(data) != side.read_text().strip():
        raise RunDirError(f"{path} is corrupted or truncated (checksum mismatch).")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def environment_info(seed: Optional[int] = None, device: Optional[str] = None) -> Dict[str, Any]:
    """Package versions, git commit, python, platform, threads, device and seed of this process."""
    from importlib import metadata

    versions = {}
    for pkg in ("torch", "torchvision", "timm", "numpy", "scipy", "pandas", "scikit-learn",
                "backpack-for-pytorch", "higher", "mlxtend", "matplotlib"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "packages": versions,
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "seed": seed,
    }


def config_diff(old_yaml: Path, cfg: Any, limit: int = 8) -> str:
    """``key: old -> new`` for the (dotted) config keys where the run at ``old_yaml`` differs from ``cfg``."""

    def flat(d: Any, prefix: str = "") -> Dict[str, Any]:
        if isinstance(d, dict):
            out: Dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    try:
        old = flat(yaml.safe_load(old_yaml.read_text()) or {})
    except (OSError, yaml.YAMLError):
        return "(the old config.yaml is unreadable)"
    new = flat(json.loads(json.dumps(to_dict(cfg), default=str)))
    keys = sorted(k for k in set(old) | set(new) if k not in ("name", "out_dir") and old.get(k) != new.get(k))
    parts = [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in keys[:limit]]
    return "; ".join(parts) + (f"; ... (+{len(keys) - limit} more)" if len(keys) > limit else "") if keys else "none"


def _joined(*diffs: str) -> str:
    parts = [d for d in diffs if d and d != "none"]
    return "; ".join(parts) if parts else "none"


def run_status(path: str | Path) -> str:
    """``finished`` (DONE), ``failed`` (FAILED), ``incomplete`` (killed or running) or ``empty``."""
    p = Path(path)
    if (p / "DONE").is_file():
        return "finished"
    if (p / "FAILED").is_file():
        return "failed"
    if (p / "config.yaml").is_file():
        return "incomplete"
    return "empty"


class RunDir:
    """A run directory bound to one config.

    Args:
        path: the directory.
        cfg: the resolved config dataclass (its hash guards the directory).
        overwrite: allow reusing a directory created by a different config (its files are replaced).
        identity: ``key -> content hash`` of what the run depends on beyond its config (the data's
            fingerprint, the labels file, the backbone weights file; see
            :func:`reweight.features.run_identity`). It enters the run's hash, so the same config on other
            data is another run; empty/None leaves the hash of the config alone.

    Raises:
        RunDirError: if ``path`` holds a run of a different config or identity and ``overwrite`` is False
            (the message names the differing keys).
    """

    def __init__(self, path: str | Path, cfg: Any, overwrite: bool = False, keep: int = 2,
                 identity: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        self.cfg = cfg
        self.keep = keep
        self.identity = dict(sorted((identity or {}).items()))
        self.hash = config_hash(cfg)
        if self.identity:
            self.hash = sha256_bytes((self.hash + json.dumps(self.identity, sort_keys=True)).encode())[:16]
        self.aside: Optional[Path] = None
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"Run directory {self.path} is a file, not a directory. Choose another name or out_dir.")
        old = self.path / "config_hash"
        if old.is_file() and old.read_text().strip() != self.hash:
            diff = _joined(config_diff(self.path / "config.yaml", cfg), self._identity_diff())
            if not overwrite:
                raise RunDirError(
                    f"Run directory {self.path} holds a run of a different config (differing keys: {diff}). "
                    f"Choose another name, or pass --overwrite (the old run is moved aside until the new one finishes)."
                )
            self.aside = self.path.with_name(f".{self.path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.path, self.aside)
            log.warning("Run directory %s held another config (%s); moved to %s until this run finishes.",
                        self.path, diff, self.aside)
        self.path.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temporaries()
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        atomic_write_text(self.path / "config_hash", self.hash + "\n")
        if self.identity:
            self.write_json("identity.json", self.identity)
        else:
            (self.path / "identity.json").unlink(missing_ok=True)
        (self.path / "FAILED").unlink(missing_ok=True)

    def _identity_diff(self) -> str:
        """``key: old -> new`` for the identity keys that differ from the run on disk ("none" if none)."""
        p = self.path / "identity.json"
        try:
            old = json.loads(p.read_text()) if p.is_file() else {}
        except (OSError, ValueError):
            return "identity.json: (unreadable)"
        keys = sorted(k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k))
        short = lambda v: "(absent)" if v is None else str(v)[:12]  # noqa: E731
        return "; ".join(f"{k}: {short(old.get(k))} -> {short(self.identity.get(k))}" for k in keys) or "none"

    def child(self, name: str) -> "RunDir":
        """A sub-directory with its own checkpoints and metrics (e.g. the second path of a cross-fitted run), guarded
        by this run's config: it is created with this run and replaced with it."""
        sub = RunDir.__new__(RunDir)
        sub.path, sub.cfg, sub.keep, sub.identity, sub.hash, sub.aside = (self.path / name, self.cfg, self.keep,
                                                                          self.identity, self.hash, None)
        sub.path.mkdir(parents=True, exist_ok=True)
        sub.remove_stale_temporaries()
        return sub

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files a killed writer left behind (``.<name>.*.tmp``); returns how many."""
        stale = [p for d in (self.path, self.path / "checkpoints") if d.is_dir() for p in d.glob(".*.tmp")]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    # ---- plain files -------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def write_env(self, seed: Optional[int] = None, device: Optional[str] = None) -> None:
        self.write_json("env.json", environment_info(seed, device))

    def write_metrics(self, rows: Iterable[Dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` atomically with ``rows`` (one JSON object per line)."""
        text = "".join(json.dumps(r, sort_keys=True, default=_json_default) + "\n" for r in rows)
        atomic_write_text(self.path / "metrics.jsonl", text)

    def read_metrics(self) -> List[Dict[str, Any]]:
        p = self.path / "metrics.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.path / "checkpoints"

    def save_checkpoint(self, step: int, state: Dict[str, Any]) -> Path:
        """Save ``state`` as ``checkpoints/step_{step:06d}.pt`` (+ checksum); keep the last ``keep``."""
        p = self.ckpt_dir / f"step_{step:06d}.pt"
        save_checked(p, state)
        ckpts = sorted(self.ckpt_dir.glob("step_*.pt"))
        for old in ckpts[: -self.keep]:
            old.unlink(missing_ok=True)
            Path(str(old) + ".sha256").unlink(missing_ok=True)
        return p

    def load_latest_checkpoint(self) -> Optional[Dict[str, Any]]:
        """The newest checkpoint whose checksum verifies; corrupted ones are skipped with a warning."""
        if not self.ckpt_dir.is_dir():
            return None
        for p in sorted(self.ckpt_dir.glob("step_*.pt"), reverse=True):
            try:
                return load_checked(p)
            except (RunDirError, RuntimeError, EOFError, ValueError) as e:
                log.warning("Skipping checkpoint %s: %s; falling back to an older one.", p.name, e)
        return None

    # ---- end of a run ------------------------------------------------------------------------
    def finish(self, summary: Dict[str, Any]) -> None:
        """Write ``summary.json`` then the ``DONE`` marker (last); a run replaced by ``overwrite`` is deleted now."""
        self.write_json("summary.json", summary)
        atomic_write_text(self.path / "DONE", self.hash + "\n")
        if self.aside is not None and self.aside.exists():
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def fail(self, message: str) -> None:
        """Write ``FAILED`` with ``message``; a run replaced by ``overwrite`` stays aside (named in the message)."""
        if self.aside is not None:
            message += f" (the replaced run is kept at {self.aside})"
        atomic_write_text(self.path / "FAILED", message + "\n")

    @property
    def done(self) -> bool:
        return (self.path / "DONE").is_file()
