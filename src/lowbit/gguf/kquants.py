"""K-quants (Q2_K .. Q6_K): 256-element super-blocks, byte-identical to llama.cpp.

Each type has two quantizers, as in llama.cpp: the reference one used without an
importance matrix, and the importance-weighted one (different scale searches and a
second-level search for the sub-block scales). Everything is vectorized over all
super-blocks; the only Python loops run over the elements of a (sub-)block where
llama.cpp's float32 summation order must be reproduced.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from ._base import BlockType, blocks_of, bytes_rows, register
from ._blockops import (
    const,
    divs,
    first_abs_max,
    fp16_bytes,
    fp16_round,
    make_q3_quants,
    make_qkx,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    recip,
    sdiv,
    seq_sum,
    sqrtf,
)

QK_K = 256


# --------------------------------------------------------------------------- helpers


def _sub(x: torch.Tensor, n: int) -> torch.Tensor:
    """Super-blocks ``[N, 256]`` -> element-major sub-blocks ``[n, N * 256 / n]``."""
    return x.reshape(-1, n).t().contiguous()


def _unsub(t: torch.Tensor, nsb: int) -> torch.Tensor:
    """Element-major ``[n, N * nsb]`` -> ``[N, nsb, n]``."""
    n = t.shape[0]
    return t.t().reshape(-1, nsb, n)


def _block_sumsq(b: torch.Tensor) -> torch.Tensor:
    """Sequential ``sum x*x`` over each super-block ``[N, 256]`` -> ``[N]``."""
    return seq_sum((b * b).t().contiguous())


def _imatrix_blocks(qw: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-column importance ``[C]`` -> per-super-block ``[rows * C / 256, 256]``."""
    return qw.reshape(1, -1, QK_K).expand(rows, -1, -1).reshape(-1, QK_K)


