"""A registry of variants by name (aggregation rules, optimizers, codecs, attacks, data sources): what each
family of variants shares.

A family keeps one :class:`Registry`; a variant is added once (a name taken twice is a bug) and looked up
by name, so consumers ask the variant what it does instead of branching on its name. A family whose
variants stand above the scenario that names them (attacks, data sources; ``fedtiny/variants.py``)
declares each by name and module: the scenario sees the name, and the first lookup imports the module,
which adds the variant.
"""

from __future__ import annotations

import importlib
from typing import Any, Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Variants of one family by name, in registration order; ``what`` names the family in messages."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}
        self._declared: dict[str, tuple[str, dict[str, Any]]] = {}  # name -> (module that adds it, facts)

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._items[name] = item
        return item

    def declare(self, name: str, module: str, **facts: Any) -> None:
        """Name a variant that ``module`` adds when imported; ``facts`` are what a lower floor may ask of it
        without importing it (:meth:`fact`)."""
        if name in self._declared or name in self._items:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._declared[name] = (module, facts)

    def fact(self, name: str, key: str, default: Any = None) -> Any:
        """A declared fact of ``name`` (``default`` when it declares none)."""
        return self._declared.get(name, ("", {}))[1].get(key, default)

    def get(self, name: str) -> T:
        if name not in self._items and name in self._declared:
            # the variant's module stands above the floor that named it: import it now, once
            importlib.import_module(self._declared[name][0])
        try:
            return self._items[name]
        except KeyError:
            if name in self._declared:
                raise LookupError(f"{self.what} {name!r}: {self._declared[name][0]} does not add it") from None
            raise ValueError(f"unknown {self.what} {name!r} (known: {', '.join(self.names())})") from None

    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self._declared, *self._items]))

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._declared

    def __delitem__(self, name: str) -> None:  # a test's own variant, removed when it is done
        del self._items[name]
