"""Quantization methods, one module each (``rtn``, ``gptq``, ``awq``), registered in :data:`METHODS`.

A new method is one file here that defines a :class:`~lowbit.methods.registry.Method` subclass
decorated with :func:`~lowbit.methods.registry.register_method`; see ARCHITECTURE.md.
"""

from __future__ import annotations

from .registry import METHODS, Method, register_method

__all__ = ["METHODS", "Method", "register_method"]
