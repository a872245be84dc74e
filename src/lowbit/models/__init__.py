"""Model sources (HF folders, GGUF, hub, demos), lazy checkpoints and architecture support."""

from .checkpoint import Checkpoint
from .loader import LoadedModel, ModelSource, build_empty_model, fill_model, load, resolve

__all__ = ["Checkpoint", "LoadedModel", "ModelSource", "build_empty_model", "fill_model", "load", "resolve"]
