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
from lowbit.core.fp4 import nvfp4_global_scale, quantize_mxfp4, quantize_nvfp4
from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.models.adapters import get_weight, set_weight
from lowbit.models.layers import LayerContext, LayerResult, full_weight_name

from ._common import Rules, keeps_float, layer_weights, rules_fingerprint, scheme_lookup
from .registry import Method, register_method

#: Linears that vLLM fuses into one (q/k/v, gate/up...), so share one NVFP4 global scale (llm-compressor's list).
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"), ("w1", "w3"))


def rtn(weight: torch.Tensor, scheme: QuantScheme, mse_clip: bool = False,
        dtype: torch.dtype = torch.float32, global_amax: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize a 2-D weight to the nearest grid point (optionally with an MSE clipping search).

    ``dtype`` is the model's float type, in which llm-compressor's rules divide (float schemes,
    integer schemes with activation quantization); ``global_amax`` the absolute maximum an NVFP4
    global scale comes from (the fused group's), default the weight's own."""
    if scheme.type == "float" and scheme.bits == 8:
        return quantize_fp8(weight, scheme, dtype)
    if scheme.type == "float" and scheme.scale_format == "e4m3":
        return quantize_nvfp4(weight, scheme, dtype, global_amax)
    if scheme.type == "float" and scheme.scale_format == "e8m0":
        return quantize_mxfp4(weight, scheme, dtype)
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
    """Whether ``scheme`` quantizes its layer's inputs with a calibrated (static) scale: a per-tensor
    scale (``FP8``), or NVFP4's global scale over dynamic local scales."""
    return scheme is not None and scheme.activations is not None and scheme.activations.dynamic is not True


def nvfp4(scheme: QuantScheme | None) -> bool:
    return scheme is not None and scheme.type == "float" and scheme.scale_format == "e4m3"


def fused_amax(ctx: LayerContext, lookup: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The absolute maximum over each NVFP4 linear's fused group (:data:`FUSED`), by linear name."""
    names = [n for g in ctx.adapter.sequential_for(ctx.layer) for n in g]
    out: dict[str, torch.Tensor] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        for group in FUSED:
            members = [f"{parent}.{m}" if parent else m for m in group]
            if leaf in group and all(m in names and nvfp4(lookup(full_weight_name(ctx.adapter, ctx.index, m)))
                                     for m in members):
                out[name] = torch.stack([get_weight(ctx.adapter, ctx.layer, m).to(dtype).abs().amax()
                                         for m in members]).amax()
    return out


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
        group_amax = fused_amax(ctx, lookup, self.dtype)
        for name, w, _, scheme in layer_weights(ctx, lookup):
            qw = self.round(w, scheme) if name not in group_amax else self.round(w, scheme, group_amax[name])
            if name in input_amax:
                assert scheme.activations is not None
                amax = input_amax[name].to(self.dtype).reshape(1)
                if nvfp4(scheme.activations):
                    qw.extra["input_global_scale"] = nvfp4_global_scale(amax)
                else:
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

    def round(self, w: torch.Tensor, scheme: QuantScheme, global_amax: torch.Tensor | None = None) -> QuantizedWeight:
        """One weight onto the grid (subclasses change only this: see ``methods/rtn_clip.py``)."""
        return rtn(w, scheme, self.mse_clip, self.dtype, global_amax)


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
            if scheme.bits == 4 and scheme.granularity == "group" and scheme.scale_format in ("e4m3", "e8m0"):
                return None
            return (f"rtn rounds FP8 weights per tensor, per channel or in blocks, and FP4 in groups with E4M3 "
                    f"(NVFP4) or E8M0 (MXFP4) scales, not {scheme.describe()}")
        return super().supports(scheme)
