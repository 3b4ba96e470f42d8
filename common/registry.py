"""A name -> object registry whose entries live in the modules of one package.

The modules are imported on the first lookup, so adding an entry is adding a file with a
`@registry.register("name")` line; a wrong name is a ShrinkError that lists the known ones.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, TypeVar

from common.errors import ShrinkError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str, package_path: list[str]) -> None:
        self.kind = kind  # what the error message calls an entry, e.g. "stage"
        self._package = package
        self._path = package_path
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = entry
            return entry

        return wrap

    def _load_all(self) -> None:
        if not self._loaded:
            for module in pkgutil.iter_modules(self._path):
                importlib.import_module(f"{self._package}.{module.name}")
            self._loaded = True

    def get(self, name: str, where: str = "") -> T:
        self._load_all()
        try:
            return self._entries[name]
        except KeyError:
            place = f" in {where}" if where else ""
            raise ShrinkError(f"unknown {self.kind} {name!r}{place}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        self._load_all()
        return sorted(self._entries)

