"""AWQ checkpoints in AutoAWQ's GEMM layout, read by vLLM (``awq`` / ``awq_marlin``) and transformers.

Layout of one quantized linear ``<m>`` (weight ``[out, in]``, 4-bit, ``G = in / group_size``):

* ``<m>.qweight`` int32 ``[in, out / 8]``: row ``i`` packs the codes of input column ``i``
  along the output dimension, eight per word; nibble ``k`` (bits ``4k..4k+3``) of word ``c``
  holds output channel ``8c + ORDER[k]`` with ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``.
* ``<m>.qzeros``  int32 ``[G, out / 8]``: the integer zero points, same interleaved packing
  (no offset).
* ``<m>.scales``  float16 ``[G, out]``.

``config.json`` gains ``quantization_config = {quant_method: awq, bits: 4, group_size,
zero_point: true, version: gemm, modules_to_not_convert}``; the last lists float linear
layers (vLLM skips a layer when one of these names is a substring of its name), plus vLLM's
fused name (``...gate_up_proj``, ``...qkv_proj``) when all its parts stay float.

Rules: asymmetric (``zero_point: true``) 4-bit with groups, no act-order, ``out % 8 == 0``,
``lm_head`` not quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..core.packing import pack, unpack
from ..core.quantized import QuantizedWeight
from ..core.scheme import QuantScheme
from ..errors import LowbitError
from ._common import (
    check_weight,
    decoding,
    fused_aliases,
    marlin_shape_issues,
    module_of,
    trivial_g_idx,
    warn_issues,
    zero_points,
)
from .base import Format, register

#: Output channel stored in nibble k of a packed word.
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: Nibble that holds output channel j (the inverse permutation of ORDER).
REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
BITS = 4


def validate(name: str, qw: QuantizedWeight) -> None:
    """Raise :class:`LowbitError` when ``qw`` cannot be stored as AWQ GEMM."""
    why = AWQ().holds_tensor(name, qw.scheme, tuple(qw.codes.shape))
    if why is not None:
        raise LowbitError(name, why)
    check_weight(name, qw)
    if not trivial_g_idx(qw):
        raise LowbitError(name, "AWQ has no act-order (g_idx); use the gptq format")


def _interleave(x: torch.Tensor) -> torch.Tensor:
    """``[rows, out]`` -> same shape with each block of 8 columns reordered by ORDER."""
    rows, out_f = x.shape
    return x.reshape(rows, out_f // 8, 8)[:, :, list(ORDER)].reshape(rows, out_f)


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    rows, out_f = x.shape
    return x.reshape(rows, out_f // 8, 8)[:, :, list(REVERSE_ORDER)].reshape(rows, out_f)


def encode_weight(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` of one module (local names)."""
    codes = qw.codes.detach().cpu().t().contiguous()  # [in, out]
    zeros = zero_points(qw).detach().cpu().round().to(torch.int32).t().contiguous()  # [G, out]
    return {
        "qweight": pack(_interleave(codes), BITS, dim=1, dtype=torch.int32).contiguous(),
        "qzeros": pack(_interleave(zeros), BITS, dim=1, dtype=torch.int32).contiguous(),
        "scales": qw.scale.detach().cpu().t().to(torch.float16).contiguous(),
    }


