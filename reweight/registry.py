"""A tiny name -> object registry that refuses duplicates and lists valid names on a miss."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Generic, Iterator, Mapping, TypeVar

from .errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes or functions.

    Example:
        >>> HYPERGRAD = Registry("hypergradient method")
        >>> @HYPERGRAD.register("exact")
        ... class Exact: ...
        >>> HYPERGRAD.get("exact") is Exact
        True
    """

    def __init__(self, what: str):
        self.what = what
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a duplicate name raises ``ValueError``."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the object registered under ``name``; raise ``ConfigError`` listing the valid names."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"Unknown {self.what} {name!r}. Registered: {', '.join(sorted(self._items))}."
            ) from None

    def create(self, name: str, options: Mapping[str, Any] | None = None) -> Any:
        """Instantiate the object registered under ``name`` with keyword ``options``.

        Raises:
            ConfigError: for an unknown name (lists the registered ones) or, for dataclasses, an
                unknown option (lists the valid ones) -- before anything is constructed.
        """
        cls = self.get(name)
        options = dict(options or {})
        if dataclasses.is_dataclass(cls):
            valid = [f.name for f in dataclasses.fields(cls)]
            unknown = [k for k in options if k not in valid]
            if unknown:
                raise ConfigError(f"Unknown option {unknown[0]!r} for {self.what} {name!r}. "
                                  f"Valid options: {', '.join(valid) or '(none)'}.")
        return cls(**options)

    def names(self) -> list[str]:
        """Sorted list of registered names."""
        return sorted(self._items)

    def ordered(self) -> list[str]:
        """Registered names in registration order (the display order of tables and legends: the order in
        which a module introduces its methods, reference/cheapest first)."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
