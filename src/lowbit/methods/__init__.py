"""Quantization methods: RTN, GPTQ and AWQ, and the whole-model entry point ``quantize_model``."""

from __future__ import annotations

from typing import Any

from .base import QuantizedModel, QuantizedWeight
from .rtn import rtn


def quantize_model(*args: Any, **kwargs: Any) -> QuantizedModel:
    """See :func:`lowbit.methods.api.quantize_model` (imported lazily: it pulls in the model code)."""
    from .api import quantize_model as _quantize_model

    return _quantize_model(*args, **kwargs)


__all__ = ["QuantizedModel", "QuantizedWeight", "quantize_model", "rtn"]
