"""Activation statistics collected on the layer engine's hooks, one decoder layer at a time.

A :class:`Statistic` receives every input ``x`` (``[..., in]``) of one linear layer (or expert
slot) during a pass over the calibration batches, with the mask of real tokens. The statistics
every method needs live here, once:

* :class:`Hessian` ``H = 2/n sum x x^T`` (GPTQ);
* :class:`Importance` sum of ``x**2`` per input column and the token count, in float64
  (llama.cpp's importance matrix);
* :class:`ChannelRange` per-input-channel minimum, maximum and absolute maximum (SmoothQuant's
  smoothing scales, static activation scales);
* :class:`Tokens` the real tokens themselves (AWQ's scale and clipping searches);
* :class:`KVRange` per KV head the largest key (after RoPE) and value (the FP8 KV cache's
  scales), collected by :func:`observe_kv`.

:func:`observe` runs the layer over every calibration batch with input hooks (experts served
through the engine's instrumented MoE forward) and returns one statistic per name; linears that
read the same tensor can share one statistic (q/k/v, gate/up), which computes it once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from lowbit import distributed as dist
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError

from .capture import input_hooks, token_mask_for
from .layers import LayerContext, LayerResult, full_weight_name, run_layer


class Statistic(Protocol):
    """Something accumulated over a linear's inputs."""

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None: ...


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` as ``[tokens, in]``, real tokens only."""
    return x.reshape(-1, x.shape[-1]) if mask is None else x[mask.to(torch.bool)]


class Hessian:
    """Running ``H = 2/n sum_t x_t x_t^T`` over the rows ``x_t`` of a layer's inputs."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add inputs ``x`` (``[..., in]``); ``mask`` (``x.shape[:-1]``, bool) keeps real tokens only."""
        x = _rows(x, mask)
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


class Importance:
    """Sum of squared inputs per column and the number of tokens (llama.cpp's imatrix), float64."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum2: torch.Tensor | None = None
        self.in_features = in_features
        self.count = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = _rows(x.detach(), mask).to(torch.float64)
        s = (x * x).sum(0)
        self.sum2 = s if self.sum2 is None else self.sum2 + s
        self.count += x.shape[0]


class ChannelRange:
    """Per-input-channel minimum and maximum over the tokens seen (float32)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.min = torch.full((in_features,), math.inf, device=device)
        self.max = torch.full((in_features,), -math.inf, device=device)
        self.n = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = _rows(x.detach(), mask).float().to(self.min.device)
        if x.shape[0] == 0:
            return
        if not torch.isfinite(x).all():
            raise LowbitError("activations", "non-finite (NaN/Inf) values in the layer inputs")
        self.min = torch.minimum(self.min, x.amin(0))
        self.max = torch.maximum(self.max, x.amax(0))
        self.n += x.shape[0]

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.min.abs(), self.max.abs())


class Tokens:
    """The real tokens themselves (``[n, in]`` once :meth:`tensor` joins them)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self.parts.append(_rows(x, mask).detach())

    def tensor(self) -> torch.Tensor | None:
        return torch.cat(self.parts) if self.parts else None


class KVRange:
    """Per KV head, the largest ``|key|`` (after RoPE) and ``|value|`` over the real tokens seen
    (float32); per tensor is the maximum over the heads (the FP8 KV cache's calibration)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.n = 0

    def add(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Keys and values ``[b, heads, L, d]``; ``mask`` ``[b, L]`` (bool) keeps real tokens."""
        kt, vt = k.detach().transpose(1, 2), v.detach().transpose(1, 2)  # [b, L, heads, d]
        if mask is not None and mask.shape == kt.shape[:2]:
            kt, vt = kt[mask.to(torch.bool)], vt[mask.to(torch.bool)]
        kt, vt = kt.reshape(-1, *kt.shape[-2:]).float(), vt.reshape(-1, *vt.shape[-2:]).float()
        if kt.shape[0] == 0:
            return
        if not (torch.isfinite(kt).all() and torch.isfinite(vt).all()):
            raise LowbitError("kv cache", "non-finite (NaN/Inf) values in the keys or values")
        ka, va = kt.abs().amax(dim=(0, 2)), vt.abs().amax(dim=(0, 2))
        self.k = ka if self.k is None else torch.maximum(self.k, ka)
        self.v = va if self.v is None else torch.maximum(self.v, va)
        self.n += kt.shape[0]


def observe_kv(ctx: LayerContext, attention: str = "self_attn") -> KVRange:
    """One pass of the layer over the calibration batches collecting its keys and values."""
    from lowbit.runtime.kvcache import kv_tap

    from .adapters import get_submodule

    stat = KVRange()
    mod = get_submodule(ctx.layer, attention)
    if mod is None:
        raise LowbitError(f"layer {ctx.index}", f"no attention module {attention!r} to calibrate the KV cache on")
    cur: list[torch.Tensor | None] = [None]

    def collect(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            stat.add(k, v, cur[0])
        except LowbitError as exc:
            raise LowbitError(f"layer {ctx.index} {attention}", exc.problem) from None
        return k, v

    with kv_tap(mod.config, {mod: collect}):
        for h, kw, m in zip(ctx.inputs.hidden, ctx.inputs.kwargs, ctx.inputs.masks):
            cur[0] = m
            run_layer(ctx.layer, h, kw)
    return stat


class _AllSeen(Exception):
    """Raised inside a forward once every observed linear has seen its input."""


def observe(
    ctx: LayerContext,
    names: list[str],
    make: Callable[[int, torch.device], Statistic],
    share: bool = True,
    early_stop: bool = False,
) -> dict[str, Statistic]:
    """One pass over the calibration batches collecting ``make(in_features, device)`` per name.

    ``share``: names fed the very same tensor in a call share one statistic (it is added once).
    ``early_stop``: stop each batch's forward once every name has had its input (the rest of the
    layer is not needed; not valid with expert slots, whose tokens arrive late). Errors name the
    layer and the linear.
    """
    stats: dict[str, Statistic] = {}
    seen: dict[int, tuple[torch.Tensor, Statistic]] = {}
    called: set[str] = set()
    cur_mask: list[torch.Tensor | None] = [None]

    def collect(name: str, x: torch.Tensor) -> None:
        called.add(name)
        entry = seen.get(id(x)) if share else None
        if name not in stats:
            stats[name] = entry[1] if entry is not None and entry[0] is x else make(x.shape[-1], ctx.device)
        stat = stats[name]
        if entry is not None and entry[0] is x and entry[1] is stat:
            return
        if share:
            seen[id(x)] = (x, stat)
        try:
            stat.add(x, token_mask_for(x, cur_mask[0]))
        except LowbitError as exc:
            raise LowbitError(f"layer {ctx.index} {name}", exc.problem) from None
        if early_stop and len(called) == len(names):
            raise _AllSeen

    if dist.inputs_sharded():
        _observe_sharded(ctx, names, early_stop, collect, seen, called, cur_mask)
        return stats
    with input_hooks(ctx.adapter, ctx.layer, names, collect):
        for h, kw, m in zip(ctx.inputs.hidden, ctx.inputs.kwargs, ctx.inputs.masks):
            seen.clear()
            called.clear()
            cur_mask[0] = m
            try:
                run_layer(ctx.layer, h, kw)
            except _AllSeen:
                pass
    return stats


def _observe_sharded(ctx: LayerContext, names: list[str], early_stop: bool, collect: Callable[[str, torch.Tensor], None],
                     seen: dict, called: set[str], cur_mask: list[torch.Tensor | None]) -> None:
    """:func:`observe` when each process holds its round-robin share of the batches
    (:mod:`lowbit.distributed`): in round ``k`` every rank runs its ``k``-th batch recording the
    linears' inputs, the recordings are gathered, and every rank adds them in one-process batch
    order (global batch ``k * N + rank``), so each statistic is the same bytes as in one process."""
    local = list(zip(ctx.inputs.hidden, ctx.inputs.kwargs, ctx.inputs.masks))
    rounds = max(dist.gather(len(local)))
    calls: list[tuple[str, torch.Tensor]] = []
    kept: dict[int, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        called.add(name)
        if id(x) not in kept:  # one copy of a tensor several linears read (identity kept for ``share``)
            kept[id(x)] = x.detach().to("cpu", copy=True)
        calls.append((name, kept[id(x)]))
        if early_stop and len(called) == len(names):
            raise _AllSeen

    for k in range(rounds):
        mine: tuple[torch.Tensor | None, list[tuple[str, torch.Tensor]]] | None = None
        if k < len(local):
            h, kw, m = local[k]
            calls, kept = [], {}
            called.clear()
            with input_hooks(ctx.adapter, ctx.layer, names, record):
                try:
                    run_layer(ctx.layer, h, kw)
                except _AllSeen:
                    pass
            mine = (None if m is None else m.cpu(), calls)
        for batch in dist.gather(mine):
            if batch is None:
                continue
            m, batch_calls = batch
            seen.clear()
            called.clear()
            cur_mask[0] = None if m is None else m.to(ctx.device)
            moved: dict[int, torch.Tensor] = {}
            try:
                for name, x in batch_calls:
                    collect(name, moved.setdefault(id(x), x.to(ctx.device)))
            except _AllSeen:
                pass


class StatisticsHandler:
    """An engine handler that only observes: one statistic per linear (and expert slot) of every
    layer, kept in :attr:`collected` by full weight name; the weights stay float.

    Run it through :func:`lowbit.models.engine.stream_quantize` to collect, for instance, the
    importance matrix with one decoder layer in memory.
    """

    propagate = "float"
    needs_inputs = True

    def __init__(self, make: Callable[[int, torch.device], Statistic], kind: str,
                 layer_setup: Callable[[LayerContext], Callable[[], None]] | None = None) -> None:
        """``layer_setup(ctx)``: changes how each layer runs before it is observed (e.g. a
        runtime's activation rounding, :mod:`lowbit.runtime.emulate`) and returns the undo; the
        layer then also produces the next layer's inputs that way (undone before the next layer)."""
        self.make = make
        self.kind = kind
        self.collected: dict[str, Statistic] = {}
        self.layer_setup = layer_setup
        self._undo: Callable[[], None] | None = None
        if layer_setup is not None:
            self.propagate = "quantized"  # the engine runs the layer after process(), as set up

    def fingerprint(self) -> dict[str, str]:
        return {"statistics": self.kind, **({"layer_setup": "yes"} if self.layer_setup is not None else {})}

    def process(self, ctx: LayerContext) -> LayerResult:
        if self._undo is not None:
            self._undo()
            self._undo = None
        if self.layer_setup is not None:
            self._undo = self.layer_setup(ctx)
        names = [n for g in ctx.adapter.sequential_for(ctx.layer) for n in g]
        # one statistic per linear even where inputs are shared: each is written under its own name
        stats = observe(ctx, names, self.make, share=False)
        for name, stat in stats.items():
            self.collected[full_weight_name(ctx.adapter, ctx.index, name)] = stat
        return LayerResult()

    def quantize_linear(self, name: str, w: torch.Tensor, scheme: QuantScheme | None,
                        inputs: list[torch.Tensor] | None, masks: list[torch.Tensor | None]) -> None:
        """A linear outside the layers (``lm_head``): observe its inputs, keep it float."""
        if inputs is not None:
            stat = self.make(w.shape[1], w.device)
            for x, m in zip(inputs, masks):
                stat.add(x, token_mask_for(x, m))
            self.collected[name] = stat
