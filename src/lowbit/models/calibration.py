"""Calibration data: ``N`` samples of ``L`` tokens from a text file or a JSONL of chat messages.

Plain text is tokenized once and ``N`` windows of ``L`` tokens are drawn at random offsets
(seeded, so the same config gives the same samples). A JSONL file holds one conversation per
line (``{"messages": [{"role": ..., "content": ...}, ...]}``, a bare list of messages, or
``{"text": ...}``); each conversation is one sample, truncated to ``L`` tokens and right-padded
with an attention mask when shorter. ``chat_template=True`` renders conversations with the
tokenizer's chat template; otherwise their contents are joined with newlines.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError

GPTQ_DEFAULT = (128, 2048)
AWQ_DEFAULT = (128, 512)


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration text comes from and how much of it to use.

    ``n_samples``/``seq_len`` of ``None`` take the method's defaults (GPTQ 128x2048, AWQ 128x512).
    ``text`` (a string) may replace ``path`` (mostly for tests). ``batch_size`` is how many
    samples run through a layer at once.
    """

    path: str | None = None
    n_samples: int | None = None
    seq_len: int | None = None
    seed: int = 0
    chat_template: bool = False
    text: str | None = None
    batch_size: int = 8

    def resolved(self, method: str) -> "CalibrationConfig":
        """A copy with ``n_samples``/``seq_len`` filled from the method's defaults."""
        n, L = AWQ_DEFAULT if method == "awq" else GPTQ_DEFAULT
        return CalibrationConfig(
            self.path, self.n_samples or n, self.seq_len or L, self.seed, self.chat_template, self.text, self.batch_size
        )

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        if d["text"] is not None:
            d["text"] = f"<{len(d['text'])} chars>"
        return d


@dataclass
class CalibrationData:
    """``input_ids`` ``[N, L]`` (long) and ``attention_mask`` ``[N, L]`` (long; ``None`` if unpadded)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    source: str

    @property
    def n_tokens(self) -> int:
        if self.attention_mask is None:
            return int(self.input_ids.numel())
        return int(self.attention_mask.sum())

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Consecutive ``(input_ids, attention_mask)`` slices of at most ``batch_size`` samples."""
        out = []
        for b0 in range(0, self.input_ids.shape[0], batch_size):
            ids = self.input_ids[b0 : b0 + batch_size]
            mask = None if self.attention_mask is None else self.attention_mask[b0 : b0 + batch_size]
            out.append((ids, mask))
        return out


def default_calibration_text() -> str:
    """The Python standard library's ``pydoc_data.topics`` help text (~1 MB of English prose and code)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def _windows(ids: list[int], n: int, L: int, seed: int, where: str) -> torch.Tensor:
    total = len(ids)
    if total < L:
        raise LowbitError(
            where, f"calibration text is too short: {total} tokens, but one sample needs {L} (lower seq_len or add text)"
        )
    if total < n * L:
        warnings.warn(
            f"{where}: {total} tokens cannot hold {n} disjoint windows of {L}; samples will overlap",
            stacklevel=3,
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - L + 1, (n,), generator=g).tolist()
    t = torch.tensor(ids, dtype=torch.long)
    return torch.stack([t[s : s + L] for s in starts])


def _conversation_text(obj: Any, tokenizer: Any, chat_template: bool, where: str) -> str:
    messages = obj.get("messages") if isinstance(obj, dict) else obj
    if isinstance(obj, dict) and messages is None and isinstance(obj.get("text"), str):
        return obj["text"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
        raise LowbitError(where, "each JSONL line must be {'messages': [{'role', 'content'}, ...]}, a list, or {'text'}")
    if chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise LowbitError(where, "chat_template requested but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(str(m["content"]) for m in messages)


def _from_jsonl(path: Path, tokenizer: Any, cfg: CalibrationConfig) -> CalibrationData:
    where = str(path)
    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise LowbitError(f"{where}:{lineno}", "not valid JSON") from None
        texts.append(_conversation_text(obj, tokenizer, cfg.chat_template, f"{where}:{lineno}"))
    n, L = int(cfg.n_samples or 0), int(cfg.seq_len or 0)
    if len(texts) < n:
        raise LowbitError(where, f"calibration file is too short: {len(texts)} conversations, {n} samples requested")
    g = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(len(texts), generator=g)[:n].tolist()
    pad = _pad_id(tokenizer)
    ids = torch.full((n, L), pad, dtype=torch.long)
    mask = torch.zeros((n, L), dtype=torch.long)
    for row, k in enumerate(pick):
        toks = _encode(tokenizer, texts[k])[:L]
        if not toks:
            raise LowbitError(where, f"conversation {k + 1} tokenizes to nothing")
        ids[row, : len(toks)] = torch.tensor(toks)
        mask[row, : len(toks)] = 1
    return CalibrationData(ids, None if bool(mask.all()) else mask, where)


def load_calibration(tokenizer: Any, cfg: CalibrationConfig, method: str = "gptq") -> CalibrationData:
    """Tokenized calibration samples following ``cfg`` (defaults by ``method``)."""
    cfg = cfg.resolved(method)
    n, L = int(cfg.n_samples or 0), int(cfg.seq_len or 0)
    if n <= 0 or L <= 0:
        raise LowbitError("calibration", f"n_samples and seq_len must be positive, got {n} x {L}")
    if cfg.text is not None:
        return CalibrationData(_windows(_encode(tokenizer, cfg.text), n, L, cfg.seed, "calibration text"), None, "text")
    if cfg.path is None:
        text = default_calibration_text()
        return CalibrationData(_windows(_encode(tokenizer, text), n, L, cfg.seed, "pydoc_data.topics"), None, "pydoc_data.topics")
    path = Path(cfg.path)
    if not path.is_file():
        raise LowbitError(path, "calibration file not found")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return _from_jsonl(path, tokenizer, cfg)
    text = path.read_text(encoding="utf-8", errors="replace")
    return CalibrationData(_windows(_encode(tokenizer, text), n, L, cfg.seed, str(path)), None, str(path))
