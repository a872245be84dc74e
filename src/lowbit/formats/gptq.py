"""GPTQ checkpoints in the AutoGPTQ / GPTQModel "v1" layout read by vLLM and transformers.

Layout of one quantized linear ``<m>`` (weight ``[out, in]``, ``G`` groups, ``b`` bits):

* ``<m>.qweight`` int32 ``[in * b / 32, out]``: each column (one output channel) holds the
  codes of its input positions as a little-endian bit stream packed along the input
  dimension (3-bit values cross word boundaries: 32 codes per 3 words).
* ``<m>.qzeros``  int32 ``[G, out * b / 32]``: zero points packed the same way but along the
  output dimension, stored minus one (the historical v1 offset: a reader adds 1 back).
* ``<m>.scales``  float16 ``[G, out]``.
* ``<m>.g_idx``   int32 ``[in]``: the group of each input column (``j // group_size`` without
  act-order; any map with ``desc_act``).

``quantize_config.json`` and ``config.json``'s ``quantization_config`` hold ``bits``,
``group_size`` (-1 per channel), ``desc_act``, ``sym``, ``lm_head``, ``quant_method: gptq``,
``checkpoint_format: gptq``; per-module differences and float linear layers go in GPTQModel's
``dynamic`` map (``"+:regex": {overrides}``, ``"-:regex": {}`` = not quantized), which vLLM reads;
float linear layers are also excluded through ``modules_in_block_to_quantize`` (optimum /
transformers).

v1 cannot store an asymmetric zero point of 0 (it would be written as -1); such weights are
refused with a clear error.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..core.packing import pack, unpack
from ..core.scheme import PER_CHANNEL, QuantScheme
from ..errors import LowbitError
from ..methods.base import QuantizedWeight
from ._common import (VLLM_FUSED, check_weight, exact_regex, fused_aliases, marlin_shape_issues, module_of,
                      per_channel, trivial_g_idx, warn_issues)

QUANTIZE_CONFIG = "quantize_config.json"
SUPPORTED_BITS = (2, 3, 4, 8)


def validate(name: str, qw: QuantizedWeight) -> None:
    """Raise :class:`LowbitError` when ``qw`` cannot be stored as v1 GPTQ."""
    check_weight(name, qw)
    s = qw.scheme
    out_f, in_f = qw.codes.shape
    if s.bits not in SUPPORTED_BITS:
        raise LowbitError(name, f"GPTQ stores {', '.join(map(str, SUPPORTED_BITS))}-bit weights, not {s.bits}-bit")
    if (in_f * s.bits) % 32:
        raise LowbitError(name, f"GPTQ packs the {in_f} input columns into whole int32 words: needs in*bits divisible by 32 "
                          f"(keep this layer in float or use compressed-tensors)")
    if (out_f * s.bits) % 32:
        raise LowbitError(name, f"GPTQ packs zero points of the {out_f} output rows into whole int32 words: "
                          f"needs out*bits divisible by 32 (keep this layer in float or use compressed-tensors)")
    if not s.symmetric and bool((qw.zero == 0).any()):
        n = int((qw.zero == 0).sum())
        raise LowbitError(name, f"{n} asymmetric zero point(s) equal 0, which the GPTQ v1 layout (zero - 1) cannot store; "
                          "use a symmetric scheme or the compressed-tensors / awq format")


def _args(s: QuantScheme, desc_act: bool) -> dict[str, Any]:
    return {"bits": s.bits, "group_size": s.group_size, "desc_act": desc_act, "sym": s.symmetric}


def encode_weight(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` of one module (local names)."""
    qw = per_channel(qw)
    bits = qw.scheme.bits
    in_f = qw.codes.shape[1]
    if qw.g_idx is not None:
        g_idx = qw.g_idx.detach().cpu().to(torch.int32)
    elif qw.scheme.group_size > 0:
        g_idx = (torch.arange(in_f) // qw.scheme.group_size).to(torch.int32)
    else:
        g_idx = torch.zeros(in_f, dtype=torch.int32)
    zeros_v1 = (qw.zero.detach().cpu().round().to(torch.int64) - 1).t().contiguous()  # [G, out], >= 0 by validate
    return {
        "qweight": pack(qw.codes.cpu().t().contiguous(), bits, dim=0, dtype=torch.int32).contiguous(),
        "qzeros": pack(zeros_v1, bits, dim=1, dtype=torch.int32).contiguous(),
        "scales": qw.scale.detach().cpu().t().to(torch.float16).contiguous(),
        "g_idx": g_idx.contiguous(),
    }


class Encoder:
    """GPTQ tensors one module at a time (:meth:`add`), then the quantize config (:meth:`config`)."""

    def __init__(self, linears: list[str]) -> None:
        self.linears = linears
        self.per_module: dict[str, dict[str, Any]] = {}
        self.marlin_issues: list[str] = []

    def add(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """Validate and encode one weight: its tensors under full names (``<module>.qweight`` ...)."""
        validate(name, qw)
        module = module_of(name)
        self.per_module[module] = _args(per_channel(qw).scheme, not trivial_g_idx(qw))
        self.marlin_issues += marlin_issues({name: qw})
        return {f"{module}.{k}": v for k, v in encode_weight(qw).items()}

    def config(self) -> dict[str, Any]:
        """The quantize config dict (also ``quantization_config``); warns when vLLM's Marlin kernel won't apply."""
        warn_issues(self.marlin_issues, MARLIN_WARNING)
        return _quantize_config(self.per_module, self.linears)


def _quantize_config(per_module: dict[str, dict[str, Any]], linears: list[str]) -> dict[str, Any]:
    body = [a for m, a in per_module.items() if m != "lm_head"] or list(per_module.values())
    counts = Counter(tuple(sorted(a.items())) for a in body)
    base = dict(max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0])
    dynamic: dict[str, dict[str, Any]] = {}
    for module in sorted(per_module):
        diff = {k: v for k, v in per_module[module].items() if base[k] != v}
        if diff:
            dynamic[f"+:{exact_regex(module)}"] = diff
    skipped = {m for m in linears if m not in per_module and m != "lm_head"}
    for module in sorted(skipped | set(fused_aliases(skipped, linears))):
        dynamic[f"-:{exact_regex(module)}"] = {}
    for fused in fused_aliases(set(per_module), linears):  # overrides vLLM must see on its fused layers
        parent, _, leaf = fused.rpartition(".")
        diffs = [dynamic.get(f"+:{exact_regex(f'{parent}.{p}')}") for p in VLLM_FUSED[leaf]]
        if diffs[0] is not None and all(d == diffs[0] for d in diffs):
            dynamic[f"+:{exact_regex(fused)}"] = diffs[0]
    qconfig: dict[str, Any] = {
        **base,
        "checkpoint_format": "gptq",
        "lm_head": "lm_head" in per_module,
        "quant_method": "gptq",
        "static_groups": False,
        "true_sequential": True,
    }
    if dynamic:
        qconfig["dynamic"] = dynamic
    body_linears = [m for m in linears if m != "lm_head"]
    if any(m not in per_module for m in body_linears):
        qconfig["modules_in_block_to_quantize"] = [_block_selection(body_linears, set(per_module))]
    return qconfig


def _block_selection(linears: list[str], quantized: set[str]) -> list[str]:
    """Names for optimum's ``modules_in_block_to_quantize`` (a layer is kept if its name ends with one).

    The in-block suffixes (``self_attn.q_proj``) when every block quantizes the same set,
    else the full module names.
    """
    full = sorted(m for m in linears if m in quantized)
    suffixes = set()
    for m in full:
        match = re.match(r"^.*\.\d+\.(.+)$", m)
        if match is None:
            return full
        suffixes.add(match.group(1))
    selected = sorted(m for m in linears if any(m.endswith("." + s) for s in suffixes))
    return sorted(suffixes) if selected == full else full


def _module_args(module: str, qconfig: Mapping[str, Any]) -> dict[str, Any] | None:
    """Effective ``bits/group_size/desc_act/sym`` of a module (``None`` if ``dynamic`` skips it)."""
    args = {k: qconfig.get(k) for k in ("bits", "group_size", "desc_act", "sym")}
    if args["sym"] is None:
        args["sym"] = True
    for pattern, override in (qconfig.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], module):
                return None
            continue
        regex = pattern[2:] if pattern.startswith("+:") else pattern
        if re.match(regex, module):
            args.update({k: v for k, v in override.items() if k in args})
    return args


