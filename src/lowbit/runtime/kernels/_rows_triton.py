"""Triton kernels around the W8A8 GEMMs on CUDA: the input rounding and the output scaling, one launch each.

:func:`lowbit.runtime.activations.quantize_rows` in torch is five to seven small kernels (the float32
copy, the row maxima, the division, the clamp, the cast), which cost more than the 8-bit GEMM itself
at decode sizes. Here each program reads one row once: its absolute maximum, the scale
``amax / qmax`` (1 for an all-zero row; or the static scale), ``x / scale`` with IEEE division
(``div_rn``), the clamp, and the cast to E4M3 (round to nearest even, as torch's cast) or the
rounding half to even to int8 (``rint``, as ``torch.round``): the same codes and scales as the torch
code, bit for bit (tests/test_w8a8_kernels.py checks it on CUDA; the int8 path and the scales also in
Triton's CPU interpreter, whose FP8 cast rounds differently from the GPU's). The first call of each
kind also compares its result with the torch code's and turns the kernel off, with a warning, if
they differ; a kernel that fails to build does the same. Per-token dynamic and static
per-tensor schemes only; anything else, or no Triton, takes the torch code. Rows past the input's
(``rows``: ``torch._int_mm`` wants more than 16) are written as zeros in the same launch.

:func:`scale_rows` is the epilogue: the GEMM's int32 (or float32) sums times the per-token and
per-channel scales plus the bias, cast to the output dtype, in one launch instead of four.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ...core.scheme import QuantScheme
from ..activations import quantize_rows

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    _jit: Any = triton.jit
except ImportError:  # CPU-only installs: the kernel below is never called
    triton = None
    tl = None
    libdevice = None

    def _jit(fn: Any) -> Any:
        return fn

__all__ = ["ENABLED", "fast_rows", "quantize_rows_fast", "scale_rows"]

#: Set to False to take the torch code everywhere (the kernel bench times both).
ENABLED = True
#: (FP8?, dynamic?, input dtype) whose first Triton result was checked against the torch code's bits
_CHECKED: set[tuple[object, ...]] = set()


@_jit
def _rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, qmax, FP8: tl.constexpr, STATIC: tl.constexpr,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0)  # rows from M on are padding: zeros (scale 1)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask & (row < M), other=0.0).to(tl.float32)
    if STATIC:
        s = tl.load(s_ptr)
    else:
        amax = tl.max(tl.abs(x), axis=0)
        s = tl.math.div_rn(amax, qmax)
        s = tl.where(s > 0, s, 1.0)
        tl.store(s_ptr + row, s)
    y = tl.math.div_rn(x, s)
    if FP8:
        y = tl.minimum(tl.maximum(y, -qmax), qmax)
        tl.store(q_ptr + row * K + offs, y.to(tl.float8e4nv), mask=mask)
    else:
        y = tl.minimum(tl.maximum(libdevice.rint(y), -128.0), 127.0)
        tl.store(q_ptr + row * K + offs, y.to(tl.int8), mask=mask)


@_jit
def _scale_kernel(acc_ptr, sa_ptr, sb_ptr, b_ptr, y_ptr, N, stride_acc, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.load(acc_ptr + row * stride_acc + cols, mask=mask, other=0).to(tl.float32)
    sa = tl.load(sa_ptr + row) if PER_ROW else tl.load(sa_ptr)
    y = acc * sa * tl.load(sb_ptr + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def scale_rows(acc: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, bias: torch.Tensor | None, m: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``(acc[:m].float() * sa * sb + bias.float()).to(dtype)``: the GEMM's sums ``[>= m, N]`` (int32 or float32)
    times the per-row (``[>= m, 1]`` or ``[1, 1]``) and per-column (``[1, N]`` float32) scales, in one Triton
    launch on CUDA (the same float32 operations in the same order: the same bits), torch ops elsewhere."""
    global ENABLED
    n = acc.shape[1]
    if not (ENABLED and triton is not None and acc.is_cuda and acc.stride(1) == 1):
        return _scale_torch(acc, sa, sb, bias, m, dtype)
    y = torch.empty(m, n, device=acc.device, dtype=dtype)
    b = bias.contiguous() if bias is not None else y
    grid = (m, triton.cdiv(n, 1024))
    try:
        _scale_kernel[grid](acc, sa, sb.contiguous(), b, y, n, acc.stride(0), PER_ROW=sa.numel() != 1,
                            HAS_BIAS=bias is not None, BLOCK_N=1024)
    except Exception as exc:  # noqa: BLE001 - as in quantize_rows_fast
        ENABLED = False
        warnings.warn(f"lowbit: the Triton scaling kernel failed ({type(exc).__name__}); using torch ops", stacklevel=2)
        return _scale_torch(acc, sa, sb, bias, m, dtype)
    key = ("scale", acc.dtype, dtype)
    if key not in _CHECKED and not torch.cuda.is_current_stream_capturing():
        _CHECKED.add(key)
        ref = _scale_torch(acc, sa, sb, bias, m, dtype)
        if not torch.equal(y, ref):
            ENABLED = False
            warnings.warn("lowbit: the Triton scaling kernel's output differs from the torch code's; using torch ops",
                          stacklevel=2)
            return ref
    return y


