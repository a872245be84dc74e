"""Symmetric scales and codes exactly as compressed-tensors (llm-compressor's engine) computes them.

FP8 E4M3 weights (per tensor, per channel, in blocks) and integer grids paired with activation
quantization (W8A8), bit for bit equal to llm-compressor 0.14 / compressed-tensors 0.19:

* ``amax`` is the absolute maximum of the values sharing a scale (0 always inside the range),
  taken in the model's dtype; a block that overhangs the weight is zero-padded first;
* ``scale = amax / half_range`` computed **in the model's dtype** (``half_range`` = 448 for E4M3,
  ``(2**bits - 1) / 2`` = 127.5 for int8: the grid ``[-128, 127]`` is 255 wide), a zero scale
  replaced by the dtype's epsilon;
* ``codes = clamp(w / scale, qmin, qmax)`` in the model's dtype, then cast to E4M3 (round to
  nearest even) or rounded half to even (integers).

Integer codes are returned unsigned (``signed + 2**(bits-1)``, zero point ``2**(bits-1)``) as
every lowbit integer grid is.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

from .quantized import QuantizedWeight
from .scheme import QuantScheme

E4M3_MAX = 448.0


def dtype_eps(dtype: torch.dtype) -> float:
    """The value a zero scale is replaced by (compressed-tensors: 0.125 for E4M3 scales)."""
    if dtype == torch.float8_e4m3fn:
        return 0.125
    if dtype.is_floating_point:
        return float(torch.finfo(dtype).eps)
    return 1.0


def symmetric_scale(amax: torch.Tensor, half_range: float) -> torch.Tensor:
    """``amax / half_range`` in ``amax``'s dtype, zeros replaced by its epsilon."""
    scale = amax / half_range
    return torch.where(scale == 0, torch.full_like(scale, dtype_eps(scale.dtype)), scale)


def half_range(scheme: QuantScheme) -> float:
    """Half the width of the grid: 448 (E4M3), 6 (E2M1), ``(2**bits - 1) / 2`` (integers)."""
    if scheme.type == "float":
        return scheme.float_spec.max
    return ((1 << scheme.bits) - 1) / 2


def _blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``w`` zero-padded to whole blocks, viewed ``[row blocks, col blocks, rows * cols]``."""
    out_f, in_f = w.shape
    br, bc = block
    nr, nc = -(-out_f // br), -(-in_f // bc)
    padded = torch.nn.functional.pad(w, (0, nc * bc - in_f, 0, nr * br - out_f))
    return padded.reshape(nr, br, nc, bc).transpose(1, 2).reshape(nr, nc, br * bc)


def weight_amax(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Absolute maximum per scale: ``[1, 1]`` tensor, ``[out, 1]`` channel, ``[out, G]`` group,
    ``[ceil(out/r), ceil(in/c)]`` block; in ``w``'s dtype."""
    a = w.abs()
    kind = scheme.granularity
    if kind == "tensor":
        return a.amax().reshape(1, 1)
    if kind == "channel":
        return a.amax(dim=1, keepdim=True)
    if kind == "group":
        return a.reshape(w.shape[0], scheme.n_groups(w.shape[1]), -1).amax(dim=-1)
    if kind == "block":
        assert scheme.block is not None
        return _blocks(a, scheme.block).amax(dim=-1)
    raise LowbitError(None, f"weights cannot be quantized {kind}-wise ({scheme.describe()})")


def expand(p: torch.Tensor, shape: torch.Size | tuple[int, int], scheme: QuantScheme) -> torch.Tensor:
    """Per-scale parameters broadcast to every element of a ``shape`` weight."""
    out_f, in_f = shape
    kind = scheme.granularity
    if kind == "tensor":
        return p.reshape(1, 1).expand(out_f, in_f)
    if kind == "block":
        assert scheme.block is not None
        return p.repeat_interleave(scheme.block[0], 0)[:out_f].repeat_interleave(scheme.block[1], 1)[:, :in_f]
    return p.repeat_interleave(in_f // p.shape[1], dim=1)


def check_finite(w: torch.Tensor, where: str | None) -> None:
    if not bool(torch.isfinite(w).all()):
        raise LowbitError(where, "has non-finite values (inf or nan); it cannot be quantized")


def quantize_fp8(w: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype, where: str | None = None) -> QuantizedWeight:
    """E4M3 codes (``float8_e4m3fn``) and scales (``dtype``) of a 2-D weight, as llm-compressor makes them."""
    if scheme.type != "float" or scheme.float_format != "e4m3":
        raise LowbitError(where, f"not an FP8 E4M3 scheme: {scheme.describe()}")
    check_finite(w, where)
    x = w.detach().to(dtype)
    scale = symmetric_scale(weight_amax(x, scheme), E4M3_MAX)
    # compressed-tensors adds its (zero) zero point before rounding, which turns -0.0 into +0.0
    scaled = x / expand(scale, x.shape, scheme) + torch.zeros((), dtype=x.dtype)
    q = torch.clamp(scaled, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight(q, scale, None, scheme)


def quantize_int(w: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype, where: str | None = None) -> QuantizedWeight:
    """Symmetric integer codes (unsigned, zero point ``2**(bits-1)``) and scales (``dtype``), as
    llm-compressor makes them (W8A8: ``scale = amax / 127.5`` in the model's dtype)."""
    if scheme.type != "int" or not scheme.symmetric:
        raise LowbitError(where, f"not a symmetric integer scheme: {scheme.describe()}")
    check_finite(w, where)
    x = w.detach().to(dtype)
    scale = symmetric_scale(weight_amax(x, scheme), half_range(scheme))
    lo, hi = -float(scheme.mid), float(scheme.mid - 1)
    q = torch.round(torch.clamp(x / expand(scale, x.shape, scheme), lo, hi)).to(torch.int32) + scheme.mid
    return QuantizedWeight(q, scale, torch.full_like(scale, float(scheme.mid), dtype=torch.float32), scheme)
