"""bitsandbytes' numerics: NF4 / FP4 codebooks in flat blocks, double quantization, LLM.int8 rows.

Byte-identical to bitsandbytes 0.50 on CPU (``tests/test_codebook.py`` against its goldens):

* **4-bit** (:func:`quantize_4bit`): the weight is read row-major as one flat vector and cut
  into blocks of ``blocksize`` values (32 to 4096, a power of two), so a block may span rows;
  the last block may be short. Each block keeps its absolute maximum ``absmax`` (a short last
  block's is at least ``1e-38``); values are scaled by ``clamp(x * (1 / absmax), -1, 1)`` (the
  short block divides: ``x / absmax``) and take the nearest code of the table, ties to the lower
  value. :func:`pack_nibbles` puts two codes in a byte, the even element in the high nibble.
* **double quantization** (:func:`double_quantize`): the absmax vector less its mean is coded
  with the signed 8-bit dynamic map (:data:`DYNAMIC_MAP`) in blocks of 256, as bitsandbytes'
  CPU library does it: a block's absmax, ``x * (1 / absmax)``, and the code index found through a
  65,536-entry lookup table over ``[-1, 1]`` (:func:`dynamic_lookup_table`; an all-zero block
  gets code 0).
* **LLM.int8** (:func:`int8_rowwise`): the weight rounded to float16, ``SCB`` = each row's
  absolute maximum, codes ``round(w * (127 / SCB))`` (half to even) as int8.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from lowbit.errors import LowbitError

from .scheme import QuantScheme

#: NormalFloat4 (QLoRA): quantiles of N(0, 1) scaled to [-1, 1], ascending (bitsandbytes' table).
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
#: bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bits, bias 2) before division by 12, in code order;
#: code 8 (sign bit, zero magnitude) is +0.0 in its table too.
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
#: FP4 codes in ascending value order (of the two zeros, code 0 first: what bitsandbytes' sort gives).
FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

CODEBOOKS = ("nf4", "fp4")
BLOCKSIZES = tuple(1 << k for k in range(5, 13))  # 32 .. 4096
NESTED_BLOCKSIZE = 256
#: The smallest absmax a short last block keeps (bitsandbytes clamps it there, and only there).
TINY = 1e-38

#: bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), float32 bit patterns, ascending.
_DYNAMIC_HEX = (
    "bf7e3333bf7a999abf770000bf736666bf6fcccdbf6c3333bf68999abf650000bf616666bf5dcccdbf5a3333bf56999a"
    "bf530000bf4f6666bf4bcccdbf483333bf44999abf410000bf3d6666bf39cccdbf363334bf32999abf2f0000bf2b6666"
    "bf27cccdbf243334bf20999abf1d0000bf196666bf15cccdbf123334bf0e999abf0b0000bf076666bf03ccccbf003333"
    "bef93332bef20000beeaccccbee3999abedc6666bed53333bece0000bec6ccccbebf999abeb86666beb13333beaa0000"
    "bea2ccccbe9b999abe946666be8d3334be860000be7d9999be6f3333be60cccdbe526666be440000be35999abe273333"
    "be18cccdbe0a6666bdf80000bddb3334bdc9eb85bdc428f7bdbe6667bdb8a3d7bdb2e148bdad1eb8bda75c2abda1999a"
    "bd9bd70abd96147bbd9051ebbd8a8f5dbd84cccdbd7e147bbd728f5dbd670a3dbd5b851fbd500000bd447ae1bd38f5c3"
    "bd2d70a3bd21eb85bd166667bd0ae148bcfeb852bce7ae15bcd0a3d7bcb9999abca28f5dbc8b851fbc68f5c3bc3ae148"
    "bc1f3b64bc160418bc0ccccdbc039581bbf4bc6abbe24dd3bbcfdf3bbbbd70a4bbab020dbb989374bb8624ddbb676c8a"
    "bb428f5cbb1db22dbaf1a9fcbaa7ef9dba7765ffba59e83eba3c6a80ba1eecc1ba016f01b9c7e283b98ce705b923d70b"
    "b8ba1f4bb88aefb3b8378034b7b24206b70205ffb65a1a94b513a3b7000000003513a3b7365a1a94370205ff37b24206"
    "38378034388aefb338ba1f4b3923d70b398ce70539c7e2833a016f013a1eecc13a3c6a803a59e83e3a7765ff3aa7ef9d"
    "3af1a9fc3b1db22d3b428f5c3b676c8a3b8624dd3b9893743bab020d3bbd70a43bcfdf3b3be24dd33bf4bc6a3c039581"
    "3c0ccccd3c1604183c1f3b643c3ae1483c68f5c33c8b851f3ca28f5d3cb9999a3cd0a3d73ce7ae153cfeb8523d0ae148"
    "3d1666673d21eb853d2d70a33d38f5c33d447ae13d5000003d5b851f3d670a3d3d728f5d3d7e147b3d84cccd3d8a8f5d"
    "3d9051eb3d96147b3d9bd70a3da1999a3da75c2a3dad1eb83db2e1483db8a3d73dbe66673dc428f73dc9eb853ddb3334"
    "3df800003e0a66663e18cccd3e2733333e35999a3e4400003e5266663e60cccd3e6f33333e7d99993e8600003e8d3334"
    "3e9466663e9b999a3ea2cccc3eaa00003eb133333eb866663ebf999a3ec6cccc3ece00003ed533333edc66663ee3999a"
    "3eeacccc3ef200003ef933323f0033333f03cccc3f0766663f0b00003f0e999a3f1233343f15cccd3f1966663f1d0000"
    "3f20999a3f2433343f27cccd3f2b66663f2f00003f32999a3f3633343f39cccd3f3d66663f4100003f44999a3f483333"
    "3f4bcccd3f4f66663f5300003f56999a3f5a33333f5dcccd3f6166663f6500003f68999a3f6c33333f6fcccd3f736666"
    "3f7700003f7a999a3f7e33333f800000"
)
_LUT_SIZE = 65536


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map (float32 ``[256]``, ascending), a fresh copy."""
    return torch.from_numpy(_dynamic_np().copy())


