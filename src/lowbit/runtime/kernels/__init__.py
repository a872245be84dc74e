"""Matmul kernels of :class:`~lowbit.runtime.qlinear.QuantLinear`, one file each, chosen per layer.

A kernel is one module of this package holding one :class:`Kernel` subclass decorated with
:func:`register`::

    @register
    class MyKernel(Kernel):
        \"\"\"One line: what it runs where.\"\"\"

        name = "my-kernel"
        priority = 10                                   # higher wins among the kernels that apply

        def supports(self, layer, device, shape, dtype): ...  # cheap checks: device, bits, group, shape
        def forward(self, layer, x): ...                # y = x @ W.T (+ bias), W as dequantize() says

``torch`` (:mod:`.torch_reference`) is the reference every other kernel is tested against: it
runs every layer on every device, with the lowest priority. :func:`select` picks, for one layer
and one input, the kernel forced by ``QuantLinear.kernel`` (class or instance attribute) or the
``LOWBIT_KERNEL`` environment variable, else the supported kernel of highest priority.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch

from ...errors import LowbitError
from ...registry import Registry

if TYPE_CHECKING:
    from ..qlinear import QuantLinear

__all__ = ["KERNELS", "REFERENCE", "Kernel", "register", "select"]

#: The name of the reference kernel (``QuantLinear.kernel = REFERENCE`` forces it).
REFERENCE = "torch"
#: Environment variable naming a kernel to force when a layer does not name one.
ENV = "LOWBIT_KERNEL"


class Kernel:
    """Base class of a QuantLinear matmul kernel (see the module doc); registered as instances."""

    name: ClassVar[str] = ""
    #: Among the kernels that support a layer, the highest priority runs (the reference has 0).
    priority: ClassVar[int] = 0

    def supports(self, layer: QuantLinear, device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Whether this kernel computes ``layer`` for an input of ``shape`` and ``dtype`` on ``device``."""
        raise NotImplementedError

    def forward(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` of ``layer`` (with its input activations quantized if it says so)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<kernel {self.name}>"


KERNELS: Registry[Kernel] = Registry("kernel", "lowbit.runtime.kernels")

K = TypeVar("K", bound=type[Kernel])


def register(cls: K) -> K:
    """Class decorator: add one instance of a :class:`Kernel` subclass to :data:`KERNELS`."""
    return KERNELS.register_instance(cls)


_ORDER: list[Kernel] = []


def _by_priority() -> list[Kernel]:
    """The registered kernels, highest priority first (re-sorted when one is added)."""
    names = KERNELS.names()
    if len(_ORDER) != len(names):
        _ORDER[:] = sorted((k for _, k in KERNELS.items()), key=lambda k: -k.priority)
    return _ORDER


def select(layer: QuantLinear, x: torch.Tensor) -> Kernel:
    """The kernel that runs ``layer`` on ``x``: the forced one, or the best one that supports it."""
    forced = getattr(layer, "kernel", None) or os.environ.get(ENV) or None
    if forced:
        kernel = KERNELS.get(forced, where=ENV if not getattr(layer, "kernel", None) else None)
        if not kernel.supports(layer, x.device, tuple(x.shape), x.dtype):
            raise LowbitError(None, f"kernel {kernel.name!r} cannot run {layer.describe()} on "
                              f"{x.device.type} for input {tuple(x.shape)} {x.dtype}; "
                              f"kernel {REFERENCE!r} runs every layer")
        return kernel
    for kernel in _by_priority():
        if kernel.supports(layer, x.device, tuple(x.shape), x.dtype):
            return kernel
    raise LowbitError(None, f"no kernel runs {layer.describe()} on {x.device.type}")  # the reference always does
