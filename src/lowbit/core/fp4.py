"""FP4 (E2M1) numerics, once for every writer: GGUF's MXFP4 / NVFP4 blocks and compressed-tensors'
NVFP4 / MXFP4 checkpoints.

E2M1 has 16 codes: bit 3 the sign, bits 0-2 the magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6``
(:data:`~lowbit.core.quantized.E2M1_VALUES`; llama.cpp holds them doubled as integers,
:data:`KVALUES_FP4`). Scales are E8M0 (a power of two: a biased exponent byte) for MXFP4 and
E4M3 for NVFP4. The two families round differently, and both are kept exactly:

* llama.cpp (:func:`best_index`, :func:`fp32_to_ue4m3`, :func:`e8m0_half`): the code whose scaled
  value is nearest, the first of equals; E8M0 exponent ``floor(log2(amax)) - 2``;
* compressed-tensors (:func:`round_e2m1`, :func:`mx_exponent`, :func:`quantize_nvfp4`,
  :func:`quantize_mxfp4`): ``w / scale`` rounded to the nearest value, ties to the even mantissa;
  MXFP4 exponents from ``amax`` rounded up to the next power of two when its mantissa is at least
  0.75; NVFP4 scales ``E4M3(group_amax / 6 * global)`` under ``global = 448 * 6 / tensor_amax``,
  both in the model's dtype as llm-compressor 0.14 computes them.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

from .floatq import check_finite
from .quantized import QuantizedWeight
from .scheme import QuantScheme

#: llama.cpp's ``kvalues_mxfp4``: the E2M1 values doubled, indexed by code.
KVALUES_FP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
E2M1_MAX = 6.0
E4M3_MAX = 448.0


# --- llama.cpp's conventions (GGUF) ----------------------------------------------------------------


def best_index(x: torch.Tensor, d: torch.Tensor, kvalues: torch.Tensor) -> torch.Tensor:
    """First code minimizing ``|kvalues[i] * d - x|`` (x ``[..., n]``, d ``[..., 1]``) -> int64."""
    err = (kvalues * d.unsqueeze(-1) - x.unsqueeze(-1)).abs()
    return err.argmin(dim=-1)


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """llama.cpp ``GGML_E8M0_TO_FP32_HALF``: 2**(e - 128) as float32 bits (subnormal for e < 2)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.full_like(e, 0x00200000) << e.clamp(max=1), (e - 1) << 23)
    return bits.view(torch.float32)


