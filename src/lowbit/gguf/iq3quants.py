"""IQ3_XXS and IQ3_S in torch: quantization byte-identical to llama.cpp, and dequantization.

IQ3_XXS codes each group of four magnitudes as one of 256 points of a fixed grid (four
odd levels 1..15 each), with the signs of each group of eight stored as 7 bits (the
eighth sign is implied: an even number of negatives, enforced by flipping the least
important value), and a 4-bit scale per 32 values under an fp16 super-block scale.

IQ3_S uses a 512-point grid (a 9th index bit in ``qh``), stores all eight signs of each
group of eight, and packs the 4-bit scales two per byte.

The grid points come from gguf-py's IQ3_XXS / IQ3_S tables. For a level combination off the grid
the quantizer searches a neighbour list: the grid points at the two smallest squared
distances, in (distance, index) order, computed once here as llama.cpp computes them at
``ggml_quantize_init``. The scale search tries 31 scales per 32 values at once; the
neighbour search loops over the (padded) neighbour slots in list order. Each class's
``dequantize_blocks`` decodes with the same grids, in torch.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gq

from ._base import BlockType, blocks_of, bytes_rows, register
from ._blockops import (
    best_neighbour,
    const,
    divs,
    f32,
    fp16_at,
    fp16_bytes,
    le_u32,
    nearest_int,
    recip,
    seq_sum,
    signs_of_7bits,
    signs_of_byte,
    sqrtf,
)

QK_K = 256
KMAXQ = 8
EPS = f32(1e-8)


@functools.cache
def _grid_levels(grid_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(levels ``[G, 4]`` in 0..7 of every grid point, the value of each level as llama.cpp stores it)."""
    src = gq.IQ3_XXS if grid_size == 256 else gq.IQ3_S
    src.init_grid()
    level_values = np.asarray(src.grid_map, dtype=np.float32)
    vals = np.asarray(src.grid).reshape(grid_size, 4)
    return np.searchsorted(level_values, vals).astype(np.int64), level_values


@functools.lru_cache(maxsize=8)
def _grid_values(device: str, grid_size: int) -> torch.Tensor:
    """The grid's points as the dequantizers use them: float32 ``[G, 4]`` level values."""
    levels, level_values = _grid_levels(grid_size)
    return torch.from_numpy(level_values[levels]).to(torch.device(device))