@functools.cache
def _dynamic_np() -> np.ndarray:
    bits = np.array([int(_DYNAMIC_HEX[i : i + 8], 16) for i in range(0, len(_DYNAMIC_HEX), 8)], dtype=np.uint32)
    return bits.view(np.float32)


def codebook_values(name: str) -> torch.Tensor:
    """The 16 values (float32, in code order) of codebook ``name`` (``nf4`` or ``fp4``)."""
    if name == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if name == "fp4":
        raw = torch.tensor(FP4_RAW, dtype=torch.float32)
        return raw / raw.abs().max()
    raise LowbitError(None, f"unknown 4-bit quant type {name!r} (choose from {', '.join(CODEBOOKS)})")


def check_blocksize(blocksize: int, where: str | None = None) -> int:
    """``blocksize`` if bitsandbytes' 4-bit quantizer takes it (a power of two, 32 to 4096)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise LowbitError(where, f"blocksize {blocksize!r} is not supported: a power of two from "
                          f"{BLOCKSIZES[0]} to {BLOCKSIZES[-1]}")
    return blocksize


def check_finite(w: torch.Tensor, where: str | None = None) -> None:
    """Refuse NaN or infinite weights (their block's scale would be meaningless)."""
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise LowbitError(where, f"{bad} weight value(s) are NaN or infinite; cannot quantize")


def n_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


def scheme_issue(scheme: QuantScheme) -> str | None:
    """``None`` when bitsandbytes has ``scheme`` (NF4/FP4 flat blocks, double quantized or not; int8 rows), else why not."""
    what = "bitsandbytes has NF4/FP4 codebooks in flat blocks (--scheme NF4, NF4_DQ, FP4, FP4_DQ) and int8 rows " \
           "(--scheme LLM_INT8)"
    if scheme.activations is not None or scheme.dynamic:
        return f"{what}; its activations stay float"
    if scheme.type == "codebook":
        if scheme.codebook not in CODEBOOKS or scheme.bits != 4:
            return f"{what}, not {scheme.describe()}"
        if scheme.granularity != "flat":
            return f"{what}: its blocks are flat (strategy='flat'), not {scheme.granularity}"
        if scheme.group_size not in BLOCKSIZES:
            return f"blocksize {scheme.group_size} is not supported: a power of two from 32 to 4096"
        if scheme.scale_format not in (None, "float32", "nested8"):
            return f"{what}: absmax is float32 or double quantized (nested8), not {scheme.scale_format}"
        return None
    if scheme.type == "int" and scheme.bits == 8 and scheme.symmetric and scheme.granularity == "channel":
        return None
    return f"{what}, not {scheme.describe()}"


# ------------------------------------------------------------------------------ 4-bit blocks


def _scaled_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scaled values in [-1, 1], absmax per block)`` of a flat float32 vector."""
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].reshape(-1, blocksize)
    absmax = head.abs().amax(dim=1) if full else flat.new_zeros(0)
    inv = 1.0 / absmax.clamp(min=TINY)
    scaled = torch.empty_like(flat)
    torch.clamp(head * inv.unsqueeze(1), -1, 1, out=scaled[:full].view(-1, blocksize))
    if full < n:
        tail = flat[full:]
        last = tail.abs().amax().clamp(min=TINY)
        torch.clamp(tail / last, -1, 1, out=scaled[full:])
        absmax = torch.cat([absmax, last.reshape(1)])
    return scaled, absmax


def _nearest(scaled: torch.Tensor, name: str) -> torch.Tensor:
    """Index (uint8) of the nearest code of ``name`` for each value; ties go to the lower value."""
    values = codebook_values(name)
    order = torch.tensor(FP4_ORDER if name == "fp4" else range(16), dtype=torch.int64)
    ascending = values[order]
    midpoints = (ascending[:-1] + ascending[1:]) / 2
    rank = torch.bucketize(scaled, midpoints, out_int32=True)  # number of midpoints strictly below: ties stay low
    if name == "nf4":  # ascending already
        return rank.to(torch.uint8)
    return order.to(torch.uint8)[rank]


def quantize_4bit(w: torch.Tensor, name: str, blocksize: int = 64,
                  where: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 shaped like w, absmax float32 [n_blocks])`` of bitsandbytes' 4-bit quantizer."""
    codebook_values(name)  # unknown names refused here
    check_blocksize(blocksize, where)
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise LowbitError(where, f"4-bit quantization takes float32/float16/bfloat16 weights, not {w.dtype}")
    if w.numel() == 0:
        raise LowbitError(where, "cannot quantize an empty weight")
    check_finite(w, where)
    scaled, absmax = _scaled_blocks(w.detach().reshape(-1).float(), blocksize)
    return _nearest(scaled, name).reshape(w.shape), absmax


