"""User data sources: image folders, precomputed embeddings, local torchvision datasets, labels files.

:func:`load_source` reads the source a :class:`~reweight.config.DataConfig` names into one
:class:`Source` -- every sample's pixels (or features), label and id, which samples are the training
source, the given trusted set and the given test set, and a content fingerprint -- and checks it
completely, so a bad file is one clear :class:`~reweight.errors.DataError` before any work.
:func:`source_splits` then applies the trusted-set protocol shared with the embedded datasets
(:func:`reweight.data.prepare_source_splits`).

============  ======================================================================================
source        layout
============  ======================================================================================
imagefolder   ``train_dir/<class>/<image>``, ``trusted_dir/<class>/<image>`` (the same classes),
              optional ``test_dir``; classes are the sorted folder names, ids the image paths relative
              to their folder; images through the backbone's own eval transform (timm)
embeddings    ``.npz`` (``features``, ``labels``, optional ``ids``), ``.pt`` (a dict with the same keys),
              ``.csv``/``.parquet`` (a label column ``data.label_column``, an optional id column
              ``data.id_column``, every other column a feature); no backbone
torchvision   ``data.root`` in torchvision's own on-disk layout (:data:`TORCHVISION_FILES`), read
              directly, never downloaded; the trusted pool is a stratified clean part of the official
              train split (removed from training), test is the official test split; ids are the
              positions in the official train split (CIFAR-10N label files follow that order)
============  ======================================================================================

A labels file (``data.labels_file``) replaces the training labels: one label per sample of the
training source in its order (a ``.csv`` with an id column is matched by id).

The fingerprint (:attr:`Source.fingerprint`) hashes the sorted list of files read, their sizes and
their content (streamed SHA-256), so a run or a cache never mistakes other data for its own.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import BackboneConfig, DataConfig
from .errors import ConfigError, DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "TORCHVISION_FILES",
    "Source",
    "check_source_paths",
    "fingerprint_files",
    "load_labels_file",
    "load_source",
    "source_splits",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_CIFAR10 = "cifar-10-batches-py"
_CIFAR100 = "cifar-100-python"
#: torchvision dataset -> files under ``data.root`` (train files, test files, metadata file or None), exactly
#: where ``torchvision.datasets.<name>(root, download=True)`` puts them.
TORCHVISION_FILES: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...], Optional[str]]] = {
    "CIFAR10": (tuple(f"{_CIFAR10}/data_batch_{i}" for i in range(1, 6)), (f"{_CIFAR10}/test_batch",),
                f"{_CIFAR10}/batches.meta"),
    "CIFAR100": ((f"{_CIFAR100}/train",), (f"{_CIFAR100}/test",), f"{_CIFAR100}/meta"),
    "MNIST": (("MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-labels-idx1-ubyte"),
              ("MNIST/raw/t10k-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"), None),
    "FashionMNIST": (("FashionMNIST/raw/train-images-idx3-ubyte", "FashionMNIST/raw/train-labels-idx1-ubyte"),
                     ("FashionMNIST/raw/t10k-images-idx3-ubyte", "FashionMNIST/raw/t10k-labels-idx1-ubyte"), None),
    "SVHN": (("train_32x32.mat",), ("test_32x32.mat",), None),
}
_FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_TABLE_EXTS = (".csv", ".parquet")
_ARRAY_EXTS = (".npz", ".pt", ".pth")


@dataclass
class Source:
    """A loaded, checked data source: every sample of every role, in one array.

    Attributes:
        kind: ``"images"`` (``x`` is ``(N, C, H, W)`` float32) or ``"features"`` (``x`` is ``(N, d)`` float32).
        x: the samples; the training source comes first (positions ``0 .. n_train - 1``, in its own order).
        labels: ``(N,)`` int64 labels given by the source (folder, file or dataset).
        num_classes: ``K``.
        classes: class names (``K``).
        ids: one id per sample (image path relative to its folder, the given id, or the position).
        n_train: size of the training source.
        trusted: positions of the given trusted set (None: a clean part of the training source).
        test: positions of the given test set (None: a stratified split of the training source).
        fingerprint: ``name -> sha256`` of what the run depends on (``data.content_sha256``, and
            ``data.labels_file_sha256`` with a labels file).
        id_root: what training ids are relative to (a folder, a file, or the dataset).
        given_labels, given_clean: labels of a labels file aligned with the training source (clean ones
            only when the file carries them).
        description: a short name for logs and summaries.
    """

    kind: str
    x: np.ndarray
    labels: np.ndarray
    num_classes: int
    classes: List[str]
    ids: List[str]
    n_train: int
    trusted: Optional[np.ndarray]
    test: Optional[np.ndarray]
    fingerprint: Dict[str, str] = field(default_factory=dict)
    id_root: str = ""
    given_labels: Optional[np.ndarray] = None
    given_clean: Optional[np.ndarray] = None
    description: str = ""


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


# ----------------------------------------------------------------------------------------------
# fingerprints
# ----------------------------------------------------------------------------------------------


class _Hasher:
    """A streamed SHA-256 over (relative path, size, content) of files, fed in sorted order by the caller."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.files = 0

    def add_bytes(self, rel: str, data: bytes) -> None:
        self.h.update(f"{rel}\0{len(data)}\0".encode())
        self.h.update(data)
        self.files += 1

    def add_file(self, path: Path, rel: str, chunk: int = 1 << 20) -> None:
        self.h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                self.h.update(block)
        self.files += 1

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def fingerprint_files(paths: Sequence[str | Path], root: str | Path | None = None) -> str:
    """SHA-256 of the sorted file list (paths relative to ``root``), each file's size and its content (streamed)."""
    root = Path(root) if root is not None else None
    h = _Hasher()
    items = sorted((str(Path(p).relative_to(root)) if root else str(p), Path(p)) for p in paths)
    for rel, p in items:
        h.add_file(p, rel)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# checks before any work