def fp32_to_ue4m3(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp ``ggml_fp32_to_ue4m3`` (round half up on the mantissa, saturating at 0x7E) -> int32."""
    pos = x > 0
    x = torch.where(pos, x, torch.zeros_like(x)).clamp(max=448.0)
    bits = x.view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127 + 7
    man = (bits >> 20) & 7
    sub = torch.trunc(x * 512.0 + 0.5).to(torch.int32).clamp(max=7)
    sub = torch.where(sub < 1, torch.zeros_like(sub), sub)
    m = man + ((bits >> 19) & 1)
    carry = m > 7
    m = torch.where(carry, torch.zeros_like(m), m)
    e = torch.where(carry, exp + 1, exp)
    normal = torch.where(e >= 15, torch.full_like(e, 0x7E), (e << 3) | m)
    out = torch.where(exp <= 0, sub, torch.where(exp >= 15, torch.full_like(exp, 0x7E), normal))
    return torch.where(pos, out, torch.zeros_like(out))


def ue4m3_to_fp32(u: torch.Tensor) -> torch.Tensor:
    """llama.cpp ``ggml_ue4m3_to_fp32`` (which halves the value)."""
    u = u.to(torch.int32)
    exp = (u >> 3) & 0xF
    man = (u & 7).float()
    sub = man * 2.0**-9
    normal = (1.0 + man / 8.0) * ((exp - 7 + 127) << 23).view(torch.float32)  # exact 2**(exp-7)
    raw = torch.where(exp == 0, sub, normal)
    return torch.where((u == 0) | (u == 0x7F), torch.zeros_like(raw), raw * 0.5)


# --- compressed-tensors' conventions (NVFP4 / MXFP4 checkpoints) ------------------------------------


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, sign in bit 3) of ``y`` (already divided by its scale and clamped to
    [-6, 6]): nearest magnitude, ties to the even mantissa (0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4);
    a negative value that rounds to zero keeps its sign (code 8)."""
    a = y.abs()
    idx = ((a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5)
           + (a > 5.0)).to(torch.uint8)
    return idx | ((y < 0).to(torch.uint8) << 3)


def _zero_point_add(y: torch.Tensor) -> torch.Tensor:
    """compressed-tensors adds its (zero) zero point before rounding: -0.0 becomes +0.0."""
    return y + torch.zeros((), dtype=y.dtype)


def _groups(x: torch.Tensor, scheme: QuantScheme, where: str | None) -> torch.Tensor:
    out_f, in_f = x.shape
    if scheme.granularity != "group" or in_f % scheme.group_size:
        raise LowbitError(where, f"{scheme.describe()} needs groups dividing the {in_f} input columns")
    return x.reshape(out_f, in_f // scheme.group_size, scheme.group_size)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """``448 * 6 / amax`` in ``amax``'s dtype (llm-compressor's ``generate_gparam``), float32 ``[1]``."""
    a = torch.clamp(amax.reshape(1), min=torch.finfo(amax.dtype).tiny)
    gs = (E4M3_MAX * E2M1_MAX) / a
    return torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape(1)


def quantize_nvfp4(w: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype, global_amax: torch.Tensor | None = None,
                   where: str | None = None) -> QuantizedWeight:
    """NVFP4: E2M1 codes, E4M3 scales per 16 (``float8_e4m3fn``), a float32 global scale (a divisor).

    ``global_amax``: the absolute maximum the global scale comes from (llm-compressor takes it
    over fused q/k/v and gate/up, which vLLM requires to share one); default this weight's.
    """
    check_finite(w, where)
    x = w.detach().to(dtype)
    g = _groups(x, scheme, where)
    gs = nvfp4_global_scale(x.abs().amax() if global_amax is None else global_amax.to(dtype))
    local = gs * (g.abs().amax(dim=-1) / E2M1_MAX)
    scale = torch.clamp(local, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    scale = torch.where(scale == 0, torch.full_like(scale, 0.125), scale)
    y = _zero_point_add(g / (scale / gs).unsqueeze(-1))
    codes = round_e2m1(torch.clamp(y, -E2M1_MAX, E2M1_MAX)).reshape(x.shape)
    return QuantizedWeight(codes, scale.to(torch.float8_e4m3fn), None, scheme, global_scale=gs)


def round_to_power_of_2(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``round_to_power_2``: the power of two below ``x``, or above it when the
    mantissa is at least 0.75 (bits of ``x``'s own float type)."""
    info = {torch.bfloat16: (torch.int16, 7, 8), torch.float16: (torch.int16, 10, 5), torch.float32: (torch.int32, 23, 8)}
    if x.dtype not in info:
        raise LowbitError(None, f"MXFP4 scales from {x.dtype} values are not supported")
    int_dtype, mantissa, exponent = info[x.dtype]
    bits = x.view(int_dtype).to(torch.int32)
    if int_dtype == torch.int16:
        bits = bits & 0xFFFF
    keep = ((1 << (exponent + 1)) - 1) << mantissa
    rounded = (bits + (1 << (mantissa - 2))) & keep
    if int_dtype == torch.int16:
        rounded = torch.where(rounded >= 0x8000, rounded - 0x10000, rounded)
    return rounded.to(int_dtype).view(x.dtype)


def mx_exponent(amax: torch.Tensor) -> torch.Tensor:
    """The E8M0 byte (uint8) of an MXFP4 group with absolute maximum ``amax`` (compressed-tensors)."""
    e = 127 + torch.floor(torch.log2(round_to_power_of_2(amax))) - 2
    return torch.round(torch.clamp(e, 0, 255)).to(torch.uint8)


def quantize_mxfp4(w: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype, where: str | None = None) -> QuantizedWeight:
    """MXFP4: E2M1 codes and one E8M0 exponent (uint8) per 32 values, as llm-compressor makes them.

    The :class:`QuantizedWeight` holds the power-of-two scales themselves (``dtype``); the format
    stores their exponents."""
    check_finite(w, where)
    x = w.detach().to(dtype)
    g = _groups(x, scheme, where)
    e = mx_exponent(g.abs().amax(dim=-1))
    scale = (2.0 ** (e.to(torch.int32) - 127).to(torch.float32)).to(dtype)
    y = _zero_point_add(g / scale.unsqueeze(-1))
    codes = round_e2m1(torch.clamp(y, -E2M1_MAX, E2M1_MAX)).reshape(x.shape)
    return QuantizedWeight(codes, scale, None, scheme)


def pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` 4-bit codes -> uint8 ``[out, in / 2]``: even column low nibble, odd column high."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_pairs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_pairs` (uint8 codes ``[out, 2 * cols]``)."""
    p = packed.to(torch.uint8)
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1)