def dequantize_4bit(codes: torch.Tensor, absmax: torch.Tensor, name_or_values: str | torch.Tensor,
                    blocksize: int) -> torch.Tensor:
    """float32 values shaped like ``codes``: ``table[code] * absmax`` of each value's flat block."""
    table = codebook_values(name_or_values) if isinstance(name_or_values, str) else name_or_values.float()
    flat = table[codes.reshape(-1).long()]
    scale = absmax.float().reshape(-1).repeat_interleave(blocksize)[: flat.numel()]
    return (flat * scale).reshape(codes.shape)


def pad_code(name: str) -> int:
    """The code bitsandbytes packs after an odd element count (the code of 0.0)."""
    return int(_nearest(torch.zeros(1), name)[0])


def pack_nibbles(codes: torch.Tensor, name: str) -> torch.Tensor:
    """Codes (flattened row-major) two per byte, even element in the high nibble: uint8 ``[ceil(n/2), 1]``."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, torch.tensor([pad_code(name)], dtype=torch.uint8)])
    return ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``numel`` codes (uint8, flat)."""
    b = packed.reshape(-1).to(torch.uint8)
    if b.numel() != -(-numel // 2):
        raise LowbitError(None, f"{b.numel()} packed bytes do not hold {numel} 4-bit codes")
    return torch.stack([b >> 4, b & 0x0F], dim=1).reshape(-1)[:numel]


# --------------------------------------------------------------------- double quantization


@functools.cache
def _lookup_np(table_bytes: bytes) -> np.ndarray:
    code = np.frombuffer(table_bytes, dtype=np.float32)
    midpoints = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    i = np.arange(_LUT_SIZE, dtype=np.float32)
    grid = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(_LUT_SIZE - 1)).astype(np.float32)
    return np.searchsorted(midpoints, grid, side="left").astype(np.uint8)


