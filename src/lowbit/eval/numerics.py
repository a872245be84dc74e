"""The runtime numerics a compressed-tensors checkpoint declares, applied in lowbit's runtime.

A checkpoint whose ``quantization_config`` quantizes input activations (``input_activations``:
int8 or FP8, dynamic per token / per group / per tensor, or static per tensor with the layer's
``input_scale``) or the KV cache (``kv_cache_scheme`` with ``self_attn.k_scale`` / ``v_scale``)
is run by vLLM with those roundings. :func:`apply` installs the same roundings on the loaded
(dequantized) model: each targeted linear's input goes through
:func:`lowbit.runtime.activations.fake_quantize_input` (the reference of the W8A8 / FP8 kernels),
each attention's keys (after RoPE) and values through the FP8 cache
(:func:`lowbit.runtime.kvcache.fp8_qdq`), so perplexity and KL measure W8A8 and FP8-KV, not only
the weights. It returns the words ``numerics`` reports.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.scheme import QuantScheme
from ..errors import LowbitError
from ..runtime import kvcache
from ..runtime.activations import check_input_scheme, fake_quantize_input, nvfp4_inputs

__all__ = ["apply", "input_schemes", "kv_scales"]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.([kv])_scale$")


def _matches(target: str, module: str, linear: bool) -> bool:
    if target.startswith("re:"):
        try:
            return re.match(target[3:], module) is not None
        except re.error as exc:
            raise LowbitError("config.json", f"config group target {target!r} is not a valid regex ({exc})") from None
    return target == module or (target == "Linear" and linear)


def _scheme(args: Mapping[str, Any], where: str) -> QuantScheme:
    from ..formats.compressed_tensors import scheme_from_args

    scheme = scheme_from_args(args, where)
    try:
        check_input_scheme(scheme, nvfp4=True)
    except LowbitError as exc:
        raise LowbitError("config.json", f"{where}: {exc.problem}") from None
    return scheme


def input_schemes(model: nn.Module, qconfig: Mapping[str, Any]) -> dict[str, QuantScheme]:
    """Module name -> the input-activation scheme its config group declares (first group wins)."""
    ignore = list(qconfig.get("ignore") or [])
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out: dict[str, QuantScheme] = {}
    for gname, group in sorted((qconfig.get("config_groups") or {}).items()):
        acts = group.get("input_activations") if isinstance(group, Mapping) else None
        if not acts:
            continue
        scheme = _scheme(acts, f"config group {gname} input_activations")
        for name in linears:
            if name in out or any(_matches(t, name, True) for t in ignore):
                continue
            if any(_matches(t, name, True) for t in group.get("targets") or []):
                out[name] = scheme
    return out


def kv_scales(get: Any, names: list[str], qconfig: Mapping[str, Any]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Layer index -> ``(k_scale, v_scale)`` of a checkpoint declaring an FP8 KV cache ({} without one)."""
    kv = qconfig.get("kv_cache_scheme")
    if not kv:
        return {}
    bad = (kv.get("type") != "float" or int(kv.get("num_bits", 0)) != 8 or kv.get("dynamic") not in (False, None)
           or kv.get("symmetric") is False or kv.get("strategy") not in kvcache.STRATEGIES.values())
    if bad:
        raise LowbitError("config.json", f"kv_cache_scheme {kv} is not a static symmetric FP8 cache "
                                         f"(strategy {' or '.join(kvcache.STRATEGIES.values())}), the one lowbit runs")
    found: dict[int, dict[str, torch.Tensor]] = {}
    for n in names:
        m = _LAYER.search(n)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = get(n)
    out = {}
    for i, kvs in sorted(found.items()):
        if set(kvs) != {"k", "v"}:
            raise LowbitError(f"layer {i}", "the checkpoint has a k_scale or a v_scale without the other")
        for t in kvs.values():
            if not torch.isfinite(t).all() or (t <= 0).any():
                raise LowbitError(f"layer {i}", "KV-cache scales must be finite and positive")
        out[i] = (kvs["k"], kvs["v"])
    if not out:
        raise LowbitError("config.json", "kv_cache_scheme is declared but the checkpoint has no self_attn.k_scale / v_scale")
    return out


def apply(model: nn.Module, hf_dir: str | Path) -> str:
    """Install the activation and KV-cache rounding ``hf_dir``'s config declares; returns what was
    installed, in words (``""``: nothing declared)."""
    from ..models.checkpoint import Checkpoint
    from ..models.loader import read_config

    qconfig = read_config(Path(hf_dir)).get("quantization_config") or {}
    if not isinstance(qconfig, Mapping) or qconfig.get("quant_method") != "compressed-tensors":
        return ""
    ckpt = Checkpoint(Path(hf_dir))
    names = list(ckpt.keys())
    words = []
    schemes = input_schemes(model, qconfig)
    modules = dict(model.named_modules())
    for name, scheme in schemes.items():
        scale = None
        if not scheme.dynamic or nvfp4_inputs(scheme):  # a static scale, or NVFP4's static global scale
            key = f"{name}.input_global_scale" if nvfp4_inputs(scheme) else f"{name}.input_scale"
            if key not in names:
                raise LowbitError(key, f"the activation scheme needs the layer's {key.rsplit('.', 1)[1]}, "
                                       "which the checkpoint lacks")
            scale = ckpt.get(key).float()

        def hook(_m: nn.Module, args: tuple[Any, ...], scheme: QuantScheme = scheme,
                 scale: torch.Tensor | None = scale) -> tuple[Any, ...]:
            return (fake_quantize_input(args[0], scheme, scale), *args[1:])

        modules[name].register_forward_pre_hook(hook)
    if schemes:
        kinds = sorted({s.describe() for s in schemes.values()})
        words.append(f"input activations {', '.join(kinds)} on {len(schemes)} linears")
    scales = kv_scales(ckpt.get, names, qconfig)
    if scales:
        kvcache.install(model, scales)
        strategy = qconfig["kv_cache_scheme"]["strategy"]
        words.append(f"FP8 E4M3 KV cache ({'per tensor' if strategy == 'tensor' else 'per KV head'}, keys after RoPE)")
    return "; ".join(words)
