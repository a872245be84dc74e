"""Low-level GGUF output: block encoding of one tensor, and streaming a planned file to disk.

``quantize_array``/``dequantize_bytes`` are the single place where this package calls a block
quantizer: ``lowbit.gguf.quants`` (byte-identical to llama.cpp, every type) when it is
importable, else gguf-py's reference quantizer for the few types it implements.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType, GGUFWriter

from ..errors import LowbitError

try:  # the other engineer's exact quantizer
    from . import quants as _lq  # type: ignore[attr-defined]
except Exception:  # pragma: no cover - depends on what has landed
    _lq = None

_GGUFPY_QUANT = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)


def row_bytes(qtype: T, ncols: int) -> int:
    blk, size = GGML_QUANT_SIZES[qtype]
    if ncols % blk:
        raise LowbitError(None, f"row length {ncols} is not a multiple of the {qtype.name} block size {blk}")
    return ncols // blk * size


def can_quantize(qtype: T) -> bool:
    """Whether this build can encode ``qtype``."""
    if qtype in (T.F32, T.F16, T.BF16):
        return True
    if _lq is not None:
        try:
            return bool(_lq.can_quantize(qtype))
        except Exception:
            return False
    return qtype in _GGUFPY_QUANT


def quantize_array(x: np.ndarray, qtype: T, imatrix: np.ndarray | None = None, device: str | None = None) -> np.ndarray:
    """Encode a float array (last axis = row) into ``qtype``; returns the raw data.

    ``device`` (``"cuda"``, ...): where the block search runs (default: the CPU); the bytes
    are the same on every device.

    Float types come back as float32/float16 arrays of the same shape (BF16 as uint16 rows
    viewed as uint8); block types as uint8 ``[..., bytes_per_row]``.  For 3-D expert tensors
    ``imatrix`` may hold one vector per expert (``[n_expert * cols]``).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == T.F32:
        return x
    if qtype == T.F16:
        return x.astype(np.float16)
    if qtype == T.BF16:
        import gguf.quants as gq

        return gq.quantize(x, T.BF16)
    cols = x.shape[-1]
    lead = x.shape[:-1]
    if x.ndim == 3 and imatrix is not None and imatrix.size == x.shape[0] * cols:
        parts = [quantize_array(x[e], qtype, imatrix[e * cols:(e + 1) * cols], device) for e in range(x.shape[0])]
        return np.stack(parts)
    x2 = x.reshape(-1, cols)
    if _lq is not None and _lq.can_quantize(qtype):
        import torch

        im = None if imatrix is None else torch.from_numpy(np.ascontiguousarray(imatrix, dtype=np.float32))
        tx = torch.from_numpy(x2)
        if device is not None and device != "cpu":
            tx = tx.to(device)
        out = _lq.quantize(tx, qtype, im)
        out = out.cpu().numpy() if hasattr(out, "numpy") else np.asarray(out)
    elif qtype in _GGUFPY_QUANT and imatrix is None:
        import gguf.quants as gq

        out = gq.quantize(x2, qtype)
    else:
        raise LowbitError(None, f"cannot encode {qtype.name}"
                          + (" with an importance matrix" if imatrix is not None else "")
                          + ": lowbit.gguf.quants does not provide it in this build")
    return np.ascontiguousarray(out, dtype=np.uint8).reshape(*lead, row_bytes(qtype, cols))


def dequantize_bytes(data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> np.ndarray:
    """Decode raw tensor data of ``qtype`` into float32 of ``shape`` (PyTorch order)."""
    if qtype == T.F32:
        return np.asarray(data).view(np.float32).reshape(shape)
    if qtype == T.F16:
        return np.asarray(data).view(np.float16).astype(np.float32).reshape(shape)
    if _lq is not None:
        try:
            import torch

            t = torch.from_numpy(np.ascontiguousarray(np.asarray(data).view(np.uint8)))
            return np.asarray(_lq.dequantize(t, qtype, shape), dtype=np.float32).reshape(shape)
        except Exception:
            pass
    import gguf.quants as gq

    raw = np.asarray(data).view(np.uint8).reshape(*shape[:-1], -1)
    return gq.dequantize(raw, qtype).astype(np.float32).reshape(shape)


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
    """Write a GGUF file at ``path`` (caller makes it atomic).  ``produce(t)`` returns the
    encoded data of ``t`` (uint8 rows or float arrays); tensors are streamed one at a time."""
    w = GGUFWriter(str(path), arch)
    for kv in kvs:
        if kv.key == "general.architecture":
            continue
        w.add_key_value(kv.key, kv.value, kv.vtype, kv.sub_type)
    for t in tensors:
        if t.qtype in (T.F32, T.F16):
            dt = np.float32 if t.qtype == T.F32 else np.float16
            w.add_tensor_info(t.name, t.shape, np.dtype(dt), t.nbytes)
        else:
            byte_shape = (*t.shape[:-1], row_bytes(t.qtype, t.shape[-1]))
            w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    it = progress(tensors) if progress else tensors
    for t in it:
        data = np.ascontiguousarray(produce(t))
        if data.nbytes != t.nbytes:
            raise LowbitError(path, f"internal error: tensor {t.name} has {data.nbytes} bytes, expected {t.nbytes}")
        if data.dtype == np.uint16:
            data = data.view(np.uint8)
        w.write_tensor_data(data)
    w.close()
