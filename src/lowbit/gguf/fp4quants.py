"""FP4 (E2M1) block types: MXFP4 and NVFP4, byte-identical to llama.cpp.

Both store 4-bit E2M1 codes (values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives,
held doubled as integers). MXFP4 has one E8M0 power-of-two scale per 32 values;
NVFP4 one unsigned E4M3 scale per 16 values, four per 64-value block. Each value gets
the nearest code (first of equals), as llama.cpp's ``best_index_mxfp4``.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from ._base import BlockType, blocks_of, bytes_rows, register
from ._blockops import c_int8_cast, const, divs

KVALUES_FP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _best_index(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """First index minimizing ``|k[i] * d - x|`` (x ``[..., n]``, d ``[..., 1]``) -> int64."""
    kv = const(KVALUES_FP4, torch.float32, x.device)
    err = (kv * d.unsqueeze(-1) - x.unsqueeze(-1)).abs()
    return err.argmin(dim=-1)


def _pack(idx: torch.Tensor, half: int) -> torch.Tensor:
    """Codes ``[N, 2*half]`` -> ``[N, half]`` bytes: j low nibble, j+half high nibble."""
    return (idx[:, :half] | (idx[:, half:] << 4)).to(torch.uint8)


def _e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """llama.cpp ``GGML_E8M0_TO_FP32_HALF``: 2**(e - 128) as float32 bits (subnormal for e < 2)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.full_like(e, 0x00200000) << e.clamp(max=1), (e - 1) << 23)
    return bits.view(torch.float32)


@register(GGMLQuantizationType.MXFP4)
class MXFP4(BlockType):
    """e (E8M0 exponent), qs[16]."""

    @classmethod
    def quantize_rows(cls, x, qw):
        b = blocks_of(x, 32)
        amax = b.abs().amax(dim=1)
        pos = amax > 0
        # floorf(log2f(amax)): a float64 log2 rounded once to float32 is the correctly rounded log2f
        lg = torch.floor(torch.log2(torch.where(pos, amax, torch.ones_like(amax)).double()).float())
        e = torch.where(pos, c_int8_cast(lg - 2.0 + 127.0) & 0xFF, torch.zeros_like(amax, dtype=torch.int32))
        d = _e8m0_half(e)
        idx = _best_index(b, d.unsqueeze(1))
        return bytes_rows(torch.cat([e.to(torch.uint8).unsqueeze(1), _pack(idx, 16)], dim=1), x.shape[0])

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _e8m0_half(blocks[:, 0])
        q = blocks[:, 1:].to(torch.int64)
        idx = torch.cat([q & 0xF, q >> 4], dim=1)
        return const(KVALUES_FP4, torch.float32, blocks.device)[idx] * d.unsqueeze(1)


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


@register(GGMLQuantizationType.NVFP4)
class NVFP4(BlockType):
    """d[4] (UE4M3 per 16 values), qs[32] (per 16 values: j low nibble, j+8 high nibble)."""

    @classmethod
    def quantize_rows(cls, x, qw):
        b = blocks_of(x, 16)  # sub-blocks
        amax = b.abs().amax(dim=1)
        ue = fp32_to_ue4m3(divs(amax, 6.0))
        d = ue4m3_to_fp32(ue)
        idx = _best_index(b, d.unsqueeze(1))
        qs = _pack(idx, 8).reshape(-1, 32)
        out = torch.cat([ue.to(torch.uint8).reshape(-1, 4), qs], dim=1)
        return bytes_rows(out, x.shape[0])

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = ue4m3_to_fp32(blocks[:, :4]).reshape(-1, 4, 1)
        q = blocks[:, 4:].to(torch.int64).reshape(-1, 4, 8)
        idx = torch.cat([q & 0xF, q >> 4], dim=2)
        return (const(KVALUES_FP4, torch.float32, blocks.device)[idx] * d).reshape(-1, 64)
