"""A small name -> object registry, read by both the CLI (its choices) and the tests."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from nnlab.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (usually factories).

    >>> MODELS = Registry("model")
    >>> @MODELS.register("lenet5")
    ... def lenet5(**kw): ...
    >>> MODELS.get("lenet5")
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator."""
        if obj is not None:
            return self._add(name, obj)
        return lambda o: self._add(name, o)

    def _add(self, name: str, obj: T) -> T:
        if name in self._items and self._items[name] is not obj:
            raise KeyError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered as ``name``; a :class:`ConfigError` listing the choices otherwise."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
