"""Optional C fast path for the GGUF block quantizers on CPU (same bytes as the torch code).

The shared library ``lowbit/gguf/_native*.so`` is built from ``native/lowbit_quants.c`` by
``pip install -e .`` when a C compiler is present. It is loaded with ctypes; rows are split
into chunks quantized on ``torch.get_num_threads()`` threads (ctypes releases the GIL).
Rows are independent, so the bytes do not depend on the thread count.
``LOWBIT_NATIVE=0`` turns the fast path off.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_lib: ctypes.CDLL | None = None
_loaded = False
_ROW_CHUNK_ELEMENTS = 1 << 16  # values per task: small enough to balance threads, large enough to amortize


def open_library(path: str | Path) -> ctypes.CDLL:
    """Load a build of ``native/lowbit_quants.c`` and declare its C signatures."""
    lib = ctypes.CDLL(str(path))
    f32p, u8p, i64 = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_uint8), ctypes.c_int64
    lib.lowbit_quantize.argtypes = [ctypes.c_int, f32p, i64, i64, f32p, u8p, f32p]
    lib.lowbit_quantize.restype = ctypes.c_int
    lib.lowbit_absmax.argtypes = [f32p, i64]
    lib.lowbit_absmax.restype = ctypes.c_float
    lib.lowbit_supports.argtypes = [ctypes.c_int]
    lib.lowbit_supports.restype = ctypes.c_int
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _loaded
    if not _loaded:
        _loaded = True
        here = Path(__file__).resolve().parent
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = here / f"_native{suffix}"
            if path.exists():
                try:
                    _lib = open_library(path)
                    break
                except OSError:
                    continue
    return _lib


def enabled() -> bool:
    """Whether the library is built and ``LOWBIT_NATIVE`` does not turn it off."""
    return os.environ.get("LOWBIT_NATIVE", "1") != "0" and _load() is not None


def supports(qtype: int) -> bool:
    """Whether ``qtype`` (a GGML type id) has a native quantizer available now."""
    return enabled() and bool(_lib.lowbit_supports(int(qtype)))


def absmax(x: torch.Tensor) -> float | None:
    """``max |x|`` of a contiguous float32 CPU tensor (NaN if it holds a NaN); None if not native.

    One C pass on this thread: a torch reduction on OpenMP threads costs far more on a busy machine.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() or not enabled():
        return None
    return float(_lib.lowbit_absmax(_ptr(x, ctypes.c_float), x.numel()))


def _ptr(t: torch.Tensor | None, ctype):
    return None if t is None else ctypes.cast(t.data_ptr(), ctypes.POINTER(ctype))


def quantize_rows(qtype: int, x: torch.Tensor, imatrix: torch.Tensor | None, row_bytes: int) -> torch.Tensor | None:
    """float32 CPU ``[R, C]`` (importance ``[C]`` or None) -> uint8 ``[R, row_bytes]``; None if not native."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not supports(qtype):
        return None
    x = x.contiguous()
    qw = None if imatrix is None else imatrix.to(device="cpu", dtype=torch.float32).contiguous()
    rows, cols = x.shape
    out = torch.empty((rows, row_bytes), dtype=torch.uint8)
    step = max(1, _ROW_CHUNK_ELEMENTS // max(cols, 1))

    def run(r0: int) -> int:
        n = min(step, rows - r0)
        work = torch.empty(cols, dtype=torch.float32)
        return _lib.lowbit_quantize(int(qtype), _ptr(x[r0], ctypes.c_float), n, cols, _ptr(qw, ctypes.c_float),
                                    _ptr(out[r0], ctypes.c_uint8), _ptr(work, ctypes.c_float))

    starts = list(range(0, rows, step))
    threads = min(torch.get_num_threads(), len(starts))
    codes = [run(r0) for r0 in starts] if threads <= 1 else list(_pool(threads).map(run, starts))
    return out if all(c == 0 for c in codes) else None


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """A kept pool per thread count (creating one per tensor costs more than small tensors take)."""
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="lowbit-native")
    return _pools[threads]
