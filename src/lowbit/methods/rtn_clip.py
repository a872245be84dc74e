"""RTN with a fixed clipping ratio: every group's range shrunk by the same factor before rounding.

A cheap alternative to the MSE clipping search (``--mse-clip``): ``clip_ratio`` (default 0.9)
scales each group's min/max, trading the clipping error of the largest weights for a finer
grid for the rest. Added as one file to show what a new method takes (ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.core import compute_qparams, quantize
from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError

from ._common import Rules
from .registry import Method, register_method
from .rtn import RTNHandler


@dataclass
class ClipRTNHandler(RTNHandler):
    clip_ratio: float = 0.9

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "method": "rtn-clip", "clip_ratio": self.clip_ratio}

    def round(self, w: torch.Tensor, scheme: QuantScheme, global_amax: torch.Tensor | None = None) -> QuantizedWeight:
        # global_amax (NVFP4's shared global scale) does not apply: this method writes integer grids only
        w = w.detach().float()
        scale, zero = compute_qparams(w, scheme, self.clip_ratio)
        return QuantizedWeight(quantize(w, scale, zero, scheme), scale, zero, scheme)


@register_method
class ClipRTN(Method):
    """round-to-nearest after shrinking every group's range by a fixed ratio (clip_ratio, default 0.9)"""

    name = "rtn-clip"
    options = ("clip_ratio",)

    def handler(self, scheme: QuantScheme, rules: Rules, act_order: bool | str | None = None,
                clip_ratio: float = 0.9, **options: Any) -> ClipRTNHandler:
        if act_order not in (None, False, "off"):
            raise LowbitError("rtn-clip", "act_order applies to GPTQ only")
        if not 0.0 < clip_ratio <= 1.0:
            raise LowbitError("rtn-clip", f"clip_ratio must be in (0, 1], got {clip_ratio}")
        return ClipRTNHandler(scheme, rules=rules, clip_ratio=clip_ratio, **options)