# ----------------------------------------------------------------------------------------------


def _torchvision_missing(name: str, root: Path) -> List[str]:
    train, test, meta = TORCHVISION_FILES[name]
    wanted = list(train) + list(test) + ([meta] if meta else [])
    return [f for f in wanted if not (root / f).is_file() and not (root / (f + ".gz")).is_file()]


def check_source_paths(data: DataConfig) -> None:
    """Cheap checks of the paths a data config names (existence, kind, extension, optional packages).

    Runs in :func:`reweight.pipeline.preflight`, before any work; :func:`load_source` checks the content.

    Raises:
        ConfigError: naming the key, the path and what is expected (for torchvision: the missing files).
    """
    def need(key: str, is_dir: bool, exts: Sequence[str] = ()) -> None:
        value = getattr(data, key)
        if value is None:
            return
        p = Path(value)
        ok = p.is_dir() if is_dir else p.is_file()
        if not ok:
            what = "an existing directory" if is_dir else "an existing file"
            raise ConfigError(f"The 'data.{key}' parameter must be {what}. Got {value!r} instead.")
        if exts and p.suffix.lower() not in exts:
            raise ConfigError(f"The 'data.{key}' parameter must be a file ending in {', '.join(exts)}. "
                              f"Got {value!r} instead.")
        if p.suffix.lower() == ".parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ConfigError(f"The 'data.{key}' parameter names a parquet file ({value!r}), which needs pyarrow: "
                                  f"pip install 'carrot-reweight[parquet]', or save it as .csv/.npz.") from None

    for key in ("train_dir", "trusted_dir", "test_dir"):
        need(key, True)
    for key in ("train_file", "trusted_file", "test_file"):
        need(key, False, _ARRAY_EXTS + _TABLE_EXTS)
    need("labels_file", False, (".npy", ".npz", ".pt", ".pth", ".csv"))
    if data.dataset == "torchvision":
        root = Path(str(data.root))
        if not root.is_dir():
            raise ConfigError(f"The 'data.root' parameter must be an existing directory holding torchvision's "
                              f"{data.name} files. Got {data.root!r} instead.")
        missing = _torchvision_missing(str(data.name), root)
        if missing:
            raise DataError(f"The torchvision {data.name} files are missing under data.root={str(root)!r}: "
                            f"{', '.join(missing)}. CARROT never downloads: copy the dataset there as "
                            f"torchvision.datasets.{data.name}(root, download=True) writes it.")


# ----------------------------------------------------------------------------------------------
# image folders
# ----------------------------------------------------------------------------------------------


