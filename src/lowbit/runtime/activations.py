"""Fake quantization of a linear layer's input activations (the reference of activation kernels).

:func:`fake_quantize_input` rounds ``x`` to the grid its scheme describes and returns the float
values a real W8A8 / FP8 kernel would multiply with, so the reference kernel (and so an
evaluation) sees what activation quantization costs. Supported:

* ``int`` (2-8 bits): symmetric, ``q = clamp(round(x / s), -2**(b-1), 2**(b-1) - 1)``, ``x' = q * s``
  with ``s = absmax / (2**(b-1) - 1)``; asymmetric (dynamic only), ``s = (max - min) / (2**b - 1)``
  over a range that includes 0, ``z = round(-min / s)``, ``x' = (clamp(round(x / s) + z, 0,
  2**b - 1) - z) * s``;
* ``float`` E4M3 / E5M2: ``x' = float8(clamp(x / s, -max, max)) * s`` with ``s = absmax / max``;
* dynamic scales per ``token`` (each row of the last dimension), per ``group`` (``group_size``
  consecutive features of a row) or per ``tensor``; static scales per ``tensor`` (the layer's
  ``input_scale``, one value).

A zero range gives a scale of 1 (the values are all zero). Anything else (FP4 activations,
E4M3 / E8M0 scale formats, static asymmetric grids, per-channel activation scales) raises
:class:`LowbitError` when the layer is built, not in the forward pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..core.scheme import QuantScheme
from ..errors import LowbitError

if TYPE_CHECKING:
    from ..core.quantized import QuantizedWeight

__all__ = ["check_input_scheme", "declared_inputs", "fake_quantize_input", "nvfp4_inputs", "quantize_rows", "rows_quantizable"]

_FLOAT8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def nvfp4_inputs(scheme: QuantScheme) -> bool:
    """NVFP4 activations: E2M1 values, dynamic E4M3 scales per group under a static global scale."""
    return (scheme.type == "float" and scheme.float_format == "e2m1" and scheme.dynamic == "local"
            and scheme.scale_format == "e4m3" and scheme.granularity == "group")


def check_input_scheme(scheme: QuantScheme, nvfp4: bool = False) -> None:
    """Raise :class:`LowbitError` when :func:`fake_quantize_input` cannot apply ``scheme``.

    ``nvfp4``: the caller has each layer's ``input_global_scale`` (evaluation does; a
    :class:`~lowbit.runtime.qlinear.QuantLinear` has no place for it), so NVFP4 inputs are accepted."""

    def bad(problem: str) -> LowbitError:
        return LowbitError(None, f"input activations {scheme.describe()}: {problem}")

    if nvfp4 and nvfp4_inputs(scheme):
        return
    if scheme.type == "codebook":
        raise bad("codebook activations are not supported")
    if scheme.type == "float" and scheme.float_format not in _FLOAT8:
        raise bad(f"{scheme.float_format} activations are not supported yet (only e4m3 / e5m2)")
    if scheme.scale_format in ("e4m3", "e8m0"):
        raise bad(f"{scheme.scale_format} activation scales are not supported yet")
    if scheme.dynamic == "local":
        raise bad("dynamic local scales (NVFP4) are not supported yet")
    if scheme.dynamic:
        if scheme.granularity not in ("token", "group", "tensor"):
            raise bad(f"dynamic activation scales are per token, group or tensor, not per {scheme.granularity}")
    else:
        if scheme.granularity != "tensor":
            raise bad(f"static activation scales are per tensor, not per {scheme.granularity}")
        if scheme.type == "int" and not scheme.symmetric:
            raise bad("static asymmetric activations (a stored zero point) are not supported yet")


def _absmax(x: torch.Tensor, granularity: str) -> torch.Tensor:
    if granularity == "tensor":
        return x.abs().amax().reshape([1] * x.dim())
    return x.abs().amax(dim=-1, keepdim=True)


def _nonzero(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))


def fake_quantize_input(x: torch.Tensor, scheme: QuantScheme, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` rounded to ``scheme``'s grid and scaled back, in ``x``'s dtype (computed in float32).

    ``input_scale`` is the static per-tensor scale (required when ``scheme`` is static), or for
    NVFP4 inputs the layer's ``input_global_scale`` (compressed-tensors: each group of 16 gets the
    E4M3 scale ``E4M3(global * amax / 6)``, a zero one 0.125, and the values are rounded to E2M1 in
    units of ``scale / global``).
    """
    check_input_scheme(scheme, nvfp4=True)
    xf = x.float()
    shape = xf.shape
    if nvfp4_inputs(scheme):
        return _nvfp4_qdq(xf, scheme, input_scale).reshape(shape).to(x.dtype)
    granularity = scheme.granularity
    if scheme.dynamic and granularity == "group":
        k = shape[-1]
        if k % scheme.group_size:
            raise LowbitError(None, f"input activations {scheme.describe()}: group size {scheme.group_size} does not "
                              f"divide the {k} input features")
        xf = xf.reshape(*shape[:-1], k // scheme.group_size, scheme.group_size)
    if not scheme.dynamic:
        if input_scale is None:
            raise LowbitError(None, f"input activations {scheme.describe()}: a static scheme needs input_scale")
        scale: torch.Tensor | None = input_scale.float().reshape([1] * xf.dim()).to(xf.device)
    else:
        scale = None
    if scheme.type == "float":
        fmax = scheme.float_spec.max
        s = scale if scale is not None else _nonzero(_absmax(xf, granularity) / fmax)
        q = (xf / s).clamp(-fmax, fmax).to(_FLOAT8[scheme.float_format or ""]).float()
        out = q * s
    elif scheme.symmetric:
        qpos = (1 << (scheme.bits - 1)) - 1
        s = scale if scale is not None else _nonzero(_absmax(xf, granularity) / qpos)
        out = torch.clamp(torch.round(xf / s), -qpos - 1, qpos) * s
    else:  # asymmetric, dynamic
        if granularity == "tensor":
            lo, hi = xf.amin().clamp(max=0), xf.amax().clamp(min=0)
        else:
            lo = xf.amin(dim=-1, keepdim=True).clamp(max=0)
            hi = xf.amax(dim=-1, keepdim=True).clamp(min=0)
        s = _nonzero((hi - lo) / scheme.qmax)
        z = torch.clamp(torch.round(-lo / s), 0, scheme.qmax)
        out = (torch.clamp(torch.round(xf / s) + z, 0, scheme.qmax) - z) * s
    return out.reshape(shape).to(x.dtype)


def _nvfp4_qdq(xf: torch.Tensor, scheme: QuantScheme, global_scale: torch.Tensor | None) -> torch.Tensor:
    from ..core.fp4 import E2M1_MAX, E4M3_MAX, round_e2m1
    from ..core.quantized import e2m1_table

    if global_scale is None:
        raise LowbitError(None, f"input activations {scheme.describe()}: NVFP4 inputs need the layer's input_global_scale")
    k = xf.shape[-1]
    if k % scheme.group_size:
        raise LowbitError(None, f"input activations {scheme.describe()}: group size {scheme.group_size} does not "
                          f"divide the {k} input features")
    g = xf.reshape(*xf.shape[:-1], k // scheme.group_size, scheme.group_size)
    gs = global_scale.float().reshape(1).to(xf.device)
    local = gs * (g.abs().amax(dim=-1, keepdim=True) / E2M1_MAX)
    scale = torch.clamp(local, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    unit = torch.where(scale == 0, torch.full_like(scale, 0.125), scale) / gs
    codes = round_e2m1(torch.clamp(g / unit + torch.zeros((), dtype=g.dtype), -E2M1_MAX, E2M1_MAX))
    return e2m1_table(xf.device)[codes.long()] * unit


def rows_quantizable(scheme: QuantScheme) -> bool:
    """Whether :func:`quantize_rows` takes ``scheme``: symmetric int8 or FP8 E4M3, one scale per
    token (dynamic) or per tensor (dynamic or static), what the W8A8 / FP8 GEMMs consume."""
    if scheme.granularity not in ("token", "tensor") or scheme.scale_format in ("e4m3", "e8m0"):
        return False
    if (not scheme.dynamic and scheme.granularity != "tensor") or scheme.dynamic == "local":
        return False
    if scheme.type == "float":
        return scheme.float_format == "e4m3"
    return scheme.type == "int" and scheme.bits == 8 and scheme.symmetric


def quantize_rows(x: torch.Tensor, scheme: QuantScheme, input_scale: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes and float32 scales of a 2-D input ``[M, K]`` that :func:`fake_quantize_input` rounds to:
    ``codes.float() * scale`` equals its result (before the cast to ``x``'s dtype) bit for bit.

    Codes are ``int8`` or ``float8_e4m3fn`` ``[M, K]``; the scale is ``[M, 1]`` (per token) or
    ``[1, 1]`` (per tensor). Only the schemes :func:`rows_quantizable` accepts; no host sync.
    """
    if not rows_quantizable(scheme):
        raise LowbitError(None, f"input activations {scheme.describe()}: not one int8 / E4M3 scale per token or tensor")
    xf = x.float()
    if not scheme.dynamic:
        if input_scale is None:
            raise LowbitError(None, f"input activations {scheme.describe()}: a static scheme needs input_scale")
        s = input_scale.float().reshape(1, 1).to(xf.device)
        if scheme.type == "float":
            fmax = scheme.float_spec.max
            return (xf / s).clamp(-fmax, fmax).to(torch.float8_e4m3fn), s
        return torch.clamp(torch.round(xf / s), -128, 127).to(torch.int8), s
    qmax = scheme.float_spec.max if scheme.type == "float" else 127.0
    s = _nonzero(_absmax(xf, scheme.granularity) / qmax)
    if scheme.type == "float":
        return (xf / s).clamp(-qmax, qmax).to(torch.float8_e4m3fn), s
    return torch.clamp(torch.round(xf / s), -128, 127).to(torch.int8), s


def declared_inputs(qw: QuantizedWeight) -> tuple[QuantScheme | None, torch.Tensor | None]:
    """The input-activation scheme and static ``input_scale`` a stored weight declares (its
    ``scheme.activations``, ``extra["input_scale"]``), as :class:`~lowbit.runtime.qlinear.QuantLinear`
    takes them; ``(None, None)`` when it declares none, or one :func:`fake_quantize_input` cannot
    apply (NVFP4's local scales): such layers run with float inputs."""
    acts = qw.scheme.activations
    if acts is None or nvfp4_inputs(acts):
        return None, None
    try:
        check_input_scheme(acts)
    except LowbitError:
        return None, None
    return acts, qw.extra.get("input_scale")
