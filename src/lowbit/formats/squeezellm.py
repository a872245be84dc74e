"""SqueezeLLM checkpoints: per-row lookup tables, codes packed as SqueezeLLM's ``pack.py`` packs them.

Layout of one quantized linear ``<m>`` (weight ``[out, in]``, ``b`` = 3 or 4 bits):

* ``<m>.qweight`` int32 ``[in * b / 32, out]``: column ``o`` holds the codes of output row ``o``
  as one little-endian bit stream along the input dimension (4 bits: code ``j`` at bits
  ``4 (j % 8)`` of word ``j // 8``; 3 bits: 32 codes in 3 words, the 11th and 22nd crossing the
  word boundaries), as SqueezeLLM's ``QuantLinearLUT.pack2`` writes;
* ``<m>.lookup_table`` float32 ``[out, 2**b]``: the row's centroids, ``w[o, j] =
  lookup_table[o, code[o, j]]``;
* dense-and-sparse only: ``<m>.rows`` int32 ``[out + 1]``, ``<m>.cols`` int32 ``[nnz]``,
  ``<m>.vals`` float32 ``[nnz]``, the CSR matrix added to the dense weight (the outliers minus the
  dense value at their place, the row's centroid nearest 0), and ``sparse_threshold.<m>`` int32
  ``[]`` = ``nnz`` (SqueezeLLM keeps that count in its state dict as a Python int).

``quant_config.json`` is ``{"wbits": b}`` (what SqueezeLLM's ``pack.py`` writes and vLLM read)
and ``config.json`` gains ``quantization_config = {quant_method: squeezellm, wbits: b}`` (vLLM
took either). Weights are stored in safetensors, not SqueezeLLM's pickled ``.pt``.

Who reads it: lowbit (``lowbit eval`` / ``generate`` through :mod:`lowbit.runtime`, the ``lut``
kernel). vLLM read the dense 4-bit layout until it removed SqueezeLLM in 2024 (v0.6); its loader
took float16 lookup tables and no sparse part. SqueezeLLM's own CUDA kernels read 3 and 4 bits,
dense or dense-and-sparse. Rules: 3 or 4 bits, ``in`` a multiple of 32, one bit width per
checkpoint (``wbits``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.lut import pack_qweight, unpack_qweight
from ..core.quantized import QuantizedWeight
from ..core.scheme import QuantScheme
from ..errors import LowbitError
from ._common import decoding, module_of, write_json
from .base import Format, register

QUANT_METHOD = "squeezellm"
QUANT_CONFIG = "quant_config.json"
BITS = (3, 4)
SPARSE = ("rows", "cols", "vals")


def lut_scheme(bits: int) -> QuantScheme:
    return QuantScheme(bits, -1, True, type="codebook", codebook="learned", strategy="channel")


def encode_weight(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``qweight``, ``lookup_table`` (and the CSR part) of one module, local names."""
    why = SqueezeLLMFormat().holds_tensor(name, qw.scheme, tuple(qw.codes.shape))
    if why is not None:
        raise LowbitError(name, why)
    out_f = qw.codes.shape[0]
    book = qw.codebook
    if book is None or tuple(book.shape) != (out_f, 1 << qw.scheme.bits):
        raise LowbitError(name, f"needs a lookup table [{out_f}, {1 << qw.scheme.bits}]")
    if not torch.all(qw.scale == 1):
        raise LowbitError(name, "SqueezeLLM stores the lookup table only: the weight must have unit scales")
    codes = qw.codes.detach().cpu()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > qw.scheme.qmax):
        raise LowbitError(name, f"codes outside [0, {qw.scheme.qmax}]")
    t = {"qweight": pack_qweight(codes, qw.scheme.bits), "lookup_table": book.detach().cpu().float().contiguous()}
    if "sparse_vals" in qw.extra:
        t.update({k: qw.extra[f"sparse_{k}"].detach().cpu().contiguous() for k in SPARSE})
    return t


