"""Lookup-table layers (SqueezeLLM's per-row tables): the weight gathered from the table in the input's dtype.

For a :class:`~lowbit.runtime.qlinear.QuantLinear` holding per-row lookup tables (``codebook``
``[out, 2**bits]``, ``qweight`` the codes ``[out, in]``, optional CSR outliers), on any device
(CPU, CUDA): ``W[o, j] = table[o, code[o, j]]`` is gathered directly in the input's dtype (the
reference dequantizes in float32 first, then casts: the same values), the outliers' float32 sums
written at their places, then one ``F.linear``. Inputs with activation quantization are left to
the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import Kernel, register

if TYPE_CHECKING:
    from ..qlinear import QuantLinear


def lut_weight(layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight ``[out, in]`` in ``dtype``, equal to the reference's float32 weight cast to ``dtype``."""
    assert layer.codebook is not None
    table = layer.codebook.float() * layer.scales.float().reshape(-1, 1)
    codes = layer.qweight.long()
    w = torch.gather(table.to(dtype), 1, codes)
    if layer.sparse_vals is not None and layer.sparse_vals.numel():
        assert layer.sparse_rows is not None and layer.sparse_cols is not None
        crow = layer.sparse_rows.long()
        rows = torch.repeat_interleave(torch.arange(layer.out_features, device=crow.device), crow[1:] - crow[:-1])
        cols = layer.sparse_cols.long()
        exact = table[rows, codes[rows, cols]] + layer.sparse_vals.float()  # float32, as the reference sums
        w[rows, cols] = exact.to(dtype)
    return w


@register
class LUTKernel(Kernel):
    """per-row lookup tables (SqueezeLLM): gather the weight in the input dtype, then matmul; CPU and CUDA"""

    name = "lut"
    priority = 5

    def supports(self, layer: QuantLinear, device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        book = layer.codebook
        return (not layer.packed and layer.scheme.type == "codebook" and book is not None and book.dim() == 2
                and layer.scales.numel() in (1, layer.out_features) and layer.input_scheme is None
                and layer.global_scale is None and dtype.is_floating_point)

    def forward(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        if layer.cache_weight and layer._cached is not None and layer._cached.dtype == x.dtype:
            w = layer._cached
        else:
            w = lut_weight(layer, x.dtype)
            if layer.cache_weight:
                layer._cached = w
        b = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, w, b)
