"""Where lowbit keeps converted models and downloads (``LOWBIT_CACHE`` or ~/.cache/lowbit)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")
    root.mkdir(parents=True, exist_ok=True)
    return root
