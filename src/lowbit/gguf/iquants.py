"""Non-linear IQ types: IQ4_NL and IQ4_XS in torch, byte-identical to llama.cpp.

Both map each value to one of 16 fixed levels (``KVALUES``) times a block scale.
IQ4_NL has one fp16 scale per 32 values; IQ4_XS has a 256-value super-block with an
fp16 scale and eight 6-bit sub-block scales. The grid-based types live in
:mod:`~lowbit.gguf.iq1quants`, :mod:`~lowbit.gguf.iq2quants` and :mod:`~lowbit.gguf.iq3quants`.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from ._base import BlockType, blocks_of, bytes_rows, register
from ._blockops import const, divs, f32, first_abs_max, fp16_bytes, nearest_int, recip, seq_sum, sqrtf, u16_bytes

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
NTRY = 7  # llama.cpp's quantize_iq4_nl / quantize_iq4_xs search width


def _levels(device: torch.device) -> torch.Tensor:
    return const(KVALUES, torch.float32, device)


def _midpoints(device: torch.device) -> torch.Tensor:
    """Doubled midpoints ``val[k-1] + val[k]`` (k = 1..15) of the level table."""
    return const([KVALUES[k - 1] + KVALUES[k] for k in range(1, 16)], torch.float32, device)


def best_index(v: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level, ties resolved like llama.cpp's ``best_index_int8`` (int32).

    llama.cpp compares ``v + v`` with each doubled midpoint; on a sorted table its binary
    search returns the number of midpoints not above ``v + v``.
    """
    v2 = v + v
    idx = torch.bucketize(v2, mids, out_int32=True, right=True)
    return torch.where(torch.isnan(v2), torch.zeros_like(idx), idx)  # C: NaN compares false -> 0


def _block_scales(xb: torch.Tensor, w: torch.Tensor, mids: torch.Tensor, lv: torch.Tensor):
    """Per-32 scale search of ``quantize_row_iq4_nl_impl``. xb, w: ``[32, M]`` -> (scale [M], zero [M])."""
    amax, mx = first_abs_max(xb)
    zero = amax < 1e-15
    mx = torch.where(zero, torch.ones_like(mx), mx)
    d = divs(-mx, float(KVALUES[0]))
    idv = recip(d)
    # the first guess and the 2*NTRY+1 alternative inverse scales, as [M, S]
    alts = const([float(t + KVALUES[0]) for t in range(-NTRY, NTRY + 1)], torch.float32, xb.device)
    isc = torch.cat([idv.unsqueeze(1), alts.unsqueeze(0) / mx.unsqueeze(1)], dim=1)
    sqx = torch.zeros_like(isc)
    sq2 = torch.zeros_like(isc)
    for j in range(xb.shape[0]):
        xj = xb[j].unsqueeze(1)
        q = lv[best_index(isc * xj, mids)]
        wq = w[j].unsqueeze(1) * q
        sqx = sqx + wq * xj
        sq2 = sq2 + wq * q
    a, b = sqx[:, 0], sq2[:, 0]
    d = torch.where(b > 0, a / b, torch.zeros_like(a))
    best = d * a
    for k in range(1, isc.shape[1]):
        a, b = sqx[:, k], sq2[:, k]
        take = (b > 0) & (a * a > best * b)
        dn = a / b
        d = torch.where(take, dn, d)
        best = torch.where(take, dn * a, best)
    return torch.where(zero, torch.zeros_like(d), d)


def _weights(b: torch.Tensor, qw: torch.Tensor | None, rows: int, sb: int) -> torch.Tensor:
    """Search weights for super-blocks ``b`` ``[N, sb]``: ``x*x``, or ``qw*sqrt(sigma2 + x*x)``."""
    if qw is None:
        return b * b
    sigma2 = seq_sum((b * b).t().contiguous()) * f32(2.0 / sb)
    qb = qw.reshape(1, -1, sb).expand(rows, -1, -1).reshape(-1, sb)
    return qb * sqrtf(sigma2.unsqueeze(1) + b * b)


def _pack(L: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, n]`` -> bytes ``[N, n/2]``: per 32 values, element j low nibble, j+16 high."""
    L = L.to(torch.uint8).reshape(L.shape[0], -1, 2, 16)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(L.shape[0], -1)


def _unpack(qs: torch.Tensor) -> torch.Tensor:
    q = qs.to(torch.int64).reshape(qs.shape[0], -1, 1, 16)
    return torch.cat([q & 0xF, q >> 4], dim=2).reshape(qs.shape[0], -1)


@register(GGMLQuantizationType.IQ4_NL)
class IQ4_NL(BlockType):
    """d, qs[16]."""

    @classmethod
    def quantize_rows(cls, x, qw):
        rows = x.shape[0]
        b = blocks_of(x, 32)
        mids, lv = _midpoints(x.device), _levels(x.device)
        w = _weights(b, qw, rows, 32)
        d = _block_scales(b.t().contiguous(), w.t().contiguous(), mids, lv)
        idv = torch.where(d != 0, recip(d), torch.zeros_like(d))
        L = best_index(idv.unsqueeze(1) * b, mids)
        return bytes_rows(torch.cat([fp16_bytes(d), _pack(L)], dim=1), rows)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        return d * _levels(blocks.device)[_unpack(blocks[:, 2:])]


@register(GGMLQuantizationType.IQ4_XS)
class IQ4_XS(BlockType):
    """d, scales_h (uint16), scales_l[4], qs[128]."""

    @classmethod
    def quantize_rows(cls, x, qw):
        rows = x.shape[0]
        b = blocks_of(x, 256)
        N = b.shape[0]
        mids, lv = _midpoints(x.device), _levels(x.device)
        w = _weights(b, qw, rows, 256)
        sc = _block_scales(b.reshape(-1, 32).t().contiguous(), w.reshape(-1, 32).t().contiguous(), mids, lv)
        sc = sc.reshape(N, 8)
        _, max_scale = first_abs_max(sc.t())
        d = divs(-max_scale, 32.0)
        idv = torch.where(d != 0, recip(d), torch.zeros_like(d))
        l = nearest_int(idv.unsqueeze(1) * sc).clamp_(-32, 31)
        dl = d.unsqueeze(1) * l.float()
        idl = torch.where(dl != 0, recip(dl), torch.zeros_like(dl))
        L = best_index(idl.unsqueeze(-1) * b.reshape(N, 8, 32), mids).reshape(N, 256)
        l = l + 32
        lo = l & 0xF
        scales_l = (lo[:, 0::2] | (lo[:, 1::2] << 4)).to(torch.uint8)
        hi = (l >> 4).to(torch.int64)
        scales_h = (hi << (2 * torch.arange(8, device=x.device))).sum(dim=1)
        out = torch.cat([fp16_bytes(d), u16_bytes(scales_h), scales_l, _pack(L)], dim=1)
        return bytes_rows(out, rows)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        sh = blocks[:, 2].to(torch.int32) | (blocks[:, 3].to(torch.int32) << 8)
        sl = blocks[:, 4:8].to(torch.int32)
        lo = torch.stack([sl & 0xF, sl >> 4], dim=2).reshape(-1, 8)
        hi = (sh.unsqueeze(1) >> (2 * torch.arange(8, device=blocks.device))) & 3
        ls = (lo | (hi << 4)) - 32
        dl = (d * ls.float()).unsqueeze(-1)
        q = _levels(blocks.device)[_unpack(blocks[:, 8:])].reshape(-1, 8, 32)
        return (dl * q).reshape(-1, 256)
