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

import json
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.packing import pack, unpack
from ..core.quantized import QuantizedWeight
from ..core.scheme import PER_CHANNEL, QuantScheme
from ..errors import LowbitError
from ._common import (
    VLLM_FUSED,
    check_weight,
    decoding,
    exact_regex,
    fused_aliases,
    marlin_shape_issues,
    module_of,
    per_channel,
    trivial_g_idx,
    warn_issues,
    write_json,
    zero_points,
)
from .base import Format, register

QUANTIZE_CONFIG = "quantize_config.json"
SUPPORTED_BITS = (2, 3, 4, 8)


def validate(name: str, qw: QuantizedWeight) -> None:
    """Raise :class:`LowbitError` when ``qw`` cannot be stored as v1 GPTQ."""
    why = GPTQ().holds_tensor(name, qw.scheme, tuple(qw.codes.shape))
    if why is not None:
        raise LowbitError(name, why)
    check_weight(name, qw)
    s = qw.scheme
    if not s.symmetric and qw.zero is not None and bool((qw.zero == 0).any()):
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
    zeros_v1 = (zero_points(qw).detach().cpu().round().to(torch.int64) - 1).t().contiguous()  # [G, out], >= 0 by validate
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
        try:
            args = _module_args(module, qconfig)
            bits = None if args is None or args["bits"] is None else int(args["bits"])
            gs = PER_CHANNEL if args is None or args["group_size"] is None else int(args["group_size"])
        except (re.error, TypeError, ValueError, AttributeError) as exc:
            raise LowbitError("config.json", f"GPTQ quantization_config cannot be applied to {module} "
                              f"({type(exc).__name__}: {exc})") from None
        if args is None or bits is None:
            raise LowbitError(module, "has a qweight but the GPTQ config does not quantize it")
        if bits not in SUPPORTED_BITS:
            raise LowbitError(module, f"GPTQ config says {bits}-bit; the layout holds "
                              f"{', '.join(map(str, SUPPORTED_BITS))}-bit codes")
        gname = f"{module}.g_idx"
        with decoding(module):
            qweight = get(qname)
            scales = get(f"{module}.scales").float()
            if qweight.dim() != 2 or scales.dim() != 2 or qweight.shape[1] != scales.shape[1]:
                raise LowbitError(module, f"qweight {tuple(qweight.shape)} and scales {tuple(scales.shape)} do not "
                                  "describe one [in, out] weight")
            n_groups, out_f = scales.shape
            in_f = qweight.shape[0] * 32 // bits
            codes = unpack(qweight, bits, in_f, dim=0).t().contiguous()
            if gs > 0 and n_groups != in_f // gs:
                raise LowbitError(module, f"scales have {n_groups} groups; group size {gs} over {in_f} columns "
                                  f"needs {in_f // gs}")
            if gs <= 0 and n_groups != 1:
                raise LowbitError(module, f"scales have {n_groups} groups; per channel needs 1")
            qzeros = get(f"{module}.qzeros")
            if qzeros.dim() != 2 or qzeros.shape[0] != n_groups or qzeros.shape[1] * 32 < out_f * bits:
                raise LowbitError(f"{module}.qzeros", f"shape {tuple(qzeros.shape)}, expected "
                                  f"{(n_groups, out_f * bits // 32)} (packed zero points)")
            zeros = unpack(qzeros, bits, out_f, dim=1).float() + offset
            zero = zeros.t().contiguous()
            if zero.shape != (out_f, n_groups):
                raise LowbitError(f"{module}.qzeros", f"holds {tuple(zero.shape)} zero points, expected "
                                  f"{(out_f, n_groups)}")
            sym = bool(args["sym"]) and bool((zero == (1 << (bits - 1))).all())
            scheme = QuantScheme(bits, gs if gs > 0 else PER_CHANNEL, sym)
            g_idx = get(gname).to(torch.int32) if gname in names else None
            if g_idx is not None and g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
                raise LowbitError(gname, f"group indices must lie in [0, {n_groups})")
            qw = QuantizedWeight(codes, scales.t().contiguous(), zero, scheme, g_idx)
            if trivial_g_idx(qw):
                qw.g_idx = None
        out[f"{module}.weight"] = qw
        used.update({qname, f"{module}.qzeros", f"{module}.scales", gname})
    return out, used


@register
class GPTQ(Format):
    """AutoGPTQ / GPTQModel v1 layout (vLLM gptq / gptq_marlin, transformers): 2/3/4/8-bit integers"""

    name = "gptq"
    rank = 10

    def holds(self, scheme: QuantScheme) -> str | None:
        if scheme.type != "int":
            return (f"gptq holds integer weights of {'/'.join(map(str, SUPPORTED_BITS))} bits, not "
                    f"{scheme.describe_raw()} {scheme.float_format or scheme.codebook}")
        if scheme.bits not in SUPPORTED_BITS:
            return f"GPTQ stores {', '.join(map(str, SUPPORTED_BITS))}-bit weights, not {scheme.bits}-bit"
        if scheme.granularity not in ("group", "channel", "tensor"):
            return f"gptq holds per-channel or grouped weights, not {scheme.granularity} ones"
        if scheme.dynamic:
            return "weights are quantized once (static); a dynamic scheme applies to activations only"
        if scheme.scale_format in ("e4m3", "e8m0"):
            return f"gptq stores float16 scales, not {scheme.scale_format}"
        return None

    def holds_tensor(self, name: str, scheme: QuantScheme, shape: tuple[int, ...] | None = None) -> str | None:
        why = super().holds_tensor(name, scheme, shape)
        if why is None and shape is not None and len(shape) == 2:
            out_f, in_f = shape
            if (in_f * scheme.bits) % 32:
                why = (f"GPTQ packs the {in_f} input columns into whole int32 words: needs in*bits divisible by 32 "
                       f"(keep this layer in float or use compressed-tensors)")
            elif (out_f * scheme.bits) % 32:
                why = (f"GPTQ packs zero points of the {out_f} output rows into whole int32 words: "
                       f"needs out*bits divisible by 32 (keep this layer in float or use compressed-tensors)")
        return why

    def detect(self, config: Mapping[str, Any], folder: Path) -> bool:
        q = config.get("quantization_config")
        if isinstance(q, Mapping):
            return str(q.get("quant_method", "")).lower() == "gptq"
        return (folder / QUANTIZE_CONFIG).is_file()

    def read_config(self, folder: Path, config: dict[str, Any]) -> dict[str, Any]:
        if isinstance(config.get("quantization_config"), dict):
            return config
        path = folder / QUANTIZE_CONFIG
        try:
            qconfig = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise LowbitError(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(qconfig, dict):
            raise LowbitError(path, "not a JSON object")
        return {**config, "quantization_config": qconfig}

    def encoder(self, config: Mapping[str, Any], linears: list[str], dtype: torch.dtype) -> Encoder:
        return Encoder(linears)

    def side_files(self, folder: Path, qconfig: Mapping[str, Any]) -> None:
        write_json(folder / QUANTIZE_CONFIG, qconfig)

    def decode(
        self, get: Callable[[str], torch.Tensor], names: list[str], config: Mapping[str, Any]
    ) -> tuple[dict[str, QuantizedWeight], set[str]]:
        return decode(get, names, config)


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
