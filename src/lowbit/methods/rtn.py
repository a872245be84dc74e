"""Round-to-nearest: the uncalibrated baseline producer of :class:`QuantizedWeight`."""

from __future__ import annotations

import torch

from lowbit.core import quantize_weight
from lowbit.core.scheme import QuantScheme

from .base import QuantizedWeight


def rtn(weight: torch.Tensor, scheme: QuantScheme, mse_clip: bool = False) -> QuantizedWeight:
    """Quantize a 2-D weight to the nearest grid point (optionally with an MSE clipping search)."""
    q, scale, zero = quantize_weight(weight.detach().float(), scheme, mse_clip=mse_clip)
    return QuantizedWeight(q, scale, zero, scheme, None)
