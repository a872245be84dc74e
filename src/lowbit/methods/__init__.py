"""Quantization methods, one module each (``rtn``, ``gptq``, ``awq``), registered in :data:`METHODS`.

A new method is one file here that defines a :class:`~lowbit.methods.registry.Method` subclass
decorated with :func:`~lowbit.methods.registry.register_method`; see ARCHITECTURE.md.
"""

from __future__ import annotations

from typing import Any

from .registry import METHODS, Method, register_method


def quantize_model(*args: Any, **kwargs: Any) -> Any:
    """See :func:`lowbit.pipeline.quantize_model` (imported lazily: it pulls in the model code)."""
    from lowbit.pipeline import quantize_model as _quantize_model

    return _quantize_model(*args, **kwargs)


__all__ = ["METHODS", "Method", "quantize_model", "register_method"]
