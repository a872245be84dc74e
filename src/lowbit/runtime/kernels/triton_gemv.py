"""Triton GEMV for decode: ``y = x @ dequant(W).T`` for 1 to 16 tokens on CUDA.

At decode time a linear layer reads its whole weight to produce a few output values, so its
speed is the speed at which it streams the weight: 4-bit codes are a quarter of bf16's bytes.
:mod:`.triton_w4a16` tiles for tensor cores (``tl.dot`` on a 16-row tile) and pays for it with a
padded tile, float32 scale *and* zero loads and a split-K buffer; this kernel is the plain
dot-product form:

* each program owns ``BLOCK_N`` output rows and a slice of ``K_PER`` input columns; it streams
  the rows' int32 words (contiguous along K: coalesced), unpacks them in registers and
  accumulates ``sum_k code * x`` per group, so the dequantization is one multiply-add per group
  and row, ``y += s * sum(code * x) + b * sum(x)`` with ``b = -zero * s`` (precomputed once per
  layer into one ``[out, G, 2]`` float32 tensor: one load per group and row);
* the tokens (``BLOCK_M`` <= 16) share every weight load;
* with ``SPLIT_K > 1`` the programs of one row block add their partial sums into a float32
  buffer (atomics), else they store the output directly in the input's dtype.

It runs packed 2-, 4- and 8-bit integer layers with the default contiguous groups (no
act-order permutation) whose group size is a multiple of ``BLOCK_K`` (or one group per row),
inputs of at most 16 tokens in fp16 / bf16 / fp32 and no input quantization. The tile sizes
come from :func:`config` (measured on an H100: bench/bench_w4a16_kernels.py). Registered as
kernel ``triton-gemv`` above ``triton-wna16``; the torch reference is its test oracle (on CPU
through ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

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
MAX_TOKENS = 16
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@_jit
def _gemv_kernel(
    x_ptr, qw_ptr, sb_ptr, bias_ptr, y_ptr,
    M, N, K, G, GROUP,
    stride_xm, stride_qn, stride_ym,
    K_PER: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    WORDS: tl.constexpr = BLOCK_K // PER
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rm = tl.arange(0, BLOCK_M)
    mmask = rm < M
    shifts = tl.arange(0, PER) * BITS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_PER
    for i in range(0, K_PER, BLOCK_K):
        k0 = k_lo + i
        wk = k0 // PER + tl.arange(0, WORDS)
        words = tl.load(qw_ptr + rn[:, None] * stride_qn + wk[None, :], mask=nmask[:, None], other=0)
        q = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & MASK, (BLOCK_N, BLOCK_K)).to(tl.float32)
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
        g = k0 // GROUP
        s = tl.load(sb_ptr + (rn * G + g) * 2, mask=nmask, other=0.0)
        b = tl.load(sb_ptr + (rn * G + g) * 2 + 1, mask=nmask, other=0.0)
        dots = tl.sum(x[:, None, :] * q[None, :, :], axis=2)  # [BLOCK_M, BLOCK_N]
        xsum = tl.sum(x, axis=1)  # [BLOCK_M]
        acc += dots * s[None, :] + xsum[:, None] * b[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    out_mask = mmask[:, None] & nmask[None, :]
    ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(ptrs, acc, mask=out_mask)


@dataclass(frozen=True)
class GemvConfig:
    """Tile sizes of one launch (``split_k`` slices of K, each a multiple of ``block_k``)."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


def config(m: int, n: int, k: int, group: int, bits: int, sms: int = 132) -> GemvConfig | None:
    """The tile sizes for an ``[m, k] x [n, k]`` product, or ``None`` when this kernel does not
    fit the shape (``block_k`` must divide the group, K must split evenly)."""
    per = 32 // bits
    for block_k in (256, 128, 64, 32):
        if group % block_k == 0 and block_k % per == 0 and k % block_k == 0:
            break
    else:
        return None
    block_n = 32 if m <= 4 else 16
    blocks = -(-n // block_n)
    split_k = 1
    # split K until there are about two programs per SM, each still streaming >= 4 K-steps
    while blocks * split_k < 2 * sms and k % (2 * split_k * block_k) == 0 and k // (2 * split_k) >= 4 * block_k:
        split_k *= 2
    return GemvConfig(block_n, block_k, split_k)


def prepared(layer: QuantLinear) -> torch.Tensor:
    """``[out, G, 2]`` float32 ``(scale, -zero * scale)`` of ``layer``, made once and cached on it."""
    sb = getattr(layer, "_gemv_sb", None)
    if sb is None or sb.device != layer.scales.device:
        assert layer.zeros is not None
        s = layer.scales.float()
        sb = torch.stack([s, -layer.zeros.float() * s], dim=-1).contiguous()
        layer._gemv_sb = sb
    return sb


def gemv_linear(x: torch.Tensor, qweight: torch.Tensor, sb: torch.Tensor, bits: int,
                bias: torch.Tensor | None = None, cfg: GemvConfig | None = None) -> torch.Tensor:
    """``x @ dequant(W).T (+ bias)`` for ``x`` ``[..., K]`` of at most 16 rows (see the module doc)."""
    K = x.shape[-1]
    N, G = sb.shape[0], sb.shape[1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    group = K // G
    if cfg is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
        cfg = config(M, N, K, group, bits, sms)
    if cfg is None or M > MAX_TOKENS:
        raise ValueError(f"triton-gemv does not fit [{M}, {K}] x [{N}, {K}] with groups of {group}")
    block_m = max(1, 1 << (M - 1).bit_length())
    if cfg.split_k > 1:
        y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(N, cfg.block_n), cfg.split_k)
    b = bias.contiguous() if bias is not None else y
    _gemv_kernel[grid](
        x2, qweight, sb, b, y,
        M, N, K, G, group,
        x2.stride(0), qweight.stride(0), y.stride(0),
        K_PER=K // cfg.split_k, BITS=bits, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


@register
class TritonGemv(Kernel):
    """Triton on CUDA, 1-16 tokens: 2/4/8-bit packed weights streamed once, dot products per group"""

    name = "triton-gemv"
    priority = 20

    def supports(self, layer: QuantLinear, device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        if not (triton is not None and device.type == "cuda" and layer.packed and layer.scheme.bits in SUPPORTED_BITS
                and layer.input_scheme is None and layer.global_scale is None and dtype in _DTYPES
                and not layer.cache_weight and layer._cached is None):
            return False
        m = 1
        for d in shape[:-1]:
            m *= d
        if m > MAX_TOKENS or not layer.default_groups():
            return False
        k = layer.in_features
        return config(m, layer.out_features, k, k // layer.scales.shape[1], layer.scheme.bits) is not None

    def forward(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        return gemv_linear(x, layer.qweight, prepared(layer), layer.scheme.bits, layer.bias)
