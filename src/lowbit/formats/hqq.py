"""HQQ checkpoints as transformers 4.57 with hqq 0.2.8 writes them (``HqqConfig``, ``save_pretrained``).

Each quantized linear ``<m>`` (weight ``[out, in]``, groups of ``g`` input columns, hqq's
``axis=1``) is ``HQQLinear.state_dict()`` under ``<m>.``:

* ``W_q``: the codes of the ``[out * in / g, g]`` view (one group a row), packed by rows: the
  rows are cut into ``8 / bits`` equal planes and plane ``k`` goes to bits ``8 - bits*(k+1)``
  of a uint8 (``4bit_u8``, ``2bit_u8``, ``1bit_u8``; 5, 6 and 8 bits one uint8 a code,
  ``8bit_u8``); 3 bits: rows padded with zeros to a multiple of 10, ten planes in an int32,
  plane ``k`` at bit ``27 - 3k`` (``3bit_32``);
* ``scale``, ``zero``: ``[out * in / g, 1]`` in the model's dtype (hqq's ``compute_dtype``);
  ``w = (W_q - zero) * scale`` with a float zero point;
* the meta-data, encoded as hqq encodes it for safetensors: ``nbits``, ``group_size``, ``axis``
  int32 scalars; ``shape`` int64 ``[out, in]``; ``packing``, ``unpack_view_dtype``,
  ``compute_dtype`` as uint8 character codes (``"4bit_u8"``, ``"torch.uint8"``,
  ``"torch.float32"``); ``channel_wise``, ``optimize``, ``round_zero``, ``view_as_float``,
  ``quant_scale``, ``quant_zero``, ``offload_meta``, ``encoded_state_dict``,
  ``stores_quant_config`` as uint8 scalars.

``config.json`` gains ``quantization_config = {quant_method: hqq, quant_config:
{weight_quant_params: {...}, scale_quant_params: null, zero_quant_params: null, offload_meta:
false}, skip_modules}``; transformers loads a linear whose name contains one of ``skip_modules``
as a float layer and every other one from its HQQ state, with its own bits and group size.

Rules: asymmetric integer grids of 1-6 or 8 bits in groups (hqq has no 7 bits), the group count
``out * in / g`` a multiple of ``8 / bits`` for 1, 2 and 4 bits (hqq packs whole planes),
``lm_head`` kept float (transformers skips it). Float linears go to ``skip_modules`` by their last name
part when every layer keeps them float (``down_proj``), as vLLM matches whole name components.

vLLM's HQQ loader (``hqq_marlin``) reads this same layout (``W_q``, ``scale``, ``zero``; the other keys
ignored) for 4-bit weights in groups of 64 only; other settings are written with a warning. Read back by lowbit (only ``axis=1`` files whose
groups do not span rows). transformers 5.x loads such a checkpoint without error but with random
weights in the HQQ layers: that path is not supported.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..core.quantized import QuantizedWeight
from ..core.scheme import QuantScheme
from ..errors import LowbitError
from ._common import decoding, module_of
from .base import Format, register

QUANT_METHOD = "hqq"
BITS = (1, 2, 3, 4, 5, 6, 8)
PACKING = {1: "1bit_u8", 2: "2bit_u8", 3: "3bit_32", 4: "4bit_u8", 5: "8bit_u8", 6: "8bit_u8", 8: "8bit_u8"}
#: what a plane takes of a word: (bits per code, planes per word) for each packing
PLANES = {"1bit_u8": (1, 8), "2bit_u8": (2, 4), "4bit_u8": (4, 2), "3bit_32": (3, 10), "8bit_u8": (8, 1)}
#: hqq's per-layer keys besides W_q, scale and zero (``HQQLinear.state_dict_keys``)
META_KEYS = ("nbits", "group_size", "axis", "shape", "packing", "unpack_view_dtype", "compute_dtype",
             "channel_wise", "optimize", "round_zero", "view_as_float", "quant_scale", "quant_zero",
             "offload_meta", "encoded_state_dict", "stores_quant_config")
_DTYPE_NAMES = {torch.float32: "torch.float32", torch.float16: "torch.float16", torch.bfloat16: "torch.bfloat16"}


def _text(s: str) -> torch.Tensor:
    return torch.tensor([ord(c) for c in s], dtype=torch.uint8)


def _read_text(t: torch.Tensor) -> str:
    return "".join(chr(int(c)) for c in t.reshape(-1).tolist())


def _flag(v: bool) -> torch.Tensor:
    return torch.tensor(int(v), dtype=torch.uint8)


def _int(v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int32)


def pack(rows: torch.Tensor, packing: str) -> torch.Tensor:
    """hqq's plane packing of codes ``[n, g]`` (see the module doc)."""
    bits, planes = PLANES[packing]
    if planes == 1:
        return rows.to(torch.uint8).contiguous()
    if packing == "3bit_32":
        n = rows.shape[0]
        padded = torch.zeros((-(-n // 10) * 10, rows.shape[1]), dtype=torch.int32)
        padded[:n] = rows.to(torch.int32)
        src, word = padded, torch.int32
    else:
        src, word = rows.to(torch.uint8), torch.uint8
    step = src.shape[0] // planes
    out = torch.zeros((step, src.shape[1]), dtype=word)
    for k in range(planes):
        out |= src[k * step:(k + 1) * step] << (bits * (planes - 1 - k))
    return out


def unpack(packed: torch.Tensor, packing: str, n: int) -> torch.Tensor:
    """The first ``n`` rows of codes (int32 ``[n, g]``) from hqq's packed ``W_q``."""
    bits, planes = PLANES[packing]
    mask = (1 << bits) - 1
    w = packed.to(torch.int32) if packed.dtype == torch.uint8 else packed
    parts = [(w >> (bits * (planes - 1 - k))) & mask for k in range(planes)]
    return torch.cat(parts, 0)[:n].contiguous()


def weight_quant_params(scheme: QuantScheme) -> dict[str, Any]:
    """hqq's ``weight_quant_params`` of a scheme (as ``hqq_base_quant_config`` makes them)."""
    return {"axis": 1, "channel_wise": True, "group_size": scheme.group_size, "nbits": scheme.bits,
            "optimize": True, "round_zero": scheme.bits == 4, "view_as_float": False}


def _groups(name: str, qw: QuantizedWeight) -> int:
    """The group size of ``qw`` (per channel: the whole row)."""
    s = qw.scheme
    return qw.codes.shape[1] if s.granularity == "channel" else s.group_size


def encode_weight(name: str, qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The ``HQQLinear.state_dict`` of one weight (local names)."""
    why = HQQ().holds_tensor(name, qw.scheme, tuple(qw.codes.shape))
    if why is not None:
        raise LowbitError(name, why)
    if qw.g_idx is not None or qw.zero is None:
        raise LowbitError(name, "hqq stores grouped weights with zero points and no act-order (g_idx)")
    out_f, in_f = qw.codes.shape
    g = _groups(name, qw)
    bits = qw.scheme.bits
    codes = qw.codes.detach().cpu()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > qw.scheme.qmax):
        raise LowbitError(name, f"codes outside [0, {qw.scheme.qmax}] for {bits}-bit")
    packing = PACKING[bits]
    n = out_f * in_f // g
    params = weight_quant_params(qw.scheme)
    return {
        "W_q": pack(codes.reshape(n, g), packing),
        "scale": qw.scale.detach().cpu().reshape(n, 1).to(dtype).contiguous(),
        "zero": qw.zero.detach().cpu().reshape(n, 1).to(dtype).contiguous(),
        "nbits": _int(bits), "group_size": _int(g), "axis": _int(1),
        "shape": torch.tensor([out_f, in_f], dtype=torch.int64),
        "packing": _text(packing),
        "unpack_view_dtype": _text("torch.int32" if packing == "3bit_32" else "torch.uint8"),
        "compute_dtype": _text(_DTYPE_NAMES.get(dtype, "torch.float32")),
        "channel_wise": _flag(True), "optimize": _flag(params["optimize"]),
        "round_zero": _flag(params["round_zero"]), "view_as_float": _flag(False),
        "quant_scale": _flag(False), "quant_zero": _flag(False), "offload_meta": _flag(False),
        "encoded_state_dict": _flag(True), "stores_quant_config": _flag(True),
    }


class Encoder:
    """HQQ tensors one module at a time (:meth:`add`), then ``quantization_config`` (:meth:`config`)."""

    def __init__(self, linears: list[str], dtype: torch.dtype) -> None:
        self.linears = linears
        self.dtype = dtype
        self.quantized: dict[str, QuantScheme] = {}

    def add(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        module = module_of(name)
        tensors = encode_weight(name, qw, self.dtype)
        self.quantized[module] = qw.scheme
        return {f"{module}.{k}": v for k, v in tensors.items()}

    def config(self) -> dict[str, Any]:
        schemes = list(self.quantized.values())
        common = max(set(schemes), key=schemes.count)  # the config names the most used scheme
        skipped = [m for m in self.linears if m not in self.quantized and m != "lm_head"]
        # a name every layer keeps float is written as its last part (``down_proj``): transformers matches
        # skip_modules as substrings of module names, vLLM as whole name components (fused layers too)
        tails = {m.rsplit(".", 1)[-1] for m in skipped}
        whole = {t for t in tails if not any(q.rsplit(".", 1)[-1] == t for q in self.quantized)}
        partial = sorted(m for m in skipped if m.rsplit(".", 1)[-1] not in whole)
        issues = [f"{s.bits}-bit g{s.group_size}" for s in sorted(set(schemes), key=str)
                  if (s.bits, s.group_size, s.granularity) != (4, 64, "group")]
        if partial:
            issues.append(f"float layers that vLLM cannot skip by name ({', '.join(partial[:3])}...)")
        if issues:
            warnings.warn(f"HQQ checkpoint that vLLM's hqq loader (4-bit, group 64 only) cannot load: {'; '.join(issues)}",
                          stacklevel=2)
        return {
            "quant_config": {"offload_meta": False, "scale_quant_params": None,
                             "weight_quant_params": weight_quant_params(common), "zero_quant_params": None},
            "quant_method": QUANT_METHOD,
            "skip_modules": ["lm_head", *sorted(whole), *partial],
        }


def decode(get: Callable[[str], torch.Tensor], names: list[str],
           config: Mapping[str, Any]) -> tuple[dict[str, QuantizedWeight], set[str]]:
    """Quantized weights keyed ``<module>.weight`` and the tensor names they consumed."""
    out: dict[str, QuantizedWeight] = {}
    used: set[str] = set()
    present = set(names)
    for qname in sorted(n for n in names if n.endswith(".W_q")):
        module = qname[: -len(".W_q")]
        with decoding(module):
            meta = {k: get(f"{module}.{k}") for k in ("nbits", "group_size", "axis", "shape", "packing")
                    if f"{module}.{k}" in present}
            missing = [k for k in ("nbits", "group_size", "shape", "packing") if k not in meta]
            if missing or f"{module}.scale" not in present or f"{module}.zero" not in present:
                raise LowbitError(module, f"incomplete HQQ state (missing {', '.join(missing or ['scale/zero'])})")
            bits, g = int(meta["nbits"].item()), int(meta["group_size"].item())
            axis = int(meta["axis"].item()) if "axis" in meta else 1
            shape = [int(v) for v in meta["shape"].reshape(-1).tolist()]
            packing = _read_text(meta["packing"])
            if axis != 1:
                raise LowbitError(module, f"HQQ axis {axis} is not supported (lowbit reads axis=1 groups)")
            if bits not in BITS or packing != PACKING[bits]:
                raise LowbitError(module, f"HQQ nbits {bits} with packing {packing!r} is not supported")
            if len(shape) != 2 or g <= 0 or shape[1] % g:
                raise LowbitError(module, f"HQQ group size {g} does not divide the rows of shape {shape}")
            out_f, in_f = shape
            n = out_f * in_f // g
            codes = unpack(get(qname), packing, n)
            if tuple(codes.shape) != (n, g):
                raise LowbitError(qname, f"unpacks to {tuple(codes.shape)}, expected {(n, g)}")
            scale, zero = get(f"{module}.scale").float(), get(f"{module}.zero").float()
            for what, t in (("scale", scale), ("zero", zero)):
                if t.numel() != n:
                    raise LowbitError(f"{module}.{what}", f"{t.numel()} values, expected {n}")
            scheme = QuantScheme(bits, g, False)
            qw = QuantizedWeight(codes.reshape(out_f, in_f), scale.reshape(out_f, -1).contiguous(),
                                 zero.reshape(out_f, -1).contiguous(), scheme, None)
        out[f"{module}.weight"] = qw
        used.update(f"{module}.{k}" for k in ("W_q", "scale", "zero", *META_KEYS) if f"{module}.{k}" in present)
    return out, used


@register
class HQQ(Format):
    """HQQ as transformers 4.57 + hqq save it (HqqConfig; float zero points, packed planes)"""

    name = "hqq"
    quant_method = QUANT_METHOD
    rank = 40

    def holds(self, scheme: QuantScheme) -> str | None:
        if scheme.type != "int" or scheme.symmetric:
            return f"hqq holds asymmetric integer grids with zero points, not {scheme.describe()}"
        if scheme.bits not in BITS:
            return f"hqq stores {', '.join(map(str, BITS))} bits, not {scheme.bits}"
        if scheme.granularity not in ("group", "channel"):
            return f"hqq holds groups (or whole rows), not {scheme.granularity} scales"
        if scheme.dynamic:
            return "weights are quantized once (static); a dynamic scheme applies to activations only"
        if scheme.scale_format in ("e4m3", "e8m0"):
            return f"hqq stores scales in the model's float type, not {scheme.scale_format}"
        return None

    def holds_tensor(self, name: str, scheme: QuantScheme, shape: tuple[int, ...] | None = None) -> str | None:
        why = super().holds_tensor(name, scheme, shape)
        if why is None and name.endswith(".weight") and module_of(name) == "lm_head":
            why = "HQQ checkpoints keep lm_head in float (transformers skips it)"
        if why is None and shape is not None and len(shape) == 2 and scheme.bits in (1, 2, 4):
            g = shape[1] if scheme.granularity == "channel" else scheme.group_size
            planes = 8 // scheme.bits
            if (shape[0] * shape[1] // g) % planes:
                why = f"hqq packs {planes} groups per byte: {shape[0] * shape[1] // g} groups is not a multiple of {planes}"
        return why

    def encoder(self, config: Mapping[str, Any], linears: list[str], dtype: torch.dtype) -> Encoder:
        return Encoder(linears, dtype)

    def decode(self, get: Callable[[str], torch.Tensor], names: list[str],
               config: Mapping[str, Any]) -> tuple[dict[str, QuantizedWeight], set[str]]:
        return decode(get, names, config)
