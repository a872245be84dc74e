"""One decoder layer as the engine and the methods see it: its inputs, context, result and weights.

A :class:`LayerHandler` (a method, seen one layer at a time) gets a :class:`LayerContext` (the
layer, loaded on the device with its float weights, and the calibration activations entering it)
and returns a :class:`LayerResult`. Weight names inside a layer are relative
(``self_attn.q_proj``); :func:`full_weight_name` gives the checkpoint name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError

from .adapters import Adapter, get_weight, set_weight

# --- per-layer inputs and results -----------------------------------------------------------------


@dataclass
class LayerInputs:
    """The calibration activations entering one decoder layer, batch by batch."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    masks: list[torch.Tensor | None]  # [b, L] bool of real tokens, None when unpadded


@dataclass
class LayerResult:
    """What a method produced for one layer (names relative to the layer)."""

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    float_overrides: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerContext:
    """Everything a :class:`LayerHandler` may use for one layer."""

    index: int
    layer: nn.Module
    adapter: Adapter
    config: Any
    inputs: LayerInputs
    device: torch.device

    def forward(self) -> list[torch.Tensor]:
        """Run the layer (as it currently is) over every calibration batch."""
        return [run_layer(self.layer, h, kw) for h, kw in zip(self.inputs.hidden, self.inputs.kwargs)]



class LayerHandler(Protocol):
    """A calibrated method, seen one decoder layer at a time.

    ``propagate`` is ``"quantized"`` when the next layer should see this layer's quantized outputs
    (GPTQ) or ``"float"`` when it should see the float outputs (AWQ). ``needs_inputs`` is False
    for methods that ignore activations (RTN). ``process`` must leave quantized layers'
    weights replaced by their dequantized values.
    """

    propagate: str
    needs_inputs: bool

    def process(self, ctx: LayerContext) -> LayerResult: ...

    def quantize_linear(
        self, name: str, w: torch.Tensor, scheme: QuantScheme | None, inputs: list[torch.Tensor] | None,
        masks: list[torch.Tensor | None],
    ) -> QuantizedWeight | None:
        """Quantize one linear outside the decoder layers (``lm_head``) given its inputs, if any;
        ``None`` keeps it float (an observe-only handler, or a scheme the tensor cannot take)."""
        ...

    def fingerprint(self) -> dict[str, Any]: ...


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


# --- weight names --------------------------------------------------------------------------------


def disk_name(adapter: Adapter, rel: str) -> str:
    """The on-disk (HF checkpoint) name of a layer-relative module or parameter path."""
    if adapter.family == "mixtral" and rel.startswith("mlp."):
        return "block_sparse_moe." + rel[len("mlp.") :]
    return rel


def full_weight_name(adapter: Adapter, i: int, rel_module: str) -> str:
    return f"{adapter.layer_prefix(i)}{disk_name(adapter, rel_module)}.weight"


# --- loading one layer ---------------------------------------------------------------------------


def load_layer_weights(
    adapter: Adapter, layer: nn.Module, ckpt: Any, i: int, device: torch.device, dtype: torch.dtype
) -> None:
    """Materialise ``layer`` (built on meta) on ``device`` with its weights from the checkpoint."""
    layer.to_empty(device=device)
    prefix = adapter.layer_prefix(i)
    moe_experts = adapter.moe.experts if adapter.moe is not None and adapter.is_moe_layer(layer) else None
    with torch.no_grad():
        for name, p in list(layer.named_parameters()) + list(layer.named_buffers()):
            if moe_experts is not None and name.startswith(moe_experts + "."):
                fused = prefix + disk_name(adapter, name)
                if fused in ckpt:
                    p.copy_(ckpt.get(fused).to(device, dtype))
                    continue
                _load_experts(adapter, layer, ckpt, i, name, p, device, dtype)
                continue
            key = prefix + disk_name(adapter, name)
            if key not in ckpt:
                if name in dict(layer.named_buffers()) and name not in layer.state_dict():
                    continue  # non-persistent buffer, recomputed by its module
                raise LowbitError(f"layer {i}", f"checkpoint has no tensor {key!r}")
            t = ckpt.get(key)
            if tuple(t.shape) != tuple(p.shape):
                raise LowbitError(f"layer {i}", f"{key}: checkpoint shape {tuple(t.shape)} != model {tuple(p.shape)}")
            p.copy_(t.to(device, dtype if p.is_floating_point() else p.dtype))
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise LowbitError(_file_of(ckpt, key), f"layer {i}: tensor {key} has NaN or Inf values")


def _load_experts(
    adapter: Adapter, layer: nn.Module, ckpt: Any, i: int, name: str, p: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> None:
    moe = adapter.moe
    assert moe is not None
    n_exp = p.shape[0]
    projs = (0, 1) if name.endswith("gate_up_proj") else (2,)
    for e in range(n_exp):
        parts = []
        for proj in projs:
            key = full_weight_name(adapter, i, moe.expert_name(e, proj))
            if key not in ckpt:
                raise LowbitError(f"layer {i}", f"checkpoint has no tensor {key!r}")
            parts.append(ckpt.get(key))
        t = torch.cat(parts, 0)
        if not torch.isfinite(t).all():
            raise LowbitError(f"layer {i}", f"non-finite (NaN/Inf) values in expert {e} weights")
        p[e].copy_(t.to(device, dtype))


def _file_of(ckpt: Any, key: str) -> Any:
    """The checkpoint file holding ``key`` (for error messages), or the layer's name."""
    file_of = getattr(ckpt, "file_of", None)
    return file_of(key) if file_of is not None else key


def free_layer(layer: nn.Module) -> None:
    """Drop a layer's storage (back to meta)."""
    layer.to_empty(device="meta")


def apply_result(adapter: Adapter, layer: nn.Module, result: LayerResult, dequantized: bool = True) -> None:
    """Write a layer result into a loaded layer: float overrides, then dequantized weights."""
    with torch.no_grad():
        params = dict(layer.named_parameters())
        for name, t in result.float_overrides.items():
            params[name].data.copy_(t.to(params[name].device, params[name].dtype))
        if dequantized:
            for name, qw in result.weights.items():
                w = get_weight(adapter, layer, name)
                set_weight(adapter, layer, name, qw.dequantize(w.dtype).to(w.device))
