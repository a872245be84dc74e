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
_ROW_CHUNK_ELEMENTS = 1 << 17  # values per task: small enough to balance threads and stay in cache
ABI_VERSION = 2  # lowbit_abi_version() of the C source this module drives; a stale build is ignored


def open_library(path: str | Path) -> ctypes.CDLL:
    """Load a build of ``native/lowbit_quants.c`` and declare its C signatures (OSError if stale)."""
    lib = ctypes.CDLL(str(path))
    try:
        version = lib.lowbit_abi_version()
    except AttributeError:
        version = 0
    if version != ABI_VERSION:
        raise OSError(f"{path}: native library version {version}, expected {ABI_VERSION}: rebuild with pip install -e .")
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64  # pointers passed as plain ints (no ctypes objects per call)
    lib.lowbit_quantize.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ptr, ptr, ptr]
    lib.lowbit_quantize.restype = ctypes.c_int
    lib.lowbit_quantize_f16.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr]
    lib.lowbit_quantize_f16.restype = ctypes.c_int
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
    return enabled() and _lib is not None and bool(_lib.lowbit_supports(int(qtype)))


def quantize_rows(qtype: int, x: torch.Tensor, imatrix: torch.Tensor | None, row_bytes: int) -> torch.Tensor | None:
    """float32 or float16 CPU ``[R, C]`` (importance ``[C]`` or None) -> uint8 ``[R, row_bytes]``; None if not native."""
    res = quantize_rows_absmax(qtype, x, imatrix, row_bytes)
    return None if res is None else res[0]


def quantize_rows_absmax(qtype: int, x: torch.Tensor, imatrix: torch.Tensor | None,
                         row_bytes: int) -> tuple[torch.Tensor, float] | None:
    """:func:`quantize_rows` plus ``max |x|`` (NaN if x holds a NaN), read while each chunk is in cache.

    NaN or Inf input gives garbage bytes (never a crash): callers check the max before using them.
    float16 input is widened row by row inside the C loop (no float32 copy of the tensor).
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float16) or not supports(qtype):
        return None
    lib = _lib
    assert lib is not None  # supports() loaded it
    half = x.dtype == torch.float16
    x = x.contiguous()
    qw = None if imatrix is None else imatrix.to(device="cpu", dtype=torch.float32).contiguous()
    rows, cols = x.shape
    out = torch.empty((rows, row_bytes), dtype=torch.uint8)
    threads = torch.get_num_threads()
    step = max(1, rows)  # one thread: one call
    if threads > 1:  # chunks that stay in cache, a few per thread so that the threads finish together
        step = max(1, min(_ROW_CHUNK_ELEMENTS // max(cols, 1), -(-rows // (4 * threads))))
    starts = list(range(0, rows, step))
    maxes = torch.zeros(len(starts), dtype=torch.float32)
    x0, out0, qwp, m0 = x.data_ptr(), out.data_ptr(), None if qw is None else qw.data_ptr(), maxes.data_ptr()

    def run(i: int) -> int:
        r0 = starts[i]
        work = torch.empty(cols, dtype=torch.float32) if qw is not None else None  # legacy types' row weights
        wp = None if work is None else work.data_ptr()
        n = min(step, rows - r0)
        if half:
            xbuf = torch.empty(cols, dtype=torch.float32)
            return lib.lowbit_quantize_f16(int(qtype), x0 + r0 * cols * 2, n, cols, qwp, out0 + r0 * row_bytes, wp,
                                            xbuf.data_ptr(), m0 + 4 * i)
        return lib.lowbit_quantize(int(qtype), x0 + r0 * cols * 4, n, cols, qwp, out0 + r0 * row_bytes, wp, m0 + 4 * i)

    threads = min(threads, len(starts))
    idx = range(len(starts))
    codes = [run(i) for i in idx] if threads <= 1 else list(_pool(threads).map(run, idx))
    if any(codes):
        return None
    amax = float(maxes.max()) if len(starts) else 0.0  # NaN propagates
    return out, amax


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """A kept pool per thread count (creating one per tensor costs more than small tensors take)."""
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="lowbit-native")
    return _pools[threads]