@functools.cache
def _tables_np(grid_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid [G, 4] odd positions, kmap [4096] grid index or -1, neighbours [4096, K] padded with -1).

    A level combination off the grid gets the grid points at its ``nwant`` smallest squared
    distances (2 for the 256-point grid, 3 for the 512-point one), in (distance, index) order.
    """
    nwant = 2 if grid_size == 256 else 3
    levels = _grid_levels(grid_size)[0]
    grid = 2 * levels + 1
    kmap = np.full(4096, -1, dtype=np.int64)
    code = (levels << (3 * np.arange(4))).sum(axis=1)
    kmap[code] = np.arange(grid_size)
    u = np.arange(4096)
    pos = 2 * ((u[:, None] >> (3 * np.arange(4))) & 7) + 1  # [4096, 4]
    d2 = ((grid[None, :, :] - pos[:, None, :]) ** 2).sum(axis=2)  # [4096, G]
    order = np.lexsort((np.broadcast_to(np.arange(grid_size), d2.shape), d2), axis=1)
    d2s = np.take_along_axis(d2, order, axis=1)
    lists: list[list[int]] = []
    for i in range(4096):
        if kmap[i] >= 0:
            lists.append([])
            continue
        distinct = np.unique(d2s[i])[:nwant]
        lists.append(order[i][d2s[i] <= distinct[-1]].tolist())
    width = max(len(v) for v in lists)
    nb = np.full((4096, width), -1, dtype=np.int64)
    for i, v in enumerate(lists):
        nb[i, : len(v)] = v
    return grid, kmap, nb


@functools.lru_cache(maxsize=8)
def _tables(device: str, grid_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grid, kmap, nb = _tables_np(grid_size)
    dev = torch.device(device)
    return (torch.from_numpy(grid).float().to(dev), torch.from_numpy(kmap).to(dev), torch.from_numpy(nb).to(dev))


def _levels(v: torch.Tensor) -> torch.Tensor:
    """``clamp(nearest_int(0.5 * (v - 1)), 0, 7)`` for ``v = id * x``."""
    return nearest_int(0.5 * (v - 1.0)).clamp_(0, KMAXQ - 1)


def _codes(l: torch.Tensor) -> torch.Tensor:
    """Levels ``[..., 8, 4]`` -> 12-bit codes ``[..., 8]``."""
    return l[..., 0] | (l[..., 1] << 3) | (l[..., 2] << 6) | (l[..., 3] << 9)


def _snap(l: torch.Tensor, xv: torch.Tensor, wa: torch.Tensor, scale: torch.Tensor, tabs) -> tuple[torch.Tensor, torch.Tensor]:
    """Map level groups to grid points (llama.cpp ``iq3_find_best_neighbour`` where off the grid).

    l: ``[..., 8, 4]`` levels; xv, wa: ``[..., 8, 4]``; scale broadcast to ``[..., 8]``.
    Returns (positions ``[..., 8, 4]`` float (odd values), on_grid ``[..., 8]``).
    """
    grid, kmap, nb = tabs
    u = _codes(l)
    gi = kmap[u]
    best_i = best_neighbour(gi, u, nb, xv, wa, scale, lambda cand, _: grid[cand])
    return grid[best_i], gi >= 0


def _weights(b: torch.Tensor, qw: torch.Tensor | None, rows: int) -> torch.Tensor:
    """``qw * sqrt(sigma2 + x*x)`` (sigma2 = 2 * mean x*x over the super-block), or ``x*x``."""
    if qw is None:
        return b * b
    sigma2 = 2.0 * seq_sum((b * b).t().contiguous()) / 256.0
    qb = qw.reshape(1, -1, QK_K).expand(rows, -1, -1).reshape(-1, QK_K)
    return qb * sqrtf(sigma2.unsqueeze(1) + b * b)


def _search(xv, wv, wav, zero, tabs, steps: range, on_grid_init: bool, redo_all: bool):
    """Scale search and grid snapping for 32-value sub-blocks ``[M, 32]`` (llama.cpp's IQ3 loop).

    Returns (scale [M] (>= 0), positions [M, 32] (odd values 2L+1), flipped [M]: scale was negative).
    """
    M = xv.shape[0]
    mx = xv.amax(dim=1)
    mxs = torch.where(zero, torch.ones_like(mx), mx)
    cvals = const([f32(2 * KMAXQ - 1 + f32(i * f32(0.2))) for i in steps], torch.float32, xv.device)
    idc = cvals.unsqueeze(0) / mxs.unsqueeze(1)  # [M, S]
    tsc = recip(idc)
    xv4 = xv.reshape(M, 1, 8, 4)
    wa4 = wav.reshape(M, 1, 8, 4)
    lv = _levels(idc.reshape(M, -1, 1, 1) * xv4)
    pos, on = _snap(lv, xv4, wa4, tsc.unsqueeze(-1).expand(-1, -1, 8), tabs)
    q = pos.reshape(M, -1, 32)
    wx = (wv * xv).unsqueeze(1)
    wq = wv.unsqueeze(1) * q
    sumqx = seq_sum((wx * q).permute(2, 0, 1).contiguous())
    sumq2 = seq_sum((wq * q).permute(2, 0, 1).contiguous())
    best = torch.zeros_like(mx)
    scale = divs(mxs, float(2 * KMAXQ - 1))
    pick = torch.full_like(mx, -1, dtype=torch.int64)
    for k in range(idc.shape[1]):
        a, c = sumqx[:, k], sumq2[:, k]
        take = (c > 0) & (a * a > best * c)
        sc = a / c
        scale = torch.where(take, sc, scale)
        best = torch.where(take, sc * a, best)
        pick = torch.where(take, torch.full_like(pick, k), pick)
    picked = pick >= 0
    kk = pick.clamp(min=0)
    P = torch.gather(q, 1, kk.view(M, 1, 1).expand(M, 1, 32)).squeeze(1)
    P = torch.where(picked.unsqueeze(1), P, torch.ones_like(P))  # no winner: all levels 0
    ong = torch.gather(on, 1, kk.view(M, 1, 1).expand(M, 1, 8)).squeeze(1)
    ong = torch.where(picked.unsqueeze(1), ong, torch.full_like(ong, on_grid_init))

    # re-snap with the chosen scale (the off-grid groups, or all groups when any is off-grid)
    redo = (~ong).any(dim=1) & (scale > 0)
    scs = torch.where(redo, scale, torch.ones_like(scale))
    lv2 = _levels(recip(scs).view(M, 1, 1) * xv.reshape(M, 8, 4))
    pos2, _ = _snap(lv2, xv.reshape(M, 8, 4), wav.reshape(M, 8, 4), scs.view(M, 1).expand(-1, 8), tabs)
    keep = torch.zeros_like(ong) if redo_all else ong
    P2 = torch.where(keep.unsqueeze(-1), P.reshape(M, 8, 4), pos2).reshape(M, 32)
    sqx = seq_sum(((wv * xv) * P2).t().contiguous())
    sq2 = seq_sum(((wv * P2) * P2).t().contiguous())
    scale = torch.where(redo & (sq2 > 0), sqx / sq2, scale)
    P = torch.where(redo.unsqueeze(1), P2, P)
    flipped = scale < 0
    scale = torch.where(flipped, -scale, scale)
    return scale, P, flipped


def _grid_index(P: torch.Tensor, kmap: torch.Tensor) -> torch.Tensor:
    """Positions ``[M, 32]`` -> grid indices ``[M, 8]``."""
    L = ((P - 1.0) * 0.5).to(torch.int64).reshape(P.shape[0], 8, 4)
    return kmap[_codes(L)]


def _block_scales(scale: torch.Tensor, fudge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sub-block scales ``[N, 8]`` -> (fp16 d bytes, 4-bit codes [N, 8], has [N])."""
    max_scale = scale.amax(dim=1)
    max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))
    has = max_scale > 0
    d = divs(max_scale, 31.0)
    idd = recip(torch.where(has, d, torch.ones_like(d)))
    ls = nearest_int(0.5 * (idd.unsqueeze(1) * scale - 1.0)).clamp_(0, 15).to(torch.int64)
    return fp16_bytes(d * f32(fudge)), ls, has


