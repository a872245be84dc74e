"""The FP8 KV cache: keys (after RoPE) and values as vLLM stores them, and a tap to observe them.

vLLM's FP8 KV cache (``kv_cache_dtype="fp8"`` with a checkpoint's ``k_scale`` / ``v_scale``)
stores ``fp8_e4m3(clamp(k / k_scale, -448, 448))`` and reads back ``k_fp8 * k_scale`` (values
likewise). :func:`fp8_qdq` computes that in the states' dtype; a scale is one value per layer
(``[1]``, strategy ``tensor``) or one per KV head (``[H, 1, 1]``, ``attn_head``).

The states are reached through a transformers attention implementation, :data:`ATTN_KV` (SDPA's
masks and kernel), that hands each attention module's keys and values, ``[batch, kv_heads, seq,
head_dim]`` after RoPE and before the heads are repeated for grouped queries, to the callable set
on that module (:data:`KV_ATTR`) first: the layer engine observes them there
(:func:`lowbit.models.statistics.observe_kv`), evaluation rounds them (:func:`install`).

Scales follow compressed-tensors' rule for a symmetric float grid: ``scale = amax / 448`` with
the division in the model's dtype, a zero maximum giving the dtype's epsilon
(:func:`scale_from_amax`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import LowbitError

__all__ = ["ATTN_KV", "FP8_MAX", "KV_ATTR", "STRATEGIES", "attention_modules", "fp8_qdq", "install", "kv_tap",
           "register_kv_attention", "scale_from_amax", "uninstall"]

#: the transformers attention implementation that passes keys and values through :data:`KV_ATTR`
ATTN_KV = "lowbit_kv"
#: the attribute of an attention module holding ``(keys, values) -> (keys, values)``
KV_ATTR = "_lowbit_kv"
FP8_MAX = 448.0
#: lowbit's name -> compressed-tensors' ``strategy`` of a KV-cache scheme
STRATEGIES = {"tensor": "tensor", "head": "attn_head"}

KVFunction = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def _kv_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    fn = getattr(module, KV_ATTR, None)
    if fn is not None:
        key, value = fn(key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_kv_attention() -> str:
    """Register :data:`ATTN_KV` with transformers; returns its name for ``config._attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_KV, _kv_attention)
    AttentionMaskInterface.register(ATTN_KV, sdpa_mask)
    return ATTN_KV


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``amax / 448`` computed in ``dtype`` (compressed-tensors' symmetric float rule); 0 -> eps."""
    s = amax.to(dtype) / torch.tensor(FP8_MAX, dtype=dtype)
    return torch.where(s == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype), s)


def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` ``[b, H, L, d]`` stored as FP8 E4M3 under ``scale`` (``[1]`` or ``[H, 1, 1]``) and read back."""
    if scale.numel() != 1 and (scale.dim() != 3 or scale.shape[0] != x.shape[1]):
        raise LowbitError(None, f"KV-cache scale of shape {tuple(scale.shape)} does not fit states {tuple(x.shape)}")
    s = scale.to(x.device, x.dtype)
    q = (x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)
    return q * s


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """The attention modules of a transformers decoder, by ``layer_idx``."""
    out: dict[int, nn.Module] = {}
    for name, mod in model.named_modules():
        if name.endswith("self_attn") and isinstance(getattr(mod, "layer_idx", None), int):
            out[int(mod.layer_idx)] = mod
    return out


@contextmanager
def kv_tap(config: Any, modules: Mapping[nn.Module, KVFunction]) -> Iterator[None]:
    """Inside the block, each module of ``modules`` hands its keys and values to its function
    (``config`` runs :data:`ATTN_KV` meanwhile; its masks are SDPA's, as before)."""
    before = getattr(config, "_attn_implementation", None)
    config._attn_implementation = register_kv_attention()
    for mod, fn in modules.items():
        setattr(mod, KV_ATTR, fn)
    try:
        yield
    finally:
        for mod in modules:
            if KV_ATTR in mod.__dict__:
                delattr(mod, KV_ATTR)
        config._attn_implementation = before


def install(model: nn.Module, scales: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> list[nn.Module]:
    """Round every listed layer's keys and values to the FP8 cache (``scales``: layer index ->
    ``(k_scale, v_scale)``) in ``model``'s forward from now on; returns the modules changed."""
    attn = attention_modules(model)
    missing = sorted(set(scales) - set(attn))
    if missing:
        raise LowbitError(None, f"KV-cache scales for layers {missing} that the model does not have")
    model.config._attn_implementation = register_kv_attention()
    changed = []
    for i, (ks, vs) in scales.items():
        def fn(k: torch.Tensor, v: torch.Tensor, ks: torch.Tensor = ks, vs: torch.Tensor = vs) -> tuple[torch.Tensor, torch.Tensor]:
            return fp8_qdq(k, ks), fp8_qdq(v, vs)

        setattr(attn[i], KV_ATTR, fn)
        changed.append(attn[i])
    return changed


def uninstall(modules: list[nn.Module]) -> None:
    for mod in modules:
        if KV_ATTR in mod.__dict__:
            delattr(mod, KV_ATTR)
