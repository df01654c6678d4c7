r"""A chunked, memory-mapped feature store for feature matrices larger than memory.

Layout of a store directory::

    shard_00000.npy ... shard_NNNNN.npy   row blocks of the ``(n, d)`` feature matrix (``.npy``)
    labels.npy                           optional ``(n,)`` int64 labels (any other 1-D extras too)
    manifest.json                        written LAST and atomically: n, d, dtype, the shards
                                         (file, rows, sha256) and the extras

A store is complete if and only if ``manifest.json`` exists: every shard is written to a temporary
name, fsynced and renamed (:func:`reweight.runs.atomic_write_bytes`), and the manifest follows the
last shard. When writing fails, :class:`StoreWriter` deletes every shard it wrote, so no partial
shard files are left behind. Reading memory-maps one shard at a time, so
:meth:`FeatureStore.chunks` holds at most one chunk of rows in memory.

This is the storage behind the streaming head computations of :mod:`reweight.streaming` (DESIGN
section 6: "stream features in chunks when they exceed memory").

Example:
    >>> import tempfile, torch
    >>> root = tempfile.mkdtemp()
    >>> store = write_store(root + "/s", torch.ones(10, 3), labels=torch.zeros(10, dtype=torch.long), shard_rows=4)
    >>> store.shape, store.num_shards, [hi - lo for lo, hi, _ in store.chunks(3)]
    ((10, 3), 3, [3, 1, 3, 1, 2])
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import ConfigError, DataError
from .rows import ChunkedFeatures, check_chunk_rows  # re-exported
from .runs import atomic_write_bytes, atomic_write_json, sha256_bytes

__all__ = [
    "MANIFEST",
    "ChunkedFeatures",
    "FeatureStore",
    "ShardInfo",
    "StoreWriter",
    "check_chunk_rows",
    "check_fits_in_memory",
    "extract_features_to_store",
    "memory_budget_bytes",
    "write_store",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


def memory_budget_bytes(fraction: float = 0.5) -> int:
    """``fraction`` of the memory available now (``MemAvailable`` of ``/proc/meminfo``; 8 GiB if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * fraction)
    except OSError:
        pass
    return int(8 * 2**30 * fraction)


def check_fits_in_memory(shape: Sequence[int], dtype: torch.dtype | str = torch.float32,
                         budget_bytes: Optional[int] = None, where: str = "features") -> int:
    """Raise :class:`ConfigError` when a dense array of ``shape``/``dtype`` exceeds the memory budget.

    Args:
        shape: shape of the array that would be materialised.
        dtype: its dtype.
        budget_bytes: the budget (default :func:`memory_budget_bytes`, half the available memory).
        where: what is being materialised (for the message).

    Returns:
        The array's size in bytes.

    Raises:
        ConfigError: if it does not fit; the message says to configure a :class:`FeatureStore`.
    """
    itemsize = torch.empty((), dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype).element_size()
    nbytes = int(np.prod([int(s) for s in shape], dtype=np.float64)) * itemsize
    budget = memory_budget_bytes() if budget_bytes is None else int(budget_bytes)
    if nbytes > budget:
        raise ConfigError(
            f"The {where} of shape {tuple(int(s) for s in shape)} need {nbytes / 2**30:.2f} GiB, more than the "
            f"in-memory budget of {budget / 2**30:.2f} GiB, and no store is configured. Pass a store directory "
            f"(reweight.store.FeatureStore / extract_features_to_store) and use the streaming head "
            f"computations of reweight.streaming."
        )
    return nbytes


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a store: its file name, number of rows and SHA-256 of the file's bytes."""

    file: str
    rows: int
    sha256: str


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


