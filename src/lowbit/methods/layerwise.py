"""GPTQ and RTN as layer handlers for the streaming engine (:mod:`lowbit.models.streaming`).

GPTQ is true-sequential inside a layer: for each group of linears (q/k/v, o, gate/up, down) the
layer is run with the earlier groups already quantized, the inputs of the group's linears are
accumulated into Hessians, and the group is quantized. Linears that read the same tensor share
one Hessian and are quantized together (their rows stacked), which gives the same result as
quantizing them one by one. Routed experts get per-expert Hessians from the tokens routed to
them; an expert with fewer than ``min_expert_tokens`` tokens falls back to RTN with a warning.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.models.adapters import get_weight, is_expert_slot, set_weight
from lowbit.models.streaming import LayerContext, full_weight_name, LayerResult, input_hooks, run_layer, token_mask_for

from .base import QuantizedWeight
from .gptq import HessianAccumulator, gptq_quantize
from .rtn import rtn


Rules = dict[str, "QuantScheme | None"] | Callable[[str], "QuantScheme | None"] | None


def scheme_resolver(default: QuantScheme, rules: Rules) -> Callable[[str], QuantScheme | None]:
    """Map a full HF weight name to its scheme (``None`` keeps it float).

    ``rules`` is ``None`` (everything uses ``default``), a callable, or a dict of regular
    expressions (searched in the name, first match wins) to a scheme or ``None``.
    """
    if rules is None:
        return lambda name: default
    if callable(rules):
        return rules
    compiled = [(re.compile(pat), sch) for pat, sch in rules.items()]

    def resolve(name: str) -> QuantScheme | None:
        for pat, sch in compiled:
            if pat.search(name):
                return sch
        return default

    return resolve


def _rules_fingerprint(rules: Rules) -> Any:
    if rules is None or callable(rules):
        return None if rules is None else getattr(rules, "__qualname__", repr(rules))
    return {k: v for k, v in rules.items()}


def _skip(scheme: QuantScheme | None, w: torch.Tensor, where: str) -> bool:
    """Whether a weight stays float: no scheme, or a group size not dividing its rows (warned)."""
    if scheme is None:
        return True
    if scheme.group_size > 0 and w.shape[1] % scheme.group_size != 0:
        warnings.warn(f"{where}: group size {scheme.group_size} does not divide {w.shape[1]}; left float", stacklevel=3)
        return True
    return False


@dataclass
class RTNHandler:
    """Round-to-nearest for every linear of the layer (no activations needed)."""

    scheme: QuantScheme
    mse_clip: bool = False
    rules: Rules = None
    propagate: str = "quantized"
    needs_inputs: bool = False

    def fingerprint(self) -> dict[str, Any]:
        return {"method": "rtn", "scheme": self.scheme, "mse_clip": self.mse_clip, "rules": _rules_fingerprint(self.rules)}

    def process(self, ctx: LayerContext) -> LayerResult:
        res = LayerResult()
        for group in ctx.adapter.sequential_for(ctx.layer):
            for name in group:
                w = get_weight(ctx.adapter, ctx.layer, name)
                full = full_weight_name(ctx.adapter, ctx.index, name)
                scheme = scheme_resolver(self.scheme, self.rules)(full)
                if _skip(scheme, w, full):
                    continue
                assert scheme is not None
                qw = rtn(w, scheme, self.mse_clip)
                set_weight(ctx.adapter, ctx.layer, name, qw.dequantize(w.dtype))
                res.weights[name] = qw.to("cpu")
        return res


class _GroupDone(Exception):
    """Raised inside a forward once every linear of the group has seen its input."""


@dataclass
class GPTQHandler:
    """GPTQ over the layer's sequential groups."""

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
            "min_expert_tokens": self.min_expert_tokens, "rules": _rules_fingerprint(self.rules),
        }

    def _hessians(self, ctx: LayerContext, names: list[str]) -> dict[str, HessianAccumulator]:
        """One pass over the calibration batches; linears fed the same tensor share an accumulator."""
        accs: dict[str, HessianAccumulator] = {}
        seen: dict[int, tuple[torch.Tensor, HessianAccumulator]] = {}
        cur_mask: list[torch.Tensor | None] = [None]
        # Without experts, the rest of the layer is not needed once every linear has had its input.
        early_stop = not any(is_expert_slot(ctx.adapter, n) for n in names)
        called: set[str] = set()

        def collect(name: str, x: torch.Tensor) -> None:
            called.add(name)
            entry = seen.get(id(x))
            if name not in accs:
                accs[name] = entry[1] if entry is not None and entry[0] is x else HessianAccumulator(x.shape[-1], ctx.device)
            acc = accs[name]
            if entry is not None and entry[0] is x and entry[1] is acc:
                return
            seen[id(x)] = (x, acc)
            try:
                acc.add(x, token_mask_for(x, cur_mask[0]))
            except LowbitError as exc:  # name the layer and the linear
                raise LowbitError(f"layer {ctx.index} {name}", exc.problem) from None
            if early_stop and len(called) == len(names):
                raise _GroupDone

        with input_hooks(ctx.adapter, ctx.layer, names, collect):
            for h, kw, m in zip(ctx.inputs.hidden, ctx.inputs.kwargs, ctx.inputs.masks):
                seen.clear()
                called.clear()
                cur_mask[0] = m
                try:
                    run_layer(ctx.layer, h, kw)
                except _GroupDone:
                    pass
        return accs

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
        """:func:`_skip`, and with a K-quant grid rows it cannot hold (the GGUF writer encodes those as llama.cpp)."""
        if self.grid is not None:
            from lowbit.gguf.from_quantized import QK_K  # GGUF only on this path

            if w.shape[1] % QK_K != 0:
                return True
        return _skip(scheme, w, where)

    def process(self, ctx: LayerContext) -> LayerResult:
        res = LayerResult()
        coverage: dict[str, int] = {}
        fallbacks: list[str] = []
        resolve = scheme_resolver(self.scheme, self.rules)
        for group in ctx.adapter.sequential_for(ctx.layer):
            schemes = {n: resolve(full_weight_name(ctx.adapter, ctx.index, n)) for n in group}
            group = [
                n for n in group
                if not self._keeps_float(schemes[n], get_weight(ctx.adapter, ctx.layer, n),
                                         full_weight_name(ctx.adapter, ctx.index, n))
            ]
            if not group:
                continue
            accs = self._hessians(ctx, group)
            # Linears sharing an accumulator and a scheme are quantized together (rows stacked).
            by_acc: dict[tuple[int, Any], list[str]] = {}
            for name in group:
                key = id(accs[name]) if name in accs else -id(name)  # an expert with no token
                by_acc.setdefault((key, schemes[name]), []).append(name)
            for (_, scheme), names in by_acc.items():
                acc = accs.get(names[0])
                ws = [get_weight(ctx.adapter, ctx.layer, n) for n in names]
                n_tok = 0 if acc is None else acc.n
                expert = is_expert_slot(ctx.adapter, names[0])
                if expert:
                    for n in names:
                        coverage[n] = n_tok
                if acc is None or (expert and n_tok < self.min_expert_tokens):
                    fallbacks.extend(names)
                    qws = [rtn(w, scheme) for w in ws]  # plain RTN: MSE-clipped RTN measured worse
                elif scheme.group_size == 0:  # one scale per tensor: no stacking
                    qws = [self._gptq(w, acc.H, scheme) for w in ws]
                else:
                    stacked = torch.cat(ws, 0) if len(ws) > 1 else ws[0]
                    qw = self._gptq(stacked, acc.H, scheme)
                    qws = _split_rows(qw, [w.shape[0] for w in ws])
                for n, w, qw in zip(names, ws, qws):
                    set_weight(ctx.adapter, ctx.layer, n, qw.dequantize(w.dtype).to(w.device))
                    res.weights[n] = qw.to("cpu")
            del accs
        if fallbacks:
            warnings.warn(
                f"layer {ctx.index}: {len(fallbacks)} expert weights saw fewer than {self.min_expert_tokens} "
                "calibration tokens and were quantized with RTN"
            )
        if coverage:
            n_exp_slots = len(coverage)
            res.info["expert_tokens"] = coverage
            res.info["expert_coverage"] = 1.0 - len(fallbacks) / n_exp_slots
            res.info["rtn_fallback"] = fallbacks
        return res


def _split_rows(qw: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    """Split a row-stacked result back into per-linear results (rows are independent)."""
    if len(rows) == 1:
        return [qw]
    out = []
    r0 = 0
    per_tensor = qw.scale.numel() == 1
    for r in rows:
        sl = slice(r0, r0 + r)
        s = qw.scale if per_tensor else qw.scale[sl]
        z = qw.zero if per_tensor else qw.zero[sl]
        out.append(QuantizedWeight(qw.codes[sl].contiguous(), s.contiguous(), z.contiguous(), qw.scheme, qw.g_idx))
        r0 += r
    return out
