"""Progress bars with ETA for long steps (tqdm), silenced when asked or not on a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_enabled: bool = True


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate with a progress bar (elapsed, rate and ETA) on stderr."""
    disable = not _enabled or os.environ.get("LOWBIT_NO_PROGRESS") == "1" or not sys.stderr.isatty()
    yield from tqdm(items, desc=desc, total=total, unit=unit, disable=disable, leave=False, dynamic_ncols=True)


def bar(total: int, desc: str, unit: str = "it") -> tqdm:
    disable = not _enabled or os.environ.get("LOWBIT_NO_PROGRESS") == "1" or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True)
