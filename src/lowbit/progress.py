"""Progress of long steps on stderr: bars on a terminal, periodic one-line reports elsewhere.

On a terminal each step draws a tqdm bar (elapsed, rate, ETA). When stderr is not a terminal
(``lowbit demo > log 2>&1``, CI, nohup), or is one that reports no width (a pseudo-terminal of some
remote shells, where tqdm draws nothing), each step prints one line every
``LOWBIT_PROGRESS_INTERVAL`` seconds (default 10; also while a single item takes long) and one
when it ends::

    lowbit: quantize 30 layers: 12/30 layer, 0.55 layer/s, ETA 33 s
    lowbit: quantize 30 layers: 30/30 layer in 54 s (0.56 layer/s)

``--quiet`` (:func:`set_enabled`) or ``LOWBIT_NO_PROGRESS=1`` silence both. tqdm is imported
only when a bar is drawn.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_enabled: bool = True
DEFAULT_INTERVAL = 10.0


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def _silenced() -> bool:
    return not _enabled or os.environ.get("LOWBIT_NO_PROGRESS") == "1"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("LOWBIT_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}:{s % 60:02d}"
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _rate(done: float, seconds: float, unit: str) -> str:
    if done <= 0 or seconds <= 0:
        return ""
    per_s = done / seconds
    return f"{per_s:.3g} {unit}/s" if per_s >= 1 else f"{seconds / done:.3g} s/{unit}"


class _Silent:
    """The progress object when nothing is shown."""

    n: float = 0

    def update(self, n: float = 1) -> None:
        self.n += n

    def close(self, report: bool = True) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LineProgress(_Silent):
    """Periodic one-line progress reports for a stderr that is not a terminal.

    A line is printed at most every ``interval`` seconds when work advances, by a background
    timer when one item takes longer than that (so a slow step still shows it is alive), and once
    at the end. With ``interval`` 0 every update prints.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", interval: float | None = None,
                 stream: Any = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.interval = _interval() if interval is None else interval
        self.stream = stream
        self.n: float = 0
        self.start = time.monotonic()
        self._last = self.start
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        if self.interval > 0:
            self._timer = threading.Thread(target=self._tick, name="lowbit-progress", daemon=True)
            self._timer.start()

    def _write(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        try:
            print(f"lowbit: {self.desc}: {line}", file=stream, flush=True)
        except (OSError, ValueError):  # stderr closed: progress is not worth failing for
            pass

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = f"{self.n:g}/{self.total}" if self.total is not None else f"{self.n:g}"
        parts = [f"{done} {self.unit}"]
        rate = _rate(self.n, elapsed, self.unit)
        if rate:
            parts.append(rate)
        if self.total is not None and 0 < self.n < self.total:
            parts.append(f"ETA {_duration(elapsed / self.n * (self.total - self.n))}")
        elif self.n == 0:
            parts.append(f"{_duration(elapsed)} elapsed")
        return ", ".join(parts)

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                if self._closed:
                    return
                if time.monotonic() - self._last >= self.interval:
                    self._last = time.monotonic()
                    self._write(self._line())

    def update(self, n: float = 1) -> None:
        if not n:
            return
        with self._lock:
            self.n += n
            now = time.monotonic()
            if self.interval == 0 or now - self._last >= self.interval:
                self._last = now
                if self.total is None or self.n < self.total:
                    self._write(self._line())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def __exit__(self, *exc: object) -> None:
        self.close(report=exc[0] is None)  # a step cut short by an error says nothing more: the error speaks

    def close(self, report: bool = True) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if not report:
            return
        elapsed = time.monotonic() - self.start
        done = f"{self.n:g}/{self.total}" if self.total is not None else f"{self.n:g}"
        rate = _rate(self.n, elapsed, self.unit)
        self._write(f"{done} {self.unit} in {_duration(elapsed)}" + (f" ({rate})" if rate else ""))


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


def bar(total: int | None, desc: str, unit: str = "it") -> Any:
    """A progress object for ``total`` items (``update(n)``, ``close()``, a context manager): a tqdm
    bar on a terminal, :class:`LineProgress` otherwise, nothing when silenced."""
    if _silenced():
        return _Silent()
    if not sys.stderr.isatty() or _columns() <= 0:  # a terminal of no width draws no bar (tqdm prints nothing)
        return LineProgress(total, desc, unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate with progress (see :func:`bar`)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(total, desc, unit) as p:
        for item in items:
            yield item
            p.update(1)
