"""bitsandbytes' quantizers as a method: NF4 / FP4 in flat blocks (double quantization optional), LLM.int8.

No calibration. The numbers are :mod:`lowbit.core.codebook`'s, byte-identical to bitsandbytes 0.50 on
CPU. Schemes: ``NF4`` / ``FP4`` (codebook, ``flat`` blocks of ``group_size`` = bitsandbytes'
``blocksize``), their ``_DQ`` variants (``scale_format="nested8"``: the absmax vector double
quantized), and 8-bit symmetric per-row integers (``LLM_INT8`` / ``W8A16``: LLM.int8's
``round(w * 127 / absmax)`` on the float16 weight).

A :class:`~lowbit.core.quantized.QuantizedWeight` from here keeps what the checkpoint needs: 4-bit
codes (uint8, one per weight) with ``scale`` = the absmax bitsandbytes dequantizes with (after double
quantization when on) and, for double quantization, ``extra`` = ``absmax_codes`` (uint8),
``nested_absmax`` (float32) and ``nested_offset`` (float32 ``[1]``); int8 codes are shifted to
``[1, 255]`` around the zero point 128 with ``scale = SCB / 127`` and ``extra["SCB"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.core import codebook as cb
from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError

from ._common import Rules
from .registry import Method, register_method
from .rtn import RTNHandler


def bnb_quantize(w: torch.Tensor, scheme: QuantScheme, where: str | None = None) -> QuantizedWeight:
    """One 2-D weight through bitsandbytes' quantizer for ``scheme`` (see the module doc)."""
    why = cb.scheme_issue(scheme)
    if why is not None:
        raise LowbitError(where, why)
    if w.dim() != 2:
        raise LowbitError(where, f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if scheme.type == "int":
        codes, scb = cb.int8_rowwise(w, where)
        scale = cb.int8_scale(scb).unsqueeze(1)
        return QuantizedWeight(codes.to(torch.int32) + 128, scale, torch.full_like(scale, 128.0), scheme,
                               extra={"SCB": scb})
    assert scheme.codebook is not None
    codes, absmax = cb.quantize_4bit(w, scheme.codebook, scheme.group_size, where)
    extra: dict[str, torch.Tensor] = {}
    if scheme.scale_format == "nested8":
        q, nested, offset = cb.double_quantize(absmax)
        absmax = cb.double_dequantize(q, nested, offset)
        extra = {"absmax_codes": q, "nested_absmax": nested, "nested_offset": offset.reshape(1)}
    return QuantizedWeight(codes, absmax, None, scheme, codebook=cb.codebook_values(scheme.codebook), extra=extra)


@dataclass
class BnbHandler(RTNHandler):
    """bitsandbytes' quantizer for every linear of the layer (no activations needed)."""

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "method": "bnb"}

    def round(self, w: torch.Tensor, scheme: QuantScheme, global_amax: torch.Tensor | None = None) -> QuantizedWeight:
        return bnb_quantize(w, scheme)  # bitsandbytes has no global scale


@register_method
class Bnb(Method):
    """bitsandbytes: NF4/FP4 in flat blocks (+ double quantization), LLM.int8 rows; bytes equal bitsandbytes'"""

    name = "bnb"

    def handler(self, scheme: QuantScheme, rules: Rules, act_order: bool | str | None = None,
                **options: Any) -> BnbHandler:
        if act_order not in (None, False, "off"):
            raise LowbitError("bnb", "act_order applies to GPTQ only")
        if options.pop("mse_clip", False):
            raise LowbitError("bnb", "--mse-clip does not apply: bitsandbytes scales by each block's absmax")
        return BnbHandler(scheme, rules=rules, **options)

    def supports(self, scheme: QuantScheme) -> str | None:
        return cb.scheme_issue(scheme)
