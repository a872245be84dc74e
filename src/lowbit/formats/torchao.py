"""torchao checkpoints as transformers (5.x) with torchao 0.18 write them (``TorchAoConfig``, safetensors).

transformers flattens each quantized weight (a torchao tensor subclass) into plain tensors named
``<m>._weight_<part>`` and describes it in the safetensors metadata: one JSON entry per state-dict
name (``<m>.weight`` -> ``{"_type": "Int8Tensor", "_data": {...}, "_tensor_data_names": [...]}``,
float tensors ``{"_type": "Tensor"}``) and ``tensor_names`` (the JSON list of them all). Kinds:

* **int8 weight-only** (``Int8WeightOnlyConfig``) and **int8 dynamic activation + int8 weight**
  (``Int8DynamicActivationInt8WeightConfig``): ``Int8Tensor``, symmetric per output row:
  ``qdata`` int8 ``[out, in]`` (lowbit's code minus 128), ``scale`` float32 ``[out, 1]``,
  ``zero_point`` int8 zeros; the dynamic kind adds ``act_quant_kwargs`` (int8 per token,
  symmetric). lowbit scheme: ``W8A16`` (per-channel symmetric 8 bits) or ``W8A8``.
* **intx weight-only** (``IntxWeightOnlyConfig``, int1..int8, ``UNPACKED_TO_INT8``; int4 is the
  usual one): ``IntxUnpackedToInt8Tensor``: ``qdata`` int8 ``[out, in]`` in
  ``[-2**(b-1), 2**(b-1) - 1]``, ``scale`` ``[out, in / g]`` in the model's dtype, ``zero_point``
  int8 (zeros when symmetric); ``w = (qdata - zero_point) * scale``.
* **float8 weight-only** (``Float8WeightOnlyConfig``): ``Float8Tensor``, ``qdata``
  float8_e4m3fn ``[out, in]``, ``scale`` float32 ``[out, 1]`` (per row).

``config.json`` gains transformers' ``quantization_config`` (``quant_method: torchao``,
``quant_type: {"default": <the torchao config as JSON>}``, ``modules_to_not_convert``). One kind,
bit width and group size per checkpoint. transformers 4.57 writes safetensors only for the float8
configs; the layout above is what 5.x writes and loads (checked with transformers 5.25 + torchao
0.18 on CPU, ``tests/test_torchao.py``). Read back by lowbit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..core.quantized import QuantizedWeight
from ..core.scheme import QuantScheme
from ..errors import LowbitError
from ._common import decoding, module_of
from .base import Format, register

QUANT_METHOD = "torchao"
_INT8_TOKEN = QuantScheme(8, 0, True, strategy="token", dynamic=True)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _dtype_json(name: str) -> dict[str, str]:
    return {"_type": "torch.dtype", "_data": name}


def kind_of(scheme: QuantScheme) -> str | None:
    """``int8``, ``int8_dynamic``, ``intx`` or ``float8`` for a scheme torchao holds, else ``None``."""
    act = scheme.activations
    if scheme.type == "float":
        if scheme.float_format == "e4m3" and scheme.granularity == "channel" and act is None \
                and scheme.scale_format in (None, "float32"):
            return "float8"
        return None
    if scheme.type != "int" or scheme.dynamic or scheme.scale_format in ("e4m3", "e8m0"):
        return None
    if scheme.bits == 8 and scheme.symmetric and scheme.granularity == "channel":
        if act is None:
            return "int8"
        if act.type == "int" and act.bits == 8 and act.symmetric and act.granularity == "token" and act.dynamic is True:
            return "int8_dynamic"
        return None
    if act is None and scheme.granularity in ("group", "channel"):
        return "intx"
    return None


def _per_row() -> dict[str, Any]:
    return {"_data": {"dim": -1}, "_type": "PerRow", "_version": 1}


def quant_type(kind: str, scheme: QuantScheme) -> dict[str, Any]:
    """The torchao config (as transformers serializes it) of a kind."""
    if kind == "int8":
        return {"_data": {"granularity": _per_row(), "group_size": None, "set_inductor_config": True},
                "_type": "Int8WeightOnlyConfig", "_version": 2}
    if kind == "int8_dynamic":
        return {"_data": {"act_mapping_type": {"_data": "SYMMETRIC", "_type": "MappingType"},
                          "granularity": _per_row(), "reduce_range": False, "set_inductor_config": True,
                          "weight_only_decode": False},
                "_type": "Int8DynamicActivationInt8WeightConfig", "_version": 2}
    if kind == "float8":
        return {"_data": {"granularity": _per_row(), "set_inductor_config": True,
                          "weight_dtype": {"_data": "float8_e4m3fn", "_type": "torch.dtype"}},
                "_type": "Float8WeightOnlyConfig", "_version": 2}
    granularity = ({"_data": {"axis": 0}, "_type": "PerAxis", "_version": 1} if scheme.granularity == "channel"
                   else {"_data": {"group_size": scheme.group_size}, "_type": "PerGroup", "_version": 1})
    return {"_data": {"granularity": granularity,
                      "intx_choose_qparams_algorithm": {"_data": "AFFINE", "_type": "IntxChooseQParamsAlgorithm"},
                      "intx_packing_format": {"_data": "UNPACKED_TO_INT8", "_type": "IntxPackingFormat"},
                      "mapping_type": {"_data": "SYMMETRIC" if scheme.symmetric else "ASYMMETRIC", "_type": "MappingType"},
                      "scale_dtype": None,
                      "weight_dtype": {"_data": f"int{scheme.bits}", "_type": "torch.dtype"}},
            "_type": "IntxWeightOnlyConfig", "_version": 2}


def tensor_entry(kind: str, qw: QuantizedWeight, dtype: torch.dtype) -> str:
    """The safetensors metadata JSON of one quantized weight (the keys in torchao's order)."""
    out_f, in_f = qw.codes.shape
    block = [1, in_f // qw.scale.shape[1]]
    model_dtype = _dtype_json(_DTYPE_NAMES.get(dtype, "float32"))
    if kind in ("int8", "int8_dynamic"):
        act = None if kind == "int8" else {
            "_type": "QuantizeTensorToInt8Kwargs",
            "_data": {"granularity": {"_type": "PerRow", "_data": {"dim": -1}},
                      "mapping_type": {"_type": "MappingType", "_data": "SYMMETRIC"}, "reduce_range": False}}
        entry: dict[str, Any] = {"_type": "Int8Tensor",
                                 "_data": {"act_quant_kwargs": act, "reduce_range": False, "block_size": block,
                                           "dtype": model_dtype},
                                 "_tensor_data_names": ["zero_point", "qdata", "scale"]}
    elif kind == "intx":
        entry = {"_type": "IntxUnpackedToInt8Tensor",
                 "_data": {"target_dtype": _dtype_json(f"int{qw.scheme.bits}"), "block_size": block,
                           "dtype": model_dtype, "activation_quantization": None},
                 "_tensor_data_names": ["qdata", "scale", "zero_point"]}
    else:
        entry = {"_type": "Float8Tensor",
                 "_data": {"block_size": block, "mm_config": None, "act_quant_kwargs": None,
                           "kernel_preference": {"_type": "KernelPreference", "_data": "AUTO"}, "dtype": model_dtype},
                 "_tensor_data_names": ["qdata", "scale"]}
    return json.dumps(entry)


def encode_weight(name: str, qw: QuantizedWeight, dtype: torch.dtype) -> tuple[str, dict[str, torch.Tensor]]:
    """``(kind, {part: tensor})`` of one weight (parts ``qdata``, ``scale``, ``zero_point``)."""
    why = Torchao().holds_tensor(name, qw.scheme, tuple(qw.codes.shape))
    if why is not None:
        raise LowbitError(name, why)
    kind = kind_of(qw.scheme)
    assert kind is not None
    if qw.g_idx is not None:
        raise LowbitError(name, "torchao has no act-order (g_idx)")
    scale = qw.scale.detach().cpu()
    if kind == "float8":
        codes = qw.codes.detach().cpu()
        if codes.dtype != torch.float8_e4m3fn:
            raise LowbitError(name, f"float8 codes must be stored as float8_e4m3fn, got {codes.dtype}")
        return kind, {"qdata": codes.contiguous(), "scale": scale.float().reshape(-1, 1).contiguous()}
    if qw.zero is None:
        raise LowbitError(name, "an integer grid needs zero points")
    s = qw.scheme
    mid = 1 << (s.bits - 1)
    codes = qw.codes.detach().cpu().to(torch.int32)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > s.qmax):
        raise LowbitError(name, f"codes outside [0, {s.qmax}] for {s.bits}-bit")
    zero = qw.zero.detach().cpu().float()
    if bool((zero != torch.round(zero)).any()) or float(zero.min()) < 0 or float(zero.max()) > s.qmax:
        raise LowbitError(name, f"torchao zero points are integers in [0, {s.qmax}] (float zero points: use the "
                                "hqq or lowbit format)")
    scale_dtype = torch.float32 if kind != "intx" else dtype
    return kind, {"qdata": (codes - mid).to(torch.int8).contiguous(),
                  "scale": scale.to(scale_dtype).contiguous(),
                  "zero_point": (zero - mid).to(torch.int8).contiguous()}


class Encoder:
    """torchao tensors one module at a time (:meth:`add`), their metadata, then ``quantization_config``."""

    def __init__(self, linears: list[str], dtype: torch.dtype) -> None:
        self.linears = linears
        self.dtype = dtype
        self.kinds: dict[tuple[str, QuantScheme], int] = {}
        self.quantized: set[str] = set()
        self.entries: dict[str, str] = {}  # state-dict name -> its metadata JSON
        self.parts: dict[str, str] = {}  # flattened tensor name -> its state-dict name

    def add(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        module = module_of(name)
        kind, parts = encode_weight(name, qw, self.dtype)
        key = (kind, qw.scheme)
        self.kinds[key] = self.kinds.get(key, 0) + 1
        self.quantized.add(module)
        self.entries[name] = tensor_entry(kind, qw, self.dtype)
        out = {f"{module}._weight_{k}": v for k, v in parts.items()}
        self.parts.update(dict.fromkeys(out, name))
        return out

    def file_metadata(self, names: list[str]) -> dict[str, str]:
        """The safetensors metadata of a shard: every state-dict name written so far and its entry."""
        state = sorted({self.parts.get(n, n) for n in names})
        meta = {n: self.entries.get(n, '{"_type": "Tensor"}') for n in state}
        meta["tensor_names"] = json.dumps(state)
        return meta

    def config(self) -> dict[str, Any]:
        if len({k for k, _ in self.kinds}) > 1 or len(self.kinds) > 1:
            raise LowbitError(None, "torchao checkpoints hold one kind (and bit width, group size) of quantized weight")
        (kind, scheme), = self.kinds
        skipped = sorted(m for m in self.linears if m not in self.quantized)
        return {"include_input_output_embeddings": False, "modules_to_not_convert": skipped or None,
                "quant_method": QUANT_METHOD, "quant_type": {"default": quant_type(kind, scheme)},
                "untie_embedding_weights": False}


def _bits(qconfig: Mapping[str, Any]) -> tuple[str, int]:
    """The config's torchao type name and integer bit width (8 unless an intx ``weight_dtype`` says)."""
    qt = qconfig.get("quant_type")
    cfg = qt.get("default") if isinstance(qt, Mapping) else None
    if not isinstance(cfg, Mapping):
        raise LowbitError("config.json", "torchao quantization_config without quant_type.default")
    name = str(cfg.get("_type", ""))
    bits = 8
    if name == "IntxWeightOnlyConfig":
        wd = str(((cfg.get("_data") or {}).get("weight_dtype") or {}).get("_data", ""))
        if not wd.startswith("int") or not wd[3:].isdigit() or not 1 <= int(wd[3:]) <= 8:
            raise LowbitError("config.json", f"torchao weight_dtype {wd!r} is not supported (int1..int8)")
        bits = int(wd[3:])
    elif name not in ("Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig", "Float8WeightOnlyConfig"):
        raise LowbitError("config.json", f"torchao quant_type {name!r} is not supported (int8 weight-only, int8 "
                                         "dynamic activation + int8 weight, intx weight-only, float8 weight-only)")
    return name, bits


def decode(get: Callable[[str], torch.Tensor], names: list[str],
           config: Mapping[str, Any]) -> tuple[dict[str, QuantizedWeight], set[str]]:
    qconfig = config.get("quantization_config") or {}
    kind, bits = _bits(qconfig)
    present = set(names)
    out: dict[str, QuantizedWeight] = {}
    used: set[str] = set()
    for qname in sorted(n for n in names if n.endswith("._weight_qdata")):
        module = qname[: -len("._weight_qdata")]
        with decoding(module):
            qdata = get(qname)
            scale = get(f"{module}._weight_scale").float()
            if qdata.dim() != 2 or scale.dim() != 2 or scale.shape[0] != qdata.shape[0] or \
                    scale.shape[1] == 0 or qdata.shape[1] % scale.shape[1]:
                raise LowbitError(module, f"qdata {tuple(qdata.shape)} and scale {tuple(scale.shape)} do not fit")
            g = qdata.shape[1] // scale.shape[1]
            group = -1 if scale.shape[1] == 1 else g
            if qdata.dtype == torch.float8_e4m3fn:
                scheme = QuantScheme(8, -1, True, type="float", float_format="e4m3")
                qw = QuantizedWeight(qdata, scale, None, scheme, None)
            else:
                if qdata.dtype != torch.int8:
                    raise LowbitError(qname, f"dtype {qdata.dtype}, expected int8 or float8_e4m3fn")
                zname = f"{module}._weight_zero_point"
                zp = get(zname).to(torch.int32) if zname in present else torch.zeros(scale.shape, dtype=torch.int32)
                if tuple(zp.shape) != tuple(scale.shape):
                    raise LowbitError(zname, f"shape {tuple(zp.shape)}, expected {tuple(scale.shape)}")
                mid = 1 << (bits - 1)
                codes = qdata.to(torch.int32) + mid
                if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > (1 << bits) - 1):
                    raise LowbitError(qname, f"values outside the int{bits} range")
                act = _INT8_TOKEN if kind == "Int8DynamicActivationInt8WeightConfig" else None
                scheme = QuantScheme(bits, group, bool((zp == 0).all()), activations=act)
                qw = QuantizedWeight(codes, scale, (zp + mid).float(), scheme, None)
        out[f"{module}.weight"] = qw
        used.update(n for n in (qname, f"{module}._weight_scale", f"{module}._weight_zero_point") if n in present)
    return out, used


@register
class Torchao(Format):
    """torchao (TorchAoConfig) safetensors as transformers 5.x writes them: int8, int8 dynamic, intx, float8"""

    name = "torchao"
    quant_method = QUANT_METHOD
    rank = 50

    def holds(self, scheme: QuantScheme) -> str | None:
        if kind_of(scheme) is None:
            return ("torchao holds int8 per-channel symmetric weights (W8A16, W8A8 with int8 per-token dynamic "
                    "activations), intx weights in groups or per channel (no activations) and float8 e4m3 per-channel "
                    f"weights, not {scheme.describe()}")
        return None

    def holds_tensor(self, name: str, scheme: QuantScheme, shape: tuple[int, ...] | None = None) -> str | None:
        why = super().holds_tensor(name, scheme, shape)
        if why is None and name.endswith(".weight") and module_of(name) == "lm_head":
            why = "torchao checkpoints here keep lm_head in float"
        return why

    def plan_issue(self, plan: Mapping[str, QuantScheme]) -> str | None:
        kinds = {(kind_of(s), s) for s in plan.values()}
        if len(kinds) > 1:
            return f"one kind of quantized weight per checkpoint; the plan has {', '.join(sorted({s.describe() for _, s in kinds}))}"
        return None

    def encoder(self, config: Mapping[str, Any], linears: list[str], dtype: torch.dtype) -> Encoder:
        return Encoder(linears, dtype)

    def decode(self, get: Callable[[str], torch.Tensor], names: list[str],
               config: Mapping[str, Any]) -> tuple[dict[str, QuantizedWeight], set[str]]:
        return decode(get, names, config)