@register(GGMLQuantizationType.IQ3_XXS)
class IQ3_XXS(BlockType):
    """d, qs[64] (grid indices), 8 x uint32 (4 x 7 sign bits | 4-bit scale << 28)."""

    chunk_elements = 1 << 16

    @classmethod
    def quantize_rows(cls, x, qw):
        rows = x.shape[0]
        b = blocks_of(x, QK_K)
        N = b.shape[0]
        tabs = _tables(str(x.device), 256)
        w = _weights(b, qw, rows)
        wa = sqrtf(w)

        # signs: per 8 values, |x| with an even number of negatives (flip the least important)
        x8 = b.reshape(N, 32, 8)
        w8 = w.reshape(N, 32, 8)
        neg = x8 < 0
        xval = torch.where(neg, -x8, x8)
        bitv = const([1 << i for i in range(8)], torch.int32, x.device)
        s = (neg.to(torch.int32) * bitv).sum(dim=2)
        odd = (neg.sum(dim=2) % 2) == 1
        imin = ((w8 * x8) * x8).argmin(dim=2)  # first minimum, as C's strict '<'
        flip = odd.unsqueeze(2) & (torch.arange(8, device=x.device) == imin.unsqueeze(2))
        xval = torch.where(flip, -xval, xval)
        s = torch.where(odd, s ^ (1 << imin.to(torch.int32)), s)
        signs = (s & 127).reshape(N * 8, 4)  # per 32-value sub-block: 4 groups of 8

        M = N * 8
        xv = xval.reshape(M, 32)
        zero = xv.amax(dim=1) < EPS
        scale, P, flipped = _search(xv, w.reshape(M, 32), wa.reshape(M, 32), zero, tabs, range(-15, 16), True, False)
        signs = torch.where(flipped.unsqueeze(1), (~signs) & 127, signs)

        gidx = _grid_index(P, tabs[1])
        gidx = torch.where(zero.unsqueeze(1), torch.zeros_like(gidx), gidx)
        word = signs[:, 0] | (signs[:, 1] << 7) | (signs[:, 2] << 14) | (signs[:, 3] << 21)
        word = torch.where(zero, torch.zeros_like(word), word).to(torch.int64)
        scale = torch.where(zero, torch.zeros_like(scale), scale).reshape(N, 8)
        dbytes, ls, has = _block_scales(scale, 1.0125)
        word = word.reshape(N, 8) | (ls << 28)
        words = torch.stack([(word >> sh) & 0xFF for sh in (0, 8, 16, 24)], dim=2).reshape(N, 32)
        out = torch.cat([dbytes, gidx.reshape(N, 64), words], dim=1).to(torch.uint8)
        out = torch.where(has.unsqueeze(1), out, torch.zeros_like(out))
        return bytes_rows(out, rows)

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        idx = blocks[:, 2:66].to(torch.int64).reshape(n, 8, 8)
        w = le_u32(blocks[:, 66:98])  # [N, 8]
        db = (fp16_at(blocks) * (0.5 + (w >> 28).float())) * 0.5
        signs = signs_of_7bits((w.unsqueeze(-1) >> const([0, 7, 14, 21], torch.int64, blocks.device)) & 127)
        grid = _grid_values(str(blocks.device), 256)[idx].reshape(n, 8, 4, 8)
        return ((db.view(n, 8, 1, 1) * grid) * signs).reshape(n, 256)