class StoreWriter:
    r"""Write a :class:`FeatureStore` block by block (a context manager).

    Rows passed to :meth:`append` are buffered and written as shards of exactly ``shard_rows`` rows
    (the last may be shorter); :meth:`close` writes the remainder, the extras and then the manifest.
    If the ``with`` block raises, every file this writer created is deleted (and the exception
    propagates): a failed write leaves neither a manifest nor partial shards.

    Args:
        root: the store directory (created; it must not already hold a manifest unless ``overwrite``).
        dim: ``d``, the number of feature columns.
        shard_rows: rows per shard file, >= 1.
        dtype: ``"float32"`` (default) or ``"float64"``/``"float16"``.
        overwrite: replace an existing store in ``root``.

    Raises:
        ConfigError: for ``shard_rows < 1``, an unknown dtype, or an existing store without ``overwrite``.
        DataError: (from :meth:`append`) for rows of the wrong width or with NaN/Inf.
    """

    def __init__(self, root: str | Path, dim: int, shard_rows: int = 65536, dtype: str = "float32",
                 overwrite: bool = False):
        self.shard_rows = check_chunk_rows(shard_rows, "StoreWriter")
        if dtype not in _DTYPES:
            raise ConfigError(f"The 'dtype' parameter of StoreWriter must be one of {sorted(_DTYPES)}. Got {dtype!r} instead.")
        if not isinstance(dim, (int, np.integer)) or int(dim) < 1:
            raise ConfigError(f"The 'dim' parameter of StoreWriter must be an int >= 1. Got {dim!r} instead.")
        self.root = Path(root)
        if (self.root / MANIFEST).exists():
            if not overwrite:
                raise ConfigError(f"The store directory {str(self.root)!r} already holds a store. "
                                  f"Pass overwrite=True to replace it or choose another directory.")
            try:
                FeatureStore(self.root).delete()
            except DataError:  # a broken old store: drop its manifest, its shards are overwritten
                (self.root / MANIFEST).unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.dim, self.dtype = int(dim), dtype
        self._buf: List[np.ndarray] = []
        self._buffered = 0
        self._shards: List[ShardInfo] = []
        self._written: List[Path] = []
        self._extras: Dict[str, List[np.ndarray]] = {}
        self._closed = False

    @property
    def rows(self) -> int:
        """Rows appended so far."""
        return sum(s.rows for s in self._shards) + self._buffered

    def append(self, x: torch.Tensor | np.ndarray, **extras: torch.Tensor | np.ndarray) -> None:
        """Append rows ``x`` ``(b, d)`` and, optionally, aligned 1-D extras (e.g. ``labels=(b,)``)."""
        if self._closed:
            raise ConfigError("The StoreWriter is closed; open a new one to write more rows.")
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise DataError(f"Expected rows of shape (b, {self.dim}), but got shape {tuple(a.shape)}.")
        if not np.isfinite(a).all():
            bad = np.nonzero(~np.isfinite(a).all(axis=1))[0][:10].tolist()
            raise DataError(f"Rows appended to the store contain NaN/Inf; first offending rows of this block: {bad}.")
        for k, v in extras.items():
            e = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            if e.shape != (a.shape[0],):
                raise DataError(f"Expected extra {k!r} of shape ({a.shape[0]},), but got {tuple(e.shape)}.")
            if self._shards or self._buffered:
                if k not in self._extras:
                    raise DataError(f"Extra {k!r} was not given with the earlier rows; give every extra with every block.")
            self._extras.setdefault(k, []).append(e)
        if set(extras) != set(self._extras):
            raise DataError(f"Expected the extras {sorted(self._extras)} with every block, but got {sorted(extras)}.")
        self._buf.append(a.astype(_DTYPES[self.dtype], copy=False))
        self._buffered += a.shape[0]
        while self._buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        block = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        head, rest = block[:rows], block[rows:]
        name = f"shard_{len(self._shards):05d}.npy"
        data = _npy_bytes(head)
        path = self.root / name
        self._written.append(path)
        atomic_write_bytes(path, data)
        self._shards.append(ShardInfo(name, int(head.shape[0]), sha256_bytes(data)))
        self._buf = [rest] if rest.shape[0] else []
        self._buffered = int(rest.shape[0])

    def close(self, meta: Optional[Dict[str, Any]] = None) -> "FeatureStore":
        """Write the remaining rows, the extras and (last) the manifest; return the store."""
        if self._closed:
            raise ConfigError("The StoreWriter is already closed.")
        if self._buffered:
            self._flush(self._buffered)
        if not self._shards:
            raise DataError("Expected at least one row in the store, but got none.")
        extras = {}
        for k, parts in self._extras.items():
            data = _npy_bytes(np.concatenate(parts))
            path = self.root / f"{k}.npy"
            self._written.append(path)
            atomic_write_bytes(path, data)
            extras[k] = {"file": path.name, "sha256": sha256_bytes(data)}
        manifest = {
            "format": FORMAT, "n": sum(s.rows for s in self._shards), "d": self.dim, "dtype": self.dtype,
            "shards": [s.__dict__ for s in self._shards], "extras": extras, "meta": meta or {},
        }
        atomic_write_json(self.root / MANIFEST, manifest)
        self._closed = True
        return FeatureStore(self.root)

    def abort(self) -> None:
        """Delete every file written so far (no manifest is written)."""
        for p in self._written:
            p.unlink(missing_ok=True)
        for p in self.root.glob(".shard_*.tmp"):
            p.unlink(missing_ok=True)
        self._written, self._shards, self._buf, self._buffered, self._closed = [], [], [], 0, True

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise


