"""Ternary and binary types: TQ1_0, TQ2_0 and Q1_0, byte-identical to llama.cpp.

TQ1_0 and TQ2_0 store values in {-1, 0, 1} times the block's absolute max (256 values
per block); TQ1_0 packs five trits per byte (as a fixed-point fraction of 3**5), TQ2_0
two bits per value. Q1_0 stores the sign of each of 128 values and their mean magnitude.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from ._base import BlockType, blocks_of, bytes_rows, register
from ._blockops import const, divs, fp16_bytes, recip, roundf, seq_sum


def _trits(b: torch.Tensor) -> torch.Tensor:
    """``lroundf(x / amax) + 1`` per value of ``[N, 256]`` blocks -> int32 in {0, 1, 2}, and d = amax.

    A non-finite product (a subnormal block makes ``1/d`` overflow) gives C's
    ``(int)lroundf(inf) + 1`` = 1 on x86-64 (LONG_MIN truncated to int is 0).
    """
    d = b.abs().amax(dim=1)
    idv = torch.where(d != 0, recip(d), torch.zeros_like(d))
    v = b * idv.unsqueeze(1)
    r = torch.where(torch.isfinite(v), roundf(v), torch.zeros_like(v))
    return r.to(torch.int32) + 1, d


def _ceil_frac(q: torch.Tensor) -> torch.Tensor:
    """``(q * 256 + 242) / 243`` in integers: a base-3 number as a byte-sized fraction."""
    return ((q * 256 + 242) // 243).to(torch.uint8)


@register(GGMLQuantizationType.TQ2_0)
class TQ2_0(BlockType):
    """qs[64] (four 2-bit codes per byte, strided by 32), d."""

    @classmethod
    def quantize_rows(cls, x, qw):
        b = blocks_of(x, 256)
        t, d = _trits(b)
        t = (t & 3).reshape(-1, 2, 4, 32)  # [N, j, n, m]: element 128j + 32n + m
        q = t[:, :, 0] | (t[:, :, 1] << 2) | (t[:, :, 2] << 4) | (t[:, :, 3] << 6)
        return bytes_rows(torch.cat([q.reshape(-1, 64).to(torch.uint8), fp16_bytes(d)], dim=1), x.shape[0])

    @classmethod
    def dequantize_blocks(cls, blocks):
        q = blocks[:, :64].to(torch.int32).reshape(-1, 2, 1, 32)
        sh = const([0, 2, 4, 6], torch.int32, blocks.device).reshape(1, 1, 4, 1)
        v = ((q >> sh) & 3).reshape(-1, 256) - 1
        d = blocks[:, 64:66].contiguous().view(torch.float16).float()
        return v.float() * d


def _tq1_pack(t: torch.Tensor, width: int, ntrit: int) -> torch.Tensor:
    """Trits ``[N, ntrit * width]`` (trit n of byte m at ``m + n*width``) -> ``[N, width]`` packed bytes."""
    t = t.reshape(t.shape[0], ntrit, width)
    q = torch.zeros_like(t[:, 0])
    for n in range(ntrit):
        q = q * 3 + t[:, n]
    if ntrit == 4:
        q = q * 3
    return _ceil_frac(q)


@register(GGMLQuantizationType.TQ1_0)
class TQ1_0(BlockType):
    """qs[48] (five trits per byte: 32 bytes over 160 values, 16 over 80), qh[4] (four trits), d."""

    @classmethod
    def quantize_rows(cls, x, qw):
        b = blocks_of(x, 256)
        t, d = _trits(b)
        qs0 = _tq1_pack(t[:, :160], 32, 5)
        qs1 = _tq1_pack(t[:, 160:240], 16, 5)
        qh = _tq1_pack(t[:, 240:], 4, 4)
        return bytes_rows(torch.cat([qs0, qs1, qh, fp16_bytes(d)], dim=1), x.shape[0])

    @classmethod
    def dequantize_blocks(cls, blocks):
        pow3 = const([1, 3, 9, 27, 81, 243], torch.int32, blocks.device)

        def unpack(q: torch.Tensor, ntrit: int) -> torch.Tensor:
            q = q.to(torch.int32).unsqueeze(1)  # [N, 1, width]
            qq = (q * pow3[:ntrit].reshape(1, -1, 1)) & 0xFF
            return ((qq * 3) >> 8).reshape(q.shape[0], -1)

        v = torch.cat([unpack(blocks[:, :32], 5), unpack(blocks[:, 32:48], 5), unpack(blocks[:, 48:52], 4)], dim=1)
        d = blocks[:, 52:54].contiguous().view(torch.float16).float()
        return (v - 1).float() * d


@register(GGMLQuantizationType.Q1_0)
class Q1_0(BlockType):
    """d (mean |x|), qs[16] (bit j set when x[j] >= 0)."""

    @classmethod
    def quantize_rows(cls, x, qw):
        b = blocks_of(x, 128)
        d = divs(seq_sum(b.abs().t().contiguous()), 128.0)
        bits = (b >= 0).to(torch.int32).reshape(-1, 16, 8)
        q = (bits << const(range(8), torch.int32, x.device)).sum(dim=2)
        return bytes_rows(torch.cat([fp16_bytes(d), q.to(torch.uint8)], dim=1), x.shape[0])

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        q = blocks[:, 2:].to(torch.int32).unsqueeze(2)
        bits = ((q >> const(range(8), torch.int32, blocks.device)) & 1).reshape(-1, 128)
        return torch.where(bits == 1, d, -d)