def _scan_folder(root: Path, key: str) -> Tuple[List[str], List[Tuple[Path, str, str]]]:
    """Class folder names and ``(path, id, class)`` of every image below ``root`` (sorted; hidden entries skipped)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"The 'data.{key}' folder {str(root)!r} has no class folders: expected {key}/<class>/<image>.")
    items = []
    for c in classes:
        files = sorted(p for p in (root / c).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            raise DataError(f"The class folder {str(root / c)!r} (data.{key}) holds no image "
                            f"({', '.join(IMAGE_EXTENSIONS)}): remove the folder or add its images.")
        items += [(p, p.relative_to(root).as_posix(), c) for p in files]
    return classes, items


def _decode(items: List[Tuple[Path, str, str]], transform: Any, gray: bool, hasher: _Hasher, desc: str,
            progress: bool) -> np.ndarray:
    from PIL import Image
    from tqdm.auto import tqdm

    out = []
    for path, rel, _ in tqdm(items, desc=desc, unit="img", disable=not progress):
        data = path.read_bytes()
        hasher.add_bytes(rel, data)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                img = im.convert("L" if gray else "RGB")
        except Exception as e:  # noqa: BLE001 - any undecodable file
            raise DataError(f"The image {str(path)!r} cannot be read ({_one_line(e)}): remove or replace it.") from None
        out.append(np.asarray(transform(img), dtype=np.float32))
    return np.stack(out)


def _load_imagefolder(data: DataConfig, backbone: BackboneConfig, progress: bool) -> Source:
    from .backbones import model_transform

    roots = {k: Path(getattr(data, k)) for k in ("train_dir", "trusted_dir", "test_dir") if getattr(data, k)}
    scans = {k: _scan_folder(r, k) for k, r in roots.items()}
    classes = scans["train_dir"][0]
    for k in ("trusted_dir", "test_dir"):
        if k not in scans:
            continue
        got = scans[k][0]
        extra = [c for c in got if c not in classes]
        if extra:
            raise DataError(f"The 'data.{k}' folder has class folders that data.train_dir lacks: {extra}. "
                            f"Training classes: {classes}.")
        lacking = [c for c in classes if c not in got]
        if k == "trusted_dir" and lacking:
            raise DataError(f"The trusted set (data.trusted_dir={str(roots[k])!r}) lacks class(es) {lacking}: every "
                            f"training class needs trusted samples. Training classes: {classes}.")
    overrides: Dict[str, Any] = {}
    if data.image_size is not None:
        overrides["input_size"] = (3, data.image_size, data.image_size)
    if not data.normalize:
        overrides.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    transform = model_transform(backbone.model, 3, **overrides)
    hasher = _Hasher()
    xs, labels, ids, roles = [], [], [], []
    index = {c: i for i, c in enumerate(classes)}
    for k in ("train_dir", "trusted_dir", "test_dir"):
        if k not in scans:
            continue
        items = scans[k][1]
        # the role enters the hashed names: the same images in another role are other data
        tagged = [(p, f"{k}/{rel}", c) for p, rel, c in items]
        xs.append(_decode(tagged, transform, False, hasher, f"decode {k}", progress))
        labels += [index[c] for _, _, c in items]
        ids += [rel for _, rel, _ in items]
        roles += [k] * len(items)
    roles_a = np.asarray(roles)
    x = np.concatenate(xs)
    n_train = int((roles_a == "train_dir").sum())
    test = np.flatnonzero(roles_a == "test_dir") if "test_dir" in scans else None
    return Source(kind="images", x=np.ascontiguousarray(x), labels=np.asarray(labels, dtype=np.int64),
                  num_classes=len(classes), classes=classes, ids=ids, n_train=n_train,
                  trusted=np.flatnonzero(roles_a == "trusted_dir"), test=test,
                  fingerprint={"data.content_sha256": hasher.hexdigest()}, id_root=str(data.train_dir),
                  description=f"imagefolder:{data.train_dir}")


# ----------------------------------------------------------------------------------------------
# embeddings
# ----------------------------------------------------------------------------------------------


def _read_features(path: Path, key: str, data: DataConfig) -> Tuple[np.ndarray, np.ndarray, Optional[List[str]]]:
    """``(features (n, d) float32, labels (n,) raw, ids or None)`` of one embeddings file."""
    ext = path.suffix.lower()
    where = f"data.{key}={str(path)!r}"
    try:
        if ext in _TABLE_EXTS:
            import pandas as pd

            df = pd.read_csv(path) if ext == ".csv" else pd.read_parquet(path)
            if data.label_column not in df.columns:
                raise DataError(f"The table {where} has no label column {data.label_column!r} (data.label_column). "
                                f"Columns: {list(df.columns)[:12]}.")
            ids = df[data.id_column].astype(str).tolist() if data.id_column in df.columns else None
            feats = df.drop(columns=[c for c in (data.label_column, data.id_column) if c in df.columns])
            bad = [c for c in feats.columns if not pd.api.types.is_numeric_dtype(feats[c])]
            if bad:
                raise DataError(f"The table {where} has non-numeric feature columns {bad[:8]}: every column but "
                                f"{data.label_column!r} and {data.id_column!r} must be a number.")
            if feats.shape[1] == 0:
                raise DataError(f"The table {where} has no feature columns.")
            return feats.to_numpy(dtype=np.float32), df[data.label_column].to_numpy(), ids
        if ext == ".npz":
            with np.load(path, allow_pickle=False) as z:
                obj: Dict[str, Any] = {k: z[k] for k in z.files}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable file
        raise DataError(f"The file {where} cannot be read ({_one_line(e)}).") from None
    if not isinstance(obj, dict) or "features" not in obj or "labels" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"The file {where} must hold 'features' (n, d) and 'labels' (n,) (optional 'ids'). "
                        f"Got {keys}.")
    X = np.asarray(torch.as_tensor(obj["features"]).float().numpy() if isinstance(obj["features"], torch.Tensor)
                   else obj["features"], dtype=np.float32)
    y = obj["labels"].numpy() if isinstance(obj["labels"], torch.Tensor) else np.asarray(obj["labels"])
    ids = obj.get("ids")
    ids = None if ids is None else [str(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    return X, y, ids


def _label_codes(raw: np.ndarray, where: str, classes: Optional[List[str]] = None) -> Tuple[np.ndarray, List[str]]:
    """Integer labels of ``raw`` (ints >= 0, or class names mapped through ``classes``/their sorted set)."""
    raw = np.asarray(raw)
    if raw.ndim != 1:
        raise DataError(f"The labels of {where} must be one-dimensional. Got shape {raw.shape}.")
    if raw.dtype.kind in "OUS":
        names = [str(v) for v in raw]
        classes = classes if classes is not None else sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise DataError(f"The labels of {where} name classes the training data lacks: {unknown[:8]}.")
        return np.asarray([index[v] for v in names], dtype=np.int64), classes
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
            raise DataError(f"The labels of {where} must be integers. Got non-integer values such as "
                            f"{raw[~np.isfinite(raw) | (raw != np.round(raw))][:3].tolist()}.")
    elif raw.dtype.kind not in "iub":
        raise DataError(f"The labels of {where} must be integers or class names. Got dtype {raw.dtype}.")
    y = raw.astype(np.int64)
    if y.size and y.min() < 0:
        raise DataError(f"The labels of {where} must be >= 0. Got {int(y.min())}.")
    return y, classes if classes is not None else []


def _load_embeddings(data: DataConfig) -> Source:
    parts = [(k, Path(getattr(data, k))) for k in ("train_file", "trusted_file", "test_file") if getattr(data, k)]
    Xs, ys, ids_all, roles = [], [], [], []
    classes: Optional[List[str]] = None
    K = 0
    hasher = _Hasher()
    for k, p in parts:
        hasher.add_file(p, k)  # role and content, not the path
        X, raw, ids = _read_features(p, k, data)
        where = f"data.{k}={str(p)!r}"
        if X.ndim != 2 or X.shape[0] == 0:
            raise DataError(f"The features of {where} must be a non-empty (n, d) array. Got shape {X.shape}.")
        if len(raw) != X.shape[0]:
            raise DataError(f"The file {where} has {X.shape[0]} feature rows but {len(raw)} labels: they must have "
                            f"the same length.")
        if ids is not None and len(ids) != X.shape[0]:
            raise DataError(f"The file {where} has {X.shape[0]} feature rows but {len(ids)} ids.")
        if Xs and X.shape[1] != Xs[0].shape[1]:
            raise DataError(f"The features of {where} have {X.shape[1]} columns, those of data.train_file "
                            f"{Xs[0].shape[1]}: every file must have the same feature dimension.")
        if not np.all(np.isfinite(X)):
            bad = np.argwhere(~np.isfinite(X))[0]
            raise DataError(f"The features of {where} must be finite. Got {X[bad[0], bad[1]]} at row {bad[0]}, "
                            f"column {bad[1]}.")
        is_names = np.asarray(raw).dtype.kind in "OUS"
        if k != "train_file" and is_names != (classes is not None and len(classes) > 0):
            raise DataError(f"The labels of {where} must be of the same kind as data.train_file's (integers or "
                            f"class names).")
        y, classes = _label_codes(raw, where, classes if k != "train_file" else None)
        if k == "train_file":
            K = len(classes) if classes else int(y.max()) + 1
            missing = np.setdiff1d(np.arange(K), y)
            if missing.size:
                raise DataError(f"The labels of {where} must cover every class 0..{K - 1}; classes "
                                f"{missing[:8].tolist()} have no training row.")
        elif y.size and y.max() >= K:
            raise DataError(f"The labels of {where} must be in 0..{K - 1} (the classes of data.train_file). Got "
                            f"label {int(y.max())}, out of range.")
        Xs.append(X)
        ys.append(y)
        ids_all.append(ids if ids is not None else [str(i) for i in range(X.shape[0])])
        roles += [k] * X.shape[0]
    train_ids = ids_all[0]
    if len(set(train_ids)) != len(train_ids):
        raise DataError(f"The ids of data.train_file={data.train_file!r} must be unique (they name the exported "
                        f"weights).")
    roles_a = np.asarray(roles)
    names = classes if classes else [str(c) for c in range(K)]
    return Source(kind="features", x=np.ascontiguousarray(np.concatenate(Xs)), labels=np.concatenate(ys),
                  num_classes=K, classes=names, ids=[i for chunk in ids_all for i in chunk],
                  n_train=Xs[0].shape[0], trusted=np.flatnonzero(roles_a == "trusted_file"),
                  test=np.flatnonzero(roles_a == "test_file") if data.test_file else None,
                  fingerprint={"data.content_sha256": hasher.hexdigest()}, id_root=str(data.train_file),
                  description=f"embeddings:{data.train_file}")


# ----------------------------------------------------------------------------------------------
# torchvision datasets on local disk
# ----------------------------------------------------------------------------------------------


def _open(root: Path, rel: str) -> Tuple[bytes, str]:
    p = root / rel
    if p.is_file():
        return p.read_bytes(), rel
    return gzip.decompress((root / (rel + ".gz")).read_bytes()), rel + ".gz"


def _unpickle(blob: bytes, rel: str) -> Dict[str, Any]:
    try:
        # the user's own copy of the dataset, read as torchvision reads it (latin1 pickles of numpy arrays)
        obj = pickle.loads(blob, encoding="latin1")  # noqa: S301
    except Exception as e:  # noqa: BLE001
        raise DataError(f"The torchvision file {rel!r} cannot be read ({_one_line(e)}).") from None
    if not isinstance(obj, dict):
        raise DataError(f"The torchvision file {rel!r} must hold a dict. Got {type(obj).__name__}.")
    return obj


def _cifar(blobs: List[Tuple[bytes, str]], label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for blob, rel in blobs:
        d = _unpickle(blob, rel)
        if "data" not in d or label_key not in d:
            raise DataError(f"The torchvision file {rel!r} lacks 'data' or {label_key!r}. Got keys {sorted(d)}.")
        x = np.asarray(d["data"], dtype=np.uint8)
        y = np.asarray(d[label_key], dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] != y.size:
            raise DataError(f"The torchvision file {rel!r} must hold data (n, 3072) and n labels. Got data "
                            f"{x.shape} and {y.size} labels.")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _idx(blob: bytes, rel: str, ndim: int) -> np.ndarray:
    if len(blob) < 4 + 4 * ndim or blob[0] != 0 or blob[1] != 0 or blob[2] != 0x08 or blob[3] != ndim:
        raise DataError(f"The torchvision file {rel!r} is not an idx file of {ndim} dimension(s) of uint8 "
                        f"(bad header).")
    dims = np.frombuffer(blob, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    need = int(np.prod(dims))
    body = np.frombuffer(blob, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != need:
        raise DataError(f"The torchvision file {rel!r} is truncated or padded: header says {dims.tolist()}, "
                        f"{body.size} bytes follow.")
    return body.reshape(tuple(dims))


def _svhn(blob: bytes, rel: str) -> Tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        m = scipy.io.loadmat(io.BytesIO(blob))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"The torchvision file {rel!r} cannot be read ({_one_line(e)}).") from None
    if "X" not in m or "y" not in m:
        raise DataError(f"The torchvision file {rel!r} lacks 'X' or 'y'.")
    x = np.transpose(np.asarray(m["X"], dtype=np.uint8), (3, 2, 0, 1))  # (H, W, C, N) -> (N, C, H, W) as torchvision
    y = np.asarray(m["y"], dtype=np.int64).reshape(-1)
    if x.shape[0] != y.size:
        raise DataError(f"The torchvision file {rel!r} has {x.shape[0]} images but {y.size} labels.")
    y[y == 10] = 0  # SVHN stores digit 0 as label 10 (torchvision maps it to 0 too)
    return x, y


def _read_torchvision(name: str, root: Path, hasher: _Hasher) -> Tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                        np.ndarray, List[str]]:
    train_f, test_f, meta_f = TORCHVISION_FILES[name]

    def blobs(rels: Sequence[str]) -> List[Tuple[bytes, str]]:
        out = [_open(root, r) for r in rels]
        for b, r in out:
            hasher.add_bytes(r, b)
        return out

    if name in ("CIFAR10", "CIFAR100"):
        key = "labels" if name == "CIFAR10" else "fine_labels"
        xtr, ytr = _cifar(blobs(train_f), key)
        xte, yte = _cifar(blobs(test_f), key)
        meta = _unpickle(*blobs([str(meta_f)])[0])
        names = meta.get("label_names" if name == "CIFAR10" else "fine_label_names")
        K = 10 if name == "CIFAR10" else 100
        classes = [str(c) for c in names] if isinstance(names, list) and len(names) == K else [str(c) for c in range(K)]
    elif name in ("MNIST", "FashionMNIST"):
        (xi, xr), (yi, yr) = blobs(train_f[:1] + test_f[:1]), blobs(train_f[1:] + test_f[1:])
        xtr, xte = _idx(xi[0], xi[1], 3)[:, None], _idx(xr[0], xr[1], 3)[:, None]
        ytr, yte = _idx(yi[0], yi[1], 1).astype(np.int64), _idx(yr[0], yr[1], 1).astype(np.int64)
        for x, y, rel in ((xtr, ytr, train_f[0]), (xte, yte, test_f[0])):
            if x.shape[0] != y.size:
                raise DataError(f"The torchvision file {rel!r} has {x.shape[0]} images but its labels file {y.size}.")
        classes = [str(c) for c in range(10)] if name == "MNIST" else list(_FASHION)
    else:  # SVHN
        (tr,), (te,) = blobs(train_f), blobs(test_f)
        (xtr, ytr), (xte, yte) = _svhn(*tr), _svhn(*te)
        classes = [str(c) for c in range(10)]
    K = len(classes)
    for y, rel in ((ytr, train_f[-1]), (yte, test_f[-1])):
        if y.size and (y.min() < 0 or y.max() >= K):
            raise DataError(f"The labels in torchvision file {rel!r} must be in 0..{K - 1}. Got a label "
                            f"{int(y.max() if y.max() >= K else y.min())}, out of range.")
    return xtr, ytr, xte, yte, classes


def _load_torchvision(data: DataConfig, backbone: BackboneConfig) -> Source:
    root = Path(str(data.root))
    name = str(data.name)
    missing = _torchvision_missing(name, root)
    if missing:
        check_source_paths(data)  # raises the message naming the missing files
    hasher = _Hasher()
    xtr, ytr, xte, yte, classes = _read_torchvision(name, root, hasher)
    x = torch.from_numpy(np.concatenate([xtr, xte])).float().div_(255.0)
    if data.image_size is not None and tuple(x.shape[-2:]) != (data.image_size, data.image_size):
        x = torch.cat([torch.nn.functional.interpolate(x[i:i + 1024], size=(data.image_size, data.image_size),
                                                       mode="bilinear", antialias=True, align_corners=False)
                       for i in range(0, x.shape[0], 1024)])
    if data.normalize:
        from .backbones import model_data_config

        cfg = model_data_config(backbone.model, int(x.shape[1]))
        mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
        x = (x - mean) / std
    n_train = xtr.shape[0]
    ids = [str(i) for i in range(n_train)] + [f"test/{i}" for i in range(xte.shape[0])]
    return Source(kind="images", x=np.ascontiguousarray(x.numpy()), labels=np.concatenate([ytr, yte]),
                  num_classes=len(classes), classes=classes, ids=ids, n_train=n_train, trusted=None,
                  test=np.arange(n_train, n_train + xte.shape[0]),
                  fingerprint={"data.content_sha256": hasher.hexdigest()}, id_root=f"{name}:{root}",
                  description=f"torchvision:{name}")


# ----------------------------------------------------------------------------------------------
# labels files
# ----------------------------------------------------------------------------------------------


def _pick(obj: Any, key: Optional[str], what: str, where: str) -> Any:
    if isinstance(obj, dict):
        if key is None:
            arrays = [k for k, v in obj.items() if hasattr(v, "__len__") and not isinstance(v, (str, bytes))]
            if len(arrays) != 1:
                raise DataError(f"The labels file {where} holds several arrays {sorted(map(str, obj))[:12]}: name the "
                                f"{what} with data.labels_key.")
            key = arrays[0]
        if key not in obj:
            raise DataError(f"The labels file {where} has no key {key!r} ({what}). Keys: {sorted(map(str, obj))[:12]}.")
        obj = obj[key]
    elif key is not None and what == "labels":
        raise DataError(f"The labels file {where} holds a single array, not keys: remove data.labels_key={key!r}.")
    return obj.numpy() if isinstance(obj, torch.Tensor) else np.asarray(obj)


def load_labels_file(path: str | Path, n_train: int, num_classes: int, *, key: Optional[str] = None,
                     clean_key: Optional[str] = None, id_column: str = "id", label_column: str = "label",
                     train_ids: Optional[Sequence[str]] = None, classes: Optional[List[str]] = None,
                     ) -> Tuple[np.ndarray, Optional[np.ndarray], str]:
    """Labels replacing those of the training source, from ``.npy``, ``.npz``/``.pt`` (``key``) or ``.csv``.

    Args:
        path: the file.
        n_train: size of the training source; the file holds one label per sample in its order (a
            ``.csv`` with an ``id_column`` is matched to ``train_ids`` instead).
        num_classes: labels must lie in ``0 .. num_classes - 1`` (or name a class of ``classes``).
        key: the array key (``.npz``/``.pt`` dicts) or column (``.csv``; default ``label_column``).
        clean_key: key/column of the original clean labels, if the file has them.

    Returns:
        ``(labels (n_train,), clean labels (n_train,) or None, sha256 of the file)``.

    Raises:
        DataError: for an unreadable file, a missing key, a length other than ``n_train``, an unknown id,
            or a label out of range.
    """
    p = Path(path)
    where = f"data.labels_file={str(p)!r}"
    ext = p.suffix.lower()
    clean = None
    try:
        if ext == ".csv":
            import pandas as pd

            df = pd.read_csv(p)
            col = key or label_column
            for c in [col] + ([clean_key] if clean_key else []):
                if c not in df.columns:
                    raise DataError(f"The labels file {where} has no column {c!r}. Columns: {list(df.columns)[:12]}.")
            if id_column in df.columns and train_ids is not None:
                pos = {str(i): j for j, i in enumerate(df[id_column].astype(str))}
                unknown = [i for i in train_ids if i not in pos]
                if unknown:
                    raise DataError(f"The labels file {where} lacks the ids of {len(unknown)} training samples, "
                                    f"e.g. {unknown[:3]}.")
                df = df.iloc[[pos[str(i)] for i in train_ids]]
            raw = df[col].to_numpy()
            raw_clean = df[clean_key].to_numpy() if clean_key else None
        else:
            if ext == ".npy":
                obj: Any = np.load(p, allow_pickle=False)
            elif ext == ".npz":
                with np.load(p, allow_pickle=False) as z:
                    obj = {k: z[k] for k in z.files}
            else:
                try:
                    obj = torch.load(p, map_location="cpu", weights_only=True)
                except pickle.UnpicklingError:
                    # e.g. CIFAR-10N's .pt files: a dict of numpy arrays (the user's own file)
                    obj = torch.load(p, map_location="cpu", weights_only=False)
            raw = _pick(obj, key, "labels", where)
            raw_clean = _pick(obj, clean_key, "clean labels", where) if clean_key else None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f"The labels file {where} cannot be read ({_one_line(e)}).") from None
    def column(a: Any) -> np.ndarray:  # (n, 1) and (1, n) arrays are columns too
        a = np.asarray(a)
        return a.reshape(-1) if a.ndim == 2 and 1 in a.shape else a

    labels, _ = _label_codes(column(raw), where, classes or None)
    if raw_clean is not None:
        clean, _ = _label_codes(column(raw_clean), f"{where} ({clean_key})", classes or None)
    for arr, what in ((labels, "labels"), (clean, "clean labels")):
        if arr is None:
            continue
        if arr.size != n_train:
            raise DataError(f"The labels file {where} has {arr.size} {what}, the training source has {n_train} "
                            f"samples: one label per training sample, in its order.")
        if arr.size and arr.max() >= num_classes:
            raise DataError(f"The {what} of {where} must be in 0..{num_classes - 1}. Got label {int(arr.max())}, "
                            f"out of range.")
    from .runs import file_sha256

    return labels, clean, file_sha256(p)


# ----------------------------------------------------------------------------------------------
# the front door
# ----------------------------------------------------------------------------------------------


def load_source(data: DataConfig, backbone: BackboneConfig, progress: bool = False) -> Source:
    """Read and check the user source of ``data`` (``imagefolder``, ``embeddings`` or ``torchvision``).

    Every check that needs the content runs here, before any work: unreadable or corrupt files, empty class
    folders, trusted classes that differ from the training classes, features and labels of different
    lengths, labels out of range, missing torchvision files; a labels file is read and aligned too.

    Raises:
        ConfigError: for a path that does not exist (see :func:`check_source_paths`).
        DataError: for bad content (one line naming the file and the fix).
    """
    check_source_paths(data)
    if data.dataset == "imagefolder":
        src = _load_imagefolder(data, backbone, progress)
    elif data.dataset == "embeddings":
        src = _load_embeddings(data)
    elif data.dataset == "torchvision":
        src = _load_torchvision(data, backbone)
    else:
        raise ConfigError(f"The 'data.dataset' parameter {data.dataset!r} is an embedded dataset; load it with "
                          f"reweight.data.load_dataset.")
    if data.labels_file is not None:
        given, clean, sha = load_labels_file(data.labels_file, src.n_train, src.num_classes, key=data.labels_key,
                                             clean_key=data.clean_labels_key, id_column=data.id_column,
                                             label_column=data.label_column, train_ids=src.ids[:src.n_train],
                                             classes=src.classes)
        src.given_labels, src.given_clean = given, clean
        src.fingerprint["data.labels_file_sha256"] = sha
    log.info("Loaded %s: %d samples (%d training source), %d classes", src.description, len(src.labels),
             src.n_train, src.num_classes)
    return src


def source_splits(src: Source, data: DataConfig, seed: int):
    """The trusted-set protocol on ``src`` (:func:`reweight.data.prepare_source_splits`) -> :class:`~reweight.data.Splits`."""
    from .data import prepare_source_splits

    return prepare_source_splits(
        src.labels, np.arange(src.n_train), src.num_classes, seed=seed, pool=src.trusted, test=src.test,
        val_fraction=data.val_fraction, test_fraction=data.test_fraction, trusted_size=data.trusted_size,
        meta_val_fraction=data.meta_val_fraction, noise=data.noise, noise_rate=data.noise_rate,
        imbalance_factor=data.imbalance_factor, given_labels=src.given_labels, given_clean=src.given_clean,
        class_names=src.classes)
