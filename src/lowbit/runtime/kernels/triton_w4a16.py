"""Triton kernel for :class:`~lowbit.runtime.qlinear.QuantLinear` on CUDA: ``y = x @ dequant(W).T``.

Works on QuantLinear's own layout (codes of each output row packed along the input
dimension, LSB first, int32 words; float32 scales / zero points ``[out, G]``; an int64
group index per input column), for 2, 4 and 8 bits, with or without act-order. Each
program computes a ``BLOCK_M x BLOCK_N`` output tile, unpacking a ``BLOCK_N x BLOCK_K``
weight tile per step in registers, so the float weight is never written to memory.

Registered as kernel ``triton-wna16``: it runs packed integer layers of 2, 4 or 8 bits on CUDA
when Triton is installed, with 16- or 32-bit float inputs and no input quantization. Without
Triton this module still imports (the kernels are then plain functions never called) and the
kernel reports that it supports nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...errors import LowbitError
from . import Kernel, register

try:
    import triton
    import triton.language as tl

    _jit: Any = triton.jit
except ImportError:  # CPU-only installs: nothing here is ever called
    triton = None
    tl = None

    def _jit(fn: Any) -> Any:
        return fn


if TYPE_CHECKING:
    from ..qlinear import QuantLinear

SUPPORTED_BITS = (2, 4, 8)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@_jit
def _wna16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr,
    M, N, K, G,
    stride_xm, stride_qn, stride_ym,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        wmask = (rn[:, None] < N) & kmask[None, :]
        words = tl.load(qw_ptr + rn[:, None] * stride_qn + (rk[None, :] // PER), mask=wmask, other=0)
        q = (words >> ((rk[None, :] % PER) * BITS)) & MASK
        grp = tl.load(g_ptr + rk, mask=kmask, other=0)
        sz = rn[:, None] * G + grp[None, :]
        s = tl.load(s_ptr + sz, mask=wmask, other=0.0)
        z = tl.load(z_ptr + sz, mask=wmask, other=0.0)
        w = ((q.to(tl.float32) - z) * s).to(x.dtype)
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:  # partial sums of K slices meet in a float32 buffer
        tl.atomic_add(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=out_mask)


@_jit
def _wna16_grouped_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, G, GROUP,
    stride_xm, stride_qn, stride_ym,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Contiguous groups that BLOCK_K divides: whole words loaded once, one scale per row per step."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    WORDS: tl.constexpr = BLOCK_K // PER
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    shifts = tl.arange(0, PER) * BITS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        wk = k0 // PER + tl.arange(0, WORDS)
        words = tl.load(qw_ptr + rn[:, None] * stride_qn + wk[None, :], mask=nmask[:, None] & (wk[None, :] * PER < K), other=0)
        q = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & MASK, (BLOCK_N, BLOCK_K))
        g = k0 // GROUP
        s = tl.load(s_ptr + rn * G + g, mask=nmask, other=0.0)
        z = tl.load(z_ptr + rn * G + g, mask=nmask, other=0.0)
        w = ((q.to(tl.float32) - z[:, None]) * s[:, None]).to(x.dtype)
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    out_mask = (rm[:, None] < M) & nmask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=out_mask)


def wna16_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None = None, contiguous: bool | None = None,
) -> torch.Tensor:
    """``x @ dequant(W).T (+ bias)`` for CUDA fp16/bf16/fp32 ``x`` of shape ``[..., K]``.

    ``contiguous`` says that ``g_idx`` is the default ``column // group_size`` map (checked
    here, at the cost of a device sync, when ``None``); such weights use a faster kernel.
    """
    if bits not in SUPPORTED_BITS:
        raise LowbitError(None, f"the Triton kernel handles {SUPPORTED_BITS}-bit codes, not {bits}")
    K = x.shape[-1]
    N = qweight.shape[0]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n, block_k = (32, 128) if M <= 32 else (64, 64)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    # split K until there are about two programs per SM, keeping >= 4 K-steps per program
    split_k = max(1, min(triton.cdiv(2 * sms, tiles), K // (4 * block_k)))
    y = torch.zeros(M, N, device=x.device, dtype=torch.float32) if split_k > 1 else torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    b = bias.to(x.dtype).contiguous() if bias is not None else y
    n_groups = scales.shape[1]
    group = K // n_groups
    if contiguous is None:
        contiguous = n_groups == 1 or bool(torch.equal(g_idx, torch.arange(K, device=g_idx.device) // group))
    grouped_block_k = min(block_k, group) if n_groups > 1 else block_k
    if contiguous and group % grouped_block_k == 0 and grouped_block_k >= 16 and grouped_block_k % (32 // bits) == 0:
        _wna16_grouped_kernel[grid](
            x2, qweight.contiguous(), scales.float().contiguous(), zeros.float().contiguous(), b, y,
            M, N, K, n_groups, group if n_groups > 1 else K,
            x2.stride(0), qweight.stride(0), y.stride(0),
            BITS=bits, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=grouped_block_k, SPLIT_K=split_k,
        )
        return y.to(x.dtype).reshape(*x.shape[:-1], N)
    _wna16_kernel[grid](
        x2, qweight.contiguous(), scales.float().contiguous(), zeros.float().contiguous(), g_idx.contiguous(), b, y,
        M, N, K, scales.shape[1],
        x2.stride(0), qweight.stride(0), y.stride(0),
        BITS=bits, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


@register
class TritonWNA16(Kernel):
    """Triton on CUDA: 2/4/8-bit packed integer weights dequantized in registers, float inputs"""

    name = "triton-wna16"
    priority = 10

    def supports(self, layer: QuantLinear, device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        return (
            triton is not None
            and device.type == "cuda"
            and layer.packed
            and layer.scheme.bits in SUPPORTED_BITS
            and layer.input_scheme is None
            and layer.global_scale is None
            and dtype in _DTYPES
            and not layer.cache_weight  # a cached float weight makes the reference's matmul the faster one
            and layer._cached is None
        )

    def forward(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        return wna16_linear(x, layer.qweight, layer.scales, layer.zeros, layer.g_idx, layer.scheme.bits, layer.bias,
                            contiguous=layer.default_groups())
