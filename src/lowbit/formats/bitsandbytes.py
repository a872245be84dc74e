"""bitsandbytes checkpoints as transformers' ``save_pretrained`` writes them (4-bit NF4/FP4, LLM.int8).

Layout of one quantized linear ``<m>``, 4-bit (``n = out * in`` values, ``B`` flat blocks):

* ``<m>.weight`` uint8 ``[ceil(n / 2), 1]``: the codes of the row-major weight, two per byte,
  the even element in the high nibble;
* ``<m>.weight.absmax`` float32 ``[B]``, or with double quantization uint8 ``[B]`` (8-bit codes)
  plus ``<m>.weight.nested_absmax`` float32 ``[ceil(B / 256)]`` and ``<m>.weight.nested_quant_map``
  float32 ``[256]`` (the dynamic map);
* ``<m>.weight.quant_map`` float32 ``[16]`` (the codebook);
* ``<m>.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``) uint8: the UTF-8 bytes of the JSON
  ``{"quant_type", "blocksize", "dtype", "shape"[, "nested_blocksize", "nested_dtype", "nested_offset"]}``.

8-bit (LLM.int8): ``<m>.weight`` int8 ``[out, in]``, ``<m>.SCB`` float32 ``[out]`` (row absmax),
``<m>.weight_format`` uint8 ``[]`` = 0 (row-major).

``config.json`` gains transformers' ``BitsAndBytesConfig`` dict (``quant_method: bitsandbytes``,
``load_in_4bit`` / ``load_in_8bit``, ``bnb_4bit_quant_type``, ``bnb_4bit_use_double_quant``...;
``bnb_4bit_compute_dtype`` is the model's dtype). ``llm_int8_skip_modules`` lists the linear layers
kept in float (plus vLLM's fused names when every part is float), or is ``null`` when that is only
``lm_head`` (transformers then skips the output layer by itself). One quant type, block size and
double-quantization setting per checkpoint (bitsandbytes' config has one of each); 4-bit and 8-bit
do not mix. transformers + bitsandbytes load it (CPU included); vLLM's pre-quantized bitsandbytes
loader reads these names (no tensor parallelism for pre-quantized checkpoints, as vLLM says).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..core import codebook as cb
from ..core.quantized import QuantizedWeight
from ..core.scheme import QuantScheme
from ..errors import LowbitError
from ._common import decoding, fused_aliases, module_of
from .base import Format, register

QS_PREFIX = "quant_state.bitsandbytes__"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def _setting(scheme: QuantScheme) -> tuple[Any, ...]:
    """What must agree across a checkpoint: (4 or 8 bits, quant type, block size, double quantization)."""
    if scheme.type == "int":
        return (8, None, None, False)
    return (4, scheme.codebook, scheme.group_size, scheme.scale_format == "nested8")


def quant_state_json(qt: str, blocksize: int, dtype: torch.dtype, shape: tuple[int, ...],
                     nested_offset: float | None = None) -> bytes:
    """bitsandbytes' packed quant state: its JSON, keys in its order, ``json.dumps``' default separators."""
    state: dict[str, Any] = {"quant_type": qt, "blocksize": blocksize, "dtype": _DTYPE_NAMES.get(dtype, "float32"),
                             "shape": list(shape)}
    if nested_offset is not None:
        state.update({"nested_blocksize": cb.NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": nested_offset})
    return json.dumps(state).encode()


def encode_4bit(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of one 4-bit weight, named relative to ``<m>.weight`` (``""`` is the weight itself)."""
    s = qw.scheme
    assert s.codebook is not None
    n = qw.codes.numel()
    out = {"": cb.pack_nibbles(qw.codes, s.codebook)}
    offset = None
    if s.scale_format == "nested8":
        if "absmax_codes" in qw.extra:
            q, nested, off = qw.extra["absmax_codes"], qw.extra["nested_absmax"], qw.extra["nested_offset"]
        else:  # scales from elsewhere: double quantized here
            q, nested, off = cb.double_quantize(qw.scale)
        out[".absmax"] = q.to(torch.uint8).reshape(-1)
        out[".nested_absmax"] = nested.float().reshape(-1)
        out[".nested_quant_map"] = cb.dynamic_map()
        offset = float(off.float().reshape(-1)[0])
    else:
        out[".absmax"] = qw.scale.float().reshape(-1)
    if out[".absmax"].numel() != cb.n_blocks(n, s.group_size):
        raise LowbitError(None, f"{out['.absmax'].numel()} absmax values for {cb.n_blocks(n, s.group_size)} blocks")
    out[".quant_map"] = cb.codebook_values(s.codebook)
    state = quant_state_json(s.codebook, s.group_size, dtype, tuple(qw.codes.shape), offset)
    out[f".{QS_PREFIX}{s.codebook}"] = torch.tensor(list(state), dtype=torch.uint8)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def encode_8bit(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``weight`` (int8), ``SCB`` and ``weight_format`` of one LLM.int8 weight, named relative to ``<m>``."""
    assert qw.zero is not None
    if not bool((qw.zero == 128).all()):
        raise LowbitError(None, "bitsandbytes int8 rows are symmetric: zero points must be 128")
    codes = qw.codes.to(torch.int32) - 128
    if codes.numel() and (int(codes.min()) < -128 or int(codes.max()) > 127):
        raise LowbitError(None, "int8 codes outside [-128, 127]")
    scb = qw.extra.get("SCB")
    if scb is None:  # another method's per-row grid: bitsandbytes' scale is SCB / 127
        scb = qw.scale.float().reshape(-1) * 127.0
    return {"weight": codes.to(torch.int8).contiguous(), "SCB": scb.float().reshape(-1).contiguous(),
            "weight_format": torch.tensor(0, dtype=torch.uint8)}


class Encoder:
    """bitsandbytes tensors one module at a time (:meth:`add`), then ``quantization_config`` (:meth:`config`)."""

    def __init__(self, linears: list[str], dtype: torch.dtype) -> None:
        self.linears = linears
        self.dtype = dtype
        self.settings: set[tuple[Any, ...]] = set()
        self.quantized: set[str] = set()

    def add(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        why = BitsAndBytes().holds(qw.scheme)
        if why is not None:
            raise LowbitError(name, why)
        self.settings.add(_setting(qw.scheme))
        if len(self.settings) > 1:
            raise LowbitError(name, f"bitsandbytes has one setting per checkpoint; got {_describe(self.settings)}")
        module = module_of(name)
        self.quantized.add(module)
        with decoding(name):
            if qw.scheme.type == "int":
                return {f"{module}.{k}": v for k, v in encode_8bit(qw).items()}
            return {f"{name}{k}": v for k, v in encode_4bit(qw, self.dtype).items()}

    def config(self) -> dict[str, Any]:
        if len(self.settings) != 1:
            raise LowbitError(None, "nothing quantized for the bitsandbytes format")
        bits, qt, _, dq = next(iter(self.settings))
        floats = {m for m in self.linears if m not in self.quantized}
        skip = sorted(floats | set(fused_aliases(floats, self.linears)))
        return {
            "_load_in_4bit": bits == 4,
            "_load_in_8bit": bits == 8,
            "bnb_4bit_compute_dtype": _DTYPE_NAMES.get(self.dtype, "float32"),
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": qt or "fp4",
            "bnb_4bit_use_double_quant": dq,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None if skip == ["lm_head"] else skip,
            "llm_int8_threshold": 6.0,
            "load_in_4bit": bits == 4,
            "load_in_8bit": bits == 8,
            "quant_method": "bitsandbytes",
        }


def _describe(settings: set[tuple[Any, ...]]) -> str:
    return ", ".join(sorted("int8" if b == 8 else f"{qt} blocksize {bs}{' double-quantized' if dq else ''}"
                            for b, qt, bs, dq in settings))


# ------------------------------------------------------------------------------------ reading


def parse_quant_state(where: str, raw: torch.Tensor, qt: str) -> dict[str, Any]:
    """The quant state JSON of ``where`` (a uint8 tensor), checked; one-line errors naming the tensor."""
    try:
        state = json.loads(bytes(raw.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LowbitError(where, f"quant_state is not valid JSON ({exc})") from None
    if not isinstance(state, dict):
        raise LowbitError(where, "quant_state must be a JSON object")
    missing = [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in state]
    if missing:
        raise LowbitError(where, f"quant_state lacks {', '.join(missing)}")
    if state["quant_type"] != qt:
        raise LowbitError(where, f"quant_state says quant_type {state['quant_type']!r} in a tensor named for {qt!r}")
    if state["quant_type"] not in cb.CODEBOOKS:
        raise LowbitError(where, f"unknown quant type {state['quant_type']!r} (choose from {', '.join(cb.CODEBOOKS)})")
    if not isinstance(state["blocksize"], int) or state["blocksize"] not in cb.BLOCKSIZES:
        raise LowbitError(where, f"blocksize {state['blocksize']!r} is not a power of two from 32 to 4096")
    shape = state["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise LowbitError(where, f"shape {shape!r} is not a 2-D [out, in] list of positive integers")
    if state["dtype"] not in _NAME_DTYPES:
        raise LowbitError(where, f"dtype {state['dtype']!r} is not float32, float16 or bfloat16")
    if "nested_offset" in state:
        if not isinstance(state.get("nested_offset"), (int, float)) or not isinstance(state.get("nested_blocksize"), int) \
                or state["nested_blocksize"] <= 0:
            raise LowbitError(where, "nested_offset must be a number and nested_blocksize a positive integer")
    return state


def _decode_4bit(get: Callable[[str], torch.Tensor], wname: str, qsname: str, qt: str,
                 names: set[str]) -> tuple[QuantizedWeight, set[str]]:
    state = parse_quant_state(qsname, get(qsname), qt)
    out_f, in_f = state["shape"]
    bs = state["blocksize"]
    n = out_f * in_f
    nb = cb.n_blocks(n, bs)
    packed = get(wname)
    if packed.dtype != torch.uint8 or packed.numel() != -(-n // 2):
        raise LowbitError(wname, f"{packed.dtype} {tuple(packed.shape)}, expected uint8 holding {-(-n // 2)} bytes "
                          f"for shape {state['shape']}")
    used = {wname, qsname, f"{wname}.absmax", f"{wname}.quant_map"}
    qmap = get(f"{wname}.quant_map")
    if qmap.numel() != 16:
        raise LowbitError(f"{wname}.quant_map", f"{qmap.numel()} values, expected 16")
    absmax = get(f"{wname}.absmax")
    if absmax.numel() != nb:
        raise LowbitError(f"{wname}.absmax", f"{absmax.numel()} values, expected {nb} blocks of {bs}")
    nested = "nested_offset" in state
    if nested != (f"{wname}.nested_absmax" in names):
        raise LowbitError(qsname, "nested_offset and the nested_absmax tensor must come together")
    extra: dict[str, torch.Tensor] = {}
    if nested:
        nested_absmax = get(f"{wname}.nested_absmax").float().reshape(-1)
        nmap = get(f"{wname}.nested_quant_map").float().reshape(-1)
        used |= {f"{wname}.nested_absmax", f"{wname}.nested_quant_map"}
        nbs = state["nested_blocksize"]
        if absmax.dtype != torch.uint8 or nmap.numel() != 256 or nested_absmax.numel() != cb.n_blocks(nb, nbs):
            raise LowbitError(f"{wname}.nested_absmax", "double quantization needs uint8 absmax codes, a 256-value "
                              f"nested_quant_map and {cb.n_blocks(nb, nbs)} nested absmax values")
        offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
        scale = cb.double_dequantize(absmax, nested_absmax, offset, nmap, nbs)
        extra = {"absmax_codes": absmax.to(torch.uint8), "nested_absmax": nested_absmax,
                 "nested_offset": offset.reshape(1)}
    else:
        if not absmax.is_floating_point():
            raise LowbitError(f"{wname}.absmax", f"{absmax.dtype} absmax without double quantization")
        scale = absmax.float().reshape(-1)
    if not bool(torch.isfinite(scale).all()):
        raise LowbitError(f"{wname}.absmax", "absmax values are NaN or infinite")
    scheme = QuantScheme(4, bs, True, type="codebook", codebook=qt, strategy="flat",
                         scale_format="nested8" if nested else None)
    codes = cb.unpack_nibbles(packed, n).reshape(out_f, in_f)
    return QuantizedWeight(codes, scale, None, scheme, codebook=cb.codebook_values(qt), extra=extra), used


def _decode_8bit(get: Callable[[str], torch.Tensor], module: str, names: set[str]) -> tuple[QuantizedWeight, set[str]]:
    wname, sname, fname = f"{module}.weight", f"{module}.SCB", f"{module}.weight_format"
    weight = get(wname)
    scb = get(sname).float().reshape(-1)
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise LowbitError(wname, f"{weight.dtype} {tuple(weight.shape)}, expected int8 [out, in]")
    if scb.numel() != weight.shape[0]:
        raise LowbitError(sname, f"{scb.numel()} values for {weight.shape[0]} rows")
    if not bool(torch.isfinite(scb).all()):
        raise LowbitError(sname, "SCB values are NaN or infinite")
    used = {wname, sname}
    if fname in names:
        fmt = get(fname)
        if fmt.numel() != 1 or int(fmt.reshape(-1)[0]) != 0:
            raise LowbitError(fname, "only the row-major weight format (0) is supported")
        used.add(fname)
    scale = cb.int8_scale(scb).unsqueeze(1)
    qw = QuantizedWeight(weight.to(torch.int32) + 128, scale, torch.full_like(scale, 128.0), QuantScheme(8, -1, True),
                         extra={"SCB": scb})
    return qw, used


def decode(get: Callable[[str], torch.Tensor], names: list[str],
           config: Mapping[str, Any]) -> tuple[dict[str, QuantizedWeight], set[str]]:
    """Quantized weights keyed ``<module>.weight``, and the tensor names they consumed."""
    present = set(names)
    out: dict[str, QuantizedWeight] = {}
    used: set[str] = set()
    for name in sorted(present):
        marker = f".weight.{QS_PREFIX}"
        if marker in name:
            wname, _, qt = name.partition(f".{QS_PREFIX}")
            with decoding(wname):
                qw, u = _decode_4bit(get, wname, name, qt, present)
            out[wname], used = qw, used | u
        elif name.endswith(".SCB"):
            module = name[: -len(".SCB")]
            with decoding(module):
                qw, u = _decode_8bit(get, module, present)
            out[f"{module}.weight"], used = qw, used | u
    return out, used


@register
class BitsAndBytes(Format):
    """bitsandbytes 4-bit (NF4/FP4, double quant) and LLM.int8 as transformers saves them (transformers, vLLM)"""

    name = "bitsandbytes"
    quant_method = "bitsandbytes"
    rank = 40

    def holds(self, scheme: QuantScheme) -> str | None:
        return cb.scheme_issue(scheme)

    def plan_issue(self, plan: Mapping[str, QuantScheme]) -> str | None:
        settings = {_setting(s) for s in plan.values()}
        if len(settings) > 1:
            return f"one quant type, block size and double-quantization setting per checkpoint; got {_describe(settings)}"
        return None

    def encoder(self, config: Mapping[str, Any], linears: list[str], dtype: torch.dtype) -> Encoder:
        return Encoder(linears, dtype)

    def decode(
        self, get: Callable[[str], torch.Tensor], names: list[str], config: Mapping[str, Any]
    ) -> tuple[dict[str, QuantizedWeight], set[str]]:
        return decode(get, names, config)
