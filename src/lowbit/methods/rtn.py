"""Round-to-nearest: the uncalibrated baseline (optionally with an MSE search of each group's range).

Float schemes (FP8 E4M3; FP4 E2M1 of NVFP4 / MXFP4) and integer schemes that come with activation
quantization (W8A8) are rounded exactly as llm-compressor rounds them (:mod:`lowbit.core.floatq`:
scales divided in the model's dtype); a static activation scheme (``FP8``) also gets each linear's
``input_scale`` from the calibration inputs (their absolute maximum / 448, in the model's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.core import quantize_weight
from lowbit.core.floatq import half_range, quantize_fp8, quantize_int, symmetric_scale
from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.models.adapters import get_weight, set_weight
from lowbit.models.layers import LayerContext, LayerResult, full_weight_name

from ._common import Rules, keeps_float, rules_fingerprint, scheme_lookup
from .registry import Method, register_method


def rtn(weight: torch.Tensor, scheme: QuantScheme, mse_clip: bool = False,
        dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Quantize a 2-D weight to the nearest grid point (optionally with an MSE clipping search).

    ``dtype`` is the model's float type, in which llm-compressor's rules divide (float schemes,
    integer schemes with activation quantization)."""
    if scheme.type == "float" and scheme.bits == 8:
        return quantize_fp8(weight, scheme, dtype)
    if scheme.type == "int" and scheme.activations is not None and scheme.symmetric and not mse_clip:
        return quantize_int(weight, scheme, dtype)
    q, scale, zero = quantize_weight(weight.detach().float(), scheme, mse_clip=mse_clip)
    return QuantizedWeight(q, scale, zero, scheme, None)


def config_dtype(config: Any) -> torch.dtype:
    """The float type a transformers config declares (``dtype`` / ``torch_dtype``); float32 if none."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d.replace("torch.", ""), None)
    return d if isinstance(d, torch.dtype) and d.is_floating_point else torch.float32


def static_input(scheme: QuantScheme | None) -> bool:
    """Whether ``scheme`` quantizes its layer's inputs with a calibrated (static) scale."""
    return scheme is not None and scheme.activations is not None and scheme.activations.dynamic is False


@dataclass
class RTNHandler:
    """Round-to-nearest for every linear of the layer (no activations needed)."""

    scheme: QuantScheme
    mse_clip: bool = False
    rules: Rules = None
    propagate: str = "quantized"
    needs_inputs: bool = False
    dtype: torch.dtype = torch.float32  # the model's float type (set from each layer's config)

    def __post_init__(self) -> None:
        if static_input(self.scheme):  # input scales from the float model's activations, as llm-compressor takes them
            self.needs_inputs, self.propagate = True, "float"

    def fingerprint(self) -> dict[str, Any]:
        return {"method": "rtn", "scheme": self.scheme, "mse_clip": self.mse_clip, "rules": rules_fingerprint(self.rules)}

    def process(self, ctx: LayerContext) -> LayerResult:
        res = LayerResult()
        self.dtype = config_dtype(ctx.config)
        lookup = scheme_lookup(self.scheme, self.rules)
        input_amax = self._input_amax(ctx, lookup) if self.needs_inputs else {}
        for group in ctx.adapter.sequential_for(ctx.layer):
            for name in group:
                w = get_weight(ctx.adapter, ctx.layer, name)
                full = full_weight_name(ctx.adapter, ctx.index, name)
                scheme = lookup(full)
                if keeps_float(scheme, w, full):
                    continue
                assert scheme is not None
                qw = self.round(w, scheme)
                if name in input_amax:
                    assert scheme.activations is not None
                    amax = input_amax[name].to(self.dtype).reshape(1)
                    qw.extra["input_scale"] = symmetric_scale(amax, half_range(scheme.activations))
                set_weight(ctx.adapter, ctx.layer, name, qw.dequantize(w.dtype))
                res.weights[name] = qw.to("cpu")
        return res

    def _input_amax(self, ctx: LayerContext, lookup: Any) -> dict[str, torch.Tensor]:
        """The absolute maximum of every static-activation linear's inputs over the calibration set."""
        from lowbit.models.statistics import ChannelRange, observe

        names = [n for g in ctx.adapter.sequential_for(ctx.layer) for n in g
                 if static_input(lookup(full_weight_name(ctx.adapter, ctx.index, n)))]
        if not names:
            return {}
        stats = observe(ctx, names, ChannelRange)
        return {n: s.absmax.amax() for n, s in stats.items() if isinstance(s, ChannelRange)}

    def quantize_linear(self, name: str, w: torch.Tensor, scheme: QuantScheme, inputs: list[torch.Tensor] | None,
                        masks: list[torch.Tensor | None]) -> QuantizedWeight | None:
        return None if keeps_float(scheme, w, name) else self.round(w, scheme)

    def round(self, w: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
        """One weight onto the grid (subclasses change only this: see ``methods/rtn_clip.py``)."""
        return rtn(w, scheme, self.mse_clip, self.dtype)


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

    def supports(self, scheme: QuantScheme) -> str | None:
        if scheme.type == "float":
            if scheme.bits == 8 and scheme.granularity in ("tensor", "channel", "block"):
                return None
            return f"rtn rounds FP8 weights per tensor, per channel or in blocks, not {scheme.describe()}"
        return super().supports(scheme)
