"""The method registry: each quantization method is one module of this package that registers a
:class:`Method` with :func:`register_method`; the pipeline and the command line find it here.

A method turns a plan (every tensor's :class:`~lowbit.core.scheme.QuantScheme`) into a
:class:`~lowbit.models.layers.LayerHandler` that the layer engine runs one decoder layer at a
time. Method, scheme and format are orthogonal: a method says which schemes it can produce
(:meth:`Method.supports`), a format which it can hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from lowbit.core.scheme import QuantScheme
from lowbit.registry import Registry

SchemeLookup = Callable[[str], "QuantScheme | None"]


class Method:
    """Base of every method (subclasses set the class attributes and implement :meth:`handler`)."""

    name: str = ""
    #: needs calibration activations (and so calibration text)
    calibrated: bool = False
    #: default calibration size (samples, tokens per sample) when it is calibrated
    calibration_default: tuple[int, int] = (128, 2048)
    #: handler options the command line exposes, for the help text
    options: tuple[str, ...] = ()

    def handler(self, scheme: QuantScheme, rules: SchemeLookup | None, **options: Any) -> Any:
        """The layer handler quantizing with ``scheme`` by default and ``rules`` per tensor."""
        raise NotImplementedError

    def supports(self, scheme: QuantScheme) -> str | None:
        """``None`` when the method can produce weights of ``scheme``, else why not (one line)."""
        if scheme.type != "int":
            return f"{self.name} produces integer grids, not {scheme.describe()}"
        if scheme.granularity not in ("tensor", "channel", "group"):
            return f"{self.name} quantizes per tensor, per channel or in groups, not {scheme.granularity}"
        return None


METHODS: Registry[Method] = Registry("method", "lowbit.methods")

M = TypeVar("M", bound=type[Method])


def register_method(cls: M) -> M:
    """Class decorator: register one instance of the :class:`Method` subclass under its ``name``."""
    return METHODS.register_instance(cls)
