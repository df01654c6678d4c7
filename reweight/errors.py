"""Domain exceptions shared by the whole package.

Every error raised for bad user input subclasses a built-in (``ValueError`` or
``RuntimeError``) so callers can catch it generically, and its message names the
offending value and what to do about it.
"""

from __future__ import annotations

__all__ = ["CarrotError", "ConfigError", "ConvergenceError", "DataError", "NonFiniteError", "RunDirError",
           "WarmupError"]


class CarrotError(Exception):
    """Base class of every error CARROT raises on purpose."""


class ConfigError(CarrotError, ValueError):
    """A configuration value or key is invalid (unknown key, wrong type, out of range)."""


class DataError(CarrotError, ValueError):
    """Features, labels or splits are malformed (NaN/Inf, out-of-range labels, empty class, ...)."""


class NonFiniteError(CarrotError, FloatingPointError):
    """A loss, gradient or hypergradient became NaN/Inf during a run."""


class ConvergenceError(CarrotError, RuntimeError):
    """An inner solve or a hypergradient missed its tolerance by far (or diverged): its numbers cannot be trusted."""


class RunDirError(CarrotError, RuntimeError):
    """A run directory is missing, incomplete, corrupted or belongs to another config."""


class WarmupError(CarrotError, RuntimeError):
    """The backbone warm-up failed to learn (its clean-validation accuracy stayed at chance)."""
