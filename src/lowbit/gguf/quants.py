"""GGUF block types in vectorized torch, byte-identical to llama.cpp's quantizers.

Public API::

    quantize(t, qtype, imatrix=None) -> uint8 [rows, bytes_per_row]
    dequantize(data, qtype, shape)   -> float32 tensor of ``shape``
    can_quantize(qtype) -> bool
    block_size(qtype)   -> (elements per block, bytes per block)

``t`` is a 2-D float tensor ``[rows, cols]`` on any device; computation happens in
float32 on that device. ``imatrix`` is the per-column importance (llama.cpp's
``quant_weights``), shape ``[cols]``. Types llama.cpp quantizes differently when given
an importance matrix (Q4_0, Q4_1, Q5_0, Q5_1, the K-quants, IQ4_NL, IQ4_XS) follow
that path when ``imatrix`` is given; the others ignore it, as llama.cpp does.

This module holds the float types and the legacy 32-element types; the others live in
:mod:`~lowbit.gguf.kquants` (Q2_K..Q6_K), :mod:`~lowbit.gguf.iquants` (IQ4_NL, IQ4_XS),
:mod:`~lowbit.gguf.iq3quants` (IQ3_XXS, IQ3_S), :mod:`~lowbit.gguf.iq2quants` (IQ2_XXS,
IQ2_XS, IQ2_S), :mod:`~lowbit.gguf.tquants` (TQ1_0, TQ2_0, Q1_0) and
:mod:`~lowbit.gguf.fp4quants` (MXFP4, NVFP4) and :mod:`~lowbit.gguf.iq1quants` (IQ1_S,
IQ1_M). Every type registers its block class (:mod:`~lowbit.gguf._base`) with a torch
``quantize_rows`` and ``dequantize_blocks``; :func:`dequantize` decodes every type in torch.

Exactness notes (each cost a mismatch before it was handled):

* torch's float32 CPU ``sqrt`` is not always correctly rounded; we take a float64 root.
* ``c / tensor`` in torch is ``reciprocal(tensor) * c`` and CUDA turns ``tensor / c``
  into ``tensor * (1/c)``; every division here is one tensor-by-tensor division.
* llama.cpp's sums are sequential float32 sums; we add element by element too.
* ``make_qkx2/3_quants`` try their candidate scales one after the other and each
  accepted candidate moves the offset the next ones use, so that loop stays sequential.
* C's ``(int8_t)`` cast of an overflowing float (a block of subnormals: ``1/d`` = inf)
  keeps the low byte of INT_MIN, i.e. 0; gguf-py differs from llama.cpp there.
* Zero signs matter where they reach an fp16 field (``-0.0`` block minimum, ``-max/32``).
"""

from __future__ import annotations

import math
from typing import TypeAlias

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import LowbitError
from . import native
from ._base import REGISTRY, BlockType, blocks_of, bytes_rows, element_major, register
from ._blockops import (
    c_int8_cast,
    divs,
    first_abs_max,
    fp16_bytes,
    make_qkx,
    make_qx_quants,
    recip,
    roundf,
    row_sigma_sum,
    seq_max,
    seq_min,
    sqrtf,
    u32_bytes,
)

__all__ = ["quantize", "dequantize", "can_quantize", "block_size", "parse_qtype", "clear_cuda_graphs"]

QType: TypeAlias = GGMLQuantizationType | str | int


# --------------------------------------------------------------------------- float types


