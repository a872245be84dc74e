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


# --- the user's own path in messages --------------------------------------------------------------
#
# A GGUF source (or demo) is converted once into a Hugging Face folder in lowbit's cache; errors
# found later (a tensor, the config) name a file of that folder, which the user never gave. The
# conversion is remembered here so that the command line names the user's file instead.

_CONVERTED: dict[str, str] = {}


def remember_conversion(folder: str | Path, original: str | Path) -> None:
    """``folder`` (in the cache) holds the conversion of the user's ``original``."""
    _CONVERTED[str(Path(folder))] = str(original)


def user_path(where: str | Path | None) -> str | None:
    """``where`` with a converted folder (or a file in it) replaced by the user's own source."""
    if where is None:
        return None
    w = str(where)
    for folder, original in _CONVERTED.items():
        if w == folder or w.startswith(folder + "/"):
            return original
    return w
