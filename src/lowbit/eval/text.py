"""Evaluation text: any file the user gives, or a default found on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import LowbitError

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
    from pydoc_data import topics  # ships with every CPython

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return "Python documentation topics (pydoc_data; WikiText-2 not found)", text


def model_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text (as llama.cpp's add_bos does)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("hello", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def tokenize(tokenizer, text: str, where: str = "text") -> torch.Tensor:
    """Token ids of the whole text (1-D int64), with BOS at the start when the model uses it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if model_adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id] + ids
    if len(ids) < 2:
        raise LowbitError(where, "text is too short to evaluate")
    return torch.tensor(ids, dtype=torch.long)


def chunk_bos(tokenizer, tokens: torch.Tensor) -> int | None:
    """The BOS id to put at the start of every chunk when the token stream begins with one."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None and int(tokens[0]) == bos else None
