"""Per-channel lookup tables (SqueezeLLM-style non-uniform quantization): weighted k-means, dense-and-sparse, packing.

No models, no files. A weight row ``w`` (``in`` values) with per-value sensitivities ``f`` (the
Fisher diagonal: squared gradients) gets ``2**bits`` centroids minimising ``sum f * (w - c[code])**2``
(:func:`weighted_kmeans`, Lloyd's algorithm in one dimension, all rows at once):

* deterministic: two fixed initialisations, no random numbers (so no seed): the row's uniform
  asymmetric integer grid (the levels RTN would use per channel; Lloyd only lowers the weighted
  error, so the result is never worse than that grid), and the weighted quantiles (equal-weight
  bins); each row keeps whichever ends with the lower weighted error;
* assignment to the nearest centroid, ties to the lower one; a centroid whose cluster has no
  weight keeps its value; iterations stop when no code changes (or after ``iters``);
* the returned centroids are the weighted means of the returned clusters (a last update).

Dense-and-sparse (:func:`split_outliers`): a fraction of the largest-magnitude values and of the
most sensitive values leaves the k-means (weight 0); their dense code is the centroid nearest 0
and the remainder ``w - c[code]`` is kept in float32 in a CSR matrix (``rows`` ``[out + 1]``,
``cols``, ``vals``), so ``dense + sparse`` is the original value (to float32 rounding: one ulp).

Packing (:func:`pack_qweight`): SqueezeLLM's ``qweight`` int32 ``[in * bits / 32, out]``, the
codes of each output column as one little-endian bit stream along the input dimension (4 bits:
eight codes per word, code ``j`` at bits ``4 (j % 8)``; 3 bits: 32 codes in 3 words, two codes
crossing word boundaries).
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

from .packing import pack, unpack

#: Lloyd iterations at most (SqueezeLLM runs scikit-learn's KMeans with max_iter=50; rows of real
#: weights mostly settle within 100, and a row that has not keeps the better of its two starts).
ITERS = 100
#: Values per chunk of rows processed at once (bounds the temporary memory of the k-means).
CHUNK = 1 << 22


class _SortedRows:
    """Rows sorted once, with prefix sums of the weights, weighted values and weighted squares (float64):
    in one dimension a cluster is a run of the sorted row, so each Lloyd step costs ``k`` binary
    searches and ``k`` differences per row instead of a pass over every value."""

    def __init__(self, w: torch.Tensor, f: torch.Tensor) -> None:
        self.w, self.order = torch.sort(w, dim=1, stable=True)
        sf = torch.gather(f, 1, self.order).double()
        sw = self.w.double()
        zero = torch.zeros(w.shape[0], 1, dtype=torch.float64, device=w.device)
        self.p0 = torch.cat([zero, torch.cumsum(sf, 1)], 1)
        self.p1 = torch.cat([zero, torch.cumsum(sf * sw, 1)], 1)
        self.p2 = torch.cat([zero, torch.cumsum(sf * sw * sw, 1)], 1)

    def bounds(self, c: torch.Tensor) -> torch.Tensor:
        """``[R, k + 1]`` start of every cluster in the sorted row (nearest centroid, ties to the lower one)."""
        mids = ((c[:, 1:] + c[:, :-1]) * 0.5).contiguous()
        inner = torch.searchsorted(self.w, mids, right=True)  # values <= mid go to the lower centroid
        n = self.w.shape[1]
        return torch.cat([torch.zeros_like(inner[:, :1]), inner, torch.full_like(inner[:, :1], n)], 1)

    def sums(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def seg(p: torch.Tensor) -> torch.Tensor:
            g = torch.gather(p, 1, b)
            return g[:, 1:] - g[:, :-1]

        return seg(self.p0), seg(self.p1), seg(self.p2)

    def means(self, b: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        s0, s1, _ = self.sums(b)
        return torch.where(s0 > 0, s1 / s0.clamp_min(1e-300), old.double()).float()

    def error(self, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s0, s1, s2 = self.sums(b)
        cd = c.double()
        return (s2 - 2 * cd * s1 + cd * cd * s0).sum(1)

    def codes(self, b: torch.Tensor) -> torch.Tensor:
        """Cluster index of every value, in the original order."""
        pos = torch.arange(self.w.shape[1], device=b.device).expand(b.shape[0], -1).contiguous()
        sorted_codes = torch.searchsorted(b[:, 1:-1].contiguous(), pos, right=True)
        return torch.empty_like(sorted_codes).scatter_(1, self.order, sorted_codes)


def _lloyd(rows: _SortedRows, c: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's iterations from the sorted centroids ``c``: ``(centroids, cluster bounds)``."""
    b = rows.bounds(c)
    for _ in range(iters):
        c = torch.sort(rows.means(b, c), dim=1).values
        new = rows.bounds(c)
        if torch.equal(new, b):
            break
        b = new
    return rows.means(b, c), b  # the centroids of the clusters returned (equal to c at a fixed point)


