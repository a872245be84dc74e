"""Data-free calibration: token sequences sampled from the model itself.

Each sample starts with the model's BOS token (when its tokenizer adds one) and a random
ordinary word from the vocabulary, then continues by ancestral sampling (temperature 1, no
top-k/top-p) with special tokens masked out, so every sample is exactly ``seq_len`` tokens of
text the model finds likely. This is the "data-free" calibration of LLM-QAT (Liu et al., 2023):
it needs no dataset, and it is always in the model's own distribution, which matters for GPTQ
(it fits the Hessian of the calibration text; out-of-domain text such as code documentation
makes it worse on prose than plain rounding).

Sampling uses its own seeded generator, so the same model, sizes and seed give the same tokens
on the same device. Results are cached under ``LOWBIT_CACHE/calibration`` because generating
them needs the whole model in memory (or on the GPU) and takes a forward pass per token.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lowbit.errors import LowbitError

from .cache import cache_dir

VERSION = 1
_WORD_SCAN = 30000  # first vocabulary ids searched for ordinary words


def _word_ids(tokenizer: Any) -> list[int]:
    """Ids among the first vocabulary entries that decode to one alphabetic word."""
    n = min(int(getattr(tokenizer, "vocab_size", 0) or len(tokenizer)), _WORD_SCAN)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    words = [i for i in range(n) if i not in special and tokenizer.decode([i]).strip().isalpha()]
    if not words:
        raise LowbitError("selfgen", "no ordinary word tokens found in the vocabulary")
    return words


def _banned_ids(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    special = [i for i in (getattr(tokenizer, "all_special_ids", []) or []) if 0 <= i < vocab_size]
    return torch.tensor(sorted(set(special)), dtype=torch.long)


@torch.no_grad()
def sample_sequences(
    model: torch.nn.Module,
    tokenizer: Any,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    batch_size: int = 16,
    bos_id: int | None = None,
    on_batch: Any = None,
) -> torch.Tensor:
    """``[n_samples, seq_len]`` token ids sampled from ``model`` (see the module docstring)."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    words = torch.tensor(_word_ids(tokenizer), device=device)
    prefix = 1 + (bos_id is not None)
    if seq_len <= prefix:
        raise LowbitError("selfgen", f"seq_len {seq_len} is too short for self-generated samples")
    out: list[torch.Tensor] = []
    for b0 in range(0, n_samples, batch_size):
        nb = min(batch_size, n_samples - b0)
        first = words[torch.randint(len(words), (nb, 1), generator=g, device=device)]
        ids = first if bos_id is None else torch.cat([torch.full_like(first, bos_id), first], 1)
        res = model(input_ids=ids, use_cache=True)
        cache = res.past_key_values
        logits = res.logits[:, -1].float()
        banned = _banned_ids(tokenizer, logits.shape[-1]).to(device)
        seqs = [ids]
        for _ in range(seq_len - prefix):
            logits[:, banned] = float("-inf")
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
            seqs.append(nxt)
            res = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, logits = res.past_key_values, res.logits[:, -1].float()
        out.append(torch.cat(seqs, 1).cpu())
        if on_batch is not None:
            on_batch(b0 + nb)
    return torch.cat(out, 0)


def _cache_path(identity: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps({"v": VERSION, **identity}, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "calibration" / f"selfgen-{key}.safetensors"


def self_generated(source: Any, n_samples: int, seq_len: int, seed: int = 0, device: str | torch.device | None = None,
                   batch_size: int | None = None, bos_id: int | None | str = "auto") -> torch.Tensor:
    """Self-generated calibration ids for a model source (``lowbit.models.resolve`` input), cached.

    ``batch_size`` (sequences sampled at once) defaults to 64 on CUDA and 16 on the CPU; it is
    part of the cache key because it changes which random numbers each sequence draws.
    ``bos_id``: the token each sample starts with; ``"auto"`` takes the tokenizer's BOS when the
    tokenizer adds one to a text, as the model sees it in use.
    """
    from lowbit.progress import bar
    from lowbit.text import model_adds_bos

    from .loader import load, load_tokenizer, resolve

    src = resolve(source)
    files = sorted(p for p in src.hf_dir.glob("*") if p.suffix in (".safetensors", ".bin", ".json"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = batch_size or (64 if dev.type == "cuda" else 16)
    identity = {"model": [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files], "dir": str(src.hf_dir.resolve()),
                "n": n_samples, "len": seq_len, "seed": seed, "batch": batch_size, "device": dev.type, "bos": bos_id}
    path = _cache_path(identity)
    if path.is_file():
        return load_file(str(path))["input_ids"]
    tok = load_tokenizer(src.hf_dir)
    bos = (tok.bos_token_id if model_adds_bos(tok) else None) if bos_id == "auto" else bos_id
    lm = load(src, device=dev)
    progress = bar(n_samples, desc=f"sampling {n_samples} x {seq_len} calibration tokens from the model", unit="seq")
    done = [0]

    def step(k: int) -> None:
        progress.update(k - done[0])
        done[0] = k

    t0 = time.perf_counter()
    ids = sample_sequences(lm.model, tok, n_samples, seq_len, seed, batch_size, bos, step)
    progress.close()
    del lm
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"input_ids": ids.contiguous()}, str(tmp), metadata={"seconds": f"{time.perf_counter() - t0:.1f}"})
    os.replace(tmp, path)
    return ids
