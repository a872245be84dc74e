"""Model sources (HF folders, GGUF, hub, demos), lazy checkpoints and architecture support.

The names below are imported on first use (PEP 562), so that torch-free modules of this package
(``demo``, ``architectures``, ``cache``) can be imported without the cost of torch: the command
line's ``--help`` and ``inspect`` of a GGUF file answer in a fraction of a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .loader import LoadedModel, ModelSource, build_empty_model, fill_model, load, resolve

__all__ = ["Checkpoint", "LoadedModel", "ModelSource", "build_empty_model", "fill_model", "load", "resolve"]

_WHERE = {"Checkpoint": "checkpoint", "LoadedModel": "loader", "ModelSource": "loader",
          "build_empty_model": "loader", "fill_model": "loader", "load": "loader", "resolve": "loader"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
