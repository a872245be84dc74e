"""FP8 W8A8 on CUDA through ``torch._scaled_mm``: E4M3 weights times E4M3 activations, float32 accumulate.

Runs a :class:`~lowbit.runtime.qlinear.QuantLinear` whose weight is FP8 E4M3 with one scale per
tensor or per output channel (``FP8``, ``FP8_DYNAMIC``) and whose input activations are E4M3 with
one scale per token (dynamic) or per tensor (dynamic, or static with the layer's ``input_scale``).
The input is rounded by :func:`~lowbit.runtime.activations.quantize_rows` to exactly the codes and
scales the reference's :func:`~lowbit.runtime.activations.fake_quantize_input` gives; the GEMM
multiplies the codes exactly and applies both scales to the float32 sums, so the only difference
from the reference (which rounds the scaled input and weight to the model dtype before its matmul)
is the order of rounding. Needs compute capability 8.9 or more (Ada, Hopper); other layers, shapes
(``K``, ``N`` not multiples of 16) and devices go to the next kernel, in the end the reference.
Per-group activations (``FP8_BLOCK``) and block weights are the reference's.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from ..activations import rows_quantizable
from . import Kernel, register
from ._rows_triton import quantize_rows_fast, scale_rows
from ._w8a8 import DTYPES, rows, scaled_mm_accepts, weight_cache

if TYPE_CHECKING:
    from ..qlinear import QuantLinear

__all__ = ["ROWWISE", "ScaledMMFP8", "fp8_layer", "scaled_mm_fp8"]

#: Per-token / per-channel scales through ``torch._scaled_mm``'s row-wise scaling (True), or unit
#: tensor-wise scales with float32 output and :func:`._rows_triton.scale_rows` after it (False; the bench
#: times both: which is faster depends on the shape and on torch's kernels).
ROWWISE = True
_ONE: dict[torch.device, torch.Tensor] = {}


@functools.cache
def _fp8_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def fp8_layer(layer: QuantLinear) -> bool:
    """Whether ``layer`` is an FP8 E4M3 x E4M3 linear of the kind this kernel runs (any device, any shape)."""
    s, a = layer.scheme, layer.input_scheme
    return (
        a is not None and a.type == "float" and rows_quantizable(a)
        and s.type == "float" and s.float_format == "e4m3" and s.granularity in ("tensor", "channel")
        and not layer.packed and layer.qweight.dtype == torch.float8_e4m3fn
        and layer.global_scale is None and layer.codebook is None
        and layer.scales.numel() in (1, layer.out_features)
    )


def _weight(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``[K, N]`` column-major E4M3 weight (a view of the row-major codes) and its float32 scales."""
    w = layer.qweight if layer.qweight.is_contiguous() else layer.qweight.contiguous()
    s = layer.scales.float()
    s = s.reshape(()) if s.numel() == 1 else s.reshape(1, layer.out_features).contiguous()
    return w.t(), s


def scaled_mm_fp8(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + bias`` of an FP8 layer through ``torch._scaled_mm`` (also runs on the CPU, for tests)."""
    assert layer.input_scheme is not None
    k, n = layer.in_features, layer.out_features
    codes, sa = quantize_rows_fast(x.reshape(-1, k), layer.input_scheme, layer.input_scale)
    wt, sb = weight_cache(layer, _weight)
    if sa.numel() == 1 and sb.numel() == 1:  # per tensor both: cuBLASLt's tensor-wise scaling
        sa = sa.reshape(())
    else:  # row-wise scaling wants [M, 1] and [1, N] float32, both
        sa = sa.expand(codes.shape[0], 1).contiguous()
        if sb.numel() == 1:
            sb = sb.reshape(1, 1).expand(1, n).contiguous()
        if not ROWWISE:  # unit tensor-wise scales, float32 sums, then one scaling launch
            one = _ONE.get(x.device) or _ONE.setdefault(x.device, torch.ones((), device=x.device))
            acc = torch._scaled_mm(codes, wt, scale_a=one, scale_b=one, out_dtype=torch.float32)
            return scale_rows(acc, sa, sb, layer.bias, codes.shape[0], x.dtype).reshape(*x.shape[:-1], n)
    y = torch._scaled_mm(codes, wt, scale_a=sa, scale_b=sb, out_dtype=x.dtype)
    if layer.bias is not None:
        y = y + layer.bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


@register
class ScaledMMFP8(Kernel):
    """torch._scaled_mm on CUDA (sm89+): FP8 E4M3 weights per tensor/channel, E4M3 inputs per token/tensor"""

    name = "scaled-mm-fp8"
    priority = 20

    def supports(self, layer: QuantLinear, device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        return (
            device.type == "cuda"
            and dtype in DTYPES
            and rows(shape) > 0
            and fp8_layer(layer)
            and scaled_mm_accepts(layer.in_features, layer.out_features)
            and _fp8_capable(device.index if device.index is not None else torch.cuda.current_device())
        )

    def forward(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        return scaled_mm_fp8(layer, x)
