"""IQ2_XXS, IQ2_XS and IQ2_S in torch: quantization byte-identical to llama.cpp, and dequantization.

Both code groups of eight magnitudes as points of a fixed grid (three odd levels 1, 3, 5
per coordinate; 256 points for IQ2_XXS, 512 for IQ2_XS), keep 7 sign bits per group (an
even number of negatives, enforced by flipping the least important value) and a 4-bit
scale per 32 (IQ2_XXS) or 16 (IQ2_XS) values under an fp16 super-block scale. Like
llama.cpp, both need an importance matrix. IQ2_S has a 1024-point grid (two high index
bits in ``qh``), all eight sign bits per group, 4-bit scales per 16 values, and also
works without an importance matrix.

Grid points come from gguf-py's tables; the neighbour lists for off-grid level
combinations (grid points at the two smallest squared distances, in (distance, index)
order) are computed here as llama.cpp computes them in ``ggml_quantize_init``. The same
grids (this module also holds IQ1_S/IQ1_M's 2048-point one) decode the blocks: each class's
``dequantize_blocks`` looks the grid points up in torch, as ``dequantize_row_iq2_*`` does.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gq

from ..errors import LowbitError
from ._base import BlockType, blocks_of, bytes_rows, register
from ._blockops import (
    best_neighbour,
    const,
    divs,
    f32,
    fp16_at,
    fp16_bytes,
    le_u16,
    le_u32,
    make_qp_quants,
    nearest_int,
    recip,
    seq_sum,
    signs_of_7bits,
    signs_of_byte,
    sqrtf,
)

QK_K = 256
KMAXQ = 3


_GRIDS = {256: gq.IQ2_XXS, 512: gq.IQ2_XS, 1024: gq.IQ2_S, 2048: gq.IQ1_S}  # IQ1_M shares IQ1_S's grid


@functools.cache
def _grid_levels(grid_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(levels ``[G, 8]`` in 0..2 of every grid point, the value of each level as llama.cpp stores it)."""
    src = _GRIDS[grid_size]
    src.init_grid()
    level_values = np.asarray(src.grid_map, dtype=np.float32)
    vals = np.asarray(src.grid).reshape(grid_size, 8)
    return np.searchsorted(level_values, vals).astype(np.int64), level_values


@functools.lru_cache(maxsize=16)
def _grid_values(device: str, grid_size: int) -> torch.Tensor:
    """The grid's points as the dequantizers use them: float32 ``[G, 8]`` level values."""
    levels, level_values = _grid_levels(grid_size)
    return torch.from_numpy(level_values[levels]).to(torch.device(device))


@functools.cache
def _tables_np(grid_size: int) -> tuple[np.ndarray, ...]:
    """(grid [G, 8] odd positions, kmap [65536] index or -1, rowmap [65536], neighbours [R, K] padded with -1).

    Neighbours: the grid points at the ``nwant`` smallest distances (1 for IQ2_S's 1024 points,
    3 for IQ1_S's 2048, else 2).
    """
    nwant = {1024: 1, 2048: 3}.get(grid_size, 2)
    levels = _grid_levels(grid_size)[0]
    grid = 2 * levels + 1
    kmap = np.full(1 << 16, -1, dtype=np.int64)
    code = (levels << (2 * np.arange(8))).sum(axis=1)
    kmap[code] = np.arange(grid_size)
    # only level combinations the quantizer can produce (each level 0..2) need neighbours
    combos = np.stack(np.meshgrid(*[np.arange(3)] * 8, indexing="ij"), -1).reshape(-1, 8)
    ucodes = (combos << (2 * np.arange(8))).sum(axis=1)
    off = kmap[ucodes] < 0
    combos, ucodes = combos[off], ucodes[off]
    pos = 2 * combos + 1
    d2 = ((grid[None, :, :] - pos[:, None, :]) ** 2).sum(axis=2)
    order = np.lexsort((np.broadcast_to(np.arange(grid_size), d2.shape), d2), axis=1)
    d2s = np.take_along_axis(d2, order, axis=1)
    lists = []
    for i in range(len(ucodes)):
        distinct = np.unique(d2s[i])[:nwant]
        lists.append(order[i][d2s[i] <= distinct[-1]])
    width = max(len(v) for v in lists)
    # compact: row r of ``nb`` lists the neighbours of code ``ucodes[r]``; ``rowmap[u]`` finds the row
    nb = np.full((len(ucodes), width), -1, dtype=np.int32)
    for r, v in enumerate(lists):
        nb[r, : len(v)] = v
    rowmap = np.zeros(1 << 16, dtype=np.int64)
    rowmap[ucodes] = np.arange(len(ucodes))
    return grid, kmap, rowmap, nb


