"""SmoothQuant: move activation outliers into the weights before quantizing (Xiao et al., 2022).

For each smoothing mapping of the architecture (:attr:`lowbit.models.adapters.Adapter.smooth_groups`:
the input norm feeding q/k/v, the MLP's norm feeding gate/up; attention only in MoE layers) a
per-channel scale ``s`` is computed from the calibration activations entering the linears and
from their weights, as llm-compressor's ``SmoothQuantModifier`` computes it::

    a_j = max_t x_tj - min_t x_tj              (the channel's dynamic range over the calibration tokens)
    w_j = 2 * max_i |W_ij|                      (over the rows of every linear of the mapping)
    s_j = a_j^alpha / w_j^(1 - alpha)           (a_j where w_j = 0), then s_j >= 1e-5

and folded exactly: the norm's weight is divided by ``s`` (Gemma's ``1 + w`` norms: ``1 + w``
is), the linears' columns multiplied by it, so the layer computes the same function in float
and its linears' inputs ``x / s`` have flatter channels. The weight method (RTN or GPTQ) then
quantizes the smoothed layer: the methods ``smoothquant+rtn`` and ``smoothquant+gptq`` are the
pre-step composed with the registered weight method's handler.

``strength`` (alpha) defaults to llm-compressor's 0.5. ``"auto"`` chooses alpha per mapping of
each layer from a grid by the layer's output error when the mapping's linears see
``Q_a(x / s)`` (the weight scheme's activation scheme, e.g. W8A8's int8 per token; int8 per
token when it has none) and ``Q_w(W s)``
(the weight scheme, round-to-nearest), against the float layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.models.adapters import Adapter, ScaleGroup, get_submodule, get_weight, set_weight
from lowbit.models.capture import token_mask_for
from lowbit.models.layers import LayerContext, LayerResult, full_weight_name, run_layer
from lowbit.models.statistics import ChannelRange, observe
from lowbit.runtime.activations import fake_quantize_input

from ._common import Rules, keeps_float, scheme_lookup
from .awq import fold_scales
from .registry import METHODS, Method, register_method
from .rtn import rtn

DEFAULT_STRENGTH = 0.5  # llm-compressor's SmoothQuantModifier.smoothing_strength
MIN_SCALE = 1e-5  # llm-compressor's MINIMUM_SMOOTHING_SCALE
AUTO_GRID = tuple(round(0.1 * k, 1) for k in range(11))  # alpha candidates of --smoothing auto
INT8_PER_TOKEN = QuantScheme(8, 0, True, strategy="token", dynamic=True)


def smoothing_scales(act_range: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per-input-channel smoothing scales (float32) from the activations' dynamic range
    ``act_range`` (``[in]``) and the weights ``[out, in]`` of the linears reading them."""
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError("--smoothing", f"strength must be between 0 and 1, got {alpha}")
    a = act_range.float()
    w = 2.0 * torch.cat([x.detach().float().abs().amax(0, keepdim=True).to(a.device) for x in weights]).amax(0)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where(w > 0, s, a)
    return torch.clamp(s, min=MIN_SCALE)


