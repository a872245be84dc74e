"""A GGUF model's hyper-parameters, validated against its tensors before any work.

llama.cpp's converters write the architecture as metadata (``<arch>.block_count``,
``<arch>.attention.head_count``, ...) beside the tensors. Nothing forces the two to agree: a head
count of 0, head counts that do not divide the embedding, a block count that does not match the
``blk.N`` tensors present, a NaN or negative norm epsilon, a vocabulary that does not match the
embedding rows all make a file that loads and computes garbage (or crashes deep inside torch).
:func:`validate_hparams` checks every hyper-parameter the model needs (types, ranges,
finiteness) and its consequences for the tensors present (shapes, counts) and returns them as
:class:`GGUFHParams`; every refusal is one :class:`~lowbit.errors.LowbitError` naming the file
and the key. Torch-free: it needs only the header.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LowbitError
from ..models.architectures import by_gguf_arch

MAX_LAYERS = 4096
MAX_WIDTH = 1 << 20  # embedding, feed-forward and head dimensions
MAX_HEADS = 1 << 14
MAX_CONTEXT = 1 << 24  # 16 Mi tokens (the longest published contexts are 10 Mi)
MAX_VOCAB = 1 << 24

_BLK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class GGUFHParams:
    """The validated hyper-parameters of a GGUF model (llama.cpp's names in comments)."""

    arch: str  # general.architecture as written in the file (the prefix of its keys)
    family: str  # lowbit's family name (models.architectures)
    n_layer: int  # block_count
    n_embd: int  # embedding_length
    n_ff: int  # feed_forward_length
    n_head: int  # attention.head_count
    n_head_kv: int  # attention.head_count_kv
    head_dim: int  # attention.key_length (default embedding_length / head_count)
    explicit_head_dim: bool  # key_length or rope.dimension_count given
    eps: float  # attention.layer_norm_rms_epsilon
    n_ctx: int  # context_length (default 2048)
    n_vocab: int  # token_embd.weight rows
    rope_base: float | None  # rope.freq_base
    sliding_window: int | None  # gemma3.attention.sliding_window


def _fail(path: str | Path | None, problem: str) -> LowbitError:
    return LowbitError(path, problem)


def _scalar(kv: Mapping[str, Any], key: str, path: str | Path | None) -> Any:
    v = kv.get(key)
    if isinstance(v, (list, tuple)) or getattr(v, "ndim", 0) > 0:
        raise _fail(path, f"metadata {key} is an array; a single number is expected")
    return v


def _int(kv: Mapping[str, Any], key: str, path: str | Path | None, lo: int, hi: int,
         default: int | None = None) -> int:
    v = _scalar(kv, key, path)
    if v is None:
        if default is None:
            raise _fail(path, f"missing metadata key {key}")
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(path, f"metadata {key} = {v!r} is not an integer")
    if not lo <= v <= hi:
        raise _fail(path, f"metadata {key} = {v} is out of range ({lo} to {hi})")
    return v


def _float(kv: Mapping[str, Any], key: str, path: str | Path | None, default: float | None = None) -> float | None:
    v = _scalar(kv, key, path)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(path, f"metadata {key} = {v!r} is not a number")
    return float(v)


def _layers_text(found: Sequence[int]) -> str:
    if not found:
        return "no blk.N tensors"
    runs, start, prev = [], found[0], found[0]
    for i in list(found[1:]) + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return "blk." + ", ".join(runs)


def validate_hparams(kv: Mapping[str, Any], shapes: Mapping[str, Sequence[int]],
                     path: str | Path | None) -> GGUFHParams:
    """Check the architecture metadata of a GGUF file against its tensors; returns the values.

    ``kv``: the file's metadata (full arrays); ``shapes``: tensor name -> PyTorch-order shape.
    Refuses, naming ``path`` and the key: a missing or non-integer hyper-parameter, a value out
    of range, head counts of 0 or that do not divide, a block count that differs from the
    ``blk.N`` tensors present, a norm epsilon that is NaN, infinite, zero, negative or absurd
    (>= 1), rope dimensions that differ from the head dimension, a vocabulary (``vocab_size``,
    ``tokenizer.ggml.tokens``, BOS/EOS ids) that does not match ``token_embd.weight``, and
    attention / feed-forward / output tensors whose shapes the hyper-parameters contradict."""
    arch_v = kv.get("general.architecture")
    if not isinstance(arch_v, str):
        raise _fail(path, "missing metadata key general.architecture" if arch_v is None
                    else f"metadata general.architecture = {arch_v!r} is not a string")
    family = by_gguf_arch(arch_v, path)
    a = arch_v

    n_layer = _int(kv, f"{a}.block_count", path, 1, MAX_LAYERS)
    n_embd = _int(kv, f"{a}.embedding_length", path, 1, MAX_WIDTH)
    # the vocabulary: the embedding's rows, and everything that names a token
    embd = shapes.get("token_embd.weight")
    if embd is None:
        raise _fail(path, "missing tensor token_embd.weight")
    if len(embd) != 2:
        raise _fail(path, f"tensor token_embd.weight has shape {tuple(embd)}, expected (vocabulary, {n_embd})")
    n_vocab, cols = int(embd[0]), int(embd[1])
    if cols != n_embd:
        raise _fail(path, f"metadata {a}.embedding_length = {n_embd}, but token_embd.weight has {cols} columns")
    if n_vocab > MAX_VOCAB:
        raise _fail(path, f"token_embd.weight has {n_vocab} rows, more than any vocabulary ({MAX_VOCAB})")
    n_ff = _int(kv, f"{a}.feed_forward_length", path, 1, MAX_WIDTH)
    n_head = _int(kv, f"{a}.attention.head_count", path, 1, MAX_HEADS)
    n_head_kv = _int(kv, f"{a}.attention.head_count_kv", path, 1, MAX_HEADS, default=n_head)
    if n_head % n_head_kv:
        raise _fail(path, f"metadata {a}.attention.head_count_kv = {n_head_kv} does not divide "
                          f"{a}.attention.head_count = {n_head}")
    key_len = _int(kv, f"{a}.attention.key_length", path, 1, MAX_WIDTH, default=0) or None
    val_len = _int(kv, f"{a}.attention.value_length", path, 1, MAX_WIDTH, default=0) or None
    rope_dim = _int(kv, f"{a}.rope.dimension_count", path, 1, MAX_WIDTH, default=0) or None
    if key_len is None and n_embd % n_head:
        raise _fail(path, f"metadata {a}.attention.head_count = {n_head} does not divide "
                          f"{a}.embedding_length = {n_embd}")
    head_dim = key_len or n_embd // n_head  # llama.cpp's n_embd_head_k
    if val_len is not None and val_len != head_dim:
        raise _fail(path, f"metadata {a}.attention.value_length = {val_len} differs from the key length "
                          f"{head_dim} (not supported)")
    if rope_dim is not None and rope_dim != head_dim:
        raise _fail(path, f"metadata {a}.rope.dimension_count = {rope_dim} differs from the head dimension "
                          f"{head_dim} (partial rotary embeddings are not supported for {a})")
    if head_dim % 2:
        raise _fail(path, f"the head dimension {head_dim} is odd (rotary embeddings need an even one)")

    eps = _float(kv, f"{a}.attention.layer_norm_rms_epsilon", path)
    if eps is None:
        raise _fail(path, f"missing metadata key {a}.attention.layer_norm_rms_epsilon")
    if not math.isfinite(eps) or not 0.0 < eps < 1.0:
        raise _fail(path, f"metadata {a}.attention.layer_norm_rms_epsilon = {eps:.6g} is not a small positive "
                          "number (expected about 1e-6 to 1e-5)")
    n_ctx = _int(kv, f"{a}.context_length", path, 1, MAX_CONTEXT, default=2048)
    rope_base = _float(kv, f"{a}.rope.freq_base", path)
    if rope_base is not None and (not math.isfinite(rope_base) or rope_base <= 0.0):
        raise _fail(path, f"metadata {a}.rope.freq_base = {rope_base:.6g} is not a positive number")
    factor = _float(kv, f"{a}.rope.scaling.factor", path)
    if factor is not None and (not math.isfinite(factor) or factor <= 0.0):
        raise _fail(path, f"metadata {a}.rope.scaling.factor = {factor:.6g} is not a positive number")
    window = None
    if family.name == "gemma3":
        window = _int(kv, f"{a}.attention.sliding_window", path, 1, MAX_CONTEXT, default=4096)

    vocab_key = _int(kv, f"{a}.vocab_size", path, 1, MAX_VOCAB, default=0) or None
    if vocab_key is not None and vocab_key != n_vocab:
        raise _fail(path, f"metadata {a}.vocab_size = {vocab_key}, but token_embd.weight has {n_vocab} rows")
    tokens = kv.get("tokenizer.ggml.tokens")
    if tokens is not None:
        if not isinstance(tokens, (list, tuple)):
            raise _fail(path, "metadata tokenizer.ggml.tokens is not an array of strings")
        if len(tokens) != n_vocab:
            raise _fail(path, f"metadata tokenizer.ggml.tokens has {len(tokens)} tokens, but token_embd.weight "
                              f"has {n_vocab} rows")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):  # the ids lowbit uses
        if kv.get(key) is not None:
            _int(kv, key, path, 0, n_vocab - 1)
    out = shapes.get("output.weight")
    if out is not None and tuple(int(d) for d in out) != (n_vocab, n_embd):
        raise _fail(path, f"tensor output.weight has shape {tuple(out)}, expected ({n_vocab}, {n_embd}) "
                          "like token_embd.weight")

    # the blocks present must be exactly blk.0 .. blk.{block_count - 1}
    found = sorted({int(m.group(1)) for name in shapes if (m := _BLK.match(name))})
    if found != list(range(n_layer)):
        raise _fail(path, f"metadata {a}.block_count = {n_layer}, but the file holds tensors of "
                          f"{_layers_text(found)}")

    # what the hyper-parameters imply for the shapes of every block's tensors
    want = {
        "attn_q.weight": (n_head * head_dim, n_embd, f"{a}.attention.head_count ({n_head}) x head dimension"),
        "attn_k.weight": (n_head_kv * head_dim, n_embd, f"{a}.attention.head_count_kv ({n_head_kv}) x head dimension"),
        "attn_v.weight": (n_head_kv * head_dim, n_embd, f"{a}.attention.head_count_kv ({n_head_kv}) x head dimension"),
        "attn_output.weight": (n_embd, n_head * head_dim, f"{a}.embedding_length ({n_embd})"),
        "ffn_gate.weight": (n_ff, n_embd, f"{a}.feed_forward_length ({n_ff})"),
        "ffn_up.weight": (n_ff, n_embd, f"{a}.feed_forward_length ({n_ff})"),
        "ffn_down.weight": (n_embd, n_ff, f"{a}.embedding_length ({n_embd})"),
    }
    hd = f"{head_dim} = " + (f"{a}.attention.key_length" if key_len else f"{a}.embedding_length / {a}.attention.head_count")
    for i in range(n_layer):
        for part, (rows, ncols, why) in want.items():
            name = f"blk.{i}.{part}"
            s = shapes.get(name)
            if s is None:
                continue  # a missing tensor is reported by the check of names against the architecture
            if tuple(int(d) for d in s) != (rows, ncols):
                why = why.replace("head dimension", f"head dimension ({hd})")
                raise _fail(path, f"tensor {name} has shape {tuple(s)}, but the metadata implies ({rows}, {ncols}) "
                                  f"from {why}")
    return GGUFHParams(arch=a, family=family.name, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head,
                       n_head_kv=n_head_kv, head_dim=head_dim, explicit_head_dim=bool(key_len or rope_dim),
                       eps=eps, n_ctx=n_ctx, n_vocab=n_vocab, rope_base=rope_base, sliding_window=window)
