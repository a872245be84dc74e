"""compressed-tensors ``pack-quantized`` checkpoints (llm-compressor's W4A16 / W8A16 output).

Layout of one quantized linear ``<m>`` (weight ``[out, in]``, ``G`` groups per row):

* ``<m>.weight_packed``  int32 ``[out, ceil(in * bits / 32)]``: the codes of each row as one
  little-endian bit stream (code ``j`` at bits ``[j*bits, (j+1)*bits)``), rows zero-padded.
  A stored code is the signed value plus ``2**(bits-1)``, i.e. exactly lowbit's unsigned code.
* ``<m>.weight_scale``   model dtype ``[out, G]`` (``G = 1`` per channel).
* ``<m>.weight_zero_point`` (asymmetric only) int32 ``[ceil(out * bits / 32), G]``: the zero
  points packed the same way but along the output dimension (dim 0).
* ``<m>.weight_shape``   int64 ``[2]`` = ``[out, in]``.
* ``<m>.weight_g_idx``   int32 ``[in]`` only for act-order with a permuted group map.

``config.json`` gains ``quantization_config`` with ``quant_method: compressed-tensors``,
``format: pack-quantized``, one config group per distinct scheme and an ``ignore`` list of
the linear layers left in float (e.g. ``lm_head``).

Act-order with ``g_idx`` is written with ``actorder: "group"`` (what vLLM's WNA16 scheme
reads); compressed-tensors 0.15+ refuses that value, so transformers with a current
compressed-tensors cannot load such a file (a warning says so). Without act-order the
output is exactly what compressed-tensors 0.20 itself produces.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.packing import pack, unpack
from ..core.quantized import QuantizedWeight
from ..core.scheme import PER_CHANNEL, QuantScheme
from ..errors import LowbitError
from ._common import (
    check_weight,
    decoding,
    module_of,
    pad_columns,
    per_channel,
    trivial_g_idx,
    warn_issues,
    zero_points,
)
from .base import Format, register

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
#: The compressed-tensors release whose on-disk layout this module writes.
VERSION = "0.20.0"


def validate(name: str, qw: QuantizedWeight) -> None:
    """Raise :class:`LowbitError` when ``qw`` cannot be stored as pack-quantized."""
    why = CompressedTensors().holds_tensor(name, qw.scheme, tuple(qw.codes.shape))
    if why is not None:
        raise LowbitError(name, why)
    check_weight(name, qw)


def weight_args(scheme: QuantScheme, actorder: bool) -> dict[str, Any]:
    """The ``weights`` QuantizationArgs dict, as compressed-tensors serialises it.

    Built from :meth:`QuantScheme.to_quantization_args`; fields that are unset (``None``, ``{}``)
    are left out as compressed-tensors' own files leave them out, except ``group_size``, which
    it always writes.
    """
    args = {k: v for k, v in scheme.to_quantization_args().items() if k == "group_size" or v not in (None, {})}
    if actorder:
        args["actorder"] = "group"
    return args


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Dense bit-stream packing along dim 1, truncated to ``ceil(n * bits / 32)`` words."""
    n = codes.shape[1]
    words = -(-n * bits // 32)
    return pack(pad_columns(codes, 32), bits, dim=1, dtype=torch.int32)[:, :words].contiguous()


def encode_weight(qw: QuantizedWeight, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors (local names) of one module, and whether it uses act-order ``g_idx``."""
    qw = per_channel(qw)
    bits = qw.scheme.bits
    out_f, in_f = qw.codes.shape
    t = {
        "weight_packed": _pack_rows(qw.codes.cpu(), bits),
        "weight_scale": qw.scale.detach().cpu().to(dtype).contiguous(),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not qw.scheme.symmetric:
        z = zero_points(qw).detach().cpu().round().to(torch.int32)
        t["weight_zero_point"] = _pack_rows(z.t().contiguous(), bits).t().contiguous()
    actorder = not trivial_g_idx(qw)
    if actorder:
        assert qw.g_idx is not None
        t["weight_g_idx"] = qw.g_idx.detach().cpu().to(torch.int32).contiguous()
    return t, actorder


class Encoder:
    """pack-quantized tensors one module at a time (:meth:`add`), then ``quantization_config`` (:meth:`config`)."""

    def __init__(self, dtype: torch.dtype, linears: list[str]) -> None:
        self.dtype = dtype
        self.linears = linears
        self.groups: dict[str, tuple[dict[str, Any], list[str]]] = {}  # weights args (as JSON) -> (args, modules)
        self.actorder = False
        self.vllm_issues: list[str] = []

    def add(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """Validate and encode one weight: its tensors under full names (``<module>.weight_packed`` ...)."""
        validate(name, qw)
        module = module_of(name)
        local, actorder = encode_weight(qw, self.dtype)
        args = weight_args(per_channel(qw).scheme, actorder)
        self.groups.setdefault(json.dumps(args, sort_keys=True), (args, []))[1].append(module)
        self.actorder |= actorder
        self.vllm_issues += vllm_issues({name: qw})
        return {f"{module}.{k}": v for k, v in local.items()}

    def config(self) -> dict[str, Any]:
        """The ``quantization_config`` dict; warns about what vLLM or transformers cannot load."""
        if self.actorder:
            warnings.warn(
                "compressed-tensors: act-order weights are written with actorder='group' and weight_g_idx; "
                "vLLM reads them but compressed-tensors >= 0.15 (and transformers using it) refuses them. "
                "Use the gptq format for act-order checkpoints meant for transformers.",
                stacklevel=3,
            )
        warn_issues(self.vllm_issues, "compressed-tensors checkpoint that vLLM cannot load as written")
        return _quantization_config(list(self.groups.values()), self.linears)


def _quantization_config(groups: list[tuple[dict[str, Any], list[str]]], linears: list[str]) -> dict[str, Any]:
    quantized = {m for _, mods in groups for m in mods}
    ignore = sorted(m for m in linears if m not in quantized)
    single = len(groups) == 1
    config_groups = {}
    for i, (args, modules) in enumerate(sorted(groups, key=lambda g: g[1][0])):
        config_groups[f"group_{i}"] = {
            "format": FORMAT,
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"] if single else [f"re:{_anchored(m)}" for m in modules],
            "weights": args,
        }
    qconfig = {
        "config_groups": config_groups,
        "format": FORMAT,
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": VERSION,
    }
    return qconfig


def vllm_issues(weights: Mapping[str, QuantizedWeight]) -> list[str]:
    """Why vLLM's compressed-tensors WNA16 scheme could not load these weights (empty: it can).

    vLLM takes 4- or 8-bit codes and sizes ``weight_packed`` as ``in / (32 / bits)`` (and an
    asymmetric ``weight_zero_point`` as ``out / (32 / bits)``), so those must divide exactly.
    """
    issues = []
    for name in sorted(weights):
        qw = weights[name]
        out_f, in_f = qw.codes.shape
        bits = qw.scheme.bits
        why = []
        if bits not in (4, 8):
            why.append(f"{bits}-bit (vLLM's WNA16 takes 4 or 8)")
        else:
            per = 32 // bits
            if in_f % per:
                why.append(f"in={in_f} not a multiple of {per}")
            if not qw.scheme.symmetric and out_f % per:
                why.append(f"out={out_f} not a multiple of {per} (packed zero points)")
        if why:
            issues.append(f"{module_of(name)}: {', '.join(why)}")
    return issues


def _anchored(module: str) -> str:
    return "^" + re.escape(module) + "$"


# ----------------------------------------------------------------------------- reading


def _matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        try:
            return re.match(target[3:], module) is not None
        except re.error as exc:
            raise LowbitError("config.json", f"config group target {target!r} is not a valid regex ({exc})") from None
    return target == module or target == "Linear"


def _scheme_for(module: str, qconfig: Mapping[str, Any]) -> tuple[QuantScheme, Mapping[str, Any]]:
    groups = qconfig.get("config_groups") or {}
    if not isinstance(groups, Mapping):
        raise LowbitError("config.json", "quantization_config.config_groups is not a table of groups")
    for group in groups.values():
        targets = group.get("targets", []) if isinstance(group, Mapping) else []
        if any(_matches(str(t), module) for t in targets):
            args = group.get("weights") or {}
            if args.get("type", "int") != "int":
                raise LowbitError(module, f"weights of type {args.get('type')!r} are not integer pack-quantized")
            strategy = args.get("strategy")
            try:
                if strategy == "group":
                    gs = int(args["group_size"])
                elif strategy in ("channel", "tensor"):
                    gs = PER_CHANNEL
                else:
                    raise LowbitError(module, f"unsupported pack-quantized strategy {strategy!r}")
                return QuantScheme(int(args.get("num_bits", 8)), gs, bool(args.get("symmetric", True))), args
            except (KeyError, TypeError, ValueError) as exc:
                if isinstance(exc, LowbitError):
                    raise LowbitError(exc.where or module, exc.problem) from None
                raise LowbitError("config.json", f"weights of the config group targeting {module} are not valid "
                                  f"QuantizationArgs ({type(exc).__name__}: {exc})") from None
    raise LowbitError(module, "has packed weights but no config group targets it")


def decode(
    get: Callable[[str], torch.Tensor], names: list[str], config: Mapping[str, Any]
) -> tuple[dict[str, QuantizedWeight], set[str]]:
    """Quantized weights keyed ``<module>.weight``, and the tensor names they consumed."""
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("format") not in (FORMAT, None) and qconfig.get("format") != "mixed-precision":
        raise LowbitError("config.json", f"compressed-tensors format {qconfig.get('format')!r} is not pack-quantized")
    out: dict[str, QuantizedWeight] = {}
    used: set[str] = set()
    names_set = set(names)
    for packed_name in sorted(n for n in names if n.endswith(".weight_packed")):
        module = packed_name[: -len(".weight_packed")]
        scheme, _ = _scheme_for(module, qconfig)
        with decoding(module):
            qw, consumed = _decode_module(get, names_set, module, scheme)
        out[f"{module}.weight"] = qw
        used |= consumed
    return out, used


def _decode_module(
    get: Callable[[str], torch.Tensor], names: set[str], module: str, scheme: QuantScheme
) -> tuple[QuantizedWeight, set[str]]:
    packed_name = f"{module}.weight_packed"
    shape = [int(v) for v in get(f"{module}.weight_shape").tolist()]
    if len(shape) != 2:
        raise LowbitError(f"{module}.weight_shape", f"holds {shape}, expected [out, in]")
    out_f, in_f = shape
    packed = get(packed_name)
    if packed.dim() != 2 or packed.shape[0] != out_f or packed.shape[1] * 32 < in_f * scheme.bits:
        raise LowbitError(packed_name, f"shape {tuple(packed.shape)} cannot hold [{out_f}, {in_f}] "
                          f"{scheme.bits}-bit codes")
    codes = unpack(packed, scheme.bits, in_f, dim=1)
    scale = get(f"{module}.weight_scale").float()
    if scale.dim() == 1:
        scale = scale.reshape(-1, 1)
    if scale.shape[0] == 1 and out_f > 1:
        scale = scale.expand(out_f, scale.shape[1]).clone()
    n_groups = scheme.n_groups(in_f) if scheme.granularity == "group" else 1
    if tuple(scale.shape) != (out_f, n_groups):
        raise LowbitError(f"{module}.weight_scale", f"shape {tuple(scale.shape)}, expected {(out_f, n_groups)} for "
                          f"{scheme.describe()} over [{out_f}, {in_f}]")
    used = {packed_name, f"{module}.weight_scale", f"{module}.weight_shape"}
    zp_name = f"{module}.weight_zero_point"
    if scheme.symmetric:
        zero = torch.full_like(scale, float(scheme.mid))
    else:
        zp = get(zp_name)
        if zp.dtype == torch.int32 and zp.shape[0] != out_f:
            words = -(-out_f * scheme.bits // 32)
            if tuple(zp.shape) != (words, n_groups):
                raise LowbitError(zp_name, f"shape {tuple(zp.shape)}, expected {(words, n_groups)} (packed "
                                  f"{scheme.bits}-bit zero points of {out_f} rows)")
            zero = unpack(zp, scheme.bits, out_f, dim=0).float()
        else:  # unpacked signed zero points (older or per-tensor files)
            zero = (zp.to(torch.int32) + scheme.mid).float()
            zero = zero.reshape(1, 1).expand(scale.shape).clone() if zero.numel() == 1 else zero.reshape(scale.shape)
        if tuple(zero.shape) != tuple(scale.shape):
            raise LowbitError(zp_name, f"shape {tuple(zp.shape)} does not match the scales' {tuple(scale.shape)}")
        used.add(zp_name)
    gidx_name = f"{module}.weight_g_idx"
    g_idx = get(gidx_name).to(torch.int32) if gidx_name in names else None
    if g_idx is not None:
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
            raise LowbitError(gidx_name, f"group indices must lie in [0, {n_groups})")
        used.add(gidx_name)
    return QuantizedWeight(codes, scale, zero, scheme, g_idx), used


@register
class CompressedTensors(Format):
    """llm-compressor's pack-quantized integer weights (vLLM, transformers; the default)"""

    name = QUANT_METHOD
    rank = 0

    def holds(self, scheme: QuantScheme) -> str | None:
        if scheme.type == "float":
            layout = "float-quantized" if scheme.bits == 8 else (
                "nvfp4-pack-quantized" if scheme.scale_format == "e4m3" else "mxfp4-pack-quantized")
            return (f"compressed-tensors pack-quantized holds integer weights of 2-8 bits; {scheme.describe_raw()} "
                    f"{scheme.float_format} weights need {layout} (not yet written)")
        if scheme.type == "codebook":
            return f"compressed-tensors has no layout for {scheme.codebook} codebook weights"
        if not 2 <= scheme.bits <= 8:
            return f"compressed-tensors pack-quantized holds integer weights of 2-8 bits, not {scheme.bits}-bit"
        if scheme.granularity not in ("group", "channel", "tensor"):
            return (f"compressed-tensors pack-quantized holds per-tensor, per-channel or grouped integer weights, "
                    f"not {scheme.granularity} ones")
        if scheme.dynamic:
            return "weights are quantized once (static); a dynamic scheme applies to activations only"
        if scheme.scale_format in ("e4m3", "e8m0"):
            return f"compressed-tensors pack-quantized stores scales in the model's float type, not {scheme.scale_format}"
        return None

    def detect(self, config: Mapping[str, Any], folder: Path) -> bool:
        q = config.get("quantization_config")
        return isinstance(q, Mapping) and str(q.get("quant_method", "")).lower() == QUANT_METHOD

    def encoder(self, config: Mapping[str, Any], linears: list[str], dtype: torch.dtype) -> Encoder:
        return Encoder(dtype, linears)

    def decode(
        self, get: Callable[[str], torch.Tensor], names: list[str], config: Mapping[str, Any]
    ) -> tuple[dict[str, QuantizedWeight], set[str]]:
        return decode(get, names, config)
