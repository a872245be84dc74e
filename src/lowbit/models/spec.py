"""What a model argument names, checked without loading anything (no torch): the command line
refuses a missing path at once, and :func:`lowbit.models.loader.resolve` says it the same way."""

from __future__ import annotations

from pathlib import Path

from ..errors import LowbitError
from .demo import DEMOS


def check_spec(spec: str | Path) -> None:
    """Refuse a model argument that is neither a demo name, ``hf:ORG/NAME`` nor an existing path."""
    s = str(spec)
    if s in DEMOS or s.startswith("hf:"):
        return
    path = Path(s).expanduser()
    if not path.exists():
        hint = f" (demo models: {', '.join(DEMOS)})" if "/" not in s and "." not in s else ""
        raise LowbitError(path, f"no such file or folder{hint}")
