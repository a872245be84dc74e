"""The one error type users see: a file (or thing) and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class LowbitError(ValueError):
    """A problem with user input, reported as ``<where>: <problem>`` on one line.

    It is a ``ValueError`` so that callers catching bad values keep working; the command line
    prints it as ``lowbit: error: <where>: <problem>`` and exits with code 1.
    """

    def __init__(self, where: str | Path | None, problem: str) -> None:
        self.where = str(where) if where is not None else None
        self.problem = problem
        super().__init__(f"{self.where}: {problem}" if self.where else problem)
