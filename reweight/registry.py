"""A tiny name -> object registry that refuses duplicates and lists valid names on a miss."""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

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

    def names(self) -> list[str]:
        """Sorted list of registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
