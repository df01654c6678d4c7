r"""Every reusable validator of CARROT, in one place.

Each check raises a :class:`~reweight.errors.ConfigError` (a bad setting) or
:class:`~reweight.errors.DataError` (bad features, labels or indices) with one sentence in the form
"The 'x' parameter of F must be .... Got ... instead." (or "Expected ..., but got ..."), and returns
the value in its canonical type when that is useful. Booleans never pass as numbers, and NaN/Inf
never pass as finite numbers: a check tests the whole family of values, not listed cases.

Example:
    >>> check_lam(0.1, "HeadObjective")
    0.1
    >>> check_int(3, "max_iter", "cg", minimum=1)
    3
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Iterable, Optional

import numpy as np
import torch

from .errors import ConfigError, DataError

__all__ = [
    "check_bool",
    "check_choice",
    "check_features",
    "check_indices",
    "check_int",
    "check_labels",
    "check_lam",
    "check_number",
    "check_splits",
    "check_top_k",
    "renamed_field",
    "renamed_option",
]


def _where(name: str, where: str) -> str:
    return f"The '{name}' parameter of {where}" if where else f"The '{name}' parameter"


def renamed_option(new_value: Any, old_value: Any, old: str, new: str, where: str, default: Any = None) -> Any:
    """Resolve a renamed keyword: ``old`` (deprecated, warned about) feeds ``new`` when ``new`` was not given.

    Example: ``grad_tol = renamed_option(grad_tol, tol, "tol", "grad_tol", "solve_head", 1e-6)``.
    """
    if old_value is not None:
        warnings.warn(f"The '{old}' parameter of {where} is deprecated; use '{new}' (same meaning).",
                      DeprecationWarning, stacklevel=3)
        if new_value is None:
            return old_value
    return default if new_value is None else new_value


def renamed_field(obj: Any, old: str, new: str, where: str) -> None:
    """Map the deprecated dataclass field ``old`` of ``obj`` onto ``new`` (with a warning), frozen or not.

    For option dataclasses that renamed a field (e.g. ``tol`` -> ``rtol``): ``old`` defaults to ``None``;
    when set, its value moves to ``new`` and ``old`` is cleared, so the resolved options hold one name.
    """
    value = getattr(obj, old)
    if value is not None:
        warnings.warn(f"The '{old}' option of {where} is deprecated; use '{new}' (same meaning).",
                      DeprecationWarning, stacklevel=4)
        object.__setattr__(obj, new, value)
        object.__setattr__(obj, old, None)


def check_number(value: Any, name: str, where: str = "", *, low: Optional[float] = None,
                 high: Optional[float] = None, low_open: bool = False, high_open: bool = False,
                 allow_none: bool = False, expected: Optional[str] = None) -> Optional[float]:
    """Return ``float(value)`` if it is a finite real number in the given range, else raise :class:`ConfigError`.

    Args:
        value: the value to check (``bool`` and non-numbers are refused; so are NaN and +-Inf).
        name, where: the parameter and the function/config section it belongs to (for the message).
        low, high: bounds (``None`` = unbounded); ``low_open``/``high_open`` make them strict.
        allow_none: accept ``None`` (returned as is).
        expected: the phrase after "must be" (default: built from the bounds).
    """
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if ok:
        v = float(value)
        ok = math.isfinite(v)
        if ok and low is not None:
            ok = v > low if low_open else v >= low
        if ok and high is not None:
            ok = v < high if high_open else v <= high
    if not ok:
        if expected is None:
            if low is not None and high is not None:
                expected = (f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
            elif low is not None:
                expected = f"a finite number {'>' if low_open else '>='} {low:g}"
            elif high is not None:
                expected = f"a finite number {'<' if high_open else '<='} {high:g}"
            else:
                expected = "a finite number"
            if allow_none:
                expected += " or null"
        raise ConfigError(f"{_where(name, where)} must be {expected}. Got {value!r} instead.")
    return v


def check_int(value: Any, name: str, where: str = "", *, minimum: Optional[int] = None,
              maximum: Optional[int] = None, allow_none: bool = False) -> Optional[int]:
    """Return ``int(value)`` if it is an integer (not a bool, not a float such as ``2.5`` or ``2.0``) in range.

    Raises:
        ConfigError: naming the parameter, the range and the value given.
    """
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    if ok and minimum is not None:
        ok = value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        rng = []
        if minimum is not None:
            rng.append(f">= {minimum}")
        if maximum is not None:
            rng.append(f"<= {maximum}")
        expected = "an int" + (" " + " and ".join(rng) if rng else "") + (" or null" if allow_none else "")
        raise ConfigError(f"{_where(name, where)} must be {expected}. Got {value!r} instead.")
    return int(value)


def check_bool(value: Any, name: str, where: str = "") -> bool:
    """Return ``value`` if it is a bool (``true``/``false`` in YAML), else raise :class:`ConfigError`.

    Strings such as ``"maybe"`` or ``"yes"`` and numbers such as ``1`` are refused, not coerced.
    """
    if not isinstance(value, bool):
        raise ConfigError(f"{_where(name, where)} must be true or false. Got {value!r} instead.")
    return value


def check_choice(value: Any, name: str, where: str, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise :class:`ConfigError` listing them."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{_where(name, where)} must be one of {', '.join(repr(c) for c in choices)}. "
                          f"Got {value!r} instead.")
    return value


def check_lam(lam: Any, where: str) -> float:
    r"""Return :math:`\lambda` as a float, or raise :class:`ConfigError` unless it is a finite number > 0.

    Strict L2 on the head (DESIGN section 2) makes the inner problem strongly convex, its optimum
    unique and the representer and influence identities exact; :math:`\lambda = \infty` would pin the
    head at zero. This is the one λ check of the package.
    """
    return check_number(lam, "lam", where, low=0.0, low_open=True,  # type: ignore[return-value]
                        expected="a finite number > 0 (strict L2 makes the inner problem strongly convex)")


def check_features(x: torch.Tensor | np.ndarray, name: str = "features", dim: Optional[int] = None) -> None:
    """Raise :class:`DataError` unless ``x`` is a finite floating 2-D array (of width ``dim``).

    The message names the first offending row indices for NaN/Inf.
    """
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise DataError(f"Expected {name} of shape (n, d), but got shape {tuple(t.shape)}.")
    if not t.is_floating_point():
        raise DataError(f"Expected floating-point {name}, but got dtype {t.dtype}.")
    if dim is not None and t.shape[1] != dim:
        raise DataError(f"Expected {name} with {dim} columns (feature dimension), but got {t.shape[1]}.")
    if t.shape[0] == 0:
        raise DataError(f"Expected at least one row in {name}, but got none.")
    bad = ~torch.isfinite(t).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()[:10].tolist()
        raise DataError(f"{name} contain NaN/Inf in {int(bad.sum())} row(s); first offending rows: {rows}.")


def check_labels(y: torch.Tensor | np.ndarray, num_classes: int, name: str = "labels",
                 n: Optional[int] = None, require_all_classes: bool = True) -> None:
    """Raise :class:`DataError` unless ``y`` is a 1-D integer array in ``0..num_classes-1``.

    With ``n`` the length must match; with ``require_all_classes`` every class must be present.
    """
    t = torch.as_tensor(y)
    if t.ndim != 1:
        raise DataError(f"Expected {name} of shape (n,), but got shape {tuple(t.shape)}.")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise DataError(f"Expected integer {name}, but got dtype {t.dtype}.")
    if n is not None and t.shape[0] != n:
        raise DataError(f"Length mismatch: {n} feature rows but {t.shape[0]} {name}.")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        bad = torch.nonzero((t < 0) | (t >= num_classes)).flatten()[:10].tolist()
        raise DataError(
            f"{name} must lie in 0..{num_classes - 1}; out of range at indices {bad} "
            f"(values {t[bad].tolist()})."
        )
    if require_all_classes:
        counts = torch.bincount(t, minlength=num_classes)
        missing = torch.nonzero(counts == 0).flatten().tolist()
        if missing:
            raise DataError(f"Class(es) {missing} have no sample in {name}; every class needs at least one.")


def check_splits(splits: Dict[str, np.ndarray], n_total: Optional[int] = None) -> None:
    """Raise :class:`DataError` if index splits overlap (leakage) or index outside ``0..n_total-1``."""
    seen: Dict[int, str] = {}
    for name, idx in splits.items():
        idx = np.asarray(idx)
        if n_total is not None and idx.size and (idx.min() < 0 or idx.max() >= n_total):
            raise DataError(f"Split {name!r} has indices outside 0..{n_total - 1}.")
        if np.unique(idx).size != idx.size:
            raise DataError(f"Split {name!r} contains duplicated indices.")
        for i in idx.tolist():
            if i in seen:
                raise DataError(f"Sample {i} is in both split {seen[i]!r} and split {name!r} (leakage).")
            seen[i] = name


def check_indices(idx: Any, n: int, where: str, name: str = "subset") -> torch.Tensor:
    """Return ``idx`` as an int64 tensor, or raise :class:`DataError` if out of ``0..n-1``, duplicated or empty."""
    t = torch.as_tensor(idx)
    if t.ndim != 1 or t.numel() == 0 or t.is_floating_point() or t.dtype == torch.bool:
        raise DataError(f"The '{name}' parameter of {where} must be a non-empty 1-D array of integer indices. "
                        f"Got shape {tuple(t.shape)} and dtype {t.dtype} instead.")
    t = t.to(torch.int64)
    bad = torch.nonzero((t < 0) | (t >= n)).flatten()
    if bad.numel():
        raise DataError(f"The '{name}' parameter of {where} must hold indices in 0..{n - 1}. "
                        f"Got {t[bad[:5]].tolist()} instead (positions {bad[:5].tolist()}).")
    uniq, counts = torch.unique(t, return_counts=True)
    if bool((counts > 1).any()):
        raise DataError(f"The '{name}' parameter of {where} must not contain duplicated indices. "
                        f"Got duplicates {uniq[counts > 1][:5].tolist()} instead.")
    return t


def check_top_k(k: Any, n: int, where: str, name: str = "k") -> int:
    """Return ``int(k)`` or raise :class:`ConfigError` unless ``1 <= k <= n``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"The '{name}' parameter of {where} must be an int in 1..{n} (the number of training "
                          f"samples). Got {k!r} instead.")
    return k
