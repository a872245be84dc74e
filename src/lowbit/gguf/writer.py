"""Low-level GGUF output: block encoding of one tensor, and streaming a planned file to disk.

``quantize_array``/``dequantize_bytes`` are the numpy face of :mod:`lowbit.gguf.quants`
(byte-identical to llama.cpp, every type): the single place where the file-level code calls a
block quantizer. :func:`write_gguf` writes a GGUF (version 3) file one tensor at a time.

Torch is imported only when a tensor needs it: on the CPU, the types of :mod:`lowbit.gguf.native`
are encoded from numpy straight by the C code (:func:`native_can_quantize`), so that the
torch-free path of :mod:`lowbit.gguf.fastpath` can write a whole file with this module.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from ..errors import LowbitError
from . import native


def row_bytes(qtype: T, ncols: int) -> int:
    """Bytes of one row of ``ncols`` values of ``qtype``."""
    blk, size = GGML_QUANT_SIZES[qtype]
    if ncols % blk:
        raise LowbitError(None, f"row length {ncols} is not a multiple of the {qtype.name} block size {blk}")
    return ncols // blk * size


def can_quantize(qtype: T) -> bool:
    """Whether this build can encode ``qtype``."""
    from . import quants as _lq

    return qtype in (T.F32, T.F16, T.BF16) or _lq.can_quantize(qtype)


def native_can_quantize(qtype: T) -> bool:
    """Whether ``qtype`` is written without torch on the CPU (F32/F16, or a type of the C code)."""
    return qtype in (T.F32, T.F16) or native.supports(int(qtype))


_SCALE_CHECK_ABOVE = 2048.0  # as lowbit.gguf.quants: only larger values can overflow an fp16 block scale


def _native_rows(x2: np.ndarray, qtype: T, imatrix: np.ndarray | None) -> np.ndarray | None:
    """The C encoding of ``[R, C]`` rows with :func:`lowbit.gguf.quants.quantize`'s checks and errors;
    None where the torch path must run (no C code, or values large enough to need the fp16 scale check)."""
    if not native.supports(int(qtype)):
        return None
    cols = x2.shape[1]
    blk = GGML_QUANT_SIZES[qtype][0]
    if cols % blk:
        raise LowbitError(None, f"row length {cols} is not a multiple of the {qtype.name} block size {blk}")
    qw = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if qw.size != cols:
            raise LowbitError(None, f"importance matrix has {qw.size} values, expected one per column ({cols})")
        if not np.isfinite(qw).all():
            raise LowbitError(None, "importance matrix contains NaN or Inf values")
    res = native.quantize_array_absmax(int(qtype), x2, qw, row_bytes(qtype, cols))
    if res is None:
        return None
    out, amax = res
    if not np.isfinite(amax):
        raise LowbitError(None, f"cannot quantize to {qtype.name}: the tensor contains NaN or Inf values")
    return out if amax <= _SCALE_CHECK_ABOVE else None


def quantize_array(x: np.ndarray, qtype: T, imatrix: np.ndarray | None = None, device: str | None = None) -> np.ndarray:
    """Encode a float array (last axis = row) into ``qtype``; returns the raw data.

    ``device`` (``"cuda"``, ...): where the block search runs (default: the CPU); the bytes
    are the same on every device.

    ``x``: float32, or float16 (exact values; not widened up front).
    F32/F16 come back as float32/float16 arrays of the same shape; BF16 and the block types
    as uint8 ``[..., bytes_per_row]``.  For 3-D expert tensors
    ``imatrix`` may hold one vector per expert (``[n_expert * cols]``).
    """
    if qtype == T.F16 and x.dtype == np.float16:
        return np.ascontiguousarray(x)
    # float16 input stays float16 for the block types: the quantizers widen it row by row
    x = np.ascontiguousarray(x, dtype=np.float16 if x.dtype == np.float16 and qtype not in (T.F32, T.BF16)
                             else np.float32)
    if qtype == T.F32:
        return x
    if qtype == T.F16:
        return x.astype(np.float16)
    cols = x.shape[-1]
    lead = x.shape[:-1]
    if x.ndim == 3 and imatrix is not None and imatrix.size == x.shape[0] * cols:
        parts = [quantize_array(x[e], qtype, imatrix[e * cols:(e + 1) * cols], device) for e in range(x.shape[0])]
        return np.stack(parts)
    x2 = x.reshape(-1, cols)
    if device is None or device == "cpu":
        fast = _native_rows(x2, qtype, imatrix)
        if fast is not None:
            return fast.reshape(*lead, row_bytes(qtype, cols))
    import torch

    from . import quants as _lq

    im = None if imatrix is None else torch.from_numpy(np.ascontiguousarray(imatrix, dtype=np.float32))
    if x2.flags.writeable:
        tx = torch.from_numpy(x2)
    else:  # a read-only file mapping: only ever read, so torch's not-writable warning does not apply
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tx = torch.from_numpy(x2)
    if device is not None and device != "cpu":
        tx = tx.to(device)
    out = _lq.quantize(tx, qtype, im).cpu().numpy()
    return np.ascontiguousarray(out, dtype=np.uint8).reshape(*lead, row_bytes(qtype, cols))


def dequantize_bytes(data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> np.ndarray:
    """Decode raw tensor data of ``qtype`` into float32 of ``shape`` (PyTorch order)."""
    if qtype == T.F32:
        return np.asarray(data).view(np.float32).reshape(shape)
    if qtype == T.F16:
        return np.asarray(data).view(np.float16).astype(np.float32).reshape(shape)
    if qtype == T.BF16:
        return (np.asarray(data).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    import torch

    from . import quants as _lq

    t = torch.from_numpy(np.ascontiguousarray(np.asarray(data).view(np.uint8)))
    return np.asarray(_lq.dequantize(t, qtype, shape), dtype=np.float32).reshape(shape)


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # PyTorch order
    qtype: T

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape[:-1]:
            n *= d
        return n * row_bytes(self.qtype, self.shape[-1])


@dataclass
class KV:
    key: str
    vtype: GGUFValueType
    value: Any
    sub_type: GGUFValueType | None = None


def write_gguf(
    path: Path,
    arch: str,
    kvs: Iterable[KV],
    tensors: list[PlannedTensor],
    produce: Callable[[PlannedTensor], np.ndarray],
    progress: Callable[[Iterable[PlannedTensor]], Iterable[PlannedTensor]] | None = None,
) -> None:
    """Write a GGUF file (version 3) at ``path`` (caller makes it atomic).  ``produce(t)`` returns
    the encoded data of ``t`` (uint8 rows or float arrays); tensors are streamed one at a time.

    Layout: header, ``general.architecture`` then ``kvs`` in order, tensor infos, data
    section aligned to 32 bytes with every tensor padded to 32 (the default alignment)."""
    head = []
    seen: set[str] = set()
    for kv in [KV("general.architecture", V.STRING, arch)] + [kv for kv in kvs if kv.key != "general.architecture"]:
        if kv.key in seen:
            raise LowbitError(path, f"internal error: duplicated metadata key {kv.key!r}")
        seen.add(kv.key)
        head.append(_string(kv.key) + _U32.pack(int(kv.vtype)) + _value_bytes(kv.vtype, kv.value, kv.sub_type, kv.key))
    offset = 0
    for t in tensors:
        ne = tuple(reversed(t.shape))
        head.append(_string(t.name) + _U32.pack(len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
                    + _U32.pack(int(t.qtype)) + _U64.pack(offset))
        offset += _padded(t.nbytes)
    with open(path, "wb") as f:
        f.write(b"GGUF" + _U32.pack(3) + _U64.pack(len(tensors)) + _U64.pack(len(seen)))
        for part in head:
            f.write(part)
        f.write(bytes(_padded(f.tell()) - f.tell()))
        it = progress(tensors) if progress else tensors
        for t in it:
            data = np.ascontiguousarray(produce(t))
            if data.nbytes != t.nbytes:
                raise LowbitError(path, f"internal error: tensor {t.name} has {data.nbytes} bytes, expected {t.nbytes}")
            data.reshape(-1).view(np.uint8).tofile(f)
            f.write(bytes(_padded(t.nbytes) - t.nbytes))


_ALIGN = 32
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_FMT = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i", V.FLOAT32: "f",
        V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _string(s: str | bytes) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8")
    return _U64.pack(len(b)) + b


def _infer_type(v: Any, key: str) -> V:
    if isinstance(v, str):
        return V.STRING
    if isinstance(v, (bool, np.bool_)):
        return V.BOOL
    if isinstance(v, (int, np.integer)):
        return V.INT32
    if isinstance(v, (float, np.floating)):
        return V.FLOAT32
    if isinstance(v, (list, tuple, np.ndarray)):
        return V.ARRAY
    raise LowbitError(None, f"metadata {key}: cannot store a {type(v).__name__} in GGUF metadata")


def _value_bytes(vtype: V, value: Any, sub_type: V | None, key: str) -> bytes:
    vtype = V(vtype)
    if vtype == V.STRING:
        return _string(value if isinstance(value, bytes) else str(value))  # bytes: written as they are
    if vtype in _FMT:
        return struct.pack("<" + _FMT[vtype], value)
    if vtype != V.ARRAY:
        raise LowbitError(None, f"metadata {key}: unknown value type {vtype}")
    items = value.tolist() if isinstance(value, np.ndarray) and value.dtype == object else value
    if sub_type is None:
        sub_type = _infer_type(items[0], key) if len(items) else V.INT32
    sub_type = V(sub_type)
    head = _U32.pack(int(sub_type)) + _U64.pack(len(items))
    if sub_type == V.STRING:
        enc = [str(x).encode("utf-8") for x in items]
        return head + b"".join(_U64.pack(len(b)) + b for b in enc)
    if sub_type in _FMT:
        return head + np.asarray(items, dtype=np.dtype("<" + _FMT[sub_type])).tobytes()
    if sub_type == V.ARRAY:  # each item: its own element type, count and items
        return head + b"".join(_value_bytes(V.ARRAY, x, None, key) for x in items)
    raise LowbitError(None, f"metadata {key}: unknown array element type {sub_type}")