def decode(
    get: Callable[[str], torch.Tensor], names: list[str], config: Mapping[str, Any]
) -> tuple[dict[str, QuantizedWeight], set[str]]:
    """Quantized weights keyed ``<module>.weight``, and the tensor names they consumed."""
    qconfig = config.get("quantization_config") or {}
    fmt = str(qconfig.get("checkpoint_format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise LowbitError("config.json", f"GPTQ checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)")
    offset = 1 if fmt == "gptq" else 0
    out: dict[str, QuantizedWeight] = {}
    used: set[str] = set()
    for qname in sorted(n for n in names if n.endswith(".qweight")):
        module = qname[: -len(".qweight")]
        args = _module_args(module, qconfig)
        if args is None or args["bits"] is None:
            raise LowbitError(module, "has a qweight but the GPTQ config does not quantize it")
        bits = int(args["bits"])
        qweight = get(qname)
        scales = get(f"{module}.scales").float()
        n_groups, out_f = scales.shape
        in_f = qweight.shape[0] * 32 // bits
        codes = unpack(qweight, bits, in_f, dim=0).t().contiguous()
        zeros = unpack(get(f"{module}.qzeros"), bits, out_f, dim=1).float() + offset
        gs = int(args["group_size"]) if args["group_size"] is not None else PER_CHANNEL
        if gs > 0 and n_groups != in_f // gs:
            raise LowbitError(module, f"scales have {n_groups} groups; group size {gs} over {in_f} columns needs {in_f // gs}")
        zero = zeros.t().contiguous()
        sym = bool(args["sym"]) and bool((zero == (1 << (bits - 1))).all())
        scheme = QuantScheme(bits, gs if gs > 0 else PER_CHANNEL, sym)
        gname = f"{module}.g_idx"
        g_idx = get(gname).to(torch.int32) if gname in names else None
        qw = QuantizedWeight(codes, scales.t().contiguous(), zero, scheme, g_idx)
        if trivial_g_idx(qw):
            qw.g_idx = None
        out[f"{module}.weight"] = qw
        used.update({qname, f"{module}.qzeros", f"{module}.scales", gname})
    return out, used


# ----------------------------------------------------------------------------- vLLM marlin


def marlin_issues(weights: Mapping[str, QuantizedWeight], tensor_parallel: int = 1) -> list[str]:
    """Why vLLM's ``gptq_marlin`` kernel would not take these weights (empty list: it qualifies).

    Rules (vLLM ``gptq_marlin.py`` / ``marlin_utils.py``): symmetric 4- or 8-bit, group size
    in -1/32/64/128, and per layer (and tensor-parallel shard) ``out % 64 == 0``,
    ``in % 128 == 0`` and the group size dividing ``in``. Fused layers (qkv, gate_up) have
    the sum of their parts' outputs, so checking each part is sufficient.
    """
    issues = []
    for name in sorted(weights):
        qw = per_channel(weights[name])
        s = qw.scheme
        why = []
        if s.bits not in (4, 8):
            why.append(f"{s.bits}-bit (needs 4 or 8)")
        if not s.symmetric:
            why.append("asymmetric (needs sym=True)")
        # vLLM shards either dimension by the tensor-parallel size; check the stricter per-shard sizes.
        why += marlin_shape_issues(qw, tensor_parallel)
        if why:
            issues.append(f"{module_of(name)}: {', '.join(why)}")
    return issues


MARLIN_WARNING = ("GPTQ checkpoint does not qualify for vLLM's fast gptq_marlin kernel; vLLM falls back to the "
                  "slower gptq kernel or refuses")


def warn_if_not_marlin(weights: Mapping[str, QuantizedWeight]) -> list[str]:
    """Emit one warning listing why ``gptq_marlin`` would not apply; returns the issues."""
    return warn_issues(marlin_issues(weights), MARLIN_WARNING)