def _scale_torch(acc: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, bias: torch.Tensor | None, m: int,
                 dtype: torch.dtype) -> torch.Tensor:
    y = acc[:m].float() * sa[:m] * sb
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def fast_rows(x: torch.Tensor, scheme: QuantScheme) -> bool:
    """Whether :func:`quantize_rows_fast` runs the Triton kernel for ``x`` (2-D, CUDA) and ``scheme``."""
    return (ENABLED and triton is not None and x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and x.shape[1] <= 65536
            and ((scheme.dynamic is True and scheme.granularity == "token")
                 or (not scheme.dynamic and scheme.granularity == "tensor")))


def _padded(q: torch.Tensor, s: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = q.shape[0]
    if rows == m:
        return q, s
    q = torch.cat([q, torch.zeros(rows - m, q.shape[1], device=q.device, dtype=q.dtype)])
    return q, (s if s.numel() == 1 else torch.cat([s, torch.ones(rows - m, 1, device=s.device, dtype=s.dtype)]))


def quantize_rows_fast(x: torch.Tensor, scheme: QuantScheme, input_scale: torch.Tensor | None = None,
                       rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~lowbit.runtime.activations.quantize_rows`, in one Triton launch where :func:`fast_rows` allows;
    ``rows`` (at least ``x``'s): the codes (and per-token scales) padded with zero rows (scale 1) to that many."""
    m, k = x.shape
    rows = m if rows is None else rows
    if not fast_rows(x, scheme) or (not scheme.dynamic and input_scale is None):
        return _padded(*quantize_rows(x, scheme, input_scale), rows)
    fp8 = scheme.type == "float"
    q = torch.empty(rows, k, device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    if scheme.dynamic:
        s = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    else:
        assert input_scale is not None
        s = input_scale.float().reshape(1, 1).to(x.device)
    block = triton.next_power_of_2(k)
    global ENABLED
    try:
        _rows_kernel[(rows,)](x, q, s, m, k, x.stride(0), scheme.float_spec.max if fp8 else 127.0, FP8=fp8,
                           STATIC=not scheme.dynamic, BLOCK=block, num_warps=4 if block <= 4096 else 8)
    except Exception as exc:  # noqa: BLE001 - a Triton that cannot build it: the torch code, once said
        ENABLED = False
        warnings.warn(f"lowbit: the Triton input-rounding kernel failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); using torch ops", stacklevel=2)
        return _padded(*quantize_rows(x, scheme, input_scale), rows)
    key = (fp8, bool(scheme.dynamic), x.dtype)
    if key not in _CHECKED and not torch.cuda.is_current_stream_capturing():  # once per kind: the torch code's bits?
        _CHECKED.add(key)
        ref_q, ref_s = _padded(*quantize_rows(x, scheme, input_scale), rows)
        if not (torch.equal(q.view(torch.int8), ref_q.view(torch.int8)) and torch.equal(s, ref_s)):
            ENABLED = False
            warnings.warn("lowbit: the Triton input-rounding kernel's codes differ from the torch code's; "
                          "using torch ops", stacklevel=2)
            return ref_q, ref_s
    return q, s
