"""Float32-exact building blocks shared by the GGUF block quantizers.

llama.cpp's reference quantizers are scalar C loops. To produce the same bytes we
reproduce their float32 arithmetic operation by operation: each product and sum is
one torch op on float32 tensors (no fused multiply-add, no reassociation), sums
that llama.cpp accumulates element by element are accumulated element by element
here too, and rounding uses the same tricks (``nearest_int``'s magic-number add,
C truncation, ``roundf``).

Vectorization is over blocks: the searches below take tensors in *element-major*
layout ``[n, M]`` (``n`` elements of each of ``M`` blocks), so that the sequential
loops over the ``n`` elements read contiguous ``[M]`` (or ``[M, S]``) slices.
Candidate scales of a search are a trailing dimension ``S`` evaluated at once.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15


def f32(v: float) -> float:
    """Round a Python float to the nearest float32 (C's ``(float)v``)."""
    return float(np.float32(v))


@functools.lru_cache(maxsize=256)
def _const(values: tuple, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def const(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A small constant tensor, cached per device (no host-to-device copy on reuse, so CUDA graphs can capture)."""
    return _const(tuple(values), dtype, str(torch.device(device)))


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ``nearest_int``: add 1.5 * 2**23 in float32 and read the mantissa.

    Equals round-half-to-even for ``|v| < 2**22``; for larger values it returns the
    same (wrapped) integer the C code returns. Result is int32.
    """
    bits = (v.float() + 12582912.0).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: round half away from zero, exact for every float32."""
    t = torch.trunc(v)
    frac = v - t  # exact
    return torch.where(frac.abs() >= 0.5, t + torch.sign(v), t)


def c_int8_cast(v: torch.Tensor) -> torch.Tensor:
    """C's ``(int8_t)(float)v`` as compiled for x86-64 (returns int32 in [-128, 127]).

    The float is truncated to a 32-bit integer (``cvttss2si``: NaN and out-of-range values
    give INT_MIN, whose low byte is 0) and the low byte is kept. llama.cpp hits the
    out-of-range case when a block of subnormal values makes ``1/d`` overflow to infinity.
    """
    t = torch.where(v.abs() < 2147483648.0, torch.trunc(v), torch.zeros_like(v))
    return ((t.to(torch.int32) & 0xFF) ^ 0x80) - 0x80


def recip(v: torch.Tensor) -> torch.Tensor:
    """``1/v`` as one IEEE float32 division."""
    return torch.ones_like(v) / v


def sqrtf(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root.

    torch's float32 CPU ``sqrt`` is not always correctly rounded (it differs from C's
    ``sqrtf`` in the last bit for some inputs); a float64 root rounded once to float32 is.
    """
    return torch.sqrt(v.double()).float()


def sdiv(c: float, v: torch.Tensor) -> torch.Tensor:
    """``c / v`` as one float32 division (``c / tensor`` in torch is ``reciprocal(v) * c``)."""
    return torch.full_like(v, c) / v


def divs(v: torch.Tensor, c: float) -> torch.Tensor:
    """``v / c`` as one float32 division (CUDA turns ``tensor / scalar`` into a multiply by ``1/c``)."""
    return v / torch.full_like(v, c)


def fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 ``[..., ]`` -> uint8 ``[..., 2]`` little-endian IEEE half (round to nearest even)."""
    return v.to(torch.float16).unsqueeze(-1).contiguous().view(torch.uint8)


def fp16_round(v: torch.Tensor) -> torch.Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``."""
    return v.to(torch.float16).float()


def u16_bytes(v: torch.Tensor) -> torch.Tensor:
    """Integer tensor ``[...]`` (values < 2**16) -> uint8 ``[..., 2]`` little-endian."""
    v = v.to(torch.int32)
    return torch.stack([v & 0xFF, (v >> 8) & 0xFF], dim=-1).to(torch.uint8)


def u32_bytes(v: torch.Tensor) -> torch.Tensor:
    """Integer tensor ``[...]`` (values < 2**32, held in int64) -> uint8 ``[..., 4]`` little-endian."""
    v = v.to(torch.int64)
    return torch.stack([(v >> s) & 0xFF for s in (0, 8, 16, 24)], dim=-1).to(torch.uint8)


def seq_sum(t: torch.Tensor, from_first: bool = False) -> torch.Tensor:
    """Sum over dim 0 one element after the other (C's ``s += t[i]``).

    Starts from 0.0, or from ``t[0]`` when ``from_first`` (matters only for the sign of a zero sum).
    """
    acc = t[0].clone() if from_first else torch.zeros_like(t[0])
    for i in range(1 if from_first else 0, t.shape[0]):
        acc = acc + t[i]
    return acc


def first_abs_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(amax, max)`` over dim 0 as C's ``if (fabsf(v) > amax) {amax = fabsf(v); max = v;}``.

    ``max`` is the signed value of the first element of largest magnitude, +0.0 when all are zero.
    """
    ax = x.abs()
    idx = ax.argmax(dim=0)  # torch documents argmax as returning the first maximal index
    amax = torch.gather(ax, 0, idx.unsqueeze(0)).squeeze(0)
    mx = torch.gather(x, 0, idx.unsqueeze(0)).squeeze(0)
    return amax, torch.where(amax > 0, mx, torch.zeros_like(mx))


def first_value_equal(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The first element along dim 0 equal to ``value`` (keeps the sign of a zero like C's loops)."""
    idx = (x == value.unsqueeze(0)).to(torch.uint8).argmax(dim=0)
    return torch.gather(x, 0, idx.unsqueeze(0)).squeeze(0)


def seq_min(x: torch.Tensor) -> torch.Tensor:
    """C's running ``if (x[i] < min) min = x[i]`` over dim 0 (first of equal values wins)."""
    return first_value_equal(x, x.amin(dim=0))


def seq_max(x: torch.Tensor) -> torch.Tensor:
    """C's running ``if (x[i] > max) max = x[i]`` over dim 0."""
    return first_value_equal(x, x.amax(dim=0))


def first_argmin_below(err: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential ``if (err[k] < best) best = err[k]`` over the last dim, starting from ``bound``.

    Returns ``(taken, k)``: whether any candidate replaced ``bound`` and the winning index.
    NaN errors never win (as in C, where a comparison with NaN is false).
    """
    e = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    emin = e.amin(dim=-1)
    k = (e == emin.unsqueeze(-1)).to(torch.uint8).argmax(dim=-1)
    return emin < bound, k


# --------------------------------------------------------------------------- searches


def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric scale search (llama.cpp ``make_qx_quants``, rmse_type 1).

    x, qw: ``[n, M]`` element-major. Returns ``(scale [M], L [n, M] int32 in [0, 2*nmax))``.
    Weights are ``qw`` or ``x*x``. Blocks whose max magnitude is below 1e-15 get scale 0, L 0.
    """
    w = qw if qw is not None else x * x
    amax, mx = first_abs_max(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    wx = w * x

    def quant(iscale: torch.Tensor) -> torch.Tensor:
        return nearest_int(iscale * x).clamp_(-nmax, nmax - 1)

    # |iscale * x| <= nmax + 1 below, where round-half-even equals nearest_int

    iscale0 = torch.full_like(mx, float(-nmax)) / mx
    lq = quant(iscale0.unsqueeze(0))
    lf = lq.float()
    sumlx = seq_sum(wx * lf)
    suml2 = seq_sum((w * lf) * lf)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx

    steps = [s for s in range(-9, 10) if s != 0]
    cvals = const([-f32(f32(nmax) + f32(f32(0.1) * s)) for s in steps], torch.float32, x.device)
    isc = cvals.unsqueeze(0) / mx.unsqueeze(1)  # [M, S]
    slx = torch.zeros_like(isc)
    sl2 = torch.zeros_like(isc)
    for i in range(x.shape[0]):
        l = torch.round(isc * x[i].unsqueeze(1)).clamp_(-nmax, nmax - 1)
        slx = slx + wx[i].unsqueeze(1) * l
        sl2 = sl2 + (w[i].unsqueeze(1) * l) * l
    chosen = iscale0.clone()
    changed = torch.zeros_like(zero)
    for k in range(len(steps)):
        a, b = slx[:, k], sl2[:, k]
        take = (b > 0) & (a * a > best * b)
        chosen = torch.where(take, isc[:, k], chosen)
        changed |= take
        new_scale = a / b
        scale = torch.where(take, new_scale, scale)
        best = torch.where(take, new_scale * a, best)
    lfin = torch.where(changed.unsqueeze(0), quant(chosen.unsqueeze(0)), lq) + nmax
    lfin = torch.where(zero.unsqueeze(0), torch.zeros_like(lfin), lfin)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, lfin


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp ``make_q3_quants`` with ``do_rmse``: coordinate-descent refinement, weights ``x*x``.

    x: ``[n, M]``. Returns ``(scale [M], L [n, M] int32 in [0, 2*nmax))``.
    """
    amax, mx = first_abs_max(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = torch.full_like(mx, float(-nmax)) / mx
    L = nearest_int(iscale.unsqueeze(0) * x).clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = L.float()
    sumlx = seq_sum(wx * lf)
    suml2 = seq_sum((w * lf) * lf)
    L = list(L.unbind(0))
    for _ in range(5):
        for i in range(x.shape[0]):
            li = L[i].float()
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (w[i] * li) * li
            pos = slx > 0
            new_l = nearest_int((x[i] * sl2) / slx).clamp_(-nmax, nmax - 1)
            diff = pos & (new_l != L[i])
            nf = new_l.float()
            slx2 = slx + wx[i] * nf
            sl22 = sl2 + (w[i] * nf) * nf
            take = diff & (sl22 > 0) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            L[i] = torch.where(take, new_l, L[i])
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    Lt = torch.stack(L, 0) + nmax
    Lt = torch.where(zero.unsqueeze(0), torch.zeros_like(Lt), Lt)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, Lt


def make_qkx(
    x: torch.Tensor,
    w: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine scale/min search (llama.cpp ``make_qkx2_quants`` / ``make_qkx3_quants`` with weights).

    x, w: ``[n, M]``. Returns ``(scale [M], the_min [M] (>= 0, subtract it), L [n, M] int32 in [0, nmax])``.
    The two C variants differ only in ``max == min`` vs ``max <= min``, which agree since ``min <= max``.
    The candidate scales are tried one after the other: each accepted candidate moves the
    offset ``min`` that the following candidates quantize against, exactly as in C. The
    codes of the winner are recomputed at the end from its (iscale, offset) pair.
    """
    mn = seq_min(x)
    mx = x.amax(dim=0)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx <= mn
    mx = torch.where(flat, mn + 1.0, mx)
    sum_w = seq_sum(w, from_first=True)
    sum_x = seq_sum(w * x, from_first=True)

    def codes(iscale: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        return nearest_int(iscale * (x - off)).clamp_(0, nmax)

    def err_of(scale: torch.Tensor, lf: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        diff = (scale * lf + off) - x
        diff = diff.abs() if use_mad else diff * diff
        return seq_sum(w * diff)

    iscale = sdiv(float(nmax), mx - mn)
    scale = recip(iscale)
    best = err_of(scale, codes(iscale, mn).float(), mn)
    win_isc, win_off = iscale, mn
    buf = torch.empty((x.shape[0], 3, x.shape[1]), dtype=x.dtype, device=x.device)
    for s in range(nstep + 1):
        c = f32(f32(f32(rmin) + f32(f32(rdelta) * s)) + nmax)
        isc = sdiv(c, mx - mn)
        lf = codes(isc, mn).float()
        torch.mul(w, lf, out=buf[:, 0])
        torch.mul(buf[:, 0], lf, out=buf[:, 1])
        torch.mul(buf[:, 0], x, out=buf[:, 2])
        sums = seq_sum(buf)
        sum_l, sum_l2, sum_xl = sums[0], sums[1], sums[2]
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clip = this_min > 0
        this_min = torch.where(clip, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(clip, sum_xl / sum_l2, this_scale)
        cur = err_of(this_scale, lf, this_min)
        take = (D > 0) & (cur < best) & ~flat
        best = torch.where(take, cur, best)
        win_isc = torch.where(take, isc, win_isc)
        win_off = torch.where(take, mn, win_off)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    L = codes(win_isc, win_off)
    L = torch.where(flat.unsqueeze(0), torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -mn, L


def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize non-negative (sub-block) scales to ``[0, nmax]`` (llama.cpp ``make_qp_quants``).

    x, qw: ``[n, M]``. Returns ``(scale [M], L [n, M] int32 in [0, 255])`` (L wraps like C's uint8).
    """
    mx = torch.clamp(x.amax(dim=0), min=0.0)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = torch.full_like(mx, float(nmax)) / mx
    L0 = nearest_int(iscale * x) & 0xFF
    scale = recip(iscale)
    d = x - scale * L0.float()
    best = seq_sum((qw * d) * d)
    steps = [s for s in range(-4, 5) if s != 0]
    cvals = const([f32(f32(f32(0.1) * s) + nmax) for s in steps], torch.float32, x.device)
    isc = cvals.unsqueeze(0) / mx.unsqueeze(1)  # [M, S]
    ssc = recip(isc)
    mse = torch.zeros_like(isc)
    for i in range(x.shape[0]):
        xi = x[i].unsqueeze(1)
        l = nearest_int(isc * xi).clamp_(max=nmax).float()
        di = xi - ssc * l
        mse = mse + (qw[i].unsqueeze(1) * di) * di
    take, k = first_argmin_below(mse, best)
    iscale = torch.where(take, torch.gather(isc, 1, k.unsqueeze(1)).squeeze(1), iscale)
    lint = nearest_int(iscale * x).clamp_(max=nmax)
    lf = lint.float()
    wx = qw * x
    sumlx = seq_sum(wx * lf)
    suml2 = seq_sum((qw * lf) * lf)
    L = list((lint & 0xFF).unbind(0))
    for _ in range(5):
        for i in range(x.shape[0]):
            li = L[i].float()
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (qw[i] * li) * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = nearest_int((x[i] * sl2) / slx).clamp_(max=nmax)
            ok &= new_l != L[i]
            nf = new_l.float()
            slx2 = slx + wx[i] * nf
            sl22 = sl2 + (qw[i] * nf) * nf
            take = ok & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            L[i] = torch.where(take, new_l & 0xFF, L[i])
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    Lt = torch.stack(L, 0)
    Lt = torch.where(zero.unsqueeze(0), torch.zeros_like(Lt), Lt)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, Lt


def row_sigma_sum(x: torch.Tensor) -> torch.Tensor:
    """Sequential ``sum x*x`` over the last dim of ``[R, n]`` (returns ``[R]``)."""
    return seq_sum((x * x).t().contiguous())


def best_neighbour(index: torch.Tensor, rows: torch.Tensor, nb: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                   scale: torch.Tensor, points, ctx: torch.Tensor | None = None) -> torch.Tensor:
    """Grid index per group, off-grid groups snapped to their best neighbour (``iq*_find_best_neighbour``).

    ``index`` ``[...]``: grid index of each group, -1 off the grid; ``rows`` ``[...]``: the row of
    ``nb`` (``[R, W]`` neighbour indices, valid ones first, then -1) listing the group's
    neighbours; ``x``, ``w`` ``[..., n]``: values and weights; ``scale`` broadcast to ``[...]``;
    ``points(cand, ctx_part)``: the ``[k, V, n]`` values of candidates ``cand`` ``[k, V]`` for
    off-grid groups whose rows of ``ctx`` (indexed like ``index``) are ``ctx_part``.  The error
    ``sum (w (s p - x))^2`` is summed left to right as the C loop does; ties go to the first
    neighbour (its strict ``<``).  Only off-grid groups are scored, all their neighbours at once,
    in buckets of similar neighbour counts (the lists are short on average, long at most).
    """
    out = index.clone()
    off = (index < 0).nonzero(as_tuple=True)
    count = off[0].numel()
    if count == 0:
        return out
    n = x.shape[-1]
    full = (*index.shape, n)
    xo, wo, ro = x.expand(full)[off], w.expand(full)[off], rows[off]
    so, io = scale.expand(index.shape)[off], index[off]
    co = None if ctx is None else ctx.expand(*index.shape, *ctx.shape[index.dim():])[off]
    lengths = (nb >= 0).sum(dim=1)[ro].clamp(min=1)
    bucket = torch.pow(2, torch.ceil(torch.log2(lengths.float()))).long().clamp(max=nb.shape[1])
    res = io.clone()
    for width in torch.unique(bucket).tolist():
        members = (bucket == width).nonzero().squeeze(1)
        step = max(1, (1 << 20) // (width * n))
        for a in range(0, members.numel(), step):
            g = members[a:a + step]
            cand = nb[ro[g], :width].long()
            vals = points(cand.clamp(min=0), None if co is None else co[g])
            diff = so[g, None, None] * vals - xo[g, None, :]
            t = (wo[g, None, :] * diff) * diff
            d2 = t[..., 0]
            for i in range(1, n):
                d2 = d2 + t[..., i]
            d2 = torch.where(cand >= 0, d2, float("inf"))
            j = d2.argmin(dim=1, keepdim=True)  # first of equal minima
            found = d2.gather(1, j).squeeze(1) < float("inf")
            res[g] = torch.where(found, cand.gather(1, j).squeeze(1).to(index.dtype), io[g])
    out[off] = res
    return out


# --------------------------------------------------------------------------- decoding (grid types)


def fp16_at(blocks: torch.Tensor, start: int = 0) -> torch.Tensor:
    """The fp16 field at byte ``start`` of every block ``[N, type_size]`` as float32 ``[N, 1]``."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def le_u16(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 2k]`` -> int64 ``[..., k]`` little-endian 16-bit words."""
    b = b.to(torch.int64).reshape(*b.shape[:-1], -1, 2)
    return b[..., 0] | (b[..., 1] << 8)


def le_u32(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 4k]`` -> int64 ``[..., k]`` little-endian 32-bit words."""
    b = b.to(torch.int64).reshape(*b.shape[:-1], -1, 4)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def signs_of_7bits(code7: torch.Tensor) -> torch.Tensor:
    """7-bit sign codes ``[...]`` -> float signs ``[..., 8]`` (the 8th makes the number of negatives even)."""
    c = code7.to(torch.int64)
    bits = (c.unsqueeze(-1) >> torch.arange(7, device=c.device)) & 1
    parity = bits.sum(dim=-1, keepdim=True) & 1
    bits = torch.cat([bits, parity], dim=-1)
    return torch.where(bits == 1, -1.0, 1.0)


def signs_of_byte(v: torch.Tensor) -> torch.Tensor:
    """Sign bytes ``[...]`` -> float signs ``[..., 8]`` (bit i set: value i is negative)."""
    bits = (v.to(torch.int64).unsqueeze(-1) >> torch.arange(8, device=v.device)) & 1
    return torch.where(bits == 1, -1.0, 1.0)