def _pos_max(v: torch.Tensor) -> torch.Tensor:
    """Row max of ``[N, k]`` starting from +0.0 (C's ``if (v > m) m = v`` with ``m = 0``)."""
    m = v.amax(dim=1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _requant(x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, lo: int, hi: int, dm: torch.Tensor | None) -> torch.Tensor:
    """Final pass: ``L = clamp(nearest_int((x + dm) / d))`` where ``d != 0``, else keep ``L``.

    x, L: ``[N, nsb, n]``; d, dm: ``[N, nsb]``.
    """
    num = x if dm is None else x + dm.unsqueeze(-1)
    dd = d.unsqueeze(-1)
    safe = torch.where(dd != 0, dd, torch.ones_like(dd))
    newl = nearest_int(num / safe).clamp_(lo, hi)
    return torch.where(dd != 0, newl, L)


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """``[N, 256]`` 2-bit codes -> ``[N, 64]``: byte 32h+l holds elements 128h+32k+l at bits 2k."""
    L = L.to(torch.uint8).reshape(-1, 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    q = qs.to(torch.int32).reshape(-1, 2, 1, 32)
    sh = const([0, 2, 4, 6], torch.int32, qs.device).reshape(1, 1, 4, 1)
    return ((q >> sh) & 3).reshape(-1, QK_K)


def _pack_4bit_pairs(L: torch.Tensor) -> torch.Tensor:
    """``[N, 256]`` 4-bit codes -> ``[N, 128]``: byte 32g+l = element 64g+l | element 64g+32+l << 4."""
    L = L.to(torch.uint8).reshape(-1, 4, 2, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_4bit_pairs(qs: torch.Tensor) -> torch.Tensor:
    q = qs.to(torch.int32).reshape(-1, 4, 1, 32)
    return torch.cat([q & 0xF, q >> 4], dim=2).reshape(-1, QK_K)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins ``[N, 8]`` -> the 12-byte Q4_K/Q5_K layout (uint8 arithmetic as in C)."""
    ls = ls.to(torch.int32)
    lm = lm.to(torch.int32)
    b0 = (ls[:, :4] | ((ls[:, 4:] >> 4) << 6)) & 0xFF
    b4 = (lm[:, :4] | ((lm[:, 4:] >> 4) << 6)) & 0xFF
    b8 = ((ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)) & 0xFF
    return torch.cat([b0, b4, b8], dim=1).to(torch.uint8)


def _unpack_scales_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes ``[N, 12]`` -> (scales ``[N, 8]``, mins ``[N, 8]``) as llama.cpp's ``get_scale_min_k4``."""
    q = sc.to(torch.int32)
    lo_s = q[:, 0:4] & 63
    lo_m = q[:, 4:8] & 63
    hi_s = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    hi_m = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return torch.cat([lo_s, hi_s], 1), torch.cat([lo_m, hi_m], 1)


def _pack_scales_q3(l: torch.Tensor) -> torch.Tensor:
    """Sixteen 6-bit values ``[N, 16]`` -> the 12-byte Q3_K scale layout."""
    l = l.to(torch.int32)
    low = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    h = (l >> 4) & 3  # [N, 16], group g = j // 4, position m = j % 4
    h = h.reshape(-1, 4, 4)
    high = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return torch.cat([low, high], dim=1).to(torch.uint8)


def _unpack_scales_q3(sc: torch.Tensor) -> torch.Tensor:
    """12 bytes -> sixteen signed scales ``[N, 16]`` (value - 32)."""
    q = sc.to(torch.int32)
    low = torch.cat([q[:, :8] & 0xF, q[:, :8] >> 4], dim=1)
    sh = const([0, 2, 4, 6], torch.int32, sc.device).reshape(1, 4, 1)
    high = ((q[:, 8:12].unsqueeze(1) >> sh) & 3).reshape(-1, 16)
    return (low | (high << 4)) - 32


def _f16_field(blocks: torch.Tensor, off: int) -> torch.Tensor:
    return blocks[:, off : off + 2].contiguous().view(torch.float16).float().squeeze(1)


# --------------------------------------------------------------------------- Q2_K


@register(GGMLQuantizationType.Q2_K)
class Q2_K(BlockType):
    """scales[16] (4-bit scale | 4-bit min << 4), qs[64], d, dmin."""

    @classmethod
    def quantize_rows(cls, x, qw):
        rows = x.shape[0]
        b = blocks_of(x, QK_K)
        N = b.shape[0]
        xs = _sub(b, 16)
        if qw is None:
            sc, mn, L = make_qkx(xs, xs.abs(), 3, -0.5, 0.1, 15, True)
            sc, mn = sc.reshape(N, 16), mn.reshape(N, 16)
            max_scale = _pos_max(sc)
            max_min = _pos_max(mn)
            has_s = max_scale > 0
            iscale = torch.where(has_s, sdiv(15.0, torch.where(has_s, max_scale, torch.ones_like(max_scale))), torch.zeros_like(max_scale))
            ls = torch.where(has_s.unsqueeze(1), nearest_int(iscale.unsqueeze(1) * sc) & 0xFF, torch.zeros_like(sc, dtype=torch.int32))
            d = torch.where(has_s, divs(max_scale, 15.0), torch.zeros_like(max_scale))
            has_m = max_min > 0
            imin = sdiv(15.0, torch.where(has_m, max_min, torch.ones_like(max_min)))
            lm = torch.where(has_m.unsqueeze(1), nearest_int(imin.unsqueeze(1) * mn), torch.zeros_like(ls))
            byte = (ls | ((lm << 4) & 0xFF)) & 0xFF
            dmin = torch.where(has_m, divs(max_min, 15.0), torch.zeros_like(max_min))
        else:
            qb = _imatrix_blocks(qw, rows)
            sigma2 = _block_sumsq(b) / 256.0
            w = qb * sqrtf(sigma2.unsqueeze(1) + b * b)
            ws = _sub(w, 16)
            sw = seq_sum(ws).reshape(N, 16)
            sc, mn, L = make_qkx(xs, ws, 3, -0.9, 0.05, 36, False)
            swt = sw.t().contiguous()
            d, Ls = make_qp_quants(sc.reshape(N, 16).t().contiguous(), 15, swt)
            dmin, Lm = make_qp_quants(mn.reshape(N, 16).t().contiguous(), 15, swt)
            byte = (Ls.t() | ((Lm.t() << 4) & 0xFF)) & 0xFF
        d16, m16 = fp16_round(d), fp16_round(dmin)
        dl = d16.unsqueeze(1) * (byte & 0xF).float()
        ml = m16.unsqueeze(1) * (byte >> 4).float()
        L = _requant(b.reshape(N, 16, 16), _unsub(L, 16), dl, 0, 3, ml)
        out = torch.cat([byte.to(torch.uint8), _pack_2bit(L.reshape(N, QK_K)), fp16_bytes(d), fp16_bytes(dmin)], dim=1)
        return bytes_rows(out, rows)

    @classmethod
    def dequantize_blocks(cls, blocks):
        sc = blocks[:, :16].to(torch.int32)
        q = _unpack_2bit(blocks[:, 16:80]).float().reshape(-1, 16, 16)
        d = _f16_field(blocks, 80).unsqueeze(1)
        dmin = _f16_field(blocks, 82).unsqueeze(1)
        dl = (d * (sc & 0xF).float()).unsqueeze(-1)
        ml = (dmin * (sc >> 4).float()).unsqueeze(-1)
        return (dl * q - ml).reshape(-1, QK_K)


# --------------------------------------------------------------------------- Q3_K


@register(GGMLQuantizationType.Q3_K)
class Q3_K(BlockType):
    """hmask[32], qs[64], scales[12] (sixteen 6-bit), d."""

    @classmethod
    def quantize_rows(cls, x, qw):
        rows = x.shape[0]
        b = blocks_of(x, QK_K)
        N = b.shape[0]
        xs = _sub(b, 16)
        if qw is None:
            sc, L = make_q3_quants(xs, 4)
            sc = sc.reshape(N, 16)
            amax, max_scale = first_abs_max(sc.t())
            nz = max_scale != 0
            iscale = sdiv(-32.0, torch.where(nz, max_scale, torch.ones_like(max_scale)))
            l = nearest_int(iscale.unsqueeze(1) * sc).clamp_(-32, 31) + 32
            l = torch.where(nz.unsqueeze(1), l, torch.zeros_like(l))
            packed = _pack_scales_q3(l)
            packed = torch.where(nz.unsqueeze(1), packed, torch.zeros_like(packed))
            d = torch.where(nz, recip(iscale), torch.zeros_like(iscale))
        else:
            qb = _imatrix_blocks(qw, rows)
            sigma2 = 2.0 * _block_sumsq(b) / 256.0
            w = qb * sqrtf(sigma2.unsqueeze(1) + b * b)
            ws = _sub(w, 16)
            sw = seq_sum(ws).reshape(N, 16)
            sc, L = make_qx_quants(xs, 4, ws)
            d, Ls = make_qx_quants(sc.reshape(N, 16).t().contiguous(), 32, sw.t().contiguous())
            packed = _pack_scales_q3(Ls.t())
        dsc = fp16_round(d).unsqueeze(1) * _unpack_scales_q3(packed).float()
        L = _requant(b.reshape(N, 16, 16), _unsub(L, 16) - 4, dsc, -4, 3, None) + 4
        L = L.reshape(N, QK_K)
        hi = (L > 3).to(torch.int32).reshape(N, 8, 32)
        hmask = sum(hi[:, k] << k for k in range(8))
        L = torch.where(L > 3, L - 4, L)
        out = torch.cat([hmask.to(torch.uint8), _pack_2bit(L), packed, fp16_bytes(d)], dim=1)
        return bytes_rows(out, rows)

    @classmethod
    def dequantize_blocks(cls, blocks):
        hmask = blocks[:, :32].to(torch.int32)
        ql = _unpack_2bit(blocks[:, 32:96])
        sc = _unpack_scales_q3(blocks[:, 96:108]).float()
        d = _f16_field(blocks, 108).unsqueeze(1)
        sh = torch.arange(8, device=blocks.device, dtype=torch.int32).reshape(1, 8, 1)
        h = ((hmask.unsqueeze(1) >> sh) & 1).reshape(-1, QK_K)
        q = (ql - 4 * (1 - h)).float().reshape(-1, 16, 16)
        return ((d * sc).unsqueeze(-1) * q).reshape(-1, QK_K)


# --------------------------------------------------------------------------- Q4_K / Q5_K


def _q45_scales(x: torch.Tensor, qw: torch.Tensor | None, rows: int, nmax: int, ref_search: tuple[float, float, int]):
    """Sub-block scales/mins and the packed 12 bytes for Q4_K and Q5_K. Returns (d, dmin, packed, L, b)."""
    b = blocks_of(x, QK_K)
    N = b.shape[0]
    xs = _sub(b, 32)
    if qw is None:
        sum_x2 = seq_sum(xs * xs)
        av_x = sqrtf(sum_x2 / 32.0)
        w = av_x.unsqueeze(0) + xs.abs()
        rmin, rdelta, nstep = ref_search
        sc, mn, L = make_qkx(xs, w, nmax, rmin, rdelta, nstep, False)
        sc, mn = sc.reshape(N, 8), mn.reshape(N, 8)
        max_scale = _pos_max(sc)
        max_min = _pos_max(mn)
        inv_s = torch.where(max_scale > 0, sdiv(63.0, torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale))), torch.zeros_like(max_scale))
        inv_m = torch.where(max_min > 0, sdiv(63.0, torch.where(max_min > 0, max_min, torch.ones_like(max_min))), torch.zeros_like(max_min))
        ls = (nearest_int(inv_s.unsqueeze(1) * sc) & 0xFF).clamp_(max=63)
        lm = (nearest_int(inv_m.unsqueeze(1) * mn) & 0xFF).clamp_(max=63)
        d = divs(max_scale, 63.0)
        dmin = divs(max_min, 63.0)
    else:
        qb = _imatrix_blocks(qw, rows)
        sigma2 = 2.0 * _block_sumsq(b) / 256.0
        w = _sub(qb * sqrtf(sigma2.unsqueeze(1) + b * b), 32)
        sw = seq_sum(w).reshape(N, 8).t().contiguous()
        sc, mn, L = make_qkx(xs, w, nmax, -0.9, 0.05, 36, False)
        d, ls = make_qp_quants(sc.reshape(N, 8).t().contiguous(), 63, sw)
        dmin, lm = make_qp_quants(mn.reshape(N, 8).t().contiguous(), 63, sw)
        ls, lm = ls.t(), lm.t()
        if nmax == 31:  # Q5_K clamps, Q4_K does not
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    packed = _pack_scales_k4(ls, lm)
    s6, m6 = _unpack_scales_k4(packed)
    dl = fp16_round(d).unsqueeze(1) * s6.float()
    ml = fp16_round(dmin).unsqueeze(1) * m6.float()
    L = _requant(b.reshape(N, 8, 32), _unsub(L, 8), dl, 0, nmax, ml).reshape(N, QK_K)
    return d, dmin, packed, L


@register(GGMLQuantizationType.Q4_K)
class Q4_K(BlockType):
    """d, dmin, scales[12], qs[128]."""

    @classmethod
    def quantize_rows(cls, x, qw):
        d, dmin, packed, L = _q45_scales(x, qw, x.shape[0], 15, (-1.0, 0.1, 20))
        out = torch.cat([fp16_bytes(d), fp16_bytes(dmin), packed, _pack_4bit_pairs(L)], dim=1)
        return bytes_rows(out, x.shape[0])

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _f16_field(blocks, 0).unsqueeze(1)
        dmin = _f16_field(blocks, 2).unsqueeze(1)
        s6, m6 = _unpack_scales_k4(blocks[:, 4:16])
        q = _unpack_4bit_pairs(blocks[:, 16:]).float().reshape(-1, 8, 32)
        return ((d * s6.float()).unsqueeze(-1) * q - (dmin * m6.float()).unsqueeze(-1)).reshape(-1, QK_K)


@register(GGMLQuantizationType.Q5_K)
class Q5_K(BlockType):
    """d, dmin, scales[12], qh[32], qs[128]."""

    @classmethod
    def quantize_rows(cls, x, qw):
        d, dmin, packed, L = _q45_scales(x, qw, x.shape[0], 31, (-0.5, 0.1, 15))
        N = L.shape[0]
        hi = (L >> 4).reshape(N, 8, 32)
        qh = sum(hi[:, k] << k for k in range(8))
        out = torch.cat([fp16_bytes(d), fp16_bytes(dmin), packed, qh.to(torch.uint8), _pack_4bit_pairs(L & 0xF)], dim=1)
        return bytes_rows(out, x.shape[0])

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _f16_field(blocks, 0).unsqueeze(1)
        dmin = _f16_field(blocks, 2).unsqueeze(1)
        s6, m6 = _unpack_scales_k4(blocks[:, 4:16])
        qh = blocks[:, 16:48].to(torch.int32)
        sh = torch.arange(8, device=blocks.device, dtype=torch.int32).reshape(1, 8, 1)
        h = ((qh.unsqueeze(1) >> sh) & 1).reshape(-1, QK_K)
        q = (_unpack_4bit_pairs(blocks[:, 48:]) | (h << 4)).float().reshape(-1, 8, 32)
        return ((d * s6.float()).unsqueeze(-1) * q - (dmin * m6.float()).unsqueeze(-1)).reshape(-1, QK_K)


# --------------------------------------------------------------------------- Q6_K


@register(GGMLQuantizationType.Q6_K)
class Q6_K(BlockType):
    """ql[128], qh[64], scales[16] (int8), d."""

    @classmethod
    def quantize_rows(cls, x, qw):
        rows = x.shape[0]
        b = blocks_of(x, QK_K)
        N = b.shape[0]
        xs = _sub(b, 16)
        ws = None if qw is None else _sub(_imatrix_blocks(qw, rows), 16)
        sc, L = make_qx_quants(xs, 32, ws)
        sc = sc.reshape(N, 16)
        amax, max_scale = first_abs_max(sc.t())
        zero = amax < 1e-15
        iscale = sdiv(-128.0, torch.where(zero, torch.ones_like(max_scale), max_scale))
        d = recip(iscale)
        s8 = nearest_int(iscale.unsqueeze(1) * sc).clamp_(max=127)
        dl = fp16_round(d).unsqueeze(1) * s8.float()
        L = _requant(b.reshape(N, 16, 16), _unsub(L, 16) - 32, dl, -32, 31, None) + 32
        L = L.reshape(N, 2, 4, 32)
        lo = L & 0xF
        ql = torch.stack([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2).reshape(N, 128)
        hi = L >> 4
        qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(N, 64)
        out = torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), (s8 & 0xFF).to(torch.uint8), fp16_bytes(d)], dim=1)
        out = torch.where(zero.unsqueeze(1), torch.zeros_like(out), out)
        return bytes_rows(out, rows)

    @classmethod
    def dequantize_blocks(cls, blocks):
        ql = blocks[:, :128].to(torch.int32).reshape(-1, 2, 1, 64)
        qh = blocks[:, 128:192].to(torch.int32).reshape(-1, 2, 1, 32)
        sc = blocks[:, 192:208].contiguous().view(torch.int8).float()
        d = _f16_field(blocks, 208).unsqueeze(1)
        lo = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(-1, 2, 4, 32)
        sh = const([0, 2, 4, 6], torch.int32, blocks.device).reshape(1, 1, 4, 1)
        hi = (qh >> sh) & 3
        q = ((lo | (hi << 4)) - 32).float().reshape(-1, 16, 16)
        return ((d * sc).unsqueeze(-1) * q).reshape(-1, QK_K)