def parse_strength(value: Any) -> float | str:
    """``"auto"`` or a float in [0, 1] (the ``--smoothing`` value)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise LowbitError("--smoothing", f"expected a strength between 0 and 1 or 'auto', got {value!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError("--smoothing", f"strength must be between 0 and 1, got {alpha}")
    return alpha


def check_smoothable(adapter: Adapter, where: str = "smoothquant") -> None:
    """Refuse, before calibration, an architecture without smoothing mappings."""
    if not adapter.smooth_groups:
        raise LowbitError(where, f"architecture family {adapter.family!r} has no SmoothQuant mappings "
                                 "(a norm feeding linears); use a weight-only method")


def _mapping_name(sg: ScaleGroup) -> str:
    return f"{sg.prev}->{','.join(n.rsplit('.', 1)[-1] for n in sg.linears)}"


@dataclass
class SmoothQuantHandler:
    """The smoothing pre-step of one decoder layer, then the weight method's handler."""

    inner: Any
    scheme: QuantScheme
    strength: float | str = DEFAULT_STRENGTH
    act_scheme: QuantScheme | None = INT8_PER_TOKEN
    search_batches: int | None = 4  # calibration batches scoring each candidate of "auto" (None: all)
    rules: Rules = None
    needs_inputs: bool = True
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # full norm name -> s (kept for tests)

    @property
    def propagate(self) -> str:
        return str(self.inner.propagate)

    def fingerprint(self) -> dict[str, Any]:
        return {"method": "smoothquant", "strength": self.strength, "act_scheme": self.act_scheme,
                "search_batches": self.search_batches, "inner": self.inner.fingerprint()}

    def check_model(self, adapter: Adapter) -> None:
        check_smoothable(adapter)

    def smooth(self, ctx: LayerContext) -> tuple[set[str], dict[str, Any]]:
        """Smooth every mapping of the layer in place; the float parameters changed and the choices."""
        groups = ctx.adapter.smooth_groups_for(ctx.layer)
        feeders = [sg.linears[0] for sg in groups]
        ranges = observe(ctx, feeders, lambda cols, dev: ChannelRange(cols, dev), share=False)
        changed: set[str] = set()
        info: dict[str, Any] = {}
        for sg in groups:
            rng = ranges.get(sg.linears[0])
            if rng is None or rng.n == 0:  # type: ignore[attr-defined]
                continue
            act = rng.max - rng.min  # type: ignore[attr-defined]
            ws = [get_weight(ctx.adapter, ctx.layer, n) for n in sg.linears]
            alpha = self._choose(ctx, sg, act) if self.strength == "auto" else float(self.strength)
            s = smoothing_scales(act, ws, alpha)
            changed.update(fold_scales(ctx.adapter, ctx.layer, sg, s))
            self.scales[f"{ctx.adapter.layer_prefix(ctx.index)}{sg.prev}"] = s.cpu()
            info[_mapping_name(sg)] = alpha
        return changed, info

    def _choose(self, ctx: LayerContext, sg: ScaleGroup, act: torch.Tensor) -> float:
        """The alpha of :data:`AUTO_GRID` whose smoothing gives the smallest layer output error
        (the first of equals; NaN never wins)."""
        best, best_err = DEFAULT_STRENGTH, float("inf")
        for alpha, err in self.errors(ctx, sg, act).items():
            if err < best_err:
                best, best_err = alpha, err
        return best

    def errors(self, ctx: LayerContext, sg: ScaleGroup, act: torch.Tensor,
               grid: tuple[float, ...] = AUTO_GRID) -> dict[float, float]:
        """Per alpha: the squared error of the layer's outputs against the float layer when the
        mapping's linears are smoothed and quantized (weights by RTN, inputs by the activation
        scheme); the layer's weights are left as they were."""
        lookup = scheme_lookup(self.scheme, self.rules)
        n_batches = len(ctx.inputs.hidden) if self.search_batches is None else self.search_batches
        batches = list(zip(ctx.inputs.hidden, ctx.inputs.kwargs, ctx.inputs.masks))[:n_batches]
        refs = [run_layer(ctx.layer, h, kw) for h, kw, _ in batches]
        originals = {n: get_weight(ctx.adapter, ctx.layer, n).clone() for n in sg.linears}
        out: dict[float, float] = {}
        for alpha in grid:
            s = smoothing_scales(act, list(originals.values()), alpha).to(ctx.device)
            handles = []
            for n, w in originals.items():
                scheme = lookup(full_weight_name(ctx.adapter, ctx.index, n))
                ws = w.float() * s[None, :]
                if not keeps_float(scheme, w, n):
                    assert scheme is not None
                    ws = rtn(ws, scheme).dequantize(torch.float32).to(ws.device)
                set_weight(ctx.adapter, ctx.layer, n, ws.to(w.dtype))
                a_scheme = scheme.activations if scheme is not None and scheme.activations is not None else self.act_scheme
                handles.append(get_submodule(ctx.layer, n).register_forward_pre_hook(self._input_hook(s, a_scheme)))
            try:
                err = 0.0
                for (h, kw, m), ref in zip(batches, refs):
                    d = (run_layer(ctx.layer, h, kw).float() - ref.float()).pow(2)
                    mm = token_mask_for(d, m)
                    err += float((d[mm] if mm is not None else d).sum())
            finally:
                for hd in handles:
                    hd.remove()
                for n, w in originals.items():
                    set_weight(ctx.adapter, ctx.layer, n, w)
            out[alpha] = err
        return out

    @staticmethod
    def _input_hook(s: torch.Tensor, act_scheme: QuantScheme | None) -> Any:
        """``x -> Q_a(x / s)``; a static scheme is scored with the batch's own per-tensor scale."""
        if act_scheme is not None and not act_scheme.dynamic:
            act_scheme = replace(act_scheme, dynamic=True)

        def hook(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0] / s.to(args[0].dtype)
            if act_scheme is not None:
                x = fake_quantize_input(x, act_scheme)
            return (x, *args[1:])

        return hook

    def process(self, ctx: LayerContext) -> LayerResult:
        changed, info = self.smooth(ctx)
        res: LayerResult = self.inner.process(ctx)
        params = dict(ctx.layer.named_parameters())
        for name in sorted(changed):
            res.float_overrides[name] = params[name].detach().cpu().clone()
        res.info["smoothquant"] = info
        return res

    def quantize_linear(self, name: str, w: torch.Tensor, scheme: QuantScheme | None, inputs: list[torch.Tensor] | None,
                        masks: list[torch.Tensor | None]) -> QuantizedWeight | None:
        """``lm_head`` follows the final norm, which no mapping smooths: the weight method alone."""
        return self.inner.quantize_linear(name, w, scheme, inputs, masks)  # type: ignore[no-any-return]


class _Smoothed(Method):
    """SmoothQuant then a registered weight method (subclasses name it in ``inner``)."""

    inner = ""
    calibrated = True
    options = ("smoothing", "act_scheme", "search_batches")

    @property
    def calibration_default(self) -> tuple[int, int]:  # type: ignore[override]
        return METHODS.get(self.inner).calibration_default

    def handler(self, scheme: QuantScheme, rules: Rules, act_order: bool | str | None = None,
                **options: Any) -> SmoothQuantHandler:
        strength = parse_strength(options.pop("smoothing", DEFAULT_STRENGTH))
        act_scheme = options.pop("act_scheme", INT8_PER_TOKEN)
        search_batches = options.pop("search_batches", 4)
        inner = METHODS.get(self.inner).handler(scheme, scheme_lookup(scheme, rules), act_order=act_order, **options)
        return SmoothQuantHandler(inner, scheme, strength, act_scheme, search_batches, rules)

    def supports(self, scheme: QuantScheme) -> str | None:
        return METHODS.get(self.inner).supports(scheme)


@register_method
class SmoothQuantRTN(_Smoothed):
    """SmoothQuant (activation outliers folded into the norms, --smoothing), then round-to-nearest (calibrated)"""

    name = "smoothquant+rtn"
    inner = "rtn"


@register_method
class SmoothQuantGPTQ(_Smoothed):
    """SmoothQuant (activation outliers folded into the norms, --smoothing), then GPTQ (calibrated)"""

    name = "smoothquant+gptq"
    inner = "gptq"