def uniform_levels(w: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` levels ``(q - zero) * scale`` of each row's asymmetric min/max integer grid (RTN per channel)."""
    lo = w.amin(1, keepdim=True).clamp(max=0.0)
    hi = w.amax(1, keepdim=True).clamp(min=0.0)
    scale = (hi - lo) / (k - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, k - 1)
    q = torch.arange(k, dtype=torch.float32, device=w.device).unsqueeze(0)
    return (q - zero) * scale


def _quantile_levels(w: torch.Tensor, f: torch.Tensor, k: int) -> torch.Tensor:
    """Weighted quantiles at the middle of ``k`` equal-weight bins of each row."""
    sw, order = torch.sort(w, dim=1)
    cf = torch.cumsum(torch.gather(f, 1, order).double(), 1)
    total = cf[:, -1:].clamp_min(1e-300)
    targets = (torch.arange(k, dtype=torch.float64, device=w.device) + 0.5) / k * total
    idx = torch.searchsorted(cf.contiguous(), targets.contiguous()).clamp(max=w.shape[1] - 1)
    return torch.gather(sw, 1, idx)


def weighted_kmeans(w: torch.Tensor, f: torch.Tensor | None, bits: int, iters: int = ITERS,
                    where: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lut float32 [out, 2**bits], codes uint8 [out, in])`` of each row of ``w`` weighted by ``f``.

    ``f`` (``[out, in]``, non-negative; ``None``: all ones) weighs each value; a row whose weights
    are all zero is clustered with equal weights (as SqueezeLLM does). See the module doc.
    """
    if w.dim() != 2:
        raise LowbitError(where, f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if not 1 <= bits <= 8:
        raise LowbitError(where, f"lookup tables have 1 to 8 bits, not {bits}")
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise LowbitError(where, "non-finite (NaN/Inf) values in the weight")
    if f is None:
        f = torch.ones_like(w)
    f = f.detach().float().to(w.device)
    if f.shape != w.shape:
        raise LowbitError(where, f"sensitivities {tuple(f.shape)} do not match the weight {tuple(w.shape)}")
    if not torch.isfinite(f).all() or bool((f < 0).any()):
        raise LowbitError(where, "sensitivities must be finite and non-negative")
    f = torch.where(f.sum(1, keepdim=True) > 0, f, torch.ones_like(f))
    k = 1 << bits
    out_f, in_f = w.shape
    luts, codes = [], []
    step = max(1, CHUNK // max(in_f, 1))
    for r0 in range(0, out_f, step):
        wc, fc = w[r0 : r0 + step], f[r0 : r0 + step]
        rows = _SortedRows(wc, fc)
        c1, b1 = _lloyd(rows, uniform_levels(wc, k), iters)
        c2, b2 = _lloyd(rows, _quantile_levels(wc, fc, k), iters)
        better = (rows.error(b2, c2) < rows.error(b1, c1))[:, None]
        luts.append(torch.where(better, c2, c1))
        codes.append(rows.codes(torch.where(better, b2, b1)).to(torch.uint8))
    return torch.cat(luts), torch.cat(codes)


# --- dense-and-sparse ----------------------------------------------------------------------------


def outlier_mask(w: torch.Tensor, f: torch.Tensor | None, magnitude: float, sensitive: float) -> torch.Tensor:
    """Bool ``[out, in]``: the ``magnitude`` fraction of largest ``|w|`` and the ``sensitive`` fraction
    of largest ``f`` (``round(fraction * numel)`` each, ``torch.topk``; the two sets may overlap)."""
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    for frac, score in ((magnitude, w.abs()), (sensitive, f)):
        n = int(round(frac * w.numel()))
        if n > 0 and score is not None:
            mask[torch.topk(score.reshape(-1).float(), n, sorted=False).indices] = True
    return mask.reshape(w.shape)


def split_outliers(w: torch.Tensor, lut: torch.Tensor, codes: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dense codes (outliers set to each row's centroid nearest 0) and the CSR remainder ``w - dense``."""
    zero_code = lut.abs().argmin(1).to(codes.dtype)
    codes = torch.where(mask, zero_code[:, None].expand_as(codes), codes)
    dense = torch.gather(lut, 1, codes.long())
    rows_i, cols_i = torch.nonzero(mask, as_tuple=True)  # row-major order: CSR order
    vals = (w.float() - dense)[rows_i, cols_i]
    counts = torch.bincount(rows_i, minlength=w.shape[0])
    crow = torch.zeros(w.shape[0] + 1, dtype=torch.int64, device=w.device)
    crow[1:] = torch.cumsum(counts, 0)
    return codes, {"sparse_rows": crow.to(torch.int32), "sparse_cols": cols_i.to(torch.int32),
                   "sparse_vals": vals.float().contiguous()}


def sparse_dense(extra: dict[str, torch.Tensor], shape: tuple[int, int], device: torch.device | None = None) -> torch.Tensor | None:
    """The CSR remainder of :func:`split_outliers` as a dense float32 ``[out, in]`` (``None`` when absent)."""
    if "sparse_vals" not in extra:
        return None
    crow = extra["sparse_rows"].long()
    out_f = shape[0]
    if crow.shape != (out_f + 1,):
        raise LowbitError(None, f"sparse rows {tuple(crow.shape)} do not match {out_f} output rows")
    rows = torch.repeat_interleave(torch.arange(out_f, device=crow.device), crow[1:] - crow[:-1])
    dense = torch.zeros(shape, dtype=torch.float32, device=device or crow.device)
    dense[rows.to(dense.device), extra["sparse_cols"].long().to(dense.device)] = extra["sparse_vals"].float().to(dense.device)
    return dense


# --- SqueezeLLM's qweight ------------------------------------------------------------------------


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """SqueezeLLM's ``qweight`` int32 ``[in * bits / 32, out]`` of codes ``[out, in]`` (``in`` a multiple of 32)."""
    if codes.shape[1] % 32:
        raise LowbitError(None, f"SqueezeLLM packs 32 input columns at a time: {codes.shape[1]} is not a multiple of 32")
    return pack(codes.t().to(torch.int64), bits, dim=0, dtype=torch.int32).contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[out, in]`` (uint8) of a SqueezeLLM ``qweight``."""
    n = qweight.shape[0] * 32 // bits
    return unpack(qweight, bits, n, dim=0).t().to(torch.uint8).contiguous()
