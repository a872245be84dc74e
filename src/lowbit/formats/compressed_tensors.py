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

import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..core.packing import pack, unpack
from ..core.scheme import PER_CHANNEL, QuantScheme
from ..errors import LowbitError
from ..methods.base import QuantizedWeight
from ._common import check_weight, module_of, pad_columns, per_channel, trivial_g_idx, warn_issues

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
#: The compressed-tensors release whose on-disk layout this module writes.
VERSION = "0.20.0"

_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def validate(name: str, qw: QuantizedWeight) -> None:
    """Raise :class:`LowbitError` when ``qw`` cannot be stored as pack-quantized."""
    check_weight(name, qw)
    if not 2 <= qw.scheme.bits <= 8:
        raise LowbitError(name, f"pack-quantized stores 2..8-bit integers, not {qw.scheme.bits}-bit")


def _weight_args(scheme: QuantScheme, actorder: bool) -> dict[str, Any]:
    """The ``weights`` QuantizationArgs dict, as compressed-tensors serialises it."""
    args: dict[str, Any] = {
        "dynamic": False,
        "group_size": scheme.group_size if scheme.group_size > 0 else None,
        "num_bits": scheme.bits,
        "observer": "minmax",
        "strategy": "group" if scheme.group_size > 0 else "channel",
        "symmetric": scheme.symmetric,
        "type": "int",
    }
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
        z = qw.zero.detach().cpu().round().to(torch.int32)
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
        self.groups: dict[tuple[int, int, bool, bool], list[str]] = {}
        self.vllm_issues: list[str] = []

    def add(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """Validate and encode one weight: its tensors under full names (``<module>.weight_packed`` ...)."""
        validate(name, qw)
        module = module_of(name)
        local, actorder = encode_weight(qw, self.dtype)
        s = per_channel(qw).scheme
        self.groups.setdefault((s.bits, s.group_size, s.symmetric, actorder), []).append(module)
        self.vllm_issues += vllm_issues({name: qw})
        return {f"{module}.{k}": v for k, v in local.items()}

    def config(self) -> dict[str, Any]:
        """The ``quantization_config`` dict; warns about what vLLM or transformers cannot load."""
        if any(key[3] for key in self.groups):
            warnings.warn(
                "compressed-tensors: act-order weights are written with actorder='group' and weight_g_idx; "
                "vLLM reads them but compressed-tensors >= 0.15 (and transformers using it) refuses them. "
                "Use the gptq format for act-order checkpoints meant for transformers.",
                stacklevel=3,
            )
        warn_issues(self.vllm_issues, "compressed-tensors checkpoint that vLLM cannot load as written")
        return _quantization_config(self.groups, self.linears)


def _quantization_config(groups: dict[tuple[int, int, bool, bool], list[str]], linears: list[str]) -> dict[str, Any]:
    quantized = {m for mods in groups.values() for m in mods}
    ignore = sorted(m for m in linears if m not in quantized)
    single = len(groups) == 1
    config_groups = {}
    for i, (key, modules) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0])):
        bits, group_size, symmetric, actorder = key
        config_groups[f"group_{i}"] = {
            "format": FORMAT,
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"] if single else [f"re:{_anchored(m)}" for m in modules],
            "weights": _weight_args(QuantScheme(bits, group_size, symmetric), actorder),
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
        return re.match(target[3:], module) is not None
    return target == module or target == "Linear"


def _scheme_for(module: str, qconfig: Mapping[str, Any]) -> tuple[QuantScheme, Mapping[str, Any]]:
    for group in qconfig.get("config_groups", {}).values():
        if any(_matches(t, module) for t in group.get("targets", [])):
            args = group.get("weights") or {}
            if args.get("type", "int") != "int":
                raise LowbitError(module, f"weights of type {args.get('type')!r} are not integer pack-quantized")
            strategy = args.get("strategy")
            if strategy == "group":
                gs = int(args["group_size"])
            elif strategy in ("channel", "tensor"):
                gs = PER_CHANNEL
            else:
                raise LowbitError(module, f"unsupported pack-quantized strategy {strategy!r}")
            return QuantScheme(int(args.get("num_bits", 8)), gs, bool(args.get("symmetric", True))), args
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
    for packed_name in sorted(n for n in names if n.endswith(".weight_packed")):
        module = packed_name[: -len(".weight_packed")]
        scheme, _ = _scheme_for(module, qconfig)
        shape = [int(v) for v in get(f"{module}.weight_shape").tolist()]
        out_f, in_f = shape
        codes = unpack(get(packed_name), scheme.bits, in_f, dim=1)
        scale = get(f"{module}.weight_scale").float()
        if scale.dim() == 1:
            scale = scale.reshape(-1, 1)
        if scale.shape[0] == 1 and out_f > 1:
            scale = scale.expand(out_f, scale.shape[1]).clone()
        zp_name = f"{module}.weight_zero_point"
        if scheme.symmetric:
            zero = torch.full_like(scale, float(scheme.mid))
        else:
            zp = get(zp_name)
            if zp.dtype == torch.int32 and zp.shape[0] != out_f:
                zero = unpack(zp, scheme.bits, out_f, dim=0).float()
            else:  # unpacked signed zero points (older or per-tensor files)
                zero = (zp.to(torch.int32) + scheme.mid).float().reshape(scale.shape)
            used.add(zp_name)
        gidx_name = f"{module}.weight_g_idx"
        g_idx = get(gidx_name).to(torch.int32) if gidx_name in names else None
        if g_idx is not None:
            used.add(gidx_name)
        out[f"{module}.weight"] = QuantizedWeight(codes, scale, zero, scheme, g_idx)
        used.update({packed_name, f"{module}.weight_scale", f"{module}.weight_shape"})
    return out, used
