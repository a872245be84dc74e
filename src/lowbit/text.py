"""Text for evaluation, calibration and importance matrices: files, defaults, tokens and chunks.

Written once for every user of text: reading a file (UTF-8, non-empty), the default evaluation
text (WikiText-2 when found, else Python's own documentation), the ``pydoc`` calibration set,
tokenizing with BOS the way llama.cpp does, and cutting ``ctx``-token chunks whose first token
is BOS (llama-perplexity's and llama-imatrix's rule).

:func:`encode` is the one text-to-ids call (evaluation, calibration and importance-matrix text
all go through it). For a model that came from a GGUF file the tokenizer the loader gives
(:func:`lowbit.models.loader.load_tokenizer`) is llama.cpp's own
(:class:`lowbit.gguf.llamacpp.LlamaCppTokenizer`), so the ids are llama.cpp's.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import LowbitError

WIKITEXT_CANDIDATES = (
    "../shared/data/wikitext-2-raw/wiki.test.raw",
    "shared/data/wikitext-2-raw/wiki.test.raw",
    "~/.cache/lowbit/data/wiki.test.raw",
)


def read_text(path: str | Path) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise LowbitError(p, "no such text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LowbitError(p, "not UTF-8 text") from None
    if not text.strip():
        raise LowbitError(p, "text file is empty")
    return text


def default_text() -> tuple[str, str]:
    """``(name, text)``: WikiText-2 test when it can be found, else Python's own documentation."""
    env = os.environ.get("LOWBIT_WIKITEXT")
    # Relative candidates are tried from the working folder and from beside a source checkout.
    checkout = Path(__file__).resolve().parents[3]
    cands = [Path(c).expanduser() for c in ([env] if env else []) + list(WIKITEXT_CANDIDATES)]
    cands += [checkout / c for c in WIKITEXT_CANDIDATES if not c.startswith("~")]
    for p in cands:
        if p.is_file():
            return f"WikiText-2 test ({p})", read_text(p)
    return "Python documentation topics (pydoc_data; WikiText-2 not found)", pydoc_text()


def pydoc_text() -> str:
    """The Python standard library's ``pydoc_data.topics`` help text (~1 MB of English prose and
    code, in every CPython): the always-present calibration set and the evaluation fallback."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def model_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text (as llama.cpp's add_bos does)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("hello", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode(tokenizer, text: str, parse_special: bool = False) -> list[int]:
    """Token ids of ``text`` without BOS/EOS. ``parse_special``: control tokens written in the
    text (``<|im_start|>``) become those tokens; llama.cpp's tools read text with it off, which a
    llama.cpp tokenizer follows; transformers tokenizers always parse them."""
    if parse_special and getattr(tokenizer, "llamacpp_vocab", None) is not None:  # a LlamaCppTokenizer
        return list(tokenizer(text, add_special_tokens=False, parse_special=True)["input_ids"])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize(tokenizer, text: str, where: str = "text", add_bos: bool | None = None) -> torch.Tensor:
    """Token ids of the whole text (1-D int64), with BOS at the start when the model uses it
    (``add_bos``: decided by the caller, e.g. from a GGUF's ``tokenizer.ggml.add_bos_token``)."""
    ids = encode(tokenizer, text)
    if add_bos is None:
        add_bos = model_adds_bos(tokenizer)
    if add_bos and getattr(tokenizer, "bos_token_id", None) is not None:
        ids = [tokenizer.bos_token_id] + ids
    if len(ids) < 2:
        raise LowbitError(where, "text is too short to evaluate")
    return torch.tensor(ids, dtype=torch.long)


def chunk_bos(tokenizer, tokens: torch.Tensor) -> int | None:
    """The BOS id to put at the start of every chunk when the token stream begins with one."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None and int(tokens[0]) == bos else None


def make_chunks(tokens: torch.Tensor, ctx: int, bos_id: int | None, max_chunks: int | None = None) -> torch.Tensor:
    """``[n_chunks, ctx]`` windows of the token stream (first token -> BOS when given)."""
    if ctx < 4:
        raise LowbitError(None, f"context length {ctx} is too small")
    n = tokens.numel() // ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise LowbitError(None, f"the text has {tokens.numel()} tokens, fewer than one {ctx}-token chunk")
    chunks = tokens[: n * ctx].reshape(n, ctx).clone()
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks
