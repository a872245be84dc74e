"""A named registry: methods, checkpoint formats, scheme presets and runtime kernels register
themselves here by decorating a class (or adding an object), and the command line takes its
choices and help text from them.

Each registry knows the package whose modules register into it; :meth:`Registry.load` imports
them all (once), so a new method or format is one file in that package and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import LowbitError

T = TypeVar("T")


class Registry(Generic[T]):
    """``name -> entry`` with one line of help per entry, filled by the modules of ``package``."""

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}
        self._display: dict[str, str] = {}
        self._loaded = package is None

    def register(self, name: str, help: str | None = None) -> Callable[[T], T]:  # noqa: A002 - argparse's word
        """Decorator (or call) adding ``entry`` under ``name``; ``help`` defaults to its docstring's first line."""

        def add(entry: T) -> T:
            self.add(name, entry, help)
            return entry

        return add

    def add(self, name: str, entry: T, help: str | None = None) -> None:  # noqa: A002
        key = name.lower()
        if key in self._entries and self._entries[key] is not entry:
            raise RuntimeError(f"{self.kind} {name!r} is registered twice")
        self._entries[key] = entry
        self._display[key] = name
        doc = help if help is not None else (getattr(entry, "__doc__", None) or "")
        self._help[key] = doc.strip().splitlines()[0] if doc.strip() else ""

    def load(self) -> None:
        """Import every module of the registry's package, so that each registers itself."""
        if self._loaded:
            return
        self._loaded = True
        assert self.package is not None
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def get(self, name: str, where: str | None = None) -> T:
        """The entry called ``name`` (case-insensitive); a one-line error lists the choices."""
        self.load()
        entry = self._entries.get(str(name).lower())
        if entry is None:
            raise LowbitError(where, f"unknown {self.kind} {name!r} (choose from {', '.join(self.names())})")
        return entry

    def __contains__(self, name: object) -> bool:
        self.load()
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        """The names as registered (lookups ignore case)."""
        self.load()
        return [self._display[k] for k in self._entries]

    def items(self) -> Iterator[tuple[str, T]]:
        self.load()
        return iter([(self._display[k], e) for k, e in self._entries.items()])

    def help_text(self) -> str:
        """``name: help`` lines, for the command line's help."""
        self.load()
        return "; ".join(f"{self._display[k]}: {h}" if h else self._display[k] for k, h in self._help.items())
