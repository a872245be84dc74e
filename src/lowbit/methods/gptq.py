"""GPTQ: quantize a linear layer's weight column by column, correcting the not-yet-quantized
columns with the inverse Hessian of the layer's input (Frantar et al., 2022).

The Hessian of the layer-wise objective ``||W X - Q X||^2`` is ``H = 2/n X X^T`` over the ``n``
calibration tokens; :class:`HessianAccumulator` keeps it as a running average. :func:`gptq_quantize`
then walks the columns (optionally in order of decreasing ``diag(H)``, "act-order"), rounds each
one onto the scheme's grid and spreads its rounding error over the remaining columns through the
upper Cholesky factor of ``H^-1``. Updates are applied lazily, one block of columns at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.core import compute_qparams, search_clip
from lowbit.core.scheme import PER_CHANNEL, QuantScheme
from lowbit.errors import LowbitError

from .base import QuantizedWeight


class HessianAccumulator:
    """Running ``H = 2/n sum_t x_t x_t^T`` over the rows ``x_t`` of a layer's inputs."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add inputs ``x`` (``[..., in]``); ``mask`` (``x.shape[:-1]``, bool) keeps real tokens only."""
        x = x.reshape(-1, x.shape[-1]) if mask is None else x[mask.to(torch.bool)]
        m = x.shape[0]
        if m == 0:
            return
        x = x.to(self.H.device, torch.float32)
        if not torch.isfinite(x).all():
            raise LowbitError("gptq", "non-finite (NaN/Inf) values in the layer inputs")
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * math.sqrt(2.0 / self.n)
        self.H.addmm_(x.t(), x)


@dataclass
class GPTQStats:
    """Diagnostics of one GPTQ run."""

    damp: float
    dead_columns: int
    loss: float  # sum over columns of err^2 / Hinv_jj (the GPTQ proxy of ||WX - QX||^2 / 2)


def _inverse_cholesky(H: torch.Tensor, damp: float, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + d I)^-1``; ``d`` starts at ``damp * mean(diag H)`` and
    grows tenfold whenever the factorisation fails."""
    mean_diag = float(torch.diag(H).mean())
    d = damp * (mean_diag if mean_diag > 0 else 1.0)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + d * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, d
        d *= 10.0
    raise LowbitError("gptq", f"Hessian is not positive definite even with dampening {d:.3g}")


def _group_params(
    w: torch.Tensor, scheme: QuantScheme, mse_clip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale/zero per row of ``w`` (``[out, cols]``), as ``[out]`` vectors."""
    row_scheme = QuantScheme(scheme.bits, PER_CHANNEL, scheme.symmetric)
    clip = search_clip(w, row_scheme) if mse_clip else 1.0
    scale, zero = compute_qparams(w, row_scheme, clip)
    return scale[:, 0], zero[:, 0]