@functools.lru_cache(maxsize=8)
def _tables(device: str, grid_size: int) -> tuple[torch.Tensor, ...]:
    dev = torch.device(device)
    grid, kmap, rowmap, nb = _tables_np(grid_size)
    return (torch.from_numpy(grid).float().to(dev), torch.from_numpy(kmap).to(dev),
            torch.from_numpy(rowmap).to(dev), torch.from_numpy(nb).to(dev))


def _levels(v: torch.Tensor) -> torch.Tensor:
    return nearest_int(0.5 * (v - 1.0)).clamp_(0, KMAXQ - 1)


def _codes(l: torch.Tensor) -> torch.Tensor:
    out = l[..., 0]
    for i in range(1, 8):
        out = out | (l[..., i] << (2 * i))
    return out


def _snap(l, xv, wa, scale, tabs):
    """Levels ``[..., G, 8]`` -> (grid positions ``[..., G, 8]``, on_grid ``[..., G]``) (``iq2_find_best_neighbour``)."""
    grid, kmap, rowmap, nb = tabs
    u = _codes(l)
    gi = kmap[u]
    best_i = best_neighbour(gi, rowmap[u], nb, xv, wa, scale, lambda cand, _: grid[cand])
    return grid[best_i], gi >= 0


def _signs(b: torch.Tensor, w: torch.Tensor, parity: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """|x| with an even number of negatives per 8 (least important value flipped); 7-bit sign codes.

    Without ``parity``: plain |x| and all 8 sign bits.
    """
    N = b.shape[0]
    x8 = b.reshape(N, 32, 8)
    neg = x8 < 0
    xval = torch.where(neg, -x8, x8)
    bitv = const([1 << i for i in range(8)], torch.int32, b.device)
    s = (neg.to(torch.int32) * bitv).sum(dim=2)
    if not parity:
        return xval.reshape(N, 256), s
    odd = (neg.sum(dim=2) % 2) == 1
    imin = ((w.reshape(N, 32, 8) * x8) * x8).argmin(dim=2)
    flip = odd.unsqueeze(2) & (torch.arange(8, device=b.device) == imin.unsqueeze(2))
    xval = torch.where(flip, -xval, xval)
    s = torch.where(odd, s ^ (1 << imin.to(torch.int32)), s)
    return xval.reshape(N, 256), s & 127


def _search(xv, wv, wav, tabs, steps, denom, scale0, redo_all: bool):
    """Scale search over ``[M, n]`` sub-blocks then a re-snap with the chosen scale.

    redo_all: re-snap every group whenever the scale is positive (IQ2_XXS); otherwise only the
    groups that were off the grid, if any (IQ2_XS). Returns (scale >= 0, positions, flipped).
    """
    M, n = xv.shape
    G = n // 8
    cvals = const([f32(2 * KMAXQ - 1 + f32(i * f32(0.1))) for i in steps], torch.float32, xv.device)
    idc = cvals.unsqueeze(0) / denom.unsqueeze(1)
    tsc = recip(idc)
    xg = xv.reshape(M, 1, G, 8)
    wg = wav.reshape(M, 1, G, 8)
    pos, on = _snap(_levels(idc.reshape(M, -1, 1, 1) * xg), xg, wg, tsc.unsqueeze(-1).expand(-1, -1, G), tabs)
    q = pos.reshape(M, -1, n)
    sumqx = seq_sum((((wv * xv).unsqueeze(1)) * q).permute(2, 0, 1).contiguous())
    sumq2 = seq_sum(((wv.unsqueeze(1) * q) * q).permute(2, 0, 1).contiguous())
    best = torch.zeros_like(scale0)
    scale = scale0
    pick = torch.full(scale0.shape, -1, dtype=torch.int64, device=xv.device)
    for k in range(idc.shape[1]):
        a, c = sumqx[:, k], sumq2[:, k]
        take = (c > 0) & (a * a > best * c)
        sc = a / c
        scale = torch.where(take, sc, scale)
        best = torch.where(take, sc * a, best)
        pick = torch.where(take, torch.full_like(pick, k), pick)
    picked = pick >= 0
    kk = pick.clamp(min=0)
    P = torch.gather(q, 1, kk.view(M, 1, 1).expand(M, 1, n)).squeeze(1)
    P = torch.where(picked.unsqueeze(1), P, torch.ones_like(P))
    ong = torch.gather(on, 1, kk.view(M, 1, 1).expand(M, 1, G)).squeeze(1)
    ong = torch.where(picked.unsqueeze(1), ong, torch.ones_like(ong))

    redo = (scale > 0) if redo_all else ((~ong).any(dim=1) & (scale > 0))
    scs = torch.where(redo, scale, torch.ones_like(scale))
    xg2 = xv.reshape(M, G, 8)
    pos2, _ = _snap(_levels(recip(scs).view(M, 1, 1) * xg2), xg2, wav.reshape(M, G, 8), scs.view(M, 1).expand(-1, G), tabs)
    keep = torch.zeros_like(ong) if redo_all else ong
    P2 = torch.where(keep.unsqueeze(-1), P.reshape(M, G, 8), pos2).reshape(M, n)
    sqx = seq_sum(((wv * xv) * P2).t().contiguous())
    sq2 = seq_sum(((wv * P2) * P2).t().contiguous())
    scale = torch.where(redo & (sq2 > 0), sqx / sq2, scale)
    P = torch.where(redo.unsqueeze(1), P2, P)
    flipped = scale < 0
    return torch.where(flipped, -scale, scale), P, flipped


def _common(x: torch.Tensor, qw: torch.Tensor | None, name: str):
    if qw is None:
        raise LowbitError(None, f"{name} needs an importance matrix (as in llama.cpp)")
    rows = x.shape[0]
    b = blocks_of(x, QK_K)
    sigma2 = divs(seq_sum((b * b).t().contiguous()), 256.0)
    qb = qw.reshape(1, -1, QK_K).expand(rows, -1, -1).reshape(-1, QK_K)
    w = qb * sqrtf(sigma2.unsqueeze(1) + b * b)
    xval, s = _signs(b, w)
    return b, w, sqrtf(w), xval, s


def _scale_codes(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sub-block scales ``[N, k]`` -> (d [N], 4-bit codes [N, k] int64, has [N])."""
    max_scale = scale.amax(dim=1)
    max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))
    has = max_scale > 0
    d = divs(max_scale, 31.0)
    idd = recip(torch.where(has, d, torch.ones_like(d)))
    ls = nearest_int(0.5 * (idd.unsqueeze(1) * scale - 1.0)).clamp_(0, 15).to(torch.int64)
    return d, ls, has


def _le_bytes(v: torch.Tensor, nbytes: int) -> torch.Tensor:
    return torch.stack([(v >> (8 * i)) & 0xFF for i in range(nbytes)], dim=-1)


@register(GGMLQuantizationType.IQ2_XXS)
class IQ2_XXS(BlockType):
    """d, 8 x (uint32 four grid indices, uint32 4 x 7 sign bits | 4-bit scale << 28)."""

    chunk_elements = 1 << 15

    @classmethod
    def quantize_rows(cls, x, qw):
        b, w, wa, xval, s = _common(x, qw, "IQ2_XXS")
        N = b.shape[0]
        M = N * 8
        tabs = _tables(str(x.device), 256)
        xv, wv, wav = xval.reshape(M, 32), w.reshape(M, 32), wa.reshape(M, 32)
        zero = xv.amax(dim=1) < 1e-15
        scale0, _ = make_qp_quants(xv.t().contiguous(), KMAXQ + 1, wv.t().contiguous())
        eff_max = scale0 * float(KMAXQ)
        zero = zero | (eff_max <= 0)
        denom = torch.where(zero, torch.ones_like(eff_max), eff_max)
        scale, P, flipped = _search(xv, wv, wav, tabs, range(-6, 7), denom, scale0, True)
        sg = s.reshape(M, 4)
        sg = torch.where(flipped.unsqueeze(1), (~sg) & 127, sg).to(torch.int64)
        L = ((P - 1.0) * 0.5).to(torch.int64).reshape(M, 4, 8)
        gidx = tabs[1][_codes(L)]  # [M, 4]
        w0 = gidx[:, 0] | (gidx[:, 1] << 8) | (gidx[:, 2] << 16) | (gidx[:, 3] << 24)
        w1 = sg[:, 0] | (sg[:, 1] << 7) | (sg[:, 2] << 14) | (sg[:, 3] << 21)
        w0 = torch.where(zero, torch.zeros_like(w0), w0)
        w1 = torch.where(zero, torch.zeros_like(w1), w1)
        scale = torch.where(zero, torch.zeros_like(scale), scale).reshape(N, 8)
        d, ls, has = _scale_codes(scale)
        w1 = w1.reshape(N, 8) | (ls << 28)
        words = torch.stack([w0.reshape(N, 8), w1], dim=2).reshape(N, 16)
        out = torch.cat([fp16_bytes(d), _le_bytes(words, 4).reshape(N, 64).to(torch.uint8)], dim=1)
        out = torch.where(has.unsqueeze(1), out, torch.zeros_like(out))
        return bytes_rows(out, x.shape[0])

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        w = le_u32(blocks[:, 2:66]).reshape(n, 8, 2)
        db = (fp16_at(blocks) * (0.5 + (w[..., 1] >> 28).float())) * 0.25  # [N, 8]
        signs = signs_of_7bits((w[..., 1].unsqueeze(-1) >> const([0, 7, 14, 21], torch.int64, blocks.device)) & 127)
        idx = torch.stack([(w[..., 0] >> s) & 255 for s in (0, 8, 16, 24)], dim=-1)  # [N, 8, 4]
        grid = _grid_values(str(blocks.device), 256)[idx]  # [N, 8, 4, 8]
        return ((db.view(n, 8, 1, 1) * grid) * signs).reshape(n, 256)


@register(GGMLQuantizationType.IQ2_XS)
class IQ2_XS(BlockType):
    """d, 32 x uint16 (9-bit grid index | 7 sign bits << 9), scales[8] (two 4-bit per 32 values)."""

    chunk_elements = 1 << 15

    @classmethod
    def quantize_rows(cls, x, qw):
        b, w, wa, xval, s = _common(x, qw, "IQ2_XS")
        N = b.shape[0]
        M = N * 16
        tabs = _tables(str(x.device), 512)
        xv, wv, wav = xval.reshape(M, 16), w.reshape(M, 16), wa.reshape(M, 16)
        mx = xv.amax(dim=1)
        zero = mx < 1e-15
        denom = torch.where(zero, torch.ones_like(mx), mx)
        scale0 = divs(denom, float(2 * KMAXQ - 1))
        scale, P, flipped = _search(xv, wv, wav, tabs, range(-9, 10), denom, scale0, False)
        sg = s.reshape(M, 2)
        sg = torch.where(flipped.unsqueeze(1), (~sg) & 127, sg).to(torch.int64)
        L = ((P - 1.0) * 0.5).to(torch.int64).reshape(M, 2, 8)
        gidx = tabs[1][_codes(L)]  # [M, 2]
        q2 = gidx | (sg << 9)
        q2 = torch.where(zero.unsqueeze(1), torch.zeros_like(q2), q2)
        scale = torch.where(zero, torch.zeros_like(scale), scale).reshape(N, 16)
        d, ls, has = _scale_codes(scale)
        sc = ls[:, 0::2] | (ls[:, 1::2] << 4)
        out = torch.cat([fp16_bytes(d), _le_bytes(q2.reshape(N, 32), 2).reshape(N, 64), sc], dim=1).to(torch.uint8)
        out = torch.where(has.unsqueeze(1), out, torch.zeros_like(out))
        return bytes_rows(out, x.shape[0])

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        q = le_u16(blocks[:, 2:66]).reshape(n, 16, 2)
        sc = blocks[:, 66:74].to(torch.int64)
        sc = torch.stack([sc & 15, sc >> 4], dim=-1).reshape(n, 16)
        db = (fp16_at(blocks) * (0.5 + sc.float())) * 0.25
        grid = _grid_values(str(blocks.device), 512)[q & 511]  # [N, 16, 2, 8]
        return ((db.view(n, 16, 1, 1) * grid) * signs_of_7bits(q >> 9)).reshape(n, 256)


@register(GGMLQuantizationType.IQ2_S)
class IQ2_S(BlockType):
    """d, qs[64] (32 grid index low bytes, then 32 sign bytes), qh[8] (2 high bits per group), scales[8]."""

    chunk_elements = 1 << 15

    @classmethod
    def quantize_rows(cls, x, qw):
        rows = x.shape[0]
        b = blocks_of(x, QK_K)
        N = b.shape[0]
        sigma2 = 2.0 * seq_sum((b * b).t().contiguous()) / 256.0
        if qw is not None:
            qb = qw.reshape(1, -1, QK_K).expand(rows, -1, -1).reshape(-1, QK_K)
            w = qb * sqrtf(sigma2.unsqueeze(1) + b * b)
        else:
            w = (sigma2 * f32(0.25)).unsqueeze(1) + b * b
        wa = sqrtf(w)
        xval, s = _signs(b, w, parity=False)
        M = N * 16
        tabs = _tables(str(x.device), 1024)
        xv, wv, wav = xval.reshape(M, 16), w.reshape(M, 16), wa.reshape(M, 16)
        mx = xv.amax(dim=1)
        zero = mx < f32(1e-8)
        denom = torch.where(zero, torch.ones_like(mx), mx)
        scale0 = divs(denom, float(2 * KMAXQ - 1))
        scale, P, flipped = _search(xv, wv, wav, tabs, range(-9, 10), denom, scale0, False)
        sg = s.reshape(M, 2)
        sg = torch.where(flipped.unsqueeze(1), (~sg) & 255, sg).to(torch.int64)
        L = ((P - 1.0) * 0.5).to(torch.int64).reshape(M, 2, 8)
        gidx = tabs[1][_codes(L)]  # [M, 2]
        z1 = zero.unsqueeze(1)
        gidx = torch.where(z1, torch.zeros_like(gidx), gidx).reshape(N, 32)
        sg = torch.where(z1, torch.zeros_like(sg), sg).reshape(N, 32)
        hi = (gidx >> 8).reshape(N, 8, 4)
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
        scale = torch.where(zero, torch.zeros_like(scale), scale).reshape(N, 16)
        d, ls, has = _scale_codes(scale)
        sc = ls[:, 0::2] | (ls[:, 1::2] << 4)
        sc = torch.where(has.unsqueeze(1), sc, torch.zeros_like(sc))  # all scales 0: d and scales stay 0
        out = torch.cat([fp16_bytes(d * f32(0.9875)), gidx & 255, sg, qh, sc], dim=1).to(torch.uint8)
        return bytes_rows(out, rows)

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        qs = blocks[:, 2:34].to(torch.int64)
        signs = signs_of_byte(blocks[:, 34:66]).reshape(n, 16, 2, 8)
        qh = blocks[:, 66:74].to(torch.int64)
        hi = ((qh.unsqueeze(-1) >> const([0, 2, 4, 6], torch.int64, blocks.device)) & 3).reshape(n, 32)
        sc = blocks[:, 74:82].to(torch.int64)
        sc = torch.stack([sc & 15, sc >> 4], dim=-1).reshape(n, 16)
        db = (fp16_at(blocks) * (0.5 + sc.float())) * 0.25
        grid = _grid_values(str(blocks.device), 1024)[(qs | (hi << 8)).reshape(n, 16, 2)]
        return ((db.view(n, 16, 1, 1) * grid) * signs).reshape(n, 256)
