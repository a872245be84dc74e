"""AWQ: activation-aware per-channel scaling before round-to-nearest (Lin et al., 2023).

For each scaling group (an op whose output channels feed some linears; see
:class:`lowbit.models.adapters.ScaleGroup`) a per-input-channel scale ``s`` is searched on a grid:
``s = mean|x|^a`` (or, "duo" scaling, ``s = mean|x|^a / mean|w~|^(1-a)`` with ``w~`` the weight
normalised per quantization group), ``a`` in ``{0, 1/n, ..., (n-1)/n}``, normalised so that
``max(s) * min(s) = 1``. A candidate is scored by the squared error of the group's block output
(the attention block, the MLP, or the linear itself) when its linears are replaced by
``Q(W diag(s)) diag(s)^-1``; ``s = 1`` (plain RTN) is always a candidate. The winner is folded
exactly: the linears' columns are multiplied by ``s`` and the preceding op's output divided by
``s`` (RMSNorm weight, Gemma's ``1 + w``, or the previous linear's rows and bias). Then each
linear (except q/k, whose errors the softmax amplifies) gets a clipping search that shrinks each
group's range to minimise the error of its outputs on calibration tokens, and is rounded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.core import compute_qparams, quantize
from lowbit.core.affine import grouped, qparams_from_range
from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.models.adapters import Adapter, ScaleGroup, get_submodule, get_weight, is_expert_slot, set_weight
from lowbit.models.capture import token_mask_for
from lowbit.models.layers import LayerContext, LayerResult, full_weight_name
from lowbit.models.statistics import Tokens, observe

from ._common import Rules, keeps_float, rules_fingerprint, scheme_lookup
from .registry import Method, register_method

# --- pure tensor pieces ---------------------------------------------------------------------------


def fake_quant(w: torch.Tensor, scheme: QuantScheme, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``w`` rounded to the scheme's grid (optionally with per-group range shrink ``clip``).

    The same values as ``dequantize(quantize(w, *compute_qparams(w, scheme, clip)))``, computed on
    the grouped view with broadcast scales, in place (no expanded copies of scale and zero point,
    no integer round trip: the codes are exact small integers either way).
    """
    g = grouped(w.float(), scheme)
    return _fake_quant_grouped(g, *qparams_from_range(g.amin(dim=-1) * clip, g.amax(dim=-1) * clip, scheme),
                               scheme).reshape(w.shape).to(w.dtype)