def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    scheme: QuantScheme,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    mse_clip: bool = False,
    return_stats: bool = False,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> QuantizedWeight | tuple[QuantizedWeight, GPTQStats]:
    """GPTQ-quantize ``weight`` (``[out, in]``) given the input Hessian ``H`` (``[in, in]``).

    ``act_order`` visits columns by decreasing ``diag(H)``; with groups, each group then holds
    consecutive columns of that order and ``g_idx`` maps every input column to its group.
    ``static_groups`` fixes all group parameters from the original weight up front (groups stay
    contiguous in the original column order, so act-order needs no ``g_idx``). Per-channel and
    per-tensor parameters are always computed up front. Deterministic for a given input.

    ``grid``: fixed group grids ``(scale, minimum)``, each ``[out, n_groups]``, meaning values
    ``q * scale - minimum`` (e.g. llama.cpp's Q4_K sub-block grids, see
    :func:`lowbit.gguf.from_quantized.kquant_grid`); GPTQ then only chooses the codes (static
    groups). The returned ``zero`` is ``minimum / scale`` (not an integer; 0 where scale is 0).
    """
    if weight.dim() != 2 or H.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and Hessian {tuple(H.shape)} do not match")
    out_f, in_f = weight.shape
    gs = scheme.group_size
    if gs > 0:
        scheme.n_groups(in_f)  # raises when the group size does not divide the row
    W = weight.detach().to(H.device, torch.float32).clone()
    if not torch.isfinite(W).all():
        raise LowbitError("gptq", "non-finite (NaN/Inf) values in the weight")
    H = H.detach().to(torch.float32).clone()

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # Parameters fixed before any update.
    static_scale: torch.Tensor | None = None
    static_zero: torch.Tensor | None = None
    if gs <= 0:
        clip = search_clip(W, scheme) if mse_clip else 1.0
        static_scale, static_zero = compute_qparams(W, scheme, clip)  # [out,1] or [1,1]
    elif grid is not None:
        static_groups = True
        g_scale, g_min = (t.to(W.device, torch.float32) for t in grid)
        if g_scale.shape != (out_f, scheme.n_groups(in_f)) or g_min.shape != g_scale.shape:
            raise ValueError(f"grid {tuple(g_scale.shape)} does not match weight {tuple(weight.shape)} and {scheme}")
        grid_div = torch.where(g_scale > 0, g_scale, 1.0)  # a zero scale holds every code at -minimum
        static_scale, static_zero = g_scale, torch.where(g_scale > 0, g_min / grid_div, 0.0)
    elif static_groups:
        sc, zr = [], []
        for g0 in range(0, in_f, gs):
            s, z = _group_params(W[:, g0 : g0 + gs], scheme, mse_clip)
            sc.append(s)
            zr.append(z)
        static_scale, static_zero = torch.stack(sc, 1), torch.stack(zr, 1)

    perm = torch.arange(in_f, device=W.device)
    if act_order:
        perm = torch.sort(torch.diag(H), descending=True, stable=True).indices
        W = W[:, perm]
        H = H[perm][:, perm]
    invperm = torch.argsort(perm)

    U, used_damp = _inverse_cholesky(H, damp)
    del H

    # Blocks end on group boundaries so a group's columns are all up to date when it starts.
    if gs > 0 and not static_groups:
        block_size = gs * max(1, block_size // gs)

    codes = torch.zeros(out_f, in_f, dtype=torch.int32, device=W.device)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    qmax = float(scheme.qmax)
    loss = torch.zeros((), dtype=torch.float32, device=W.device)
    if static_groups and gs > 0:
        col_group = (perm // gs).tolist()  # original-order group of each visited column

    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        W1 = W[:, b0:b1].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            j = b0 + i
            if gs <= 0:
                s, z = static_scale[:, 0], static_zero[:, 0]
            elif static_groups:
                g = col_group[j]
                s, z = static_scale[:, g], static_zero[:, g]
            else:
                if j % gs == 0:
                    s, z = _group_params(W1[:, i : i + gs], scheme, mse_clip)
                    scales.append(s)
                    zeros.append(z)
                s, z = scales[-1], zeros[-1]
            w = W1[:, i]
            if grid is None:
                q = torch.clamp(torch.round(w / s) + z, 0.0, qmax)
                deq = (q - z) * s
            else:  # rounded as llama.cpp rounds onto its own grid
                q = torch.clamp(torch.round((w + g_min[:, g]) / grid_div[:, g]), 0.0, qmax)
                deq = q * s - g_min[:, g]
            codes[:, j] = q.to(torch.int32)
            d = U1[i, i]
            err = (w - deq) / d
            loss += (err * err).sum()
            W1[:, i:].sub_(err[:, None] * U1[i, i:][None, :])
            E1[:, i] = err
        W[:, b1:].sub_(E1 @ U[b0:b1, b1:])

    codes = codes[:, invperm].contiguous()
    g_idx: torch.Tensor | None = None
    if gs > 0 and not static_groups:
        scale, zero = torch.stack(scales, 1), torch.stack(zeros, 1)
        if act_order:
            g_idx = (invperm // gs).to(torch.int32)
    else:
        scale, zero = static_scale, static_zero
    qw = QuantizedWeight(codes, scale, zero, scheme, g_idx)
    if return_stats:
        return qw, GPTQStats(used_damp, int(dead.sum()), float(loss))
    return qw
