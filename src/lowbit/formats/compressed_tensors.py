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

Weights that come with activation quantization, and float weights, use the layouts llm-compressor
gives them (one ``format`` per config group; the top-level ``format`` is ``mixed-precision`` when
they differ):

* ``int-quantized`` (8-bit integer weights with input activations, W8A8): ``<m>.weight`` int8
  ``[out, in]`` (signed codes), ``<m>.weight_scale`` model dtype ``[out, 1]`` (``[1]`` per tensor);
* ``float-quantized`` (FP8 E4M3): ``<m>.weight`` float8_e4m3fn, ``<m>.weight_scale`` model dtype,
  ``[1]`` per tensor, ``[out, 1]`` per channel, ``[ceil(out/128), ceil(in/128)]`` per 128x128 block;
* static activations add ``<m>.input_scale`` model dtype ``[1]``; their QuantizationArgs (and the
  weights') are written with every key compressed-tensors 0.19 writes, as llm-compressor 0.14 does.

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
from dataclasses import replace
from typing import Any

import torch

from ..core.fp4 import pack_pairs, unpack_pairs
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
    if layout(qw.scheme) in (FORMAT, "int-quantized"):
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


def layout(scheme: QuantScheme) -> str:
    """The compressed-tensors format of weights of ``scheme`` (what ``infer_module_format`` picks)."""
    if scheme.type == "float":
        if scheme.bits == 8:
            return "float-quantized"
        return "nvfp4-pack-quantized" if scheme.scale_format == "e4m3" else "mxfp4-pack-quantized"
    if scheme.type == "int" and scheme.bits == 8 and scheme.activations is not None:
        return "int-quantized"
    return FORMAT


def full_args(scheme: QuantScheme, weights: bool) -> dict[str, Any]:
    """QuantizationArgs with every key, as compressed-tensors 0.19 serialises them (llm-compressor 0.14)."""
    args = scheme.to_quantization_args()
    args["scale_dtype"] = args.get("scale_dtype")
    args["zp_dtype"] = None
    if weights:
        args["observer"] = "memoryless_minmax"
    else:
        args["observer"] = None if scheme.dynamic is True else "static_minmax"
    if args["strategy"] in ("token", "tensor", "channel", "block"):
        args["group_size"] = None
    return args


def encode_fp4(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` tensors of one module (local names)."""
    t = {"weight_packed": pack_pairs(qw.codes.cpu())}
    if qw.scheme.scale_format == "e4m3":
        assert qw.global_scale is not None
        t["weight_scale"] = qw.scale.detach().cpu().to(torch.float8_e4m3fn).contiguous()
        t["weight_global_scale"] = qw.global_scale.detach().cpu().to(torch.float32).reshape(1).contiguous()
    else:  # E8M0: the biased exponent of each power-of-two scale
        e = torch.floor(torch.log2(qw.scale.detach().cpu().float())).to(torch.int32) + 127
        t["weight_scale"] = e.to(torch.uint8).contiguous()
    if "input_global_scale" in qw.extra:
        t["input_global_scale"] = qw.extra["input_global_scale"].detach().cpu().to(torch.float32).reshape(1)
    return t


def encode_unpacked(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``int-quantized`` / ``float-quantized`` tensors of one module (local names)."""
    if qw.scheme.type == "int":
        assert qw.zero is not None
        codes = qw.codes.to(torch.int32) - qw.scheme.mid
        weight = codes.to(torch.int8)
    else:
        weight = qw.codes.to(torch.float8_e4m3fn)
    scale = qw.scale.detach().cpu().to(dtype)
    t = {"weight": weight.cpu().contiguous(),
         "weight_scale": (scale.reshape(1) if qw.scheme.granularity == "tensor" else scale).contiguous()}
    if "input_scale" in qw.extra:
        t["input_scale"] = qw.extra["input_scale"].detach().cpu().to(dtype).reshape(1).contiguous()
    return t


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
        self.groups: dict[str, tuple[dict[str, Any], list[str]]] = {}  # group (as JSON) -> (group, modules)
        self.actorder = False
        self.vllm_issues: list[str] = []

    def add(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """Validate and encode one weight: its tensors under full names (``<module>.weight_packed`` ...)."""
        validate(name, qw)
        module = module_of(name)
        kind = layout(qw.scheme)
        if kind == FORMAT:
            local, actorder = encode_weight(qw, self.dtype)
            args = weight_args(per_channel(qw).scheme, actorder)
            self.actorder |= actorder
            self.vllm_issues += vllm_issues({name: qw})
        elif kind in FP4:
            local, args = encode_fp4(qw), full_args(qw.scheme, True)
        else:
            local, args = encode_unpacked(qw, self.dtype), full_args(qw.scheme, True)
        acts = qw.scheme.activations
        group = {"format": kind, "weights": args,
                 "input_activations": None if acts is None else full_args(acts, False)}
        self.groups.setdefault(json.dumps(group, sort_keys=True), (group, []))[1].append(module)
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
    for i, (group, modules) in enumerate(sorted(groups, key=lambda g: g[1][0])):
        config_groups[f"group_{i}"] = {
            "format": group["format"],
            "input_activations": group["input_activations"],
            "output_activations": None,
            "targets": ["Linear"] if single else [f"re:{_anchored(m)}" for m in modules],
            "weights": group["weights"],
        }
    kinds = {g["format"] for g, _ in groups}
    qconfig = {
        "config_groups": config_groups,
        "format": kinds.pop() if len(kinds) == 1 else "mixed-precision",
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


UNPACKED = ("int-quantized", "float-quantized")
FP4 = ("nvfp4-pack-quantized", "mxfp4-pack-quantized")


def _group_for(module: str, qconfig: Mapping[str, Any]) -> Mapping[str, Any]:
    groups = qconfig.get("config_groups") or {}
    if not isinstance(groups, Mapping):
        raise LowbitError("config.json", "quantization_config.config_groups is not a table of groups")
    for group in groups.values():
        targets = group.get("targets", []) if isinstance(group, Mapping) else []
        if any(_matches(str(t), module) for t in targets):
            return group
    raise LowbitError(module, "has quantized weights but no config group targets it")


def scheme_from_args(args: Mapping[str, Any], where: str) -> QuantScheme:
    """A :class:`QuantScheme` from compressed-tensors QuantizationArgs (int or float, any strategy)."""
    try:
        strategy = str(args.get("strategy") or "tensor")
        kind = str(args.get("type", "int"))
        bits = int(args.get("num_bits", 8))
        gs = int(args["group_size"]) if strategy in ("group", "tensor_group") else (
            -1 if strategy == "channel" else 0)
        block = args.get("block_structure")
        scale_dtype = str(args.get("scale_dtype") or "")
        scale_format = "e4m3" if "float8" in scale_dtype else ("e8m0" if "uint8" in scale_dtype else None)
        if strategy == "tensor_group":
            strategy, scale_format = "group", scale_format or "e4m3"
        return QuantScheme(bits, gs, bool(args.get("symmetric", True)), type=kind,
                           strategy=strategy if strategy in ("token", "block", "group") else None,
                           block=tuple(block) if strategy == "block" and block else None,  # type: ignore[arg-type]
                           dynamic=args.get("dynamic", False), scale_format=scale_format)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, LowbitError):
            raise LowbitError(exc.where or where, exc.problem) from None
        raise LowbitError("config.json", f"the QuantizationArgs of {where} are not valid "
                          f"({type(exc).__name__}: {exc})") from None


def _group_scheme(group: Mapping[str, Any], module: str) -> QuantScheme:
    """A config group's weight scheme, carrying its input-activation scheme when it has one."""
    scheme = scheme_from_args(group.get("weights") or {}, module)
    acts = group.get("input_activations")
    return replace(scheme, activations=scheme_from_args(acts, module)) if acts else scheme


def _decode_unpacked(
    get: Callable[[str], torch.Tensor], names: set[str], module: str, group: Mapping[str, Any]
) -> tuple[QuantizedWeight, set[str]]:
    """One ``int-quantized`` / ``float-quantized`` module."""
    scheme = _group_scheme(group, module)
    w_name, s_name = f"{module}.weight", f"{module}.weight_scale"
    weight, scale = get(w_name), get(s_name)
    if weight.dim() != 2:
        raise LowbitError(w_name, f"shape {tuple(weight.shape)}, expected [out, in]")
    out_f, in_f = weight.shape
    kind = scheme.granularity
    if kind == "block":
        assert scheme.block is not None
        want = (-(-out_f // scheme.block[0]), -(-in_f // scheme.block[1]))
    else:
        want = {"tensor": (1, 1), "channel": (out_f, 1)}.get(kind, (out_f, scheme.n_groups(in_f)))
    scale = scale.reshape(1, 1) if kind == "tensor" and scale.numel() == 1 else scale
    if tuple(scale.shape) != want:
        raise LowbitError(s_name, f"shape {tuple(scale.shape)}, expected {want} for {scheme.describe()} over "
                          f"[{out_f}, {in_f}]")
    used = {w_name, s_name}
    extra = {}
    if f"{module}.input_scale" in names:
        extra["input_scale"] = get(f"{module}.input_scale")
        used.add(f"{module}.input_scale")
    if scheme.type == "int":
        if weight.dtype != torch.int8:
            raise LowbitError(w_name, f"dtype {weight.dtype}, expected torch.int8 (int-quantized)")
        codes = weight.to(torch.int32) + scheme.mid
        zero = torch.full(scale.shape, float(scheme.mid))
        return QuantizedWeight(codes, scale, zero, scheme, extra=extra), used
    if weight.dtype != torch.float8_e4m3fn:
        raise LowbitError(w_name, f"dtype {weight.dtype}, expected torch.float8_e4m3fn (float-quantized)")
    return QuantizedWeight(weight, scale, None, scheme, extra=extra), used


def _decode_fp4(
    get: Callable[[str], torch.Tensor], names: set[str], module: str, group: Mapping[str, Any]
) -> tuple[QuantizedWeight, set[str]]:
    """One ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` module."""
    scheme = _group_scheme(group, module)
    if scheme.type != "float" or scheme.bits != 4 or scheme.scale_format not in ("e4m3", "e8m0"):
        raise LowbitError(module, f"weight_packed of {scheme.describe()} is not FP4 (NVFP4 / MXFP4)")
    p_name, s_name = f"{module}.weight_packed", f"{module}.weight_scale"
    packed, scale = get(p_name), get(s_name)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise LowbitError(p_name, f"{packed.dtype} {tuple(packed.shape)}, expected uint8 [out, in / 2]")
    codes = unpack_pairs(packed)
    want = (codes.shape[0], scheme.n_groups(codes.shape[1]))
    if tuple(scale.shape) != want:
        raise LowbitError(s_name, f"shape {tuple(scale.shape)}, expected {want}")
    used = {p_name, s_name}
    extra = {}
    if f"{module}.input_global_scale" in names:
        extra["input_global_scale"] = get(f"{module}.input_global_scale")
        used.add(f"{module}.input_global_scale")
    if scheme.scale_format == "e8m0":
        if scale.dtype != torch.uint8:
            raise LowbitError(s_name, f"dtype {scale.dtype}, expected uint8 E8M0 exponents")
        real = torch.pow(2.0, scale.to(torch.float32) - 127)
        return QuantizedWeight(codes, real, None, scheme, extra=extra), used
    gs_name = f"{module}.weight_global_scale"
    if scale.dtype != torch.float8_e4m3fn:
        raise LowbitError(s_name, f"dtype {scale.dtype}, expected float8_e4m3fn")
    gs = get(gs_name).to(torch.float32).reshape(1)
    used.add(gs_name)
    return QuantizedWeight(codes, scale, None, scheme, global_scale=gs, extra=extra), used


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
    if qconfig.get("format") not in (FORMAT, None, "mixed-precision", *UNPACKED, *FP4):
        raise LowbitError("config.json", f"compressed-tensors format {qconfig.get('format')!r} is not one lowbit "
                          f"reads ({', '.join((FORMAT, *UNPACKED, *FP4))})")
    out: dict[str, QuantizedWeight] = {}
    used: set[str] = set()
    names_set = set(names)
    for scale_name in sorted(n for n in names if n.endswith(".weight_scale")):
        module = scale_name[: -len(".weight_scale")]
        if f"{module}.weight_packed" in names_set:
            continue
        group = _group_for(module, qconfig)
        with decoding(module):
            qw, consumed = _decode_unpacked(get, names_set, module, group)
        out[f"{module}.weight"] = qw
        used |= consumed
    for packed_name in sorted(n for n in names if n.endswith(".weight_packed")):
        module = packed_name[: -len(".weight_packed")]
        group = _group_for(module, qconfig)
        if group.get("format") in FP4 or (group.get("weights") or {}).get("type") == "float":
            with decoding(module):
                qw, consumed = _decode_fp4(get, names_set, module, group)
            out[f"{module}.weight"] = qw
            used |= consumed
            continue
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
    quant_method = QUANT_METHOD
    rank = 0

    def holds(self, scheme: QuantScheme) -> str | None:
        if scheme.dynamic:
            return "weights are quantized once (static); a dynamic scheme applies to activations only"
        if scheme.type == "float":
            kind = layout(scheme)
            if kind == "float-quantized":
                if scheme.float_format != "e4m3" or scheme.granularity not in ("tensor", "channel", "block"):
                    return f"compressed-tensors float-quantized holds E4M3 weights per tensor, channel or block, " \
                           f"not {scheme.describe()}"
                return None
            want = {"nvfp4-pack-quantized": 16, "mxfp4-pack-quantized": 32}[kind]
            if scheme.granularity != "group" or scheme.group_size != want:
                return f"compressed-tensors {kind} holds FP4 weights in groups of {want}, not {scheme.describe()}"
            return None
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

    def encoder(self, config: Mapping[str, Any], linears: list[str], dtype: torch.dtype) -> Encoder:
        return Encoder(dtype, linears)

    def decode(
        self, get: Callable[[str], torch.Tensor], names: list[str], config: Mapping[str, Any]
    ) -> tuple[dict[str, QuantizedWeight], set[str]]:
        return decode(get, names, config)
