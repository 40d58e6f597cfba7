"""A registry of variants by name (aggregation rules, optimizers): what each family of variants shares.

A family keeps one :class:`Registry`; a variant is added once (a name taken twice is a bug) and looked up
by name, so consumers ask the variant what it does instead of branching on its name.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Variants of one family by name, in registration order; ``what`` names the family in messages."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.what} {name!r} (known: {', '.join(self._items)})") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __delitem__(self, name: str) -> None:  # a test's own variant, removed when it is done
        del self._items[name]
