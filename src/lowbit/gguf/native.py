"""Optional C fast path for the GGUF block quantizers on CPU (same bytes as the torch code).

The shared library ``lowbit/gguf/_native*.so`` is built from ``native/lowbit_quants.c`` by
``pip install -e .`` when a C compiler is present. It is loaded with ctypes and driven with numpy
arrays (:func:`quantize_array_absmax`; torch is not imported here, so the torch-free GGUF path of
:mod:`lowbit.gguf.fastpath` can use it); rows are split into chunks quantized on
:func:`thread_count` threads (ctypes releases the GIL). Rows are independent, so the bytes do not
depend on the thread count. ``LOWBIT_NATIVE=0`` turns the fast path off.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

_lib: _Library | None = None
_loaded = False
_ROW_CHUNK_ELEMENTS = 1 << 17  # values per task: small enough to balance threads and stay in cache
ABI_VERSION = 3  # lowbit_abi_version() of the C source this module drives; a stale build is ignored


class _Library(ctypes.CDLL):
    """A loaded build, with the IQ grid sizes already given to it (:func:`_set_grid`)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.grids: set[tuple[str, int]] = set()


def open_library(path: str | Path) -> _Library:
    """Load a build of ``native/lowbit_quants.c`` and declare its C signatures (OSError if stale)."""
    lib = _Library(str(path))
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
    lib.lowbit_set_grid.argtypes = [ctypes.c_int, ptr, ctypes.c_int]
    lib.lowbit_set_grid.restype = ctypes.c_int
    lib.lowbit_set_grid3.argtypes = [ctypes.c_int, ptr, ctypes.c_int]
    lib.lowbit_set_grid3.restype = ctypes.c_int
    return lib


#: GGML type id -> (gguf-py's grid class name, points, values per point, neighbour distances kept)
_GRID_OF = {16: ("IQ2_XXS", 256, 8, 2), 17: ("IQ2_XS", 512, 8, 2), 22: ("IQ2_S", 1024, 8, 1),
            18: ("IQ3_XXS", 256, 4, 2), 21: ("IQ3_S", 512, 4, 3), 19: ("IQ1_S", 2048, 8, 3), 29: ("IQ1_S", 2048, 8, 3)}


def _set_grid(lib: _Library, qtype: int) -> None:
    """Give the C code the grid of an IQ type (once, before any thread quantizes): gguf-py's
    points as levels; the C code builds the neighbour lists as iq2/iq3quants._tables_np do."""
    if qtype not in _GRID_OF or _GRID_OF[qtype][:2] in lib.grids:
        return
    from gguf import quants as gq

    name, size, width, nwant = _GRID_OF[qtype]
    src = getattr(gq, name)
    src.init_grid()
    values = np.asarray(src.grid).reshape(size, width)
    levels = np.ascontiguousarray(np.searchsorted(np.asarray(src.grid_map), values), dtype=np.uint8)
    setter = lib.lowbit_set_grid if width == 8 else lib.lowbit_set_grid3
    if setter(size, levels.ctypes.data, nwant) != 0:
        raise RuntimeError(f"native grid of {name} could not be built")
    lib.grids.add(_GRID_OF[qtype][:2])


def _load() -> _Library | None:
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


def thread_count() -> int:
    """Threads for the C quantizers: torch's setting when torch is loaded, else ``LOWBIT_THREADS``,
    ``OMP_NUM_THREADS`` or the CPUs this process may run on (the bytes never depend on it)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return max(1, int(torch.get_num_threads()))
    for var in ("LOWBIT_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def quantize_rows(qtype: int, x: Any, imatrix: Any, row_bytes: int) -> Any:
    """float32 or float16 CPU tensor ``[R, C]`` (importance ``[C]`` or None) -> uint8 tensor ``[R, row_bytes]``;
    None if not native."""
    res = quantize_rows_absmax(qtype, x, imatrix, row_bytes)
    return None if res is None else res[0]


def quantize_rows_absmax(qtype: int, x: Any, imatrix: Any, row_bytes: int) -> tuple[Any, float] | None:
    """:func:`quantize_array_absmax` for torch tensors (what :mod:`lowbit.gguf.quants` calls)."""
    import torch

    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float16) or not supports(qtype):
        return None
    qw = None if imatrix is None else imatrix.to(device="cpu", dtype=torch.float32).contiguous().numpy()
    res = quantize_array_absmax(qtype, x.detach().contiguous().numpy(), qw, row_bytes)
    return None if res is None else (torch.from_numpy(res[0]), res[1])


def quantize_array_absmax(qtype: int, x: np.ndarray, imatrix: np.ndarray | None,
                          row_bytes: int) -> tuple[np.ndarray, float] | None:
    """float32 or float16 ``[R, C]`` (importance ``[C]`` or None) -> (uint8 ``[R, row_bytes]``, ``max |x|``);
    None if ``qtype`` has no native quantizer. ``max |x|`` is NaN if x holds a NaN, read while
    each chunk is in cache.

    NaN or Inf input gives garbage bytes (never a crash): callers check the max before using them.
    float16 input is widened row by row inside the C loop (no float32 copy of the array).
    """
    if x.ndim != 2 or x.dtype not in (np.float32, np.float16) or not supports(qtype):
        return None
    lib = _lib
    assert lib is not None  # supports() loaded it
    _set_grid(lib, int(qtype))
    half = x.dtype == np.float16
    x = np.ascontiguousarray(x)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    rows, cols = x.shape
    out = np.empty((rows, row_bytes), dtype=np.uint8)
    threads = thread_count()
    step = max(1, rows)  # one thread: one call
    if threads > 1:  # chunks that stay in cache, a few per thread so that the threads finish together
        step = max(1, min(_ROW_CHUNK_ELEMENTS // max(cols, 1), -(-rows // (4 * threads))))
    starts = list(range(0, rows, step))
    maxes = np.zeros(len(starts), dtype=np.float32)
    x0, out0, m0 = x.ctypes.data, out.ctypes.data, maxes.ctypes.data
    qwp = None if qw is None else qw.ctypes.data

    def run(i: int) -> int:
        r0 = starts[i]
        work = np.empty(cols, dtype=np.float32) if qw is not None else None  # legacy types' row weights
        wp = None if work is None else work.ctypes.data
        n = min(step, rows - r0)
        if half:
            xbuf = np.empty(cols, dtype=np.float32)
            return lib.lowbit_quantize_f16(int(qtype), x0 + r0 * cols * 2, n, cols, qwp, out0 + r0 * row_bytes, wp,
                                            xbuf.ctypes.data, m0 + 4 * i)
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
