"""Round-to-nearest: the uncalibrated baseline (optionally with an MSE search of each group's range)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.core import quantize_weight
from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.models.adapters import get_weight, set_weight
from lowbit.models.layers import LayerContext, LayerResult, full_weight_name

from ._common import Rules, keeps_float, rules_fingerprint, scheme_lookup
from .registry import Method, register_method


def rtn(weight: torch.Tensor, scheme: QuantScheme, mse_clip: bool = False) -> QuantizedWeight:
    """Quantize a 2-D weight to the nearest grid point (optionally with an MSE clipping search)."""
    q, scale, zero = quantize_weight(weight.detach().float(), scheme, mse_clip=mse_clip)
    return QuantizedWeight(q, scale, zero, scheme, None)


@dataclass
class RTNHandler:
    """Round-to-nearest for every linear of the layer (no activations needed)."""

    scheme: QuantScheme
    mse_clip: bool = False
    rules: Rules = None
    propagate: str = "quantized"
    needs_inputs: bool = False

    def fingerprint(self) -> dict[str, Any]:
        return {"method": "rtn", "scheme": self.scheme, "mse_clip": self.mse_clip, "rules": rules_fingerprint(self.rules)}

    def process(self, ctx: LayerContext) -> LayerResult:
        res = LayerResult()
        lookup = scheme_lookup(self.scheme, self.rules)
        for group in ctx.adapter.sequential_for(ctx.layer):
            for name in group:
                w = get_weight(ctx.adapter, ctx.layer, name)
                full = full_weight_name(ctx.adapter, ctx.index, name)
                scheme = lookup(full)
                if keeps_float(scheme, w, full):
                    continue
                assert scheme is not None
                qw = self.round(w, scheme)
                set_weight(ctx.adapter, ctx.layer, name, qw.dequantize(w.dtype))
                res.weights[name] = qw.to("cpu")
        return res

    def quantize_linear(self, name: str, w: torch.Tensor, scheme: QuantScheme, inputs: list[torch.Tensor] | None,
                        masks: list[torch.Tensor | None]) -> QuantizedWeight | None:
        return None if keeps_float(scheme, w, name) else self.round(w, scheme)

    def round(self, w: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
        """One weight onto the grid (subclasses change only this: see ``methods/rtn_clip.py``)."""
        return rtn(w, scheme, self.mse_clip)


@register_method
class RTN(Method):
    """round-to-nearest, no calibration (--mse-clip searches each group's range)"""

    name = "rtn"
    options = ("mse_clip",)

    def handler(self, scheme: QuantScheme, rules: Rules, act_order: bool | str | None = None,
                **options: Any) -> RTNHandler:
        if act_order not in (None, False, "off"):
            raise LowbitError("rtn", "act_order applies to GPTQ only")
        return RTNHandler(scheme, rules=rules, **options)
