"""IQ1_S quantization in torch, byte-identical to llama.cpp (glibc's stable ``qsort``).

IQ1_S codes each group of eight values as one of 2048 points of a ternary grid
(levels -1, 0, 1, shifted by +-1/8 per 32 values), with a 3-bit scale and the shift
sign per 32 values under an fp16 super-block scale. llama.cpp sorts each 32-value
block (a stable sort with glibc <= 2.36, which this reproduces: ties keep their order),
tries every split of the sorted values into the three levels for both shifts, keeps
the best, and snaps off-grid groups to the nearest of their neighbour grid points.
Needs an importance matrix, as in llama.cpp.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from ..errors import LowbitError
from ._base import BlockType, blocks_of, bytes_rows, register
from ._blockops import const, divs, f32, fp16_bytes, nearest_int, recip, seq_sum, sqrtf
from .iq2quants import _codes, _tables

QK_K = 256
DELTA = 0.125
X_P = (-1 + DELTA, DELTA, 1 + DELTA)
X_M = (-1 - DELTA, -DELTA, 1 - DELTA)


def _splits() -> tuple[list[int], list[int]]:
    i1s, i2s = [], []
    for i1 in range(33):
        for i2 in range(i1, 33):
            i1s.append(i1)
            i2s.append(i2)
    return i1s, i2s


def _scores(sx: torch.Tensor, sw: torch.Tensor, i1: torch.Tensor, i2: torch.Tensor, xs: tuple) -> tuple:
    """(sumqx, sumq2) ``[M, P]`` for every split, in llama.cpp's operation order."""
    a = sx[:, i1] - sx[:, :1]
    b = sx[:, i2] - sx[:, i1]
    c = sx[:, 32:33] - sx[:, i2]
    qx = (a * xs[0] + b * xs[1]) + c * xs[2]
    aw = sw[:, i1] - sw[:, :1]
    bw = sw[:, i2] - sw[:, i1]
    cw = sw[:, 32:33] - sw[:, i2]
    q2 = ((aw * xs[0]) * xs[0] + (bw * xs[1]) * xs[1]) + (cw * xs[2]) * xs[2]
    return qx, q2


