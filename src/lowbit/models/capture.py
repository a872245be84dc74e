"""Running a model without holding it: the meta skeleton, the inputs of every decoder layer, and
input hooks on linear layers and expert slots.

The model skeleton is built on the ``meta`` device. Only the embeddings and the rotary embedding
are materialised to turn calibration tokens into the inputs of decoder layer 0; the arguments
every layer receives (masks, position embeddings) are recorded by stand-in layers during one
pass of the model's own forward. :func:`input_hooks` reports the input of named linears and of
routed experts (through an instrumented copy of the experts' forward, same math).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError

from .adapters import Adapter, check_model, get_adapter, get_submodule, is_expert_slot

# --- the skeleton and the inputs of layer 0 -------------------------------------------------------


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer ``idx``: records its call arguments and passes hidden states on."""

    def __init__(self, idx: int, sink: dict[int, tuple[torch.Tensor, dict[str, Any]]], last: bool) -> None:
        super().__init__()
        self.idx, self.sink, self.last = idx, sink, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise LowbitError(f"layer {self.idx}", "decoder layer called with positional extras; unsupported")
        self.sink[self.idx] = (hidden_states, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


def build_skeleton(config: Any) -> nn.Module:
    """The model on the ``meta`` device (no storage), eager/sdpa attention."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


def layer_stack(config: Any) -> tuple[Adapter, nn.Module, nn.ModuleList]:
    """What a layer-streaming pass starts from: the architecture's adapter, the meta skeleton (checked
    against it; SDPA attention unless the config names another) and its decoder layers."""
    config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    adapter = get_adapter(config)
    model = build_skeleton(config)
    check_model(adapter, model)
    return adapter, model, get_submodule(model, adapter.layers)


def materialise_outer(adapter: Adapter, model: nn.Module, ckpt: Any, device: torch.device, dtype: torch.dtype) -> None:
    emb = get_submodule(model, adapter.embed)
    emb.to_empty(device=device)
    with torch.no_grad():
        emb.weight.copy_(ckpt.get(f"{adapter.embed}.weight").to(device, dtype))
        if not torch.isfinite(emb.weight).all():
            raise LowbitError(adapter.embed, "non-finite (NaN/Inf) values in the embedding weights")
        if hasattr(emb, "scalar_embed_scale"):  # Gemma's scaled embedding buffer
            emb.embed_scale = torch.tensor(emb.scalar_embed_scale, device=device)
    if adapter.rotary is not None:
        rot = get_submodule(model, adapter.rotary)
        parent_path, _, attr = adapter.rotary.rpartition(".")
        fresh = type(rot)(rot.config).to(device)
        setattr(get_submodule(model, parent_path), attr, fresh)


def free_outer(adapter: Adapter, model: nn.Module) -> None:
    get_submodule(model, adapter.embed).to_empty(device="meta")


@contextmanager
def _recorders(layers: nn.ModuleList, sink: dict[int, Any]) -> Iterator[None]:
    originals = list(layers)
    n = len(originals)
    for i in range(n):
        layers[i] = _Recorder(i, sink, i == n - 1)
    try:
        yield
    finally:
        for i in range(n):
            layers[i] = originals[i]


def capture_all_layer_args(
    adapter: Adapter, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Run the model's own forward with stand-in layers: the hidden states entering layer 0 and the
    keyword arguments every layer receives (masks, position embeddings...)."""
    layers = get_submodule(model, adapter.layers)
    base = get_submodule(model, adapter.layers.rpartition(".")[0])
    sink: dict[int, Any] = {}
    with _recorders(layers, sink), torch.no_grad():
        try:
            base(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
    hidden0 = sink[0][0]
    return hidden0, [sink[i][1] for i in range(len(layers))]


# --- statistics hooks ----------------------------------------------------------------------------


@contextmanager
def input_hooks(
    adapter: Adapter, layer: nn.Module, names: list[str], callback: Callable[[str, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``callback(name, x)`` with the input of every named linear / expert slot during forwards.

    Expert slots are served by temporarily replacing the experts' forward with an instrumented
    copy of the routed computation (same math), which reports each expert's routed tokens.
    """
    handles = []
    plain = [n for n in names if not is_expert_slot(adapter, n)]
    expert_names = set(n for n in names if is_expert_slot(adapter, n))
    for n in plain:
        mod = get_submodule(layer, n)

        def hook(_m: nn.Module, args: tuple[Any, ...], _n: str = n) -> None:
            callback(_n, args[0])

        handles.append(mod.register_forward_pre_hook(hook))
    restore = None
    if expert_names:
        moe = adapter.moe
        assert moe is not None
        experts = get_submodule(layer, moe.experts)
        restore = experts.forward
        experts.forward = _instrumented_experts(adapter, experts, expert_names, callback)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if restore is not None:
            del get_submodule(layer, adapter.moe.experts).forward  # type: ignore[union-attr]


def _instrumented_experts(
    adapter: Adapter, experts: nn.Module, wanted: set[str], callback: Callable[[str, torch.Tensor], None]
) -> Callable[..., torch.Tensor]:
    moe = adapter.moe
    assert moe is not None

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        n_exp = experts.gate_up_proj.shape[0]
        for e in range(n_exp):
            tok, pos = torch.where(top_k_index == e)
            if tok.numel() == 0:
                continue
            x = hidden_states[tok]
            for proj in (0, 1):
                if moe.expert_name(e, proj) in wanted:
                    callback(moe.expert_name(e, proj), x)
            gate, up = nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            h = experts.act_fn(gate) * up
            if moe.expert_name(e, 2) in wanted:
                callback(moe.expert_name(e, 2), h)
            y = nn.functional.linear(h, experts.down_proj[e]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    return forward


def token_mask_for(x: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor | None:
    """The real-token mask matching an input ``x`` shaped ``[b, L, in]`` (None for routed 2-D inputs)."""
    if masks is None or x.dim() != 3 or x.shape[:2] != masks.shape:
        return None
    return masks