@register(GGMLQuantizationType.IQ3_S)
class IQ3_S(BlockType):
    """d, qs[64] (grid index low bytes), qh[8] (9th bits), signs[32], scales[4] (two 4-bit)."""

    chunk_elements = 1 << 16

    @classmethod
    def quantize_rows(cls, x, qw):
        rows = x.shape[0]
        b = blocks_of(x, QK_K)
        N = b.shape[0]
        tabs = _tables(str(x.device), 512)
        w = _weights(b, qw, rows)
        wa = sqrtf(w)
        neg = b < 0
        xval = torch.where(neg, -b, b)
        bitv = const([1 << i for i in range(8)], torch.int32, x.device)
        signs = (neg.to(torch.int32).reshape(N, 32, 8) * bitv).sum(dim=2).reshape(N * 8, 4)

        M = N * 8
        xv = xval.reshape(M, 32)
        zero = xv.amax(dim=1) == 0
        scale, P, flipped = _search(xv, w.reshape(M, 32), wa.reshape(M, 32), zero, tabs, range(-9, 10), False, True)
        signs = torch.where(flipped.unsqueeze(1), (~signs) & 255, signs)
        gidx = _grid_index(P, tabs[1])  # [M, 8]
        scale = torch.where(zero, torch.zeros_like(scale), scale).reshape(N, 8)

        # llama.cpp advances its qs/signs write position only after a non-empty sub-block
        nz = (~zero).reshape(N, 8)
        slot = torch.cumsum(nz.to(torch.int64), dim=1) - nz.to(torch.int64)  # [N, 8]
        slot = torch.where(nz, slot, torch.full_like(slot, 8))  # empty: dropped
        qs = torch.zeros((N, 9, 8), dtype=torch.int64, device=x.device)
        qs.scatter_(1, slot.unsqueeze(2).expand(N, 8, 8), (gidx & 255).reshape(N, 8, 8))
        sg = torch.zeros((N, 9, 4), dtype=torch.int64, device=x.device)
        sg.scatter_(1, slot.unsqueeze(2).expand(N, 8, 4), signs.reshape(N, 8, 4).to(torch.int64))
        hi = torch.where(nz.unsqueeze(2), (gidx >> 8).reshape(N, 8, 8), torch.zeros_like(gidx).reshape(N, 8, 8))
        qh = (hi << torch.arange(8, device=x.device)).sum(dim=2)  # [N, 8]: byte ib, bit k
        dbytes, ls, has = _block_scales(scale, 1.033)
        sc = ls[:, 0::2] | (ls[:, 1::2] << 4)
        sc = torch.where(has.unsqueeze(1), sc, torch.zeros_like(sc))  # all scales 0: d and scales stay 0
        out = torch.cat([dbytes, qs[:, :8].reshape(N, 64), qh, sg[:, :8].reshape(N, 32), sc], dim=1).to(torch.uint8)
        return bytes_rows(out, rows)

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        qs = blocks[:, 2:66].to(torch.int64)
        qh = blocks[:, 66:74].to(torch.int64)
        hi = ((qh.unsqueeze(-1) >> torch.arange(8, device=blocks.device)) & 1).reshape(n, 64)
        signs = signs_of_byte(blocks[:, 74:106]).reshape(n, 8, 4, 8)
        sc = blocks[:, 106:110].to(torch.int64)
        sc = torch.stack([sc & 15, sc >> 4], dim=-1).reshape(n, 8)
        db = fp16_at(blocks) * (1 + 2 * sc).float()
        grid = _grid_values(str(blocks.device), 512)[qs | (hi << 8)].reshape(n, 8, 4, 8)
        return ((db.view(n, 8, 1, 1) * grid) * signs).reshape(n, 256)
