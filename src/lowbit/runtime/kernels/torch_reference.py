"""The reference kernel: dequantize the weight in float32, quantize the input if asked, ``F.linear``.

Runs every :class:`~lowbit.runtime.qlinear.QuantLinear` on every device; its weight is exactly
:meth:`QuantizedWeight.dequantize <lowbit.core.quantized.QuantizedWeight.dequantize>` cast to the
input's dtype, and its input activations go through
:func:`~lowbit.runtime.activations.fake_quantize_input` when the layer has an ``input_scheme``.
Every other kernel is tested against it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..activations import fake_quantize_input
from . import REFERENCE, Kernel, register

if TYPE_CHECKING:
    from ..qlinear import QuantLinear


@register
class TorchReference(Kernel):
    """dequantize-then-matmul in torch: any device, any scheme (the oracle)"""

    name = REFERENCE
    priority = 0

    def supports(self, layer: QuantLinear, device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        return True

    def forward(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        if layer.input_scheme is not None:
            x = fake_quantize_input(x, layer.input_scheme, layer.input_scale)
        w = layer.dequantized_weight(x.dtype)
        b = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, w, b)