@register(GGMLQuantizationType.IQ1_S)
class IQ1_S(BlockType):
    """d, qs[32] (grid index low bytes), qh[8] x uint16 (3 high index bits per group, scale << 12, shift bit 15)."""

    chunk_elements = 1 << 14

    @classmethod
    def quantize_rows(cls, x, qw):
        if qw is None:
            raise LowbitError(None, "IQ1_S needs an importance matrix (as in llama.cpp)")
        rows = x.shape[0]
        b = blocks_of(x, QK_K)
        N = b.shape[0]
        M = N * 8
        dev = x.device
        grid, kmap, rowmap, nb = _tables(str(dev), 2048)
        sigma2 = 2.0 * seq_sum((b * b).t().contiguous()) / 256.0
        qb = qw.reshape(1, -1, QK_K).expand(rows, -1, -1).reshape(-1, QK_K)
        w = (qb * sqrtf(sigma2.unsqueeze(1) + b * b)).reshape(M, 32)
        xb = b.reshape(M, 32)
        mx = xb.abs().amax(dim=1)
        empty = mx < f32(1e-12)

        # stable sort, then prefix sums of w*x and w in sorted order
        order = torch.sort(xb, dim=1, stable=True).indices
        ws, xs = torch.gather(w, 1, order), torch.gather(xb, 1, order)
        terms = torch.stack([ws * xs, ws], dim=0).permute(2, 0, 1)  # [32, 2, M]
        acc = torch.zeros_like(terms[0])
        pref = [acc]
        for j in range(32):
            acc = acc + terms[j]
            pref.append(acc)
        pref = torch.stack(pref, dim=2)  # [2, M, 33]
        sx, sw = pref[0], pref[1]

        i1l, i2l = _splits()
        i1 = const(i1l, torch.int64, dev)
        i2 = const(i2l, torch.int64, dev)
        qxp, q2p = _scores(sx, sw, i1, i2, X_P)
        qxm, q2m = _scores(sx, sw, i1, i2, X_M)
        best = torch.full_like(mx, -3.4028234663852886e38)
        scale = mx.clone()
        pick = torch.full(mx.shape, -1, dtype=torch.int64, device=dev)
        shift = torch.zeros(mx.shape, dtype=torch.int64, device=dev)
        for p in range(len(i1l)):
            for qx, q2, sh in ((qxp, q2p, 1), (qxm, q2m, -1)):
                a, c = qx[:, p], q2[:, p]
                take = (c > 0) & (a * a > best * c)
                sc = a / c
                scale = torch.where(take, sc, scale)
                best = torch.where(take, sc * a, best)
                pick = torch.where(take, torch.full_like(pick, p), pick)
                shift = torch.where(take, torch.full_like(shift, sh), shift)
        none = pick < 0
        empty = empty | none
        pk = pick.clamp(min=0)
        b1 = i1[pk].unsqueeze(1)
        b2 = i2[pk].unsqueeze(1)
        rank = torch.arange(32, device=dev).unsqueeze(0)
        lsorted = torch.where(rank < b1, 0, torch.where(rank < b2, 1, 2))
        L = torch.empty_like(lsorted).scatter_(1, order, lsorted)
        neg = scale < 0
        L = torch.where(neg.unsqueeze(1), 2 - L, L)
        scale = torch.where(neg, -scale, scale)
        shift = torch.where(neg, -shift, shift)
        xx = torch.where((shift == 1).unsqueeze(1), const(X_P, torch.float32, dev), const(X_M, torch.float32, dev))

        # snap groups of 8 (iq1_find_best_neighbour2: weights w, signed x, level values xx)
        Lg = L.reshape(M, 4, 8)
        u = _codes(Lg)
        gi = kmap[u]
        on = gi >= 0
        row = rowmap[u]
        best_d = torch.full(u.shape, float("inf"), dtype=torch.float32, device=dev)
        best_i = gi.clone()
        xg = xb.reshape(M, 4, 8)
        wg = w.reshape(M, 4, 8)
        s = scale.view(M, 1, 1)
        xx3 = xx.view(M, 1, 1, 3).expand(M, 4, 8, 3)
        for j in range(nb.shape[1]):
            cand = nb[row, j].long()
            valid = cand >= 0
            lv = ((grid[cand.clamp(min=0)] - 1.0) * 0.5).long()  # [M, 4, 8]
            q = torch.gather(xx3, 3, lv.unsqueeze(-1)).squeeze(-1)
            diff = s * q - xg
            t = (wg * diff) * diff
            d2 = t[..., 0]
            for i in range(1, 8):
                d2 = d2 + t[..., i]
            better = valid & ~on & (d2 < best_d)
            best_d = torch.where(better, d2, best_d)
            best_i = torch.where(better, cand, best_i)
        index = best_i  # [M, 4]
        offgrid = (~on).any(dim=1)
        lv = ((grid[index.clamp(min=0)] - 1.0) * 0.5).long().reshape(M, 32)
        q = torch.gather(xx, 1, lv)
        sqx = seq_sum(((w * q) * xb).t().contiguous())
        sq2 = seq_sum(((w * q) * q).t().contiguous())
        scale = torch.where(offgrid & (sqx > 0) & (sq2 > 0), sqx / sq2, scale)

        index = torch.where(empty.unsqueeze(1), torch.zeros_like(index), index)
        h = (index >> 8)
        h = h[:, 0] | (h[:, 1] << 3) | (h[:, 2] << 6) | (h[:, 3] << 9)
        scale = torch.where(empty, torch.zeros_like(scale), scale).reshape(N, 8)
        shift = torch.where(empty, torch.ones_like(shift), shift).reshape(N, 8)
        max_scale = scale.amax(dim=1)
        max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))
        has = max_scale > 0
        d = divs(max_scale, 15.0)
        idd = recip(torch.where(has, d, torch.ones_like(d)))
        ls = nearest_int(0.5 * (idd.unsqueeze(1) * scale - 1.0)).clamp_(0, 7).to(torch.int64)
        ls = torch.where(shift == -1, ls | 8, ls)
        ls = torch.where(has.unsqueeze(1), ls, torch.zeros_like(ls))
        qh = h.reshape(N, 8) | (ls << 12)
        qhb = torch.stack([qh & 0xFF, qh >> 8], dim=2).reshape(N, 16)
        out = torch.cat([fp16_bytes(d * f32(1.125)), (index & 255).reshape(N, 32), qhb], dim=1).to(torch.uint8)
        return bytes_rows(out, rows)
