"""Affine (scale and zero point) quantization of 2-D weights, with optional MSE clipping search.

Shapes: a weight is ``[out, in]``; scales and zero points are ``[out, n_groups]``
(``[1, 1]`` per tensor). Codes ``q`` are integers in ``[0, 2**bits - 1]``; dequantized
values are ``(q - zero) * scale``. All math runs in float32 on the weight's device.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

from .scheme import QuantScheme


def grouped(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """View ``w`` as ``[rows, n_groups, group]`` following the scheme's granularity."""
    if w.dim() != 2:
        raise LowbitError(None, f"expected a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    if scheme.group_size == 0:
        return w.reshape(1, 1, out_f * in_f)
    g = scheme.n_groups(in_f)
    return w.reshape(out_f, g, in_f // g)


def _expand(p: torch.Tensor, w_shape: torch.Size, scheme: QuantScheme) -> torch.Tensor:
    """Broadcast per-group parameters ``[rows, n_groups]`` back to the weight's shape."""
    out_f, in_f = w_shape
    if scheme.group_size == 0:
        return p.reshape(1, 1).expand(out_f, in_f)
    g = p.shape[1]
    return p.repeat_interleave(in_f // g, dim=1)


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ``[lo, hi]`` (the range is widened to include 0)."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    # Divide by full tensors, not Python scalars: CUDA turns division by a scalar into a
    # multiplication by its reciprocal, which would make GPU scales differ from CPU ones.
    if scheme.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = amax / torch.full_like(amax, scheme.qmax / 2)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, float(scheme.mid))
    else:
        scale = (hi - lo) / torch.full_like(hi, float(scheme.qmax))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / scale), 0, scheme.qmax)
    return scale, zero


def compute_qparams(
    w: torch.Tensor, scheme: QuantScheme, clip: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero point per group; ``clip`` (scalar or per group) shrinks the range."""
    g = grouped(w.float(), scheme)
    lo = g.amin(dim=-1) * clip
    hi = g.amax(dim=-1) * clip
    return qparams_from_range(lo, hi, scheme)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Integer codes (int32, ``[out, in]``) of ``w`` on the grid given by ``scale`` and ``zero``."""
    s = _expand(scale, w.shape, scheme)
    z = _expand(zero, w.shape, scheme)
    return torch.clamp(torch.round(w.float() / s) + z, 0, scheme.qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Float32 values ``(q - zero) * scale``."""
    s = _expand(scale, q.shape, scheme)
    z = _expand(zero, q.shape, scheme)
    return (q.float() - z) * s


def search_clip(
    w: torch.Tensor, scheme: QuantScheme, steps: int = 20, max_shrink: float = 0.5
) -> torch.Tensor:
    """Per-group clipping factor in ``[1 - max_shrink, 1]`` that minimises the squared error."""
    g = grouped(w.float(), scheme)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    best_err = torch.full_like(lo, float("inf"))
    best = torch.ones_like(lo)
    for i in range(steps):
        factor = 1.0 - max_shrink * i / steps
        scale, zero = qparams_from_range(lo * factor, hi * factor, scheme)
        q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, scheme.qmax)
        err = ((q - zero[..., None]) * scale[..., None] - g).pow(2).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, factor), best)
    return best


def quantize_weight(
    w: torch.Tensor, scheme: QuantScheme, mse_clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(codes, scale, zero)`` of a 2-D weight."""
    clip = search_clip(w, scheme) if mse_clip else 1.0
    scale, zero = compute_qparams(w, scheme, clip)
    return quantize(w, scale, zero, scheme), scale, zero


def fake_quantize(w: torch.Tensor, scheme: QuantScheme, mse_clip: bool = False) -> torch.Tensor:
    """Quantize and dequantize, returning a tensor of ``w``'s dtype."""
    q, scale, zero = quantize_weight(w, scheme, mse_clip)
    return dequantize(q, scale, zero, scheme).to(w.dtype)