def _fake_quant_grouped(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``(clamp(round(g / scale) + zero, 0, qmax) - zero) * scale`` on ``[rows, groups, group]`` values."""
    s, z = scale[..., None], zero[..., None]
    q = g / s
    q.round_().add_(z).clamp_(0, scheme.qmax)
    return q.sub_(z).mul_(s)


def weight_channel_mean(ws: list[torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    """Mean over rows of ``|w|`` normalised by its quantization group's max (duo-scaling statistic)."""
    w = torch.cat([x.float() for x in ws], 0)
    g = grouped(w, scheme if scheme.group_size != 0 else QuantScheme(scheme.bits, -1, scheme.symmetric)).abs()
    g = g / (g.amax(dim=-1, keepdim=True) + 1e-6)
    return g.reshape(w.shape).mean(0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``x_mean^a`` (or ``x_mean^a / w_mean^(1-a)``), clamped and normalised to ``max*min = 1``."""
    s = x_mean.float().pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.float().pow(1.0 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_clip_for_output(
    w: torch.Tensor, x: torch.Tensor, scheme: QuantScheme, n_grid: int = 20, max_shrink: float = 0.5, rows_per_chunk: int = 256
) -> torch.Tensor:
    """Per-group range shrink (``[out, n_groups]``) minimising ``||(W - Q(W)) x||^2`` on tokens ``x`` ``[n, in]``."""
    w = w.float()
    x = x.float().to(w.device)
    out_f, in_f = w.shape
    sch = scheme if scheme.group_size > 0 else QuantScheme(scheme.bits, -1, scheme.symmetric)
    ng = sch.n_groups(in_f)
    gs = in_f // ng
    # Each group's products are one batched matrix product over the groups, [ng, rows, gs] @ [ng, gs, n]
    # (what einsum("ogk,ngk->ogn") runs), with the tokens' side laid out once for every call.
    xt = x.reshape(x.shape[0], ng, gs).permute(1, 2, 0).contiguous()  # [ng, gs, n]
    best = torch.ones(out_f, ng, device=w.device)
    for r0 in range(0, out_f, rows_per_chunk):
        wc = w[r0 : r0 + rows_per_chunk]
        wg = wc.reshape(wc.shape[0], ng, gs)
        ref = torch.bmm(wg.transpose(0, 1), xt)  # [ng, rows, n]
        best_err = torch.full((wc.shape[0], ng), float("inf"), device=w.device)
        g = grouped(wc, sch)  # the range of each group, found once for every shrink factor
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        for k in range(int(max_shrink * n_grid)):
            factor = 1.0 - k / n_grid
            clip = torch.full((wc.shape[0], ng), factor, device=w.device)
            q = _fake_quant_grouped(g, *qparams_from_range(lo * clip, hi * clip, sch), sch).reshape(wc.shape[0], ng, gs)
            d = torch.bmm(q.transpose(0, 1), xt).sub_(ref)
            err = d.mul_(d).mean(-1).t()  # mean squared output error per [row, group]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[r0 : r0 + rows_per_chunk] = torch.where(better, clip, best[r0 : r0 + rows_per_chunk])
    if scheme.group_size == 0:  # per tensor: one shared factor, the most common choice
        return best.flatten().mode().values.reshape(1, 1)
    return best


# --- folding ---------------------------------------------------------------------------------------


def fold_scales(adapter: Adapter, layer: nn.Module, sg: ScaleGroup, s: torch.Tensor) -> list[str]:
    """Divide ``sg.prev``'s output channels by ``s`` and multiply the columns of the group's linears
    (and followers) by ``s``: the float function of the layer is unchanged. Returns the names of
    float parameters changed (norm weights, biases, followers) other than the group's weights."""
    changed: list[str] = []
    prev = get_submodule(layer, sg.prev)
    with torch.no_grad():
        s_ = s.to(prev.weight.device, torch.float32)
        if sg.prev_kind == "norm":
            prev.weight.copy_((prev.weight.float() / s_).to(prev.weight.dtype))
            changed.append(f"{sg.prev}.weight")
        elif sg.prev_kind == "norm_plus_one":
            prev.weight.copy_(((1.0 + prev.weight.float()) / s_ - 1.0).to(prev.weight.dtype))
            changed.append(f"{sg.prev}.weight")
        elif sg.prev_kind == "linear":
            prev.weight.copy_((prev.weight.float() / s_[:, None]).to(prev.weight.dtype))
            if getattr(prev, "bias", None) is not None:
                prev.bias.copy_((prev.bias.float() / s_).to(prev.bias.dtype))
                changed.append(f"{sg.prev}.bias")
        else:
            raise LowbitError(sg.prev, f"unknown scaling source kind {sg.prev_kind!r}")
        for name in sg.linears:
            w = get_weight(adapter, layer, name)
            set_weight(adapter, layer, name, (w.float() * s_[None, :]).to(w.dtype))
        for name in sg.followers:
            mod = get_submodule(layer, name)
            mod.weight.copy_((mod.weight.float() * s_[None, :]).to(mod.weight.dtype))
            changed.append(f"{name}.weight")
    return changed


# --- the layer handler ------------------------------------------------------------------------------


def _call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    out = module(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _masked_sq_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    d = (a.float() - b.float()).pow(2)
    m = token_mask_for(d, mask)
    if m is not None:
        d = d[m]
    return float(d.sum()), d.numel()


@dataclass
class AWQHandler:
    """AWQ for one decoder layer: scale search and folding, clipping search, rounding."""

    scheme: QuantScheme
    n_grid: int = 20
    duo_scaling: bool | str = True  # True, False, or "both" (search both families)
    clip: bool = True
    clip_tokens: int = 512
    search_batches: int | None = None  # calibration batches used by the scale search (None: all)
    rules: Rules = None
    propagate: str = "float"
    needs_inputs: bool = True

    def fingerprint(self) -> dict[str, Any]:
        return {
            "method": "awq", "scheme": self.scheme, "n_grid": self.n_grid, "duo_scaling": self.duo_scaling,
            "clip": self.clip, "clip_tokens": self.clip_tokens, "search_batches": self.search_batches, "rules": rules_fingerprint(self.rules),
        }

    # capture --------------------------------------------------------------------------------------

    def _capture(self, ctx: LayerContext, linears: list[str], inspect: list[str]) -> tuple[dict, dict]:
        """Inputs of the named linears ([n_tok, in] each, real tokens only) and the call arguments of
        the inspected modules (per batch), from one float pass over the calibration batches."""
        calls: dict[str, list[tuple[tuple, dict]]] = {n: [] for n in inspect}
        handles = []
        for n in inspect:
            mod = get_submodule(ctx.layer, n)

            def pre(_m: nn.Module, args: tuple, kwargs: dict, _n: str = n) -> None:
                calls[_n].append((args, dict(kwargs)))

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            stats = observe(ctx, linears, lambda cols, dev: Tokens(cols, dev), share=False)
        finally:
            for hd in handles:
                hd.remove()
        return {n: stats[n].tensor() if n in stats else None for n in linears}, calls  # type: ignore[attr-defined]

    # search ---------------------------------------------------------------------------------------

    def _group_loss(
        self, ctx: LayerContext, sg: ScaleGroup, s: torch.Tensor | None, calls: list, refs: list, originals: dict,
        scheme: QuantScheme,
    ) -> float:
        """Block-output squared error with the group's linears replaced by ``Q(W s) / s``."""
        module = get_submodule(ctx.layer, sg.inspect)
        for name in sg.linears:
            w = originals[name]
            if s is None:
                q = fake_quant(w, scheme)
            else:
                s_ = s.to(w.device)
                q = fake_quant((w.float() * s_), scheme).float() / s_
            set_weight(ctx.adapter, ctx.layer, name, q.to(w.dtype))
        total, count = 0.0, 0
        for (args, kwargs), ref, m in zip(calls, refs, ctx.inputs.masks):
            e, c = _masked_sq_err(_call(module, args, kwargs), ref, m)
            total += e
            count += c
        for name in sg.linears:
            set_weight(ctx.adapter, ctx.layer, name, originals[name])
        return total / max(count, 1)

    def _search(self, ctx: LayerContext, sg: ScaleGroup, x: torch.Tensor, calls: list, scheme: QuantScheme) -> tuple[torch.Tensor | None, dict]:
        module = get_submodule(ctx.layer, sg.inspect)
        refs = [_call(module, a, k) for a, k in calls]
        originals = {n: get_weight(ctx.adapter, ctx.layer, n).clone() for n in sg.linears}
        x_mean = x.abs().float().mean(0)
        families: list[bool] = [True, False] if self.duo_scaling == "both" else [bool(self.duo_scaling)]
        w_mean = weight_channel_mean(list(originals.values()), scheme)
        rtn_loss = self._group_loss(ctx, sg, None, calls, refs, originals, scheme)
        best_loss, best_s, best_desc = rtn_loss, None, "rtn"
        for duo in families:
            for k in range(self.n_grid):
                a = k / self.n_grid
                s = candidate_scales(x_mean, w_mean if duo else None, a)
                loss = self._group_loss(ctx, sg, s, calls, refs, originals, scheme)
                if loss < best_loss:
                    best_loss, best_s, best_desc = loss, s, f"{'duo ' if duo else ''}alpha={a:.2f}"
        return best_s, {"rtn_loss": rtn_loss, "awq_loss": best_loss, "choice": best_desc}

    def _group_input(self, sg: ScaleGroup, xs: dict, calls: dict, ctx: LayerContext) -> torch.Tensor | None:
        """The tokens entering the group's linears; for routed experts, the MoE block's input."""
        if sg.linears[0] in xs:
            return xs[sg.linears[0]]
        parts = []
        for (args, kwargs), m in zip(calls.get(sg.inspect, []), ctx.inputs.masks):
            h = args[0] if args else kwargs["hidden_states"]
            mm = token_mask_for(h, m)
            parts.append(h[mm] if mm is not None else h.reshape(-1, h.shape[-1]))
        return torch.cat(parts) if parts else None

    # the layer ------------------------------------------------------------------------------------

    def process(self, ctx: LayerContext) -> LayerResult:
        adapter, layer = ctx.adapter, ctx.layer
        lookup = scheme_lookup(self.scheme, self.rules)
        names = [n for g in adapter.sequential_for(layer) for n in g]
        schemes = {n: lookup(full_weight_name(adapter, ctx.index, n)) for n in names}
        quantized = [
            n for n in names
            if not keeps_float(schemes[n], get_weight(adapter, layer, n), full_weight_name(adapter, ctx.index, n))
        ]
        groups = []
        for sg in adapter.scale_groups_for(layer, ctx.config):
            prev_ok = sg.prev_kind != "linear" or sg.prev in quantized
            same = len({schemes.get(n) for n in sg.linears}) == 1
            if prev_ok and same and all(n in quantized for n in sg.linears):
                groups.append(sg)
        plain = [n for n in quantized if not is_expert_slot(adapter, n)]
        feeders = sorted({sg.linears[0] for sg in groups if not is_expert_slot(adapter, sg.linears[0])} | set(plain))
        xs, calls = self._capture(ctx, feeders, sorted({sg.inspect for sg in groups if sg.inspect}))

        res = LayerResult()
        changed: set[str] = set()
        searches: dict[str, Any] = {}
        for sg in groups:
            scheme = schemes[sg.linears[0]]
            assert scheme is not None  # every linear of a group is quantized
            x = self._group_input(sg, xs, calls, ctx)
            if x is None or x.shape[0] == 0:
                continue
            if not torch.isfinite(x).all():
                raise LowbitError(f"layer {ctx.index} {sg.linears[0]}", "non-finite (NaN/Inf) values in the layer inputs")
            inspect_calls = calls[sg.inspect] if sg.inspect else [((xx,), {}) for xx in [x]]
            if self.search_batches is not None:
                inspect_calls = inspect_calls[: self.search_batches]
            s, info = self._search(ctx, sg, x, inspect_calls, scheme)
            searches[f"{sg.prev}->{','.join(sg.linears[:3])}{'...' if len(sg.linears) > 3 else ''}"] = info
            if s is None:
                continue
            changed.update(fold_scales(adapter, layer, sg, s))
            for n in sg.linears:  # the linears now see x / s
                if xs.get(n) is not None:
                    xs[n] = xs[n] / s.to(xs[n].device)
        for n in quantized:
            scheme = schemes[n]
            assert scheme is not None
            w = get_weight(adapter, layer, n)
            short = n.rsplit(".", 1)[-1]
            x = xs.get(n)
            qw = self._round(w, scheme, x if self.clip and short not in ("q_proj", "k_proj") else None)
            set_weight(adapter, layer, n, qw.dequantize(w.dtype))
            res.weights[n] = qw.to("cpu")
        params = dict(layer.named_parameters())
        for name in sorted(changed):
            res.float_overrides[name] = params[name].detach().cpu().clone()
        res.info["awq"] = searches
        if not groups:
            warnings.warn(f"layer {ctx.index}: no AWQ scaling group applies; plain RTN with clipping", stacklevel=2)
        return res

    def _round(self, w: torch.Tensor, scheme: QuantScheme, x: torch.Tensor | None) -> QuantizedWeight:
        """Round ``w``, after a clipping search on the output error over tokens ``x`` when given."""
        clip: torch.Tensor | float = 1.0
        if x is not None and x.shape[0] > 0:
            step = max(1, x.shape[0] // self.clip_tokens)
            clip = search_clip_for_output(w, x[::step][: self.clip_tokens], scheme)
        scale, zero = compute_qparams(w, scheme, clip)
        return QuantizedWeight(quantize(w, scale, zero, scheme), scale, zero, scheme, None)

    def quantize_linear(self, name: str, w: torch.Tensor, scheme: QuantScheme, inputs: list[torch.Tensor] | None,
                        masks: list[torch.Tensor | None]) -> QuantizedWeight | None:
        """A linear outside the layers (``lm_head``): no op to fold a scale into, so the clipping
        search on its output error alone, then rounding."""
        if keeps_float(scheme, w, name):
            return None
        x = None
        if inputs is not None and self.clip:
            x = torch.cat([xx[mm] if (mm := token_mask_for(xx, m)) is not None else xx.reshape(-1, xx.shape[-1])
                           for xx, m in zip(inputs, masks)])
        return self._round(w, scheme, x)


@register_method
class AWQ(Method):
    """AWQ: activation-aware per-channel scales folded into the previous op, then clipped rounding (calibrated)"""

    name = "awq"
    calibrated = True
    calibration_default = (128, 512)
    options = ("n_grid", "duo_scaling", "clip", "clip_tokens", "search_batches")

    def handler(self, scheme: QuantScheme, rules: Rules, act_order: bool | str | None = None,
                **options: Any) -> AWQHandler:
        if act_order not in (None, False, "off"):
            raise LowbitError("awq", "act_order applies to GPTQ only")
        return AWQHandler(scheme, rules=rules, **options)