class Encoder:
    """AWQ tensors one module at a time (:meth:`add`), then ``quantization_config`` (:meth:`config`)."""

    def __init__(self, linears: list[str]) -> None:
        self.linears = linears
        self.group_sizes: set[int] = set()
        self.quantized: set[str] = set()
        self.marlin_issues: list[str] = []

    def add(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """Validate and encode one weight: its tensors under full names (``<module>.qweight`` ...)."""
        validate(name, qw)
        module = module_of(name)
        self.group_sizes.add(qw.scheme.group_size)
        self.quantized.add(module)
        self.marlin_issues += marlin_issues({name: qw})
        return {f"{module}.{k}": v for k, v in encode_weight(qw).items()}

    def config(self) -> dict[str, Any]:
        """The ``quantization_config`` dict; warns when vLLM's Marlin kernel won't apply."""
        if len(self.group_sizes) != 1:
            raise LowbitError(None, f"AWQ has one group size per checkpoint; got {sorted(self.group_sizes)}")
        warn_issues(self.marlin_issues, MARLIN_WARNING)
        skipped = {m for m in self.linears if m not in self.quantized and m != "lm_head"}
        return {
            "bits": BITS,
            "group_size": next(iter(self.group_sizes)),
            "modules_to_not_convert": sorted(skipped | set(fused_aliases(skipped, self.linears))) or None,
            "quant_method": "awq",
            "version": "gemm",
            "zero_point": True,
        }


def decode(
    get: Callable[[str], torch.Tensor], names: list[str], config: Mapping[str, Any]
) -> tuple[dict[str, QuantizedWeight], set[str]]:
    """Quantized weights keyed ``<module>.weight``, and the tensor names they consumed."""
    qconfig = config.get("quantization_config") or {}
    version = str(qconfig.get("version", "gemm")).lower()
    if version != "gemm":
        raise LowbitError("config.json", f"AWQ version {version!r} is not supported (only gemm)")
    try:
        bits = int(qconfig.get("bits", qconfig.get("w_bit", BITS)))
        group_size = int(qconfig.get("group_size", qconfig.get("q_group_size", 128)))
    except (TypeError, ValueError) as exc:
        raise LowbitError("config.json", f"AWQ quantization_config: bad bits or group_size ({exc})") from None
    if bits != BITS:
        raise LowbitError("config.json", f"AWQ with {bits} bits is not supported (only 4)")
    if group_size <= 0:
        raise LowbitError("config.json", f"AWQ group_size {group_size} is not supported (needs groups, > 0)")
    zero_point = bool(qconfig.get("zero_point", True))
    out: dict[str, QuantizedWeight] = {}
    used: set[str] = set()
    for qname in sorted(n for n in names if n.endswith(".qweight")):
        module = qname[: -len(".qweight")]
        zname = f"{module}.qzeros"
        with decoding(module):
            qweight = get(qname)
            if qweight.dim() != 2:
                raise LowbitError(qname, f"shape {tuple(qweight.shape)}, expected [in, out / 8]")
            in_f, out_f = qweight.shape[0], qweight.shape[1] * 8
            codes = _deinterleave(unpack(qweight, BITS, out_f, dim=1)).t().contiguous()
            scales = get(f"{module}.scales").float()
            if scales.dim() != 2 or scales.shape[1] != out_f:
                raise LowbitError(f"{module}.scales", f"shape {tuple(scales.shape)}, expected [groups, {out_f}]")
            if scales.shape[0] * group_size != in_f:
                raise LowbitError(module, f"scales have {scales.shape[0]} groups, expected {in_f} / {group_size}")
            if zero_point:
                qzeros = get(zname)
                if tuple(qzeros.shape) != (scales.shape[0], out_f // 8):
                    raise LowbitError(zname, f"shape {tuple(qzeros.shape)}, expected {(scales.shape[0], out_f // 8)}")
                zero = _deinterleave(unpack(qzeros, BITS, out_f, dim=1)).float()
            else:
                zero = torch.full_like(scales, float(1 << (BITS - 1)))
            scheme = QuantScheme(BITS, group_size, not zero_point)
            qw = QuantizedWeight(codes, scales.t().contiguous(), zero.t().contiguous(), scheme, None)
        out[f"{module}.weight"] = qw
        used.update({qname, zname, f"{module}.scales"})
    return out, used


@register
class AWQ(Format):
    """AutoAWQ GEMM layout (vLLM awq / awq_marlin, transformers): asymmetric 4-bit groups"""

    name = "awq"
    quant_method = "awq"
    rank = 20

    def holds(self, scheme: QuantScheme) -> str | None:
        what = "awq holds asymmetric 4-bit groups only (grouped quantization with zero points)"
        if scheme.type != "int":
            return f"{what}, not {scheme.describe()} weights"
        if scheme.bits != BITS:
            return f"{what}: AWQ GEMM stores 4-bit weights, not {scheme.bits}-bit"
        if scheme.symmetric:
            return f"{what}: this scheme is symmetric; use gptq or compressed-tensors for symmetric weights"
        if scheme.granularity != "group":
            return f"{what}: needs group_size > 0, not {scheme.granularity}"
        if scheme.dynamic:
            return "weights are quantized once (static); a dynamic scheme applies to activations only"
        if scheme.scale_format in ("e4m3", "e8m0"):
            return f"awq stores float16 scales, not {scheme.scale_format}"
        return None

    def holds_tensor(self, name: str, scheme: QuantScheme, shape: tuple[int, ...] | None = None) -> str | None:
        why = super().holds_tensor(name, scheme, shape)
        if why is None and shape is not None and len(shape) == 2 and shape[0] % 8:
            why = f"AWQ packs 8 output channels per int32: out={shape[0]} is not a multiple of 8"
        if why is None and name.endswith(".weight") and module_of(name) == "lm_head":
            why = "AWQ checkpoints keep lm_head in float"
        return why

    def plan_issue(self, plan: Mapping[str, QuantScheme]) -> str | None:
        sizes = sorted({s.group_size for s in plan.values() if s.granularity == "group"})
        if len(sizes) > 1:
            return f"AWQ has one group size per checkpoint; the plan has {', '.join(map(str, sizes))}"
        return None

    def encoder(self, config: Mapping[str, Any], linears: list[str], dtype: torch.dtype) -> Encoder:
        return Encoder(linears)

    def decode(
        self, get: Callable[[str], torch.Tensor], names: list[str], config: Mapping[str, Any]
    ) -> tuple[dict[str, QuantizedWeight], set[str]]:
        return decode(get, names, config)


def marlin_issues(weights: Mapping[str, QuantizedWeight]) -> list[str]:
    """Why vLLM's ``awq_marlin`` kernel would not take these weights (empty list: it qualifies).

    Rules (vLLM ``awq_marlin.py`` / ``marlin_utils.py``): 4-bit with zero points, group size
    in -1/32/64/128, and per layer ``out % 64 == 0``, ``in % 128 == 0``, group dividing ``in``.
    """
    issues = []
    for name in sorted(weights):
        why = marlin_shape_issues(weights[name])
        if why:
            issues.append(f"{module_of(name)}: {', '.join(why)}")
    return issues


MARLIN_WARNING = ("AWQ checkpoint does not qualify for vLLM's fast awq_marlin kernel; vLLM falls back to the "
                  "slower awq kernel")
