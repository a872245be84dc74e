"""GPTQ: quantize a linear layer's weight column by column, correcting the not-yet-quantized
columns with the inverse Hessian of the layer's input (Frantar et al., 2022).

The Hessian of the layer-wise objective ``||W X - Q X||^2`` is ``H = 2/n X X^T`` over the ``n``
calibration tokens; :class:`~lowbit.models.statistics.Hessian` keeps it as a running average. :func:`gptq_quantize`
then walks the columns (optionally in order of decreasing ``diag(H)``, "act-order"), rounds each
one onto the scheme's grid and spreads its rounding error over the remaining columns through the
upper Cholesky factor of ``H^-1``. Updates are applied lazily, one block of columns at a time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.core import compute_qparams, search_clip
from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import PER_CHANNEL, QuantScheme
from lowbit.errors import LowbitError
from lowbit.models.adapters import get_weight, is_expert_slot, set_weight
from lowbit.models.capture import token_mask_for
from lowbit.models.layers import LayerContext, LayerResult, full_weight_name
from lowbit.models.statistics import Hessian, observe

from ._common import Rules, keeps_float, rules_fingerprint, scheme_lookup, split_rows
from .registry import Method, register_method
from .rtn import rtn

HessianAccumulator = Hessian  # the statistic lives with the others in lowbit.models.statistics


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
        raise LowbitError("gptq", f"weight {tuple(weight.shape)} and Hessian {tuple(H.shape)} do not match")
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
            raise LowbitError("gptq", f"grid {tuple(g_scale.shape)} does not match weight {tuple(weight.shape)} and {scheme}")
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
                assert static_scale is not None and static_zero is not None
                s, z = static_scale[:, 0], static_zero[:, 0]
            elif static_groups:
                assert static_scale is not None and static_zero is not None
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


# --- the layer handler ---------------------------------------------------------------------------

ACT_ORDERS = ("static", "dynamic", "off")


def act_order_flags(act_order: bool | str) -> tuple[bool, bool]:
    """``(act_order, static_groups)`` of a GPTQ act-order mode.

    ``"static"`` (the default): columns in order of decreasing Hessian diagonal, groups fixed
    up front in the original column order, so checkpoints need no ``g_idx`` (llm-compressor's
    "static" actorder); ``"dynamic"`` or ``True``: groups follow the visiting order and a ``g_idx``
    maps columns to groups (AutoGPTQ's ``desc_act``); ``"off"`` or ``False``: plain column order.
    """
    modes = {"static": (True, True), "dynamic": (True, False), "off": (False, False), True: (True, False),
             False: (False, False)}
    if act_order not in modes:
        raise LowbitError("act_order", f"unknown act-order mode {act_order!r} (choose from {', '.join(ACT_ORDERS)})")
    return modes[act_order]


@dataclass
class GPTQHandler:
    """GPTQ over the layer's sequential groups.

    GPTQ is true-sequential inside a layer: for each group of linears (q/k/v, o, gate/up, down)
    the layer is run with the earlier groups already quantized, the inputs of the group's linears
    are accumulated into Hessians, and the group is quantized. Linears that read the same tensor
    share one Hessian and are quantized together (their rows stacked), which gives the same result
    as quantizing them one by one. Routed experts get per-expert Hessians from the tokens routed
    to them; an expert with fewer than ``min_expert_tokens`` tokens falls back to RTN with a warning.
    """

    scheme: QuantScheme
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    mse_clip: bool = True  # group ranges by MSE search (measured: large gain at 3 bits, see bench/results)
    grid: str | None = None  # "Q4_K": llama.cpp's block grid (its imatrix search, diag H) fixed up front; GPTQ picks codes
    min_expert_tokens: int = 16
    rules: Rules = None
    propagate: str = "quantized"
    needs_inputs: bool = True

    def fingerprint(self) -> dict[str, Any]:
        return {
            "method": "gptq", "scheme": self.scheme, "act_order": self.act_order, "static_groups": self.static_groups,
            "damp": self.damp, "block_size": self.block_size, "mse_clip": self.mse_clip, "grid": self.grid,
            "min_expert_tokens": self.min_expert_tokens, "rules": rules_fingerprint(self.rules),
        }

    def _gptq(self, w: torch.Tensor, H: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
        grid = None
        if self.grid is not None:
            from lowbit.gguf.from_quantized import kquant_grid

            if scheme != QuantScheme(4, 32, False):
                raise LowbitError(f"grid {self.grid}", f"needs int4 asymmetric groups of 32, not {scheme.describe()}")
            grid = kquant_grid(w, self.grid, imatrix=torch.diag(H))  # llama-imatrix's statistic, same data
        return gptq_quantize(  # type: ignore[return-value]
            w, H, scheme, act_order=self.act_order, static_groups=self.static_groups,
            block_size=self.block_size, damp=self.damp, mse_clip=self.mse_clip, grid=grid,
        )

    def _keeps_float(self, scheme: QuantScheme | None, w: torch.Tensor, where: str) -> bool:
        """:func:`keeps_float`, and with a K-quant grid rows it cannot hold (the GGUF writer encodes those as llama.cpp)."""
        if self.grid is not None:
            from lowbit.gguf.from_quantized import QK_K  # GGUF only on this path

            if w.shape[1] % QK_K != 0:
                return True
        return keeps_float(scheme, w, where)

    def process(self, ctx: LayerContext) -> LayerResult:
        res = LayerResult()
        coverage: dict[str, int] = {}
        fallbacks: list[str] = []
        lookup = scheme_lookup(self.scheme, self.rules)
        for group in ctx.adapter.sequential_for(ctx.layer):
            schemes = {n: lookup(full_weight_name(ctx.adapter, ctx.index, n)) for n in group}
            group = [
                n for n in group
                if not self._keeps_float(schemes[n], get_weight(ctx.adapter, ctx.layer, n),
                                         full_weight_name(ctx.adapter, ctx.index, n))
            ]
            if not group:
                continue
            # Without experts, the rest of the layer is not needed once every linear has had its input.
            early_stop = not any(is_expert_slot(ctx.adapter, n) for n in group)
            accs = observe(ctx, group, lambda cols, dev: Hessian(cols, dev), share=True, early_stop=early_stop)
            # Linears sharing an accumulator and a scheme are quantized together (rows stacked).
            by_acc: dict[tuple[int, Any], list[str]] = {}
            for name in group:
                key = id(accs[name]) if name in accs else -id(name)  # an expert with no token
                by_acc.setdefault((key, schemes[name]), []).append(name)
            for (_, scheme), names in by_acc.items():
                acc = accs.get(names[0])
                ws = [get_weight(ctx.adapter, ctx.layer, n) for n in names]
                n_tok = 0 if acc is None else acc.n  # type: ignore[attr-defined]
                expert = is_expert_slot(ctx.adapter, names[0])
                if expert:
                    for n in names:
                        coverage[n] = n_tok
                if acc is None or (expert and n_tok < self.min_expert_tokens):
                    fallbacks.extend(names)
                    qws = [rtn(w, scheme) for w in ws]  # plain RTN: MSE-clipped RTN measured worse
                elif scheme.group_size == 0:  # one scale per tensor: no stacking
                    qws = [self._gptq(w, acc.H, scheme) for w in ws]  # type: ignore[attr-defined]
                else:
                    stacked = torch.cat(ws, 0) if len(ws) > 1 else ws[0]
                    qw = self._gptq(stacked, acc.H, scheme)  # type: ignore[attr-defined]
                    qws = split_rows(qw, [w.shape[0] for w in ws])
                for n, w, qw in zip(names, ws, qws):
                    set_weight(ctx.adapter, ctx.layer, n, qw.dequantize(w.dtype).to(w.device))
                    res.weights[n] = qw.to("cpu")
            del accs
        if fallbacks:
            warnings.warn(
                f"layer {ctx.index}: {len(fallbacks)} expert weights saw fewer than {self.min_expert_tokens} "
                "calibration tokens and were quantized with RTN", stacklevel=2,
            )
        if coverage:
            n_exp_slots = len(coverage)
            res.info["expert_tokens"] = coverage
            res.info["expert_coverage"] = 1.0 - len(fallbacks) / n_exp_slots
            res.info["rtn_fallback"] = fallbacks
        return res

    def quantize_linear(self, name: str, w: torch.Tensor, scheme: QuantScheme, inputs: list[torch.Tensor] | None,
                        masks: list[torch.Tensor | None]) -> QuantizedWeight | None:
        """GPTQ of a linear outside the layers (``lm_head``) on the final norm's outputs."""
        if self._keeps_float(scheme, w, name):
            return None
        if inputs is None:
            return rtn(w, scheme)
        H = Hessian(w.shape[1], w.device)
        for x, m in zip(inputs, masks):
            H.add(x, token_mask_for(x, m))
        return self._gptq(w, H.H, scheme)


@register_method
class GPTQ(Method):
    """GPTQ: column-by-column rounding with error feedback through the inputs' Hessian (calibrated)"""

    name = "gptq"
    calibrated = True
    calibration_default = (128, 2048)
    options = ("act_order", "damp", "block_size", "mse_clip", "grid", "min_expert_tokens")

    def handler(self, scheme: QuantScheme, rules: Rules, act_order: bool | str | None = None,
                **options: Any) -> GPTQHandler:
        ao, static = act_order_flags("static" if act_order is None else act_order)
        options.setdefault("static_groups", static)
        return GPTQHandler(scheme, act_order=ao, rules=rules, **options)