@register(GGMLQuantizationType.F32)
class F32(BlockType):
    @classmethod
    def quantize_rows(cls, x, qw):
        return x.float().contiguous().view(torch.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks.contiguous().view(torch.float32)


@register(GGMLQuantizationType.F16)
class F16(BlockType):
    @classmethod
    def quantize_rows(cls, x, qw):
        return x.to(torch.float16).contiguous().view(torch.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks.contiguous().view(torch.float16).float()


@register(GGMLQuantizationType.BF16)
class BF16(BlockType):
    @classmethod
    def quantize_rows(cls, x, qw):
        return x.to(torch.bfloat16).contiguous().view(torch.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks.contiguous().view(torch.bfloat16).float()


# --------------------------------------------------------------------------- legacy helpers


def _pack_nibbles(L: torch.Tensor) -> torch.Tensor:
    """``[N, 32]`` 4-bit codes -> ``[N, 16]`` bytes: element j low nibble, j+16 high nibble."""
    L = L.to(torch.uint8)
    return L[:, :16] | (L[:, 16:] << 4)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_nibbles` -> int32 ``[N, 32]``."""
    q = qs.to(torch.int32)
    return torch.cat([q & 0x0F, q >> 4], dim=1)


def _pack_q5(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """5-bit codes ``[N, 32]`` -> (qh ``[N, 4]`` bit j = bit 4 of code j, qs ``[N, 16]``)."""
    L = L.to(torch.int64)
    hi = (L >> 4) & 1
    qh = (hi << torch.arange(32, device=L.device)).sum(dim=1)
    return u32_bytes(qh), _pack_nibbles(L & 0x0F)


def _unpack_q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    h = qh.to(torch.int64)
    word = h[:, 0] | (h[:, 1] << 8) | (h[:, 2] << 16) | (h[:, 3] << 24)
    bits = (word.unsqueeze(1) >> torch.arange(32, device=qh.device)) & 1
    return _unpack_nibbles(qs) | (bits.to(torch.int32) << 4)


def _row_weights(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """Legacy imatrix weights ``qw * sqrt(sigma2 + x*x)``, sigma2 = mean of x*x over the row. -> ``[R, C]``."""
    sigma2 = divs(row_sigma_sum(x), float(x.shape[1]))
    return qw.unsqueeze(0) * sqrtf(sigma2.unsqueeze(1) + x * x)


def _half(d: torch.Tensor) -> torch.Tensor:
    return fp16_bytes(d)


# --------------------------------------------------------------------------- legacy types


def _symmetric_levels(x: torch.Tensor, qw: torch.Tensor | None, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block scale d and levels in [0, 2*half) of Q4_0 (half=8) and Q5_0 (half=16): x ~ (L - half) * d."""
    if qw is not None:
        w = _row_weights(x, qw)
        d, L = make_qx_quants(element_major(x, 32), half, element_major(w, 32))
        return d, L.t()
    b = blocks_of(x, 32)
    _, mx = first_abs_max(b.t())
    d = divs(mx, -float(half))
    idv = torch.where(d != 0, recip(d), torch.zeros_like(d))
    return d, c_int8_cast(b * idv.unsqueeze(1) + (half + 0.5)).clamp_(max=2 * half - 1) & 0xFF


@register(GGMLQuantizationType.Q4_0)
class Q4_0(BlockType):
    @classmethod
    def quantize_rows(cls, x, qw):
        rows = x.shape[0]
        d, L = _symmetric_levels(x, qw, 8)
        return bytes_rows(torch.cat([_half(d), _pack_nibbles(L)], dim=1), rows)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        return (_unpack_nibbles(blocks[:, 2:]) - 8).float() * d


@register(GGMLQuantizationType.Q4_1)
class Q4_1(BlockType):
    @classmethod
    def quantize_rows(cls, x, qw):
        rows = x.shape[0]
        if qw is not None:
            w = _row_weights(x, qw)
            d, the_min, L = make_qkx(element_major(x, 32), element_major(w, 32), 15, -0.9, 0.05, 36, False)
            m, L = -the_min, L.t()
        else:
            b = blocks_of(x, 32)
            bt = b.t()
            m, mx = seq_min(bt), seq_max(bt)
            d = divs(mx - m, 15.0)
            idv = torch.where(d != 0, recip(d), torch.zeros_like(d))
            L = c_int8_cast((b - m.unsqueeze(1)) * idv.unsqueeze(1) + 0.5).clamp_(max=15) & 0xFF
        return bytes_rows(torch.cat([_half(d), _half(m), _pack_nibbles(L)], dim=1), rows)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        m = blocks[:, 2:4].contiguous().view(torch.float16).float()
        return _unpack_nibbles(blocks[:, 4:]).float() * d + m


@register(GGMLQuantizationType.Q5_0)
class Q5_0(BlockType):
    @classmethod
    def quantize_rows(cls, x, qw):
        rows = x.shape[0]
        d, L = _symmetric_levels(x, qw, 16)
        qh, qs = _pack_q5(L)
        return bytes_rows(torch.cat([_half(d), qh, qs], dim=1), rows)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        return (_unpack_q5(blocks[:, 2:6], blocks[:, 6:]) - 16).float() * d


@register(GGMLQuantizationType.Q5_1)
class Q5_1(BlockType):
    @classmethod
    def quantize_rows(cls, x, qw):
        rows = x.shape[0]
        if qw is not None:
            w = _row_weights(x, qw)
            d, the_min, L = make_qkx(element_major(x, 32), element_major(w, 32), 31, -0.9, 0.05, 36, False)
            m, L = -the_min, L.t()
        else:
            b = blocks_of(x, 32)
            bt = b.t()
            m, mx = seq_min(bt), seq_max(bt)
            d = divs(mx - m, 31.0)
            idv = torch.where(d != 0, recip(d), torch.zeros_like(d))
            # C casts to uint8 without clamping (same low byte as the int8 cast)
            L = c_int8_cast((b - m.unsqueeze(1)) * idv.unsqueeze(1) + 0.5) & 0xFF
        qh, qs = _pack_q5(L)
        return bytes_rows(torch.cat([_half(d), _half(m), qh, qs], dim=1), rows)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        m = blocks[:, 2:4].contiguous().view(torch.float16).float()
        return _unpack_q5(blocks[:, 4:8], blocks[:, 8:]).float() * d + m


@register(GGMLQuantizationType.Q8_0)
class Q8_0(BlockType):
    @classmethod
    def quantize_rows(cls, x, qw):
        rows = x.shape[0]
        b = blocks_of(x, 32)
        amax = b.abs().amax(dim=1)
        d = divs(amax, 127.0)
        idv = torch.where(d != 0, recip(d), torch.zeros_like(d))
        q = roundf(b * idv.unsqueeze(1)).to(torch.int8).view(torch.uint8)
        return bytes_rows(torch.cat([_half(d), q], dim=1), rows)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        return blocks[:, 2:].contiguous().view(torch.int8).float() * d


# K-quants and IQ types register themselves on import.
from . import fp4quants as _fp4quants  # noqa: E402,F401
from . import iq1quants as _iq1quants  # noqa: E402,F401
from . import iq2quants as _iq2quants  # noqa: E402,F401
from . import iq3quants as _iq3quants  # noqa: E402,F401
from . import iquants as _iquants  # noqa: E402,F401
from . import kquants as _kquants  # noqa: E402,F401
from . import tquants as _tquants  # noqa: E402,F401

# --------------------------------------------------------------------------- public API


def parse_qtype(qtype: QType) -> GGMLQuantizationType:
    """Accept a ``GGMLQuantizationType``, its name (``"q4_k"``) or its integer id."""
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    if isinstance(qtype, str):
        try:
            return GGMLQuantizationType[qtype.upper()]
        except KeyError:
            raise LowbitError(None, f"unknown GGUF tensor type {qtype!r}") from None
    try:
        return GGMLQuantizationType(int(qtype))
    except ValueError:
        raise LowbitError(None, f"unknown GGUF tensor type {qtype!r}") from None


def block_size(qtype: QType) -> tuple[int, int]:
    """``(elements per block, bytes per block)`` of a type."""
    return GGML_QUANT_SIZES[parse_qtype(qtype)]


def can_quantize(qtype: QType) -> bool:
    """Whether :func:`quantize` can write this type."""
    cls = REGISTRY.get(parse_qtype(qtype))
    return cls is not None and cls.can_quantize


def _chunk_rows(rows: int, cols: int, device: torch.device, cls: type[BlockType] | None = None) -> int:
    budget = (1 << 25) if device.type == "cuda" else (1 << 21)
    budget = min(budget, getattr(cls, "chunk_elements", budget) * (16 if device.type == "cuda" else 1))
    return max(1, min(rows, budget // max(cols, 1)))


# --------------------------------------------------------------------------- CUDA graphs
#
# The quantizers are long chains of small torch ops (the per-element loops), so on a GPU
# the Python launch overhead, not the arithmetic, sets the pace. For large CUDA tensors
# each row chunk runs as a replayed CUDA graph: captured once per (type, chunk shape,
# importance or not), fed through static buffers. Rows are independent in every type, so a
# short last chunk is zero-padded to the captured shape. Same ops, same bytes.

_GRAPH_MIN_ELEMENTS = 1 << 22
_GRAPH_ROW_QUANTUM = 512
_GRAPH_CACHE_SIZE = 16
_graphs: dict[tuple, tuple] = {}
_graph_failed: set[tuple] = set()
_graph_pool = None


def _graphs_enabled() -> bool:
    import os

    return os.environ.get("LOWBIT_CUDA_GRAPHS", "1") != "0"


def clear_cuda_graphs() -> None:
    """Drop the captured quantizer graphs and their memory."""
    global _graph_pool
    _graphs.clear()
    _graph_pool = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _capture(cls: type[BlockType], rows: int, cols: int, with_qw: bool, device: torch.device) -> tuple:
    global _graph_pool
    if _graph_pool is None:
        _graph_pool = torch.cuda.graph_pool_handle()
    sx = torch.zeros((rows, cols), dtype=torch.float32, device=device)
    sqw = torch.ones((cols,), dtype=torch.float32, device=device) if with_qw else None
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        cls.quantize_rows(sx, sqw)  # warm-up: kernels, cached constants
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=_graph_pool):
        sout = cls.quantize_rows(sx, sqw)
    return graph, sx, sqw, sout


def _run_graphed(cls: type[BlockType], x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor, step: int) -> bool:
    """Quantize ``x`` chunk by chunk through captured graphs; False if capture is not possible."""
    rows, cols = x.shape
    for r0 in range(0, rows, step):
        chunk = x[r0 : r0 + step]
        n = chunk.shape[0]
        padded = min(step, -(-n // _GRAPH_ROW_QUANTUM) * _GRAPH_ROW_QUANTUM)
        key = (cls.qtype, padded, cols, qw is not None, x.device)
        if key in _graph_failed:
            return False
        entry = _graphs.pop(key, None)
        if entry is None:
            try:
                entry = _capture(cls, padded, cols, qw is not None, x.device)
            except Exception:  # capture unsupported here: fall back to eager for this shape
                _graph_failed.add(key)
                return False
            while len(_graphs) >= _GRAPH_CACHE_SIZE:
                _graphs.pop(next(iter(_graphs)))
        _graphs[key] = entry  # most recently used last
        graph, sx, sqw, sout = entry
        sx[:n].copy_(chunk)
        if n < padded:
            sx[n:].zero_()
        if sqw is not None:
            sqw.copy_(qw)
        graph.replay()
        out[r0 : r0 + n].copy_(sout[:n])
    return True


def quantize(t: torch.Tensor, qtype: QType, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize a 2-D float tensor ``[rows, cols]`` to GGUF blocks, llama.cpp byte for byte.

    Returns uint8 ``[rows, cols / block_size * type_size]`` on ``t``'s device.
    Raises :class:`LowbitError` for a row length that is not a multiple of the block
    size, non-finite values, a bad importance matrix, or block scales that overflow fp16.
    """
    qt = parse_qtype(qtype)
    cls = REGISTRY.get(qt)
    if cls is None or not cls.can_quantize:
        raise LowbitError(None, f"quantization to {qt.name} is not supported")
    if t.dim() != 2:
        raise LowbitError(None, f"quantize expects a 2-D tensor [rows, cols], got shape {tuple(t.shape)}")
    rows, cols = t.shape
    if cols % cls.block_size != 0:
        raise LowbitError(None, f"row length {cols} is not a multiple of the {qt.name} block size {cls.block_size}")
    x = t.detach()
    if not (x.dtype == torch.float16 and x.device.type == "cpu"):
        x = x.float()  # float16 on the CPU: the native quantizers widen it row by row
    x = x.contiguous()
    qw = None
    if imatrix is not None and qt not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        qw = imatrix.detach().float().reshape(-1).to(x.device)
        if qw.numel() != cols:
            raise LowbitError(None, f"importance matrix has {qw.numel()} values, expected one per column ({cols})")
        if not bool(torch.isfinite(qw).all()):
            raise LowbitError(None, "importance matrix contains NaN or Inf values")
    row_bytes = cols // cls.block_size * cls.type_size
    # CPU: the native C quantizers when built (same bytes); they also return max |x|
    fast = native.quantize_rows_absmax(int(qt), x, qw, row_bytes) if x.device.type == "cpu" else None
    if fast is not None:
        amax = fast[1]
    else:
        x = x.float()  # the torch path works in float32
        amax = 0.0
        if x.numel():
            lo, hi = (float(v) for v in torch.aminmax(x))  # one pass, no |x| temporary
            amax = max(-lo, hi) if math.isfinite(lo) and math.isfinite(hi) else math.nan
    if not math.isfinite(amax):
        raise LowbitError(None, f"cannot quantize to {qt.name}: the tensor contains NaN or Inf values")
    if fast is not None:
        return _check_scales(fast[0], qt, (rows, cols), amax)
    out = torch.empty((rows, row_bytes), dtype=torch.uint8, device=x.device)
    step = _chunk_rows(rows, cols, x.device, cls)
    if (
        x.is_cuda
        and rows * cols >= _GRAPH_MIN_ELEMENTS
        and cls.qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
        and _graphs_enabled()
        and _run_graphed(cls, x, qw, out, step)
    ):
        return _check_scales(out, qt, (rows, cols), amax)
    for r0 in range(0, rows, step):
        out[r0 : r0 + step] = cls.quantize_rows(x[r0 : r0 + step], qw)
    return _check_scales(out, qt, (rows, cols), amax)


_SCALE_CHECK_ABOVE = 2048.0


def _check_scales(out: torch.Tensor, qt: GGMLQuantizationType, shape: tuple[int, int], amax: float) -> torch.Tensor:
    """Refuse results whose fp16 fields overflowed (llama.cpp's row validation rejects them too).

    Only tensors with large values can overflow a block scale, so only they are decoded to check.
    """
    if amax > _SCALE_CHECK_ABOVE and qt not in (GGMLQuantizationType.F32, GGMLQuantizationType.BF16):
        if not bool(torch.isfinite(dequantize(out, qt, shape)).all()):
            raise LowbitError(None, f"cannot quantize to {qt.name}: values up to {amax:g} overflow the fp16 block scales")
    return out


def dequantize(data: torch.Tensor, qtype: QType, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode GGUF bytes (any shape of uint8 holding whole rows) to float32 of ``shape``."""
    qt = parse_qtype(qtype)
    bs, ts = GGML_QUANT_SIZES[qt]
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape)) if shape else 1
    if shape and shape[-1] % bs != 0:
        raise LowbitError(None, f"row length {shape[-1]} is not a multiple of the {qt.name} block size {bs}")
    raw = data.detach().contiguous().reshape(-1)
    if raw.dtype != torch.uint8:
        raw = raw.view(torch.uint8)
    if raw.numel() != n // bs * ts:
        raise LowbitError(None, f"{raw.numel()} bytes do not hold {qt.name} data of shape {shape}")
    cls = REGISTRY.get(qt)
    if cls is None:
        raise LowbitError(None, f"dequantization of {qt.name} is not supported")
    return cls.dequantize_blocks(raw.reshape(-1, ts)).reshape(shape)