class FeatureStore:
    r"""Read side of a store directory (see the module doc): memory-mapped shards, one chunk at a time.

    Tensor-like attributes (``shape``, ``dtype``, ``device``) describe the stored matrix, so the
    store can stand where code only asks for those.

    Args:
        root: the store directory.
        verify: also verify every file's SHA-256 now (reads the whole store once).

    Raises:
        DataError: if the manifest is missing (incomplete store), a shard is missing, has the wrong
            shape or dtype, or (with ``verify``) a checksum does not match.
    """

    def __init__(self, root: str | Path, verify: bool = False):
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            raise DataError(f"No feature store at {str(self.root)!r}: {MANIFEST} is missing (the store was "
                            f"never completed). Write it with reweight.store.StoreWriter.")
        m = json.loads(mpath.read_text())
        if m.get("format") != FORMAT or m.get("dtype") not in _DTYPES:
            raise DataError(f"Unsupported store manifest in {str(self.root)!r} (format {m.get('format')!r}, dtype {m.get('dtype')!r}).")
        self.manifest = m
        self.n, self.d, self.np_dtype = int(m["n"]), int(m["d"]), np.dtype(_DTYPES[m["dtype"]])
        self.shards = [ShardInfo(**s) for s in m["shards"]]
        if sum(s.rows for s in self.shards) != self.n:
            raise DataError(f"Store manifest of {str(self.root)!r} is inconsistent: shard rows sum to "
                            f"{sum(s.rows for s in self.shards)}, not n = {self.n}.")
        self.offsets = np.concatenate([[0], np.cumsum([s.rows for s in self.shards])]).astype(np.int64)
        for i in range(len(self.shards)):
            self._open(i)  # header check of every shard: missing or wrong-shape shards fail now
        if verify:
            self.verify()

    # ---- tensor-like description ---------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int]:
        return (self.n, self.d)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, str(self.np_dtype))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def nbytes(self) -> int:
        return self.n * self.d * self.np_dtype.itemsize

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r}, n={self.n}, d={self.d}, dtype={self.np_dtype}, shards={self.num_shards})"

    # ---- reading -------------------------------------------------------------------------------
    def _open(self, i: int) -> np.ndarray:
        s = self.shards[i]
        p = self.root / s.file
        if not p.is_file():
            raise DataError(f"Shard {s.file!r} of the store {str(self.root)!r} is missing; rewrite the store.")
        try:
            a = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"Shard {s.file!r} of the store {str(self.root)!r} is unreadable ({e}); rewrite the store.") from None
        if a.shape != (s.rows, self.d) or a.dtype != self.np_dtype:
            raise DataError(f"Shard {s.file!r} of the store {str(self.root)!r} has shape {a.shape} and dtype {a.dtype}, "
                            f"but the manifest says ({s.rows}, {self.d}) {self.np_dtype}; rewrite the store.")
        return a

    def verify(self) -> None:
        """Check the SHA-256 of every shard and extra; raise :class:`DataError` on a mismatch."""
        files = [(s.file, s.sha256) for s in self.shards] + [(e["file"], e["sha256"]) for e in self.manifest["extras"].values()]
        for name, digest in files:
            p = self.root / name
            if not p.is_file():
                raise DataError(f"File {name!r} of the store {str(self.root)!r} is missing; rewrite the store.")
            if sha256_bytes(p.read_bytes()) != digest:
                raise DataError(f"File {name!r} of the store {str(self.root)!r} is corrupted (checksum mismatch); rewrite the store.")

    def shard(self, i: int) -> torch.Tensor:
        """Shard ``i`` as a (read-only, memory-mapped) CPU tensor ``(rows_i, d)``."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # non-writable memmap: we never write through it
            return torch.from_numpy(self._open(i))

    def chunks(self, chunk_rows: int) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """Yield ``(lo, hi, X[lo:hi])`` with at most ``chunk_rows`` rows, never spanning two shards.

        Raises:
            ConfigError: for ``chunk_rows < 1``.
        """
        chunk_rows = check_chunk_rows(chunk_rows, "FeatureStore.chunks")
        for i in range(self.num_shards):
            base = int(self.offsets[i])
            sh = self.shard(i)
            for lo in range(0, sh.shape[0], chunk_rows):
                hi = min(sh.shape[0], lo + chunk_rows)
                yield base + lo, base + hi, sh[lo:hi]

    def extra(self, name: str) -> torch.Tensor:
        """The 1-D extra ``name`` (e.g. ``labels``), fully loaded.

        Raises:
            DataError: if the store has no such extra, or its file is missing or of the wrong length.
        """
        ex = self.manifest["extras"]
        if name not in ex:
            raise DataError(f"The store {str(self.root)!r} has no extra {name!r}. Available: {sorted(ex) or '(none)'}.")
        p = self.root / ex[name]["file"]
        if not p.is_file():
            raise DataError(f"File {ex[name]['file']!r} of the store {str(self.root)!r} is missing; rewrite the store.")
        a = np.load(p, allow_pickle=False)
        if a.shape != (self.n,):
            raise DataError(f"Extra {name!r} of the store {str(self.root)!r} has shape {a.shape}, expected ({self.n},).")
        return torch.from_numpy(np.array(a))

    @property
    def labels(self) -> torch.Tensor:
        """The ``labels`` extra."""
        return self.extra("labels")

    def to_tensor(self, budget_bytes: Optional[int] = None) -> torch.Tensor:
        """Load the whole matrix (only when it fits; see :func:`check_fits_in_memory`)."""
        check_fits_in_memory(self.shape, self.dtype, budget_bytes, where=f"features of {self!r}")
        return torch.cat([self.shard(i).clone() for i in range(self.num_shards)])

    def delete(self) -> None:
        """Remove the manifest (first, so the store is incomplete at once), then the shards and extras."""
        (self.root / MANIFEST).unlink(missing_ok=True)
        for s in self.shards:
            (self.root / s.file).unlink(missing_ok=True)
        for e in self.manifest["extras"].values():
            (self.root / e["file"]).unlink(missing_ok=True)


def write_store(root: str | Path, X: torch.Tensor | np.ndarray, labels: Optional[torch.Tensor | np.ndarray] = None,
                shard_rows: int = 65536, dtype: str = "float32", overwrite: bool = False,
                meta: Optional[Dict[str, Any]] = None) -> FeatureStore:
    """Write an in-memory ``(n, d)`` matrix (and optional ``(n,)`` labels) as a store; see :class:`StoreWriter`."""
    shape = tuple(X.shape)
    if len(shape) != 2:
        raise DataError(f"Expected features of shape (n, d), but got shape {shape}.")
    with StoreWriter(root, shape[1], shard_rows=shard_rows, dtype=dtype, overwrite=overwrite) as w:
        for lo in range(0, shape[0], w.shard_rows):
            extras = {} if labels is None else {"labels": labels[lo:lo + w.shard_rows]}
            w.append(X[lo:lo + w.shard_rows], **extras)
        return w.close(meta)


def extract_features_to_store(model: torch.nn.Module, images: torch.Tensor | np.ndarray, root: str | Path,
                              labels: Optional[torch.Tensor | np.ndarray] = None, shard_rows: int = 65536,
                              batch_size: int = 512, device: str = "cpu", indices: Optional[Sequence[int]] = None,
                              overwrite: bool = False, progress: bool = False) -> FeatureStore:
    """Extract pooled pre-logit features of a frozen model (:func:`reweight.features.extract_features`)
    shard by shard into a store: only one shard of features is ever held in memory.

    Args:
        model: a timm model (``forward_features``/``forward_head``), used in eval mode.
        images: ``(N, C, H, W)`` images (memory-mapped arrays are fine).
        root: store directory.
        labels: optional ``(N,)`` labels stored as the ``labels`` extra.
        shard_rows: rows per shard.
        batch_size: extraction batch size.
        device: torch device of the model.
        indices: the rows of ``images`` to extract, in order (default all); stored as the ``index`` extra.
        overwrite: replace an existing store.

    Raises:
        ConfigError: for ``shard_rows < 1``; on any error no shard file is left behind.
    """
    from .features import extract_features

    shard_rows = check_chunk_rows(shard_rows, "extract_features_to_store")
    idx = np.arange(len(images)) if indices is None else np.asarray(indices, dtype=np.int64)
    writer: Optional[StoreWriter] = None
    try:
        for lo in range(0, len(idx), shard_rows):
            sel = idx[lo:lo + shard_rows]
            f = extract_features(model, np.asarray(images[sel]), batch_size=batch_size, device=device, progress=progress)
            if writer is None:
                writer = StoreWriter(root, f.shape[1], shard_rows=shard_rows, overwrite=overwrite)
            extras = {"index": sel}
            if labels is not None:
                extras["labels"] = np.asarray(labels)[sel]
            writer.append(f, **extras)
        if writer is None:
            raise DataError("Expected at least one image to extract, but got none.")
        return writer.close({"source": "extract_features_to_store"})
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
