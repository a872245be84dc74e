"""Bit packing of small unsigned integer codes into int32 or uint8 words.

Codes are laid out as one little-endian bit stream along the packed dimension: code ``i``
occupies bits ``[i*bits, (i+1)*bits)`` of the stream, and word ``k`` holds stream bits
``[k*W, (k+1)*W)``. For 2, 4 and 8 bits this is the usual "first value in the lowest bits";
for 3 bits it is the layout GPTQ uses (32 codes in 3 int32 words, values crossing words).
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

_WORD_BITS = {torch.int32: 32, torch.uint8: 8}


def _move_last(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.movedim(dim, -1)


def pack(q: torch.Tensor, bits: int, dim: int = -1, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Pack codes in ``[0, 2**bits)`` along ``dim`` into words of ``dtype`` (int32 or uint8)."""
    if dtype not in _WORD_BITS:
        raise LowbitError(None, f"pack supports int32 and uint8 words, not {dtype}")
    word = _WORD_BITS[dtype]
    x = _move_last(q.to(torch.int64), dim)
    n = x.shape[-1]
    if (n * bits) % word:
        raise LowbitError(None, f"{n} codes of {bits} bits do not fill whole {word}-bit words")
    if int(x.min()) < 0 or int(x.max()) >= (1 << bits):
        raise LowbitError(None, f"codes must lie in [0, {1 << bits}) to pack into {bits} bits")
    lead = x.shape[:-1]
    if word % bits == 0:
        per = word // bits
        shifts = torch.arange(per, device=x.device, dtype=torch.int64) * bits
        words = (x.reshape(*lead, n // per, per) << shifts).sum(dim=-1)
    else:
        bit_idx = torch.arange(bits, device=x.device, dtype=torch.int64)
        stream = ((x[..., None] >> bit_idx) & 1).reshape(*lead, n * bits // word, word)
        words = (stream << torch.arange(word, device=x.device, dtype=torch.int64)).sum(dim=-1)
    if dtype == torch.int32:
        words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(dtype).movedim(-1, dim)


def unpack(packed: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack`: ``n`` codes (int32) along ``dim``."""
    if packed.dtype not in _WORD_BITS:
        raise LowbitError(None, f"unpack supports int32 and uint8 words, not {packed.dtype}")
    word = _WORD_BITS[packed.dtype]
    x = _move_last(packed.to(torch.int64), dim) & ((1 << word) - 1)
    lead = x.shape[:-1]
    if x.shape[-1] * word < n * bits:
        raise LowbitError(None, f"{x.shape[-1]} words hold fewer than {n} codes of {bits} bits")
    if word % bits == 0:
        per = word // bits
        shifts = torch.arange(per, device=x.device, dtype=torch.int64) * bits
        codes = ((x[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*lead, -1)[..., :n]
    else:
        stream = ((x[..., None] >> torch.arange(word, device=x.device, dtype=torch.int64)) & 1)
        stream = stream.reshape(*lead, -1)[..., : n * bits].reshape(*lead, n, bits)
        codes = (stream << torch.arange(bits, device=x.device, dtype=torch.int64)).sum(dim=-1)
    return codes.to(torch.int32).movedim(-1, dim)
