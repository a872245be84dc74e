"""HQQ: half-quadratic quantization, no calibration (the solver is :mod:`lowbit.core.hqq`).

Each linear's groups get hqq's min/max inverse scale and a zero point fitted by the proximal
solver (lp shrinkage p = 0.7, beta = 10, at most 20 iterations, early stop); codes, scales and
zero points equal the hqq library's (0.2.8, CPU, float32). The grid is asymmetric with a *float*
zero point: the ``hqq`` and ``lowbit`` formats store it as it is. Formats whose zero points are
integers (compressed-tensors, GPTQ, AWQ) get HQQ's scale with the fitted zero point rounded to
the integer grid and the codes rounded again on that grid (``integer_zero``; chosen from the
format the pipeline writes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.core.hqq import ITERS, solve
from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError

from ._common import Rules
from .registry import Method, register_method
from .rtn import RTNHandler

#: Formats that store HQQ's float zero points as they are (the others get integer zero points).
FLOAT_ZERO_FORMATS = ("hqq", "lowbit")


def hqq(w: torch.Tensor, scheme: QuantScheme, integer_zero: bool = False, where: str | None = None,
        **solver: Any) -> QuantizedWeight:
    """HQQ-quantize a 2-D weight with an asymmetric grouped (or per-channel) integer ``scheme``."""
    if scheme.type != "int" or scheme.symmetric:
        raise LowbitError(where, f"hqq produces asymmetric integer grids, not {scheme.describe()}")
    group = w.shape[1] if scheme.granularity == "channel" else scheme.group_size
    if scheme.granularity not in ("group", "channel"):
        raise LowbitError(where, f"hqq quantizes in groups or per channel, not {scheme.granularity}")
    r = solve(w, scheme.bits, group, where=where, **solver)
    codes, zero = r.codes, r.zero
    if integer_zero:
        zero = torch.round(zero).clamp_(0, scheme.qmax)
        inv = 1.0 / r.scale
        g = w.detach().float().reshape(-1, group)
        codes = torch.round(g * inv.reshape(-1, 1) + zero.reshape(-1, 1)).clamp_(0, scheme.qmax)
        codes = codes.to(torch.uint8).reshape(w.shape)
    return QuantizedWeight(codes.to(torch.int32), r.scale, zero, scheme, None)


@dataclass
class HQQHandler(RTNHandler):
    """HQQ for every linear of the layer (no activations needed)."""

    integer_zero: bool = False
    iters: int = ITERS

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "method": "hqq", "integer_zero": self.integer_zero, "iters": self.iters}

    def round(self, w: torch.Tensor, scheme: QuantScheme, global_amax: torch.Tensor | None = None) -> QuantizedWeight:
        return hqq(w, scheme, self.integer_zero, iters=self.iters)  # no global scale: HQQ grids are per group


@register_method
class HQQ(Method):
    """HQQ: half-quadratic zero-point fitting, no calibration (asymmetric; equal to the hqq library)"""

    name = "hqq"
    options = ("iters", "integer_zero")
    #: the grid it always produces (the CLI's default when neither --sym nor --asym is given)
    symmetric = False
    #: the pipeline passes the output format (``format=``): integer zero points unless it holds floats
    wants_format = True

    def supports(self, scheme: QuantScheme) -> str | None:
        why = super().supports(scheme)
        if why is None and scheme.granularity == "tensor":
            why = "hqq quantizes in groups or per channel, not per tensor"
        if why is None and scheme.symmetric:
            why = "hqq fits a zero point per group: it produces asymmetric grids (--asym, symmetric=False)"
        if why is None and scheme.dynamic:
            why = "weights are quantized once (static); a dynamic scheme applies to activations only"
        return why

    def handler(self, scheme: QuantScheme, rules: Rules, act_order: bool | str | None = None,
                **options: Any) -> HQQHandler:
        if act_order not in (None, False, "off"):
            raise LowbitError("hqq", "act_order applies to GPTQ only")
        fmt = options.pop("format", None)
        if fmt is not None and "integer_zero" not in options:
            options["integer_zero"] = fmt not in FLOAT_ZERO_FORMATS
        unknown = set(options) - set(self.options)
        if unknown:
            raise LowbitError("hqq", f"unknown option(s) {', '.join(sorted(unknown))} (choose from {', '.join(self.options)})")
        return HQQHandler(scheme, rules=rules, **options)

