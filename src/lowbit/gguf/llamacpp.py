"""llama.cpp itself, through llama-cpp-python (optional): its tokenizer and its logits.

lowbit measures GGUF files as llama.cpp runs them when llama-cpp-python is installed:

* :class:`Vocab` is llama.cpp's own tokenizer of a GGUF file (the model loaded ``vocab_only``:
  no weights, a fraction of a second), so token ids are llama.cpp's byte for byte;
  :class:`LlamaCppTokenizer` puts it in front of the transformers tokenizer of a model converted
  from a GGUF file (text to ids through llama.cpp, everything else through transformers);
* :class:`Runner` is a GGUF model in llama.cpp's runtime: logits of token chunks, batched as
  ``llama-perplexity`` batches them (``n_batch // ctx`` chunks per decode as parallel
  sequences, 512-token micro-batches, only the scored positions' logits), so perplexity and
  KL-divergence computed on them by :mod:`lowbit.eval` are llama.cpp's numbers.

Without llama-cpp-python :func:`available` is false; callers fall back (tokenization) or refuse
(the llama.cpp runtime) with a message naming the package.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LowbitError

__all__ = ["LlamaCppTokenizer", "Runner", "Vocab", "available", "require"]

INSTALL_HINT = "pip install -c constraints.txt -e '.[llamacpp]'"

_lock = threading.Lock()
_state: dict[str, Any] = {}


def available() -> bool:
    """Whether llama-cpp-python can be imported (``LOWBIT_LLAMACPP=0`` turns it off)."""
    if os.environ.get("LOWBIT_LLAMACPP", "1") == "0":
        return False
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken build counts as absent
        return False
    return True


def require(what: str) -> Any:
    """The ``llama_cpp`` module with its backend initialised and its log silenced, or a
    :class:`LowbitError` saying ``what`` needs it."""
    if not available():
        raise LowbitError(None, f"{what} needs llama-cpp-python ({INSTALL_HINT})")
    import llama_cpp as ll

    with _lock:
        if "ll" not in _state:
            ll.llama_backend_init()

            @ll.llama_log_callback
            def _quiet(level, text, user_data):  # noqa: ARG001
                return None

            _state["log"] = _quiet  # keep the callback alive for the process lifetime
            ll.llama_log_set(_quiet, ctypes.c_void_p())
            _state["ll"] = ll
    return _state["ll"]


def _threads() -> int:
    return max(1, int(os.environ.get("LOWBIT_THREADS", torch.get_num_threads())))


class Vocab:
    """llama.cpp's tokenizer of the GGUF file at ``path`` (a vocabulary-only model load)."""

    def __init__(self, path: str | Path) -> None:
        ll = require("llama.cpp's tokenizer")
        self.ll = ll
        self.path = Path(path)
        mp = ll.llama_model_default_params()
        mp.vocab_only = True
        mp.n_gpu_layers = 0
        self._model = ll.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self._model:
            raise LowbitError(self.path, "llama.cpp could not read the vocabulary of this GGUF file")
        self._vocab = ll.llama_model_get_vocab(self._model)

    @property
    def bos(self) -> int | None:
        b = int(self.ll.llama_vocab_bos(self._vocab))
        return None if b < 0 else b

    @property
    def eos(self) -> int | None:
        e = int(self.ll.llama_vocab_eos(self._vocab))
        return None if e < 0 else e

    @property
    def add_bos(self) -> bool:
        return bool(self.ll.llama_vocab_get_add_bos(self._vocab))

    @property
    def n_tokens(self) -> int:
        return int(self.ll.llama_vocab_n_tokens(self._vocab))

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` exactly as ``llama_tokenize`` gives them (``add_special``: BOS/EOS
        as the vocabulary adds them; ``parse_special``: control tokens written in the text are
        read as such; llama-perplexity and llama-imatrix tokenize with ``True, False``)."""
        raw = text.encode("utf-8")
        n = len(raw) + 16
        buf = (self.ll.llama_token * n)()
        k = self.ll.llama_tokenize(self._vocab, raw, len(raw), buf, n, add_special, parse_special)
        if k < 0:
            n = -k
            buf = (self.ll.llama_token * n)()
            k = self.ll.llama_tokenize(self._vocab, raw, len(raw), buf, n, add_special, parse_special)
        if k < 0:
            raise LowbitError(self.path, "llama.cpp could not tokenize the text")
        return np.ctypeslib.as_array(buf, shape=(n,))[:k].astype(np.int64).tolist()

    def close(self) -> None:
        if getattr(self, "_model", None):
            self.ll.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class LlamaCppTokenizer:
    """A transformers tokenizer whose text-to-ids runs through llama.cpp's tokenizer of a GGUF file.

    ``tokenizer(text, add_special_tokens=...)["input_ids"]`` (what :mod:`lowbit.text` and the
    calibration code call) gives llama.cpp's ids; BOS/EOS ids come from the GGUF's vocabulary;
    every other attribute (``decode``, ``apply_chat_template``, ``pad_token_id``...) is the
    transformers tokenizer's.
    """

    def __init__(self, hf: Any, vocab: Vocab) -> None:
        """``hf``: the transformers tokenizer behind it (None: ids and special ids only)."""
        self._hf = hf
        self._vocab = vocab

    @property
    def llamacpp_vocab(self) -> Vocab:
        return self._vocab

    @property
    def bos_token_id(self) -> int | None:
        return self._vocab.bos

    @property
    def eos_token_id(self) -> int | None:
        return self._vocab.eos

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, parse_special: bool = False,
                 return_tensors: str | None = None, **_: Any) -> Any:
        """Like a transformers tokenizer's call (a ``BatchEncoding`` with ``input_ids`` and
        ``attention_mask``; ``return_tensors="pt"`` gives ``[batch, n]`` tensors), ids from llama.cpp."""
        from transformers import BatchEncoding

        texts = [text] if isinstance(text, str) else list(text)
        ids = [self._vocab.tokenize(t, add_special_tokens, parse_special) for t in texts]
        if return_tensors is not None and len({len(i) for i in ids}) > 1:
            raise ValueError("LlamaCppTokenizer does not pad: tokenize texts of different lengths one at a time")
        data: dict[str, Any] = {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}
        if isinstance(text, str) and return_tensors is None:
            data = {k: v[0] for k, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors)

    def __len__(self) -> int:
        return self._vocab.n_tokens if self._hf is None else len(self._hf)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_hf", "_vocab") or self._hf is None:
            raise AttributeError(name)
        return getattr(self._hf, name)


_warned: set[str] = set()


def gguf_tokenizer(hf: Any, gguf: str | Path | None) -> Any:
    """``hf`` with llama.cpp's tokenization of ``gguf`` in front when llama-cpp-python is
    installed; without it ``hf`` itself and a one-line warning (once per file) that token ids
    may differ from llama.cpp's."""
    if gguf is None or not Path(gguf).is_file():
        return hf
    why = f"install llama-cpp-python: {INSTALL_HINT}"
    if available():
        try:
            return LlamaCppTokenizer(hf, Vocab(gguf))
        except LowbitError as exc:
            why = exc.problem
    key = str(gguf)
    if key not in _warned:
        _warned.add(key)
        import warnings

        warnings.warn(f"{gguf}: tokenizing with the transformers tokenizer converted from the GGUF; token ids "
                      f"may differ from llama.cpp's ({why})", stacklevel=2)
    return hf


# ---------------------------------------------------------------------------------------------
# the runtime


class Runner:
    """The GGUF model at ``path`` in llama.cpp's CPU runtime, evaluating ``ctx``-token chunks.

    The context is made as llama-perplexity makes it (``n_seq = max(1, n_batch // ctx)``
    parallel sequences of ``ctx`` tokens, ``n_batch = min(n_batch, n_seq * ctx)``, micro-batches
    of ``n_ubatch``, a KV cache per sequence, llama.cpp's default cache type and attention), and
    :meth:`chunk_logits` decodes up to ``n_seq`` chunks at a time, asking for the logits of the
    positions ``first..ctx-1`` only (llama-perplexity's ``--kl-divergence`` does the same).
    """

    numerics = "llama.cpp runtime (llama-cpp-python): its quantized matmuls, activation quantization and KV cache"

    def __init__(self, path: str | Path, ctx: int, first: int = 0, n_batch: int = 2048, n_ubatch: int = 512,
                 threads: int | None = None) -> None:
        ll = require("--runtime llama.cpp")
        self.ll = ll
        self.path = Path(path)
        self.ctx = int(ctx)
        self.first = int(first)
        self.n_seq = max(1, n_batch // self.ctx)
        self.n_batch = min(n_batch, self.n_seq * self.ctx)
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = 0
        self._model = ll.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self._model:
            raise LowbitError(self.path, "llama.cpp could not load this GGUF file")
        self._vocab = ll.llama_model_get_vocab(self._model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        cp = ll.llama_context_default_params()
        cp.n_ctx = self.n_seq * self.ctx
        cp.n_batch = self.n_batch
        cp.n_ubatch = n_ubatch
        cp.n_seq_max = self.n_seq
        cp.n_threads = cp.n_threads_batch = threads or _threads()
        self._ctx = ll.llama_init_from_model(self._model, cp)
        if not self._ctx:
            self.close()
            raise LowbitError(self.path, "llama.cpp could not create a context for this model")
        self._batch = ll.llama_batch_init(self.n_batch, 0, self.n_seq)

    def chunk_logits(self, chunks: torch.Tensor, first: int | None = None) -> torch.Tensor:
        """Logits (float32 ``[b, ctx, vocab]``) of each chunk (``[b, ctx]`` token ids, BOS already in
        place, each chunk its own sequence from position 0); only positions ``first..ctx-1``
        (default: the runner's ``first``) are computed, the rows before them are zeros."""
        ll = self.ll
        first = self.first if first is None else int(first)
        chunks = torch.as_tensor(chunks, dtype=torch.long).cpu()
        b, n = chunks.shape
        if n != self.ctx:
            raise LowbitError(self.path, f"chunks of {n} tokens given to a {self.ctx}-token context")
        keep = n - first
        full = torch.zeros(b, n, self.n_vocab, dtype=torch.float32)
        out = full[:, first:]
        num_batches = (n + self.n_batch - 1) // self.n_batch
        toks = chunks.numpy()
        for i in range(0, b, self.n_seq):
            g = min(self.n_seq, b - i)
            ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)
            got = 0
            for j in range(num_batches):
                start = j * self.n_batch
                size = min(n - start, self.n_batch)
                batch = self._batch
                k = 0
                rows = []
                for s in range(g):
                    for p in range(start, start + size):
                        batch.token[k] = int(toks[i + s, p])
                        batch.pos[k] = p
                        batch.n_seq_id[k] = 1
                        batch.seq_id[k][0] = s
                        want = p >= first
                        batch.logits[k] = want
                        if want:
                            rows.append((s, p - first))
                        k += 1
                batch.n_tokens = k
                rc = ll.llama_decode(self._ctx, batch)
                if rc != 0:
                    raise LowbitError(self.path, f"llama.cpp failed to decode a batch (llama_decode returned {rc})")
                if rows:
                    ptr = ll.llama_get_logits(self._ctx)
                    arr = np.ctypeslib.as_array(ptr, shape=(len(rows) * self.n_vocab,)).reshape(len(rows), self.n_vocab)
                    r0 = rows[0][1]
                    per_seq = len(rows) // g
                    out[i : i + g, r0 : r0 + per_seq] = torch.from_numpy(arr.reshape(g, per_seq, self.n_vocab))
                    got += per_seq
            assert got == keep
        return full

    def close(self) -> None:
        ll = self.ll
        if getattr(self, "_batch", None) is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            ll.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            ll.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
