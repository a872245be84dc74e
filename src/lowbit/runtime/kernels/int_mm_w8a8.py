"""INT8 W8A8 on CUDA through ``torch._int_mm``: int8 weights times int8 activations, int32 accumulate.

Runs a :class:`~lowbit.runtime.qlinear.QuantLinear` whose weight is symmetric int8 with one scale
per output channel (``W8A8``; per-tensor integer weights are stored per channel) and whose input
activations are symmetric int8 with one scale per token (dynamic) or per tensor (dynamic, or
static with the layer's ``input_scale``). The input is rounded by
:func:`~lowbit.runtime.activations.quantize_rows` to exactly the codes and scales of the
reference's :func:`~lowbit.runtime.activations.fake_quantize_input`; the int32 sums are exact, then
scaled in float32 (``acc * s_token * s_channel``, plus the bias) and cast to the input's dtype (on
CUDA the rounding and this scaling are one Triton launch each, :mod:`._rows_triton`).
The signed int8 weight (codes minus the zero point 128, ``[N, K]`` row-major, given to the GEMM
transposed: column-major) is made once per layer and kept beside its packed codes (as many bytes
again). ``torch._int_mm`` needs more than 16 rows on CUDA: smaller inputs (decoding) are
zero-padded to 32 rows (by the rounding kernel). ``K``, ``N`` not multiples of 8, asymmetric grids and other devices go to
the next kernel, in the end the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..activations import rows_quantizable
from . import Kernel, register
from ._rows_triton import quantize_rows_fast, scale_rows
from ._w8a8 import DTYPES, int_mm_accepts, int_mm_rows, rows, weight_cache

if TYPE_CHECKING:
    from ..qlinear import QuantLinear

__all__ = ["IntMMW8A8", "int8_layer", "int_mm_w8a8"]


def int8_layer(layer: QuantLinear) -> bool:
    """Whether ``layer`` is a symmetric int8 x int8 linear of the kind this kernel runs (any device, any shape)."""
    s, a = layer.scheme, layer.input_scheme
    return (
        a is not None and a.type == "int" and rows_quantizable(a)
        and s.type == "int" and s.bits == 8 and s.symmetric and s.granularity == "channel"
        and layer.packed and layer.zeros is not None and layer.scales.shape == (layer.out_features, 1)
        and layer.global_scale is None
    )


def _weight(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``[K, N]`` column-major signed int8 weight and its float32 ``[1, N]`` scales."""
    assert layer.zeros is not None
    signed = (layer.codes() - layer.zeros.round().to(torch.int32)).to(torch.int8).contiguous()
    return signed.t(), layer.scales.float().reshape(1, layer.out_features).contiguous()


def int_mm_w8a8(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + bias`` of an int8 W8A8 layer through ``torch._int_mm`` (also runs on the CPU, for tests)."""
    assert layer.input_scheme is not None
    k, n = layer.in_features, layer.out_features
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    codes, sa = quantize_rows_fast(x2, layer.input_scheme, layer.input_scale, rows=int_mm_rows(m))
    wt, sb = weight_cache(layer, _weight)
    acc = torch._int_mm(codes, wt)
    return scale_rows(acc, sa, sb, layer.bias, m, x.dtype).reshape(*x.shape[:-1], n)


@register
class IntMMW8A8(Kernel):
    """torch._int_mm on CUDA: symmetric int8 weights per channel, int8 inputs per token/tensor"""

    name = "int-mm-w8a8"
    priority = 20

    def supports(self, layer: QuantLinear, device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        return (
            device.type == "cuda"
            and dtype in DTYPES
            and rows(shape) > 0
            and int8_layer(layer)
            and int_mm_accepts(layer.in_features, layer.out_features)
        )

    def forward(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        return int_mm_w8a8(layer, x)
