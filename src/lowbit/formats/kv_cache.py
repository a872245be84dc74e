"""FP8 KV-cache scales: calibrated per layer by the engine, written as compressed-tensors writes them.

``--kv-cache fp8`` (one scale per layer) or ``fp8-head`` (one per KV head) wraps the method's
layer handler in :class:`KVCacheHandler`: before the method quantizes a layer, one pass over
the calibration batches takes the largest ``|key|`` (after RoPE) and ``|value|``
(:func:`lowbit.models.statistics.observe_kv`) on the layer as it is then (float weights, inputs
from the layers before as the method propagates them), and the scales ``amax / 448`` in the
model's dtype (:func:`lowbit.runtime.kvcache.scale_from_amax`) go into the layer's result info.

:func:`tensors` and :func:`annotate` are what :func:`lowbit.formats.save` calls: the tensors
``<layer>.self_attn.k_scale`` / ``v_scale`` (``[1]`` or ``[H, 1, 1]``, the model's dtype) and
the ``kv_cache_scheme`` block of ``quantization_config``, exactly as llm-compressor 0.14 writes
them (tests/test_kvcache_llmc.py); a checkpoint whose weights all stay float gets
llm-compressor's ``dense`` config (:func:`float_config`). Only compressed-tensors holds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LowbitError
from ..runtime.kvcache import STRATEGIES, scale_from_amax
from ._common import model_dtype

__all__ = ["CHOICES", "INFO_KEY", "KVCacheHandler", "annotate", "float_config", "is_float_with_kv", "is_kv_scale", "parse",
           "scheme_args", "tensors"]

INFO_KEY = "kv_cache"
#: ``--kv-cache`` values -> strategy
CHOICES = {"fp8": "tensor", "fp8-head": "head"}
#: formats whose config can say that the KV cache is quantized
HOLDERS = ("compressed-tensors",)


def parse(value: str | None) -> str | None:
    """The strategy of a ``--kv-cache`` value (``None``: no KV-cache quantization)."""
    if value is None or value == "none":
        return None
    if value not in CHOICES:
        raise LowbitError("--kv-cache", f"unknown KV-cache scheme {value!r} (choose from none, {', '.join(CHOICES)})")
    return CHOICES[value]


def check_format(fmt: str) -> None:
    if fmt not in HOLDERS:
        raise LowbitError("--kv-cache", f"the {fmt} format cannot hold KV-cache scales (use {', '.join(HOLDERS)})")


def scheme_args(strategy: str) -> dict[str, Any]:
    """The ``kv_cache_scheme`` block (compressed-tensors ``QuantizationArgs``, as llm-compressor 0.14
    writes it; ``static_minmax``: the true maximum over the calibration set)."""
    return {
        "actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
        "observer": "static_minmax", "observer_kwargs": {}, "scale_dtype": None, "strategy": STRATEGIES[strategy],
        "symmetric": True, "type": "float", "zp_dtype": None,
    }


@dataclass
class KVCacheHandler:
    """Calibrate each layer's KV-cache scales, then let ``inner`` (the method) quantize the layer."""

    inner: Any
    strategy: str = "tensor"
    attention: str = "self_attn"
    needs_inputs: bool = True

    @property
    def propagate(self) -> str:
        return str(self.inner.propagate)

    def fingerprint(self) -> dict[str, Any]:
        return {"kv_cache": self.strategy, "attention": self.attention, "inner": self.inner.fingerprint()}

    def check_model(self, adapter: Any) -> None:
        check = getattr(self.inner, "check_model", None)
        if check is not None:
            check(adapter)

    def process(self, ctx: Any) -> Any:
        from ..models.statistics import observe_kv

        stat = observe_kv(ctx, self.attention)
        res = self.inner.process(ctx)
        if stat.k is None or stat.v is None:
            raise LowbitError(f"layer {ctx.index}", "no calibration token reached the attention (KV cache)")
        dtype = model_dtype(ctx.config.to_dict())
        k, v = (stat.k.amax().reshape(1), stat.v.amax().reshape(1)) if self.strategy == "tensor" else (stat.k, stat.v)
        prefix = f"{ctx.adapter.layer_prefix(ctx.index)}{self.attention}."
        res.info[INFO_KEY] = {"strategy": self.strategy, "dtype": str(dtype).replace("torch.", ""),
                              prefix + "k_scale": scale_from_amax(k, dtype).float().tolist(),
                              prefix + "v_scale": scale_from_amax(v, dtype).float().tolist()}
        return res

    def quantize_linear(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.quantize_linear(*args, **kwargs)


def _layers_info(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    layers = (config.get("lowbit") or {}).get("layers") or {}
    return [v[INFO_KEY] for _, v in sorted(layers.items(), key=lambda kv: int(kv[0])) if INFO_KEY in (v or {})]


def strategy_of(config: Mapping[str, Any]) -> str | None:
    """The KV-cache strategy a quantized model's config (``QuantizedModel.config``) calibrated, if any."""
    infos = _layers_info(config)
    return infos[0]["strategy"] if infos else None


def tensors(config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The ``k_scale`` / ``v_scale`` tensors recorded in a quantized model's config, by checkpoint name."""
    out: dict[str, torch.Tensor] = {}
    for info in _layers_info(config):
        dtype = getattr(torch, info["dtype"])
        for name, values in info.items():
            if name.endswith(("k_scale", "v_scale")):
                t = torch.tensor(values, dtype=torch.float32).to(dtype)
                out[name] = t.reshape(1) if info["strategy"] == "tensor" else t.reshape(-1, 1, 1)
    return out


def annotate(qconfig: dict[str, Any], strategy: str) -> dict[str, Any]:
    """``quantization_config`` with its ``kv_cache_scheme`` block filled in."""
    return {**qconfig, "kv_cache_scheme": scheme_args(strategy)}


def is_float_with_kv(qconfig: Mapping[str, Any] | None) -> bool:
    """Whether a ``quantization_config`` is float weights with a quantized KV cache (``dense``)."""
    return (isinstance(qconfig, Mapping) and qconfig.get("format") == "dense" and not qconfig.get("config_groups")
            and bool(qconfig.get("kv_cache_scheme")))


def is_kv_scale(name: str) -> bool:
    """Whether a checkpoint tensor is an attention's KV-cache scale (``...self_attn.k_scale`` / ``v_scale``)."""
    return name.endswith(("self_attn.k_scale", "self_attn.v_scale"))


def float_config(strategy: str, version: str = "0.19.0") -> dict[str, Any]:
    """The ``quantization_config`` of float weights with an FP8 KV cache (llm-compressor's ``dense``)."""
    return {
        "config_groups": {}, "format": "dense", "global_compression_ratio": None, "ignore": [],
        "kv_cache_scheme": scheme_args(strategy), "quant_method": "compressed-tensors",
        "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {}, "version": version,
    }
