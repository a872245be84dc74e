"""Get llama.cpp's own bytes for a set of float tensors (test and bench helper).

llama.cpp quantizes whole model files, so we write a small llama-architecture GGUF
holding F32 tensors under llama tensor names (``blk.N.ffn_down.weight``...), run
``llama_model_quantize`` from llama-cpp-python on it in *pure* mode (every 2-D
weight gets the file type's base type), and read the tensors back with
``gguf.GGUFReader``. An importance matrix is passed through the
``llama_model_imatrix_data`` array of ``llama_model_quantize_params`` (one entry per
tensor name: ``cols`` floats; a NULL name ends the array).

Only the quantizer's hyper-parameter loading runs, so the file needs no vocabulary.
Rows whose length is not a multiple of the type's block size make llama.cpp pick a
fallback type; :func:`llamacpp_quantize` returns the type it actually wrote.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter

# llama_ftype whose base type (pure mode) is the key
FTYPE_FOR: dict[T, int] = {
    T.F16: 1,
    T.Q4_0: 2,
    T.Q4_1: 3,
    T.Q8_0: 7,
    T.Q5_0: 8,
    T.Q5_1: 9,
    T.Q2_K: 10,
    T.Q3_K: 12,
    T.Q4_K: 15,
    T.Q5_K: 17,
    T.Q6_K: 18,
    T.IQ2_XXS: 19,
    T.IQ2_XS: 20,
    T.IQ3_XXS: 23,
    T.IQ1_S: 24,
    T.IQ4_NL: 25,
    T.IQ3_S: 26,
    T.IQ2_S: 29,  # LLAMA_FTYPE_MOSTLY_IQ2_M has base type IQ2_S
    T.IQ4_XS: 30,
    T.IQ1_M: 31,
    T.BF16: 32,
    T.TQ1_0: 36,
    T.TQ2_0: 37,
    T.MXFP4: 38,  # LLAMA_FTYPE_MOSTLY_MXFP4_MOE: base type MXFP4 in pure mode
    T.Q1_0: 40,
}

# types with no llama_ftype of their own: quantized through a tensor-type override (".*" -> type)
# on top of a Q8_0 file type
OVERRIDE_ONLY = {T.NVFP4}

LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

_quiet_cb = None


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


def quiet_llama_logs() -> None:
    """Silence llama.cpp's log output (kept for the process lifetime)."""
    global _quiet_cb
    if _quiet_cb is not None:
        return
    import llama_cpp

    _quiet_cb = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_quiet_cb, ctypes.c_void_p(0))


def layer_names(n: int, first_layer: int = 0) -> list[str]:
    """``n`` distinct llama weight names (``blk.0.attn_q.weight``, ``blk.0.attn_k.weight``, ...)."""
    k = len(LAYER_TENSORS)
    return [f"blk.{first_layer + i // k}.{LAYER_TENSORS[i % k]}.weight" for i in range(n)]


def write_llama_gguf(path: str | Path, tensors: dict[str, np.ndarray], n_layer: int | None = None) -> None:
    """Write 2-D float tensors (numpy ``[rows, cols]``) as F32 into a loadable llama GGUF."""
    if n_layer is None:
        layers = [int(k.split(".")[1]) for k in tensors if k.startswith("blk.")]
        n_layer = max(layers) + 1 if layers else 1
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(2048)
    w.add_embedding_length(576)
    w.add_feed_forward_length(1536)
    w.add_head_count(9)
    w.add_head_count_kv(3)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(64)
    w.add_vocab_size(49152)
    w.add_file_type(0)
    for name, arr in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run_llama_quantize(
    src: str | Path,
    dst: str | Path,
    qtype: T,
    imatrix: dict[str, np.ndarray] | None = None,
    nthread: int = 1,
    quiet: bool = True,
) -> float:
    """Run ``llama_model_quantize`` (pure mode) and return its wall time in seconds."""
    import llama_cpp

    if quiet:
        quiet_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.pure = True
    params.nthread = nthread
    keep = []
    if qtype in OVERRIDE_ONLY:
        params.ftype = FTYPE_FOR[T.Q8_0]
        ov = (llama_cpp.llama_model_tensor_override * 2)()
        ov[0].pattern = b".*"
        ov[0].type = int(qtype)
        ov[1].pattern = None
        keep.append(ov)
        params.tt_overrides = ctypes.cast(ov, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    else:
        params.ftype = FTYPE_FOR[qtype]
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, vals) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(vals, dtype=np.float32)
            keep.append(v)
            arr[i].name = name.encode()
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(imatrix)].name = None
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    dt = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {qtype.name}")
    return dt


def read_gguf_tensors(path: str | Path) -> dict[str, tuple[T, np.ndarray]]:
    """name -> (type, uint8 bytes ``[rows, bytes_per_row]``) for every tensor of a GGUF."""
    r = GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        out[t.name] = (T(t.tensor_type), np.array(t.data).view(np.uint8).reshape(rows, -1))
    return out


def llamacpp_quantize(
    tensors: dict[str, np.ndarray],
    qtype: T,
    imatrix: dict[str, np.ndarray] | None = None,
    nthread: int = 1,
    workdir: str | Path | None = None,
) -> dict[str, tuple[T, np.ndarray]]:
    """llama.cpp's bytes for each named float tensor: name -> (type written, uint8 ``[rows, bytes]``)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src, dst = os.path.join(tmp, "in.gguf"), os.path.join(tmp, "out.gguf")
        write_llama_gguf(src, tensors)
        run_llama_quantize(src, dst, qtype, imatrix, nthread)
        got = read_gguf_tensors(dst)
    return {k: got[k] for k in tensors}


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF of the ``smollm2-135m`` demo (fetched once if needed;
    raises :class:`~lowbit.errors.LowbitError` when it cannot be obtained)."""
    from lowbit.models.demo import demo_gguf

    return demo_gguf("smollm2-135m")


def smollm2_tensors(names: list[str] | None = None, max_rows: int | None = None) -> dict[str, np.ndarray]:
    """Dequantized (gguf-py) 2-D weights of SmolLM2 as float32 ``[rows, cols]``; optionally the first rows only.

    Parsing the GGUF (its 49k-token vocabulary) is slow, so results are cached in the temp dir.
    """
    from gguf import quants as gq

    path = smollm2_path()
    key = f"{path.stat().st_mtime_ns}-{max_rows}-{','.join(sorted(names)) if names else 'all'}"
    cache = Path(tempfile.gettempdir()) / f"lowbit_smollm2_{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    r = GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        if len(t.shape) != 2 or (names is not None and t.name not in names):
            continue
        raw = np.array(t.data)
        rows = int(t.shape[1]) if max_rows is None else min(max_rows, int(t.shape[1]))
        arr = gq.dequantize(raw.reshape(int(t.shape[1]), -1)[:rows], T(t.tensor_type)).reshape(rows, int(t.shape[0]))
        out[t.name] = np.ascontiguousarray(arr, dtype=np.float32)
    tmp = cache.with_suffix(f".{os.getpid()}.npz")
    np.savez(tmp, **out)
    os.replace(tmp, cache)
    return out
