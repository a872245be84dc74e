"""A named registry: methods, checkpoint formats, scheme presets and runtime kernels register
themselves here by decorating a class (or adding an object), and the command line takes its
choices and help text from them.

Each registry knows the package whose modules register into it; :meth:`Registry.load` imports
them all (once), so a new method or format is one file in that package and nothing else.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from .errors import LowbitError

T = TypeVar("T")
C = TypeVar("C", bound=type)


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

    def register_instance(self, cls: C) -> C:
        """Class decorator: register one instance of ``cls`` under ``cls.name`` (help: its docstring)."""
        name = getattr(cls, "name", "")
        if not name:
            raise RuntimeError(f"{self.kind} class {cls.__name__} has no name")
        self.add(name, cls(), cls.__doc__)
        return cls

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


# --- what the plug-ins register, read from their source -----------------------------------------
#
# The command line's --help lists every method, format and preset with its one line of help, but
# loading the registries imports the plug-in modules, and with them torch (seconds). So the CLI
# reads the same names and lines from the plug-ins' source with ``ast``, without importing them;
# tests/test_cli_startup.py checks that this reading agrees with the live registries.


def _package_files(dotted: str) -> list[Path]:
    """The source files of a package (its modules, not ``_private`` ones) or of one module, by name."""
    root = Path(__file__).resolve().parent
    rel = dotted.split(".")[1:]
    base = root.joinpath(*rel)
    if base.is_dir():
        return [p for p in sorted(base.glob("*.py")) if not p.name.startswith("_") or p.name == "__init__.py"]
    mod = base.with_suffix(".py")
    return [mod] if mod.exists() else []


def _first_line(doc: str | None) -> str:
    doc = (doc or "").strip()
    return doc.splitlines()[0] if doc else ""


def source_entries(dotted: str, call: str | None = None) -> list[tuple[str, str, int]]:
    """``(name, help, rank)`` of every entry the modules of ``dotted`` register, read with ``ast``.

    Found: classes with a decorator and a class attribute ``name = "<str>"`` (help: the class
    docstring's first line; ``rank = <int>`` when set, else 100), and, with ``call``, calls
    ``call("<name>", ..., description="<help>")`` (presets). In file order; empty when the source
    is not there (then ask the registry itself).
    """
    found: list[tuple[str, str, int]] = []
    for path in _package_files(dotted):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        except (OSError, SyntaxError, UnicodeDecodeError):
            return []
        consts = {t.id: stmt.value.value for stmt in tree.body if isinstance(stmt, ast.Assign)
                  and isinstance(stmt.value, ast.Constant) for t in stmt.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.decorator_list:
                attrs: dict[str, object] = {}
                for stmt in node.body:
                    target = stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else (
                        stmt.target if isinstance(stmt, ast.AnnAssign) else None)
                    value = getattr(stmt, "value", None)
                    if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
                        attrs[target.id] = value.value
                    elif isinstance(target, ast.Name) and isinstance(value, ast.Name) and value.id in consts:
                        attrs[target.id] = consts[value.id]  # name = A_MODULE_CONSTANT
                name = attrs.get("name")
                if isinstance(name, str) and name:
                    rank = attrs.get("rank")
                    found.append((name, _first_line(ast.get_docstring(node)), rank if isinstance(rank, int) else 100))
            elif (call is not None and isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id == call and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)):
                desc = next((k.value.value for k in node.keywords if k.arg == "description"
                             and isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)), "")
                found.append((node.args[0].value, _first_line(desc), 100))
    return found


def help_line(entries: list[tuple[str, str, int]]) -> str:
    """``name: help; ...`` as :meth:`Registry.help_text` writes it."""
    return "; ".join(f"{n}: {h}" if h else n for n, h, _ in entries)
