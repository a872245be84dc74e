"""torch's tinygemm int4 kernel (``torch._weight_int4pack_mm``) for decode on CUDA.

Measured on an H100 (bench/bench_w4a16_kernels.py, CUDA graphs, weights from HBM, Llama-3-8B
shapes, 4-bit groups of 128): 2.3x faster than bf16 cuBLAS at 1 token, 0.6-0.8x at 16, where
lowbit's Triton tile kernel is at 0.4-0.5x throughout; so it runs 4-bit layers for up to
:data:`MAX_TOKENS` tokens and ``triton-wna16`` the rest.

Its operands, made once per layer and kept on it (the packed codes are a second 4-bit copy of
the weight): the codes as ``uint8`` pairs (even column in the high nibble) converted by
``torch._convert_weight_to_int4pack``, and ``[K/g, N, 2]`` bf16 ``(scale, zero)`` under its rule
``w = (q - 8) * scale + zero``; lowbit's ``w = (q - z) * s`` gives ``zero = (8 - z) * s``. The
scale and zero are rounded to bf16, so outputs differ from the float32 reference by about one
bf16 step of the weights (tests bound it).

Runs 4-bit packed layers with the default contiguous groups of 32, 64, 128 or 256 (or one group
per row of at most 256 columns), ``K`` a multiple of 128 and ``N`` of 8, bf16 inputs of at most
:data:`MAX_TOKENS` tokens, no input quantization. Registered as ``torch-int4pack``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import Kernel, register

if TYPE_CHECKING:
    from ..qlinear import QuantLinear

MAX_TOKENS = 16
INNER_K_TILES = 8
GROUPS = (32, 64, 128, 256)


def operands(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, ``[K/g, N, 2]`` bf16 scale and zero) of ``layer`` for tinygemm, made once and cached."""
    cached = getattr(layer, "_int4pack", None)
    if cached is not None and cached[0].device == layer.qweight.device:
        return cached
    assert layer.zeros is not None
    codes = layer.codes().to(torch.int32)
    pairs = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()
    packed = torch._convert_weight_to_int4pack(pairs, INNER_K_TILES)
    s = layer.scales.float()
    sz = torch.stack([s, (8 - layer.zeros.float()) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    layer._int4pack = (packed, sz)
    return packed, sz


@register
class TorchInt4Pack(Kernel):
    """torch._weight_int4pack_mm (tinygemm) on CUDA: 4-bit groups, bf16, 1-16 tokens"""

    name = "torch-int4pack"
    priority = 20

    def supports(self, layer: QuantLinear, device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        if not (device.type == "cuda" and dtype == torch.bfloat16 and layer.packed and layer.scheme.bits == 4
                and layer.input_scheme is None and layer.global_scale is None and not layer.cache_weight
                and layer._cached is None and hasattr(torch, "_weight_int4pack_mm")):
            return False
        m = 1
        for d in shape[:-1]:
            m *= d
        k, n = layer.in_features, layer.out_features
        group = k // layer.scales.shape[1]
        return (m <= MAX_TOKENS and k % (INNER_K_TILES * 16) == 0 and n % 8 == 0 and group in GROUPS
                and layer.default_groups())

    def forward(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        packed, sz = operands(layer)
        k = layer.in_features
        y = torch._weight_int4pack_mm(x.reshape(-1, k).contiguous(), packed, k // layer.scales.shape[1], sz)
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], layer.out_features)
