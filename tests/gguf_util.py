"""Helpers that drive llama.cpp (through llama-cpp-python's low-level ctypes API) for GGUF tests
and benchmarks: its quantizer, logits of a token sequence, perplexity/KL, and an importance
matrix collected with an eval callback exactly where llama-imatrix collects it.

Model paths are found as ``tests/conftest.py`` finds them: ``STORIES`` and ``WIKI`` under
``$LOWBIT_SHARED`` (default ``../shared`` beside the repository); ``SMOL`` and ``GEMMA`` are the
demo GGUF files of :func:`lowbit.models.demo.demo_gguf`, fetched once on first use (reading
either attribute raises when the model cannot be obtained).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

N_THREADS = int(os.environ.get("LOWBIT_TEST_THREADS", "2"))

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWBIT_SHARED", ROOT.parent / "shared"))
STORIES = str(SHARED / "models" / "stories260K")
WIKI = str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw")
_DEMOS = {"SMOL": "smollm2-135m", "GEMMA": "gemma3-270m"}


def __getattr__(name: str) -> str:
    """``SMOL`` / ``GEMMA``: the demo model's GGUF file (fetched once; raises if it cannot be)."""
    if name in _DEMOS:
        from lowbit.models.demo import demo_gguf

        return str(demo_gguf(_DEMOS[name]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ll():
    import llama_cpp

    return llama_cpp


_BACKEND_READY = False


def _init():
    global _BACKEND_READY
    ll = _ll()
    if not _BACKEND_READY:
        ll.llama_backend_init()
        # silence llama.cpp's logging
        @ll.llama_log_callback
        def _quiet(level, text, user_data):  # noqa: ARG001
            return None

        _init.cb = _quiet  # keep a reference
        ll.llama_log_set(_quiet, ctypes.c_void_p())
        _BACKEND_READY = True
    return ll


def llamacpp_quantize(inp, out, mix: str, *, pure: bool = False, imatrix: dict | None = None,
                      output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                      tensor_types=(), allow_requantize: bool = True) -> Path:
    """Quantize ``inp`` to ``out`` with llama.cpp's own quantizer (llama_model_quantize).

    ``imatrix``: name -> per-column importance (already divided by the counts, as
    llama-quantize passes it)."""
    from gguf import GGMLQuantizationType as T

    from lowbit.gguf.mixes import FTYPES, normalize_mix

    ll = _init()
    p = ll.llama_model_quantize_default_params()
    p.nthread = N_THREADS
    p.ftype = FTYPES[normalize_mix(mix)]
    p.pure = pure
    p.allow_requantize = allow_requantize
    if output_tensor_type:
        p.output_tensor_type = int(T[output_tensor_type.upper()])
    if token_embedding_type:
        p.token_embedding_type = int(T[token_embedding_type.upper()])
    keep = []
    if imatrix:
        arr = (ll.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(v, dtype=np.float32)
            keep.append(v)
            nb = name.encode()
            keep.append(nb)
            arr[i].name = nb
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(imatrix)].name = None
        keep.append(arr)
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(ll.llama_model_imatrix_data))
    if tensor_types:
        tt = (ll.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, item in enumerate(tensor_types):
            pat, _, typ = item.partition("=")
            pb = pat.lower().encode()
            keep.append(pb)
            tt[i].pattern = pb
            tt[i].type = int(T[typ.upper()])
        tt[len(tensor_types)].pattern = None
        keep.append(tt)
        p.tt_overrides = ctypes.cast(tt, ctypes.POINTER(ll.llama_model_tensor_override))
    rc = ll.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {inp} -> {mix}")
    return Path(out)


def gguf_types(path) -> dict:
    """name -> GGMLQuantizationType of every tensor in a GGUF file."""
    from lowbit.gguf.reader import validate_gguf

    return {t.name: t.type for t in validate_gguf(path).tensors}


def gguf_tensor_bytes(path) -> dict:
    from lowbit.gguf.reader import GGUFFile

    f = GGUFFile(path)
    return {t.name: bytes(f.data(t.name)) for t in f.tensors}


# ---------------------------------------------------------------------------------------------
# running models

class _GGMLTensor(ctypes.Structure):
    pass


_GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GGMLTensor) * 10),
    ("view_src", ctypes.POINTER(_GGMLTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def _ggml_op_name():
    ll = _ll()
    lib = ctypes.CDLL(str(Path(ll.__file__).parent / "lib" / "libggml-base.so"))
    f = lib.ggml_op_name
    f.restype = ctypes.c_char_p
    f.argtypes = [ctypes.c_int]
    return f


class LlamaRunner:
    """One llama.cpp model + context; ``logits(tokens)`` gives logits at every position."""

    def __init__(self, path, n_ctx: int = 512, collect_imatrix: bool = False, n_seq: int = 1,
                 n_ubatch: int | None = None):
        """``n_seq > 1`` (with ``n_ubatch``) makes the context llama-imatrix / llama-perplexity make
        for ``-c n_ctx -b n_seq*n_ctx -ub n_ubatch``: :meth:`decode_sequences` then decodes up to
        ``n_seq`` chunks at once as parallel sequences, split into micro-batches by llama.cpp."""
        ll = _init()
        self.ll = ll
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = ll.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq
        cp.n_batch = n_ctx * n_seq
        cp.n_ubatch = n_ubatch or n_ctx
        cp.n_seq_max = n_seq
        self.n_seq = n_seq
        cp.n_threads = N_THREADS
        cp.n_threads_batch = N_THREADS
        self.n_ctx = n_ctx
        self.stats: dict[str, list] = {}
        if collect_imatrix:
            op_name = _ggml_op_name()
            want = {}

            def cb(t_ptr, ask, user_data):  # noqa: ARG001
                t = ctypes.cast(t_ptr, ctypes.POINTER(_GGMLTensor)).contents
                op = want.get(t.op)
                if op is None:
                    op = want[t.op] = op_name(t.op).decode()
                if op != "MUL_MAT":
                    return False if ask else True
                src0 = t.src[0].contents
                src1 = t.src[1].contents
                name = src0.name.decode()
                if "#" in name:
                    name = name.split("#")[1]
                if ask:
                    return bool(src1.ne[1] >= 16 and src1.type == 0 and name.startswith("blk."))
                ne0, ne1 = src1.ne[0], src1.ne[1]
                n = ne0 * ne1 * src1.ne[2] * src1.ne[3]
                assert src1.nb[1] == ne0 * 4
                x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(src1.data)).reshape(-1, ne0)
                e = self.stats.setdefault(name, [np.zeros(ne0, np.float64), 0])
                e[0] += (x.astype(np.float64) ** 2).sum(0)
                e[1] += x.shape[0]
                return True

            self._cb = ll.ggml_backend_sched_eval_callback(cb)
            cp.cb_eval = self._cb
            cp.cb_eval_user_data = None
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")

    @property
    def bos(self) -> int:
        return self.ll.llama_vocab_bos(self.vocab)

    @property
    def add_bos(self) -> bool:
        return bool(self.ll.llama_vocab_get_add_bos(self.vocab))

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        raw = text.encode()
        n = len(raw) + 16
        buf = (self.ll.llama_token * n)()
        k = self.ll.llama_tokenize(self.vocab, raw, len(raw), buf, n, add_special, False)
        if k < 0:
            buf = (self.ll.llama_token * (-k))()
            k = self.ll.llama_tokenize(self.vocab, raw, len(raw), buf, -k, add_special, False)
        return list(buf[:k])

    def logits(self, tokens: list[int]) -> np.ndarray:
        ll = self.ll
        n = len(tokens)
        assert n <= self.n_ctx
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        batch = ll.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, tok in enumerate(tokens):
                batch.token[i] = tok
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            rc = ll.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc})")
            ptr = ll.llama_get_logits(self.ctx)
            return np.ctypeslib.as_array(ptr, shape=(n * self.n_vocab,)).reshape(n, self.n_vocab).copy()
        finally:
            ll.llama_batch_free(batch)

    def decode_sequences(self, chunks: list[list[int]]) -> None:
        """Decode up to ``n_seq`` chunks in one batch, chunk ``s`` as sequence ``s`` from position 0
        (every position an output), as llama-imatrix decodes a group of chunks."""
        ll = self.ll
        assert len(chunks) <= self.n_seq
        n = sum(len(c) for c in chunks)
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        batch = ll.llama_batch_init(n, 0, self.n_seq)
        try:
            batch.n_tokens = n
            k = 0
            for s, c in enumerate(chunks):
                for i, tok in enumerate(c):
                    batch.token[k] = tok
                    batch.pos[k] = i
                    batch.n_seq_id[k] = 1
                    batch.seq_id[k][0] = s
                    batch.logits[k] = True
                    k += 1
            rc = ll.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc})")
        finally:
            ll.llama_batch_free(batch)

    def generate(self, tokens: list[int], n: int) -> list[int]:
        out = list(tokens)
        for _ in range(n):
            out.append(int(self.logits(out)[-1].argmax()))
        return out[len(tokens):]

    def detokenize(self, tokens: list[int]) -> str:
        out = b""
        buf = ctypes.create_string_buffer(256)
        for t in tokens:
            k = self.ll.llama_token_to_piece(self.vocab, t, buf, 256, 0, False)
            out += buf.raw[:max(k, 0)]
        return out.decode(errors="replace")

    def close(self):
        if getattr(self, "ctx", None):
            self.ll.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def llama_imatrix(path, chunks: list[list[int]], n_ctx: int, n_batch: int = 2048, n_ubatch: int = 512) -> dict:
    """llama-imatrix's statistics (name -> [sum of squares (float64), rows counted]) of ``chunks``:
    its context (``n_seq = n_batch // n_ctx`` parallel sequences, micro-batches of ``n_ubatch``),
    its grouping of chunks, its eval-callback rule (``MUL_MAT`` on ``blk.*`` weights, at least 16
    rows of F32 activations)."""
    n_seq = max(1, n_batch // n_ctx)
    with LlamaRunner(path, n_ctx=n_ctx, collect_imatrix=True, n_seq=n_seq, n_ubatch=n_ubatch) as r:
        for i in range(0, len(chunks), n_seq):
            r.decode_sequences(chunks[i:i + n_seq])
        return r.stats


def chunks_of(tokens: list[int], n_ctx: int, n_chunks: int | None, bos: int | None) -> list[list[int]]:
    """llama-perplexity/imatrix chunking: consecutive n_ctx windows, first token set to BOS."""
    k = len(tokens) // n_ctx
    if n_chunks is not None:
        k = min(k, n_chunks)
    out = []
    for i in range(k):
        c = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos is not None:
            c[0] = bos
        out.append(c)
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def score_chunk(logits: np.ndarray, chunk: list[int], base_logp: np.ndarray | None = None):
    """llama-perplexity convention: score the second half of the chunk.  Returns (nll list,
    kl list or None, logp of the scored positions)."""
    n = len(chunk)
    first = n // 2
    lp = log_softmax(logits[first:n - 1])
    tgt = np.asarray(chunk[first + 1:n])
    nll = -lp[np.arange(len(tgt)), tgt]
    kl = None
    if base_logp is not None:
        kl = (np.exp(base_logp) * (base_logp - lp)).sum(-1)
    return nll, kl, lp


def make_skeleton(src_gguf, out, rows: int | None = 8, seed: int = 0, keep_tokenizer: bool = False,
                  layers: int | None = None) -> Path:
    """A small F32 GGUF with the metadata, tensor names and row lengths of ``src_gguf`` but only
    ``rows`` rows per matrix: llama.cpp's quantizer picks types from names and row lengths
    only, so the type map of a mix can be checked in milliseconds on large models.  The
    quantizer reads hyper-parameters but not the vocabulary, so tokenizer keys are dropped
    unless ``keep_tokenizer``. Such a file contradicts its own metadata (lowbit refuses to
    quantize it); ``rows=None, layers=N`` keeps every row and only the first N blocks instead
    (``block_count`` = N): a valid model file."""
    import re

    from gguf import GGMLQuantizationType as T

    from lowbit.gguf.reader import GGUFFile
    from lowbit.gguf.writer import KV, PlannedTensor, write_gguf

    f = GGUFFile(src_gguf)
    arch = f.kv["general.architecture"]
    kvs = [KV(k, vt, layers if layers is not None and k == f"{arch}.block_count" else v, sub)
           for k, vt, v, sub in f.kv_entries()
           if k not in ("general.file_type", "general.quantization_version", "general.alignment")
           and (keep_tokenizer or not k.startswith("tokenizer."))]
    planned = []
    for t in f.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if layers is not None and m and int(m.group(1)) >= layers:
            continue
        shape = t.shape
        if len(shape) >= 2 and rows is not None:
            shape = (*shape[:-2], min(rows, shape[-2]), shape[-1])
        planned.append(PlannedTensor(t.name, shape, T.F32))
    rng = np.random.default_rng(seed)
    write_gguf(Path(out), arch, kvs, planned,
               lambda p: rng.standard_normal(p.shape).astype(np.float32) * 0.02 + (1.0 if len(p.shape) == 1 else 0.0))
    return Path(out)