class Encoder:
    def __init__(self) -> None:
        self.bits: set[int] = set()

    def add(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        module = module_of(name)
        t = {f"{module}.{k}": v for k, v in encode_weight(name, qw).items()}
        if f"{module}.vals" in t:
            t[f"sparse_threshold.{module}"] = torch.tensor(t[f"{module}.vals"].numel(), dtype=torch.int32)
        self.bits.add(qw.scheme.bits)
        return t

    def config(self) -> dict[str, Any]:
        if len(self.bits) != 1:
            raise LowbitError(None, f"a SqueezeLLM checkpoint has one bit width (wbits); got {sorted(self.bits)}")
        return {"quant_method": QUANT_METHOD, "wbits": next(iter(self.bits))}


def _bits(config: Mapping[str, Any]) -> int:
    q = config.get("quantization_config") or {}
    try:
        bits = int(q.get("wbits"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise LowbitError("config.json", f"squeezellm quantization_config needs an integer wbits, got {q.get('wbits')!r}") from None
    if bits not in BITS:
        raise LowbitError("config.json", f"squeezellm wbits {bits} is not supported (3 or 4)")
    return bits


def decode(get: Callable[[str], torch.Tensor], names: list[str],
           config: Mapping[str, Any]) -> tuple[dict[str, QuantizedWeight], set[str]]:
    bits = _bits(config)
    out: dict[str, QuantizedWeight] = {}
    used: set[str] = set()
    present = set(names)
    for qname in sorted(n for n in names if n.endswith(".qweight")):
        module = qname[: -len(".qweight")]
        with decoding(module):
            qweight = get(qname)
            if qweight.dtype != torch.int32 or qweight.dim() != 2 or (qweight.shape[0] * 32) % bits:
                raise LowbitError(qname, f"expected int32 [in * {bits} / 32, out], got {qweight.dtype} {tuple(qweight.shape)}")
            codes = unpack_qweight(qweight, bits)
            out_f, in_f = codes.shape
            lut = get(f"{module}.lookup_table")
            if tuple(lut.shape) != (out_f, 1 << bits):
                raise LowbitError(f"{module}.lookup_table", f"shape {tuple(lut.shape)}, expected {(out_f, 1 << bits)}")
            if not torch.isfinite(lut).all():
                raise LowbitError(f"{module}.lookup_table", "non-finite (NaN/Inf) values")
            extra: dict[str, torch.Tensor] = {}
            if f"{module}.vals" in present:
                extra = _sparse(get, module, out_f, in_f)
                used.update(f"{module}.{k}" for k in SPARSE)
                used.add(f"sparse_threshold.{module}")
            qw = QuantizedWeight(codes, torch.ones(out_f, 1), None, lut_scheme(bits), codebook=lut.float(), extra=extra)
        out[f"{module}.weight"] = qw
        used.update({qname, f"{module}.lookup_table"})
    return out, used


def _sparse(get: Callable[[str], torch.Tensor], module: str, out_f: int, in_f: int) -> dict[str, torch.Tensor]:
    rows, cols, vals = (get(f"{module}.{k}") for k in SPARSE)
    if rows.shape != (out_f + 1,) or cols.dim() != 1 or vals.shape != cols.shape:
        raise LowbitError(module, f"sparse part: rows {tuple(rows.shape)}, cols {tuple(cols.shape)}, vals "
                          f"{tuple(vals.shape)} do not make a CSR matrix of {out_f} rows")
    r = rows.long()
    if int(r[0]) != 0 or int(r[-1]) != cols.numel() or bool((r[1:] < r[:-1]).any()):
        raise LowbitError(f"{module}.rows", "row pointers must start at 0, never decrease and end at the value count")
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= in_f):
        raise LowbitError(f"{module}.cols", f"column indices outside [0, {in_f})")
    if not torch.isfinite(vals).all():
        raise LowbitError(f"{module}.vals", "non-finite (NaN/Inf) values")
    return {"sparse_rows": rows.to(torch.int32), "sparse_cols": cols.to(torch.int32), "sparse_vals": vals.float()}


@register
class SqueezeLLMFormat(Format):
    """SqueezeLLM's layout (qweight + per-row lookup_table, optional CSR outliers; 3/4 bits): lowbit's runtime"""

    name = "squeezellm"
    quant_method = QUANT_METHOD
    rank = 60

    def holds(self, scheme: QuantScheme) -> str | None:
        if scheme.type != "codebook" or scheme.codebook != "learned" or scheme.granularity != "channel":
            return f"squeezellm holds per-row learned lookup tables (--scheme LUT4/LUT3), not {scheme.describe()}"
        if scheme.bits not in BITS:
            return f"squeezellm packs 3 or 4 bits, not {scheme.bits}"
        return None

    def holds_tensor(self, name: str, scheme: QuantScheme, shape: tuple[int, ...] | None = None) -> str | None:
        why = super().holds_tensor(name, scheme, shape)
        if why is None and shape is not None and len(shape) == 2 and shape[1] % 32:
            why = f"SqueezeLLM packs 32 input columns at a time: in={shape[1]} is not a multiple of 32"
        return why

    def plan_issue(self, plan: Mapping[str, QuantScheme]) -> str | None:
        bits = sorted({s.bits for s in plan.values()})
        return f"one bit width per checkpoint (wbits); the plan has {bits}" if len(bits) > 1 else None

    def encoder(self, config: Mapping[str, Any], linears: list[str], dtype: torch.dtype) -> Encoder:
        return Encoder()

    def side_files(self, folder: Path, qconfig: Mapping[str, Any]) -> None:
        write_json(folder / QUANT_CONFIG, {"wbits": qconfig["wbits"]})

    def decode(self, get: Callable[[str], torch.Tensor], names: list[str],
               config: Mapping[str, Any]) -> tuple[dict[str, QuantizedWeight], set[str]]:
        return decode(get, names, config)