def dynamic_lookup_table(code: torch.Tensor | None = None) -> torch.Tensor:
    """bitsandbytes' CPU lookup table: the nearest code index (uint8) of each of 65,536 points of ``[-1, 1]``.

    Point ``i`` is ``-1 + 2i / 65535`` in float32; it takes the first code whose midpoint with the
    next one is not below it (ties to the lower code).
    """
    table = _dynamic_np() if code is None else code.detach().cpu().float().numpy()
    return torch.from_numpy(_lookup_np(table.astype(np.float32).tobytes()).copy())


def _lookup_index(v: torch.Tensor) -> torch.Tensor:
    """The table index of scaled values: ``trunc(fma((clamp(v) + 1) * 0.5, 65535, 0.5))`` in float32."""
    t = ((torch.clamp(v, -1.0, 1.0) + 1.0) * 0.5).double()
    return (t * (_LUT_SIZE - 1) + 0.5).float().to(torch.int64)  # one rounding (fused or not: same index)


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE,
                            code: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8, absmax float32 [n_blocks])`` of a float32 vector with the 8-bit dynamic map."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = n_blocks(n, blocksize)
    padded = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).reshape(nb, blocksize)
    absmax = padded.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    lut = dynamic_lookup_table(code)
    q = lut[_lookup_index(padded * inv.unsqueeze(1))]
    q = torch.where((absmax > 0).unsqueeze(1), q, torch.zeros_like(q))
    return q.reshape(-1)[:n], absmax


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes uint8 [n], nested absmax float32 [ceil(n/256)], offset float32 [])`` of a 4-bit absmax vector."""
    absmax = absmax.float()
    offset = absmax.mean()
    q, nested = quantize_blockwise_8bit(absmax - offset)
    return q, nested, offset


def double_dequantize(q: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor | float,
                      code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """The absmax vector (float32) bitsandbytes recovers: ``code[q] * nested_absmax + offset``."""
    table = dynamic_map() if code is None else code.float()
    vals = table[q.reshape(-1).long()]
    scale = nested_absmax.float().reshape(-1).repeat_interleave(blocksize)[: vals.numel()]
    return vals * scale + torch.as_tensor(offset, dtype=torch.float32)


# --------------------------------------------------------------------------------- LLM.int8


def int8_rowwise(w: torch.Tensor, where: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [out, in], SCB float32 [out])`` of bitsandbytes' LLM.int8 weight quantizer."""
    if w.dim() != 2:
        raise LowbitError(where, f"expected a 2-D weight, got shape {tuple(w.shape)}")
    check_finite(w, where)
    half = w.detach().to(torch.float16)
    scb = half.abs().amax(dim=1).float()
    codes = torch.round(half * (127.0 / scb.unsqueeze(1))).to(torch.int8)
    return codes, scb


def int8_scale(scb: torch.Tensor) -> torch.Tensor:
    """The per-row step bitsandbytes dequantizes int8 rows with: ``SCB * (1 / 127)`` (float32)."""
    return scb.float() * 7.874015718698502e-3
