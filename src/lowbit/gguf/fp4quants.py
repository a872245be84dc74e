"""FP4 (E2M1) block types: MXFP4 and NVFP4, byte-identical to llama.cpp.

Both store 4-bit E2M1 codes (values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives,
held doubled as integers). MXFP4 has one E8M0 power-of-two scale per 32 values;
NVFP4 one unsigned E4M3 scale per 16 values, four per 64-value block. Each value gets
the nearest code (first of equals), as llama.cpp's ``best_index_mxfp4``. The FP4 numerics
themselves live in :mod:`lowbit.core.fp4`, shared with the compressed-tensors NVFP4 / MXFP4 writers.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from ..core.fp4 import KVALUES_FP4, best_index, e8m0_half, fp32_to_ue4m3, ue4m3_to_fp32
from ._base import BlockType, blocks_of, bytes_rows, register
from ._blockops import c_int8_cast, const, divs


def _best_index(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """First index minimizing ``|k[i] * d - x|`` (x ``[..., n]``, d ``[..., 1]``) -> int64."""
    return best_index(x, d, const(KVALUES_FP4, torch.float32, x.device))


def _pack(idx: torch.Tensor, half: int) -> torch.Tensor:
    """Codes ``[N, 2*half]`` -> ``[N, half]`` bytes: j low nibble, j+half high nibble."""
    return (idx[:, :half] | (idx[:, half:] << 4)).to(torch.uint8)





@register(GGMLQuantizationType.MXFP4)
class MXFP4(BlockType):
    """e (E8M0 exponent), qs[16]."""

    @classmethod
    def quantize_rows(cls, x, qw):
        b = blocks_of(x, 32)
        amax = b.abs().amax(dim=1)
        pos = amax > 0
        # floorf(log2f(amax)): a float64 log2 rounded once to float32 is the correctly rounded log2f
        lg = torch.floor(torch.log2(torch.where(pos, amax, torch.ones_like(amax)).double()).float())
        e = torch.where(pos, c_int8_cast(lg - 2.0 + 127.0) & 0xFF, torch.zeros_like(amax, dtype=torch.int32))
        d = e8m0_half(e)
        idx = _best_index(b, d.unsqueeze(1))
        return bytes_rows(torch.cat([e.to(torch.uint8).unsqueeze(1), _pack(idx, 16)], dim=1), x.shape[0])

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = e8m0_half(blocks[:, 0])
        q = blocks[:, 1:].to(torch.int64)
        idx = torch.cat([q & 0xF, q >> 4], dim=1)
        return const(KVALUES_FP4, torch.float32, blocks.device)[idx] * d.unsqueeze(1)


@register(GGMLQuantizationType.NVFP4)
class NVFP4(BlockType):
    """d[4] (UE4M3 per 16 values), qs[32] (per 16 values: j low nibble, j+8 high nibble)."""

    @classmethod
    def quantize_rows(cls, x, qw):
        b = blocks_of(x, 16)  # sub-blocks
        amax = b.abs().amax(dim=1)
        ue = fp32_to_ue4m3(divs(amax, 6.0))
        d = ue4m3_to_fp32(ue)
        idx = _best_index(b, d.unsqueeze(1))
        qs = _pack(idx, 8).reshape(-1, 32)
        out = torch.cat([ue.to(torch.uint8).reshape(-1, 4), qs], dim=1)
        return bytes_rows(out, x.shape[0])

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = ue4m3_to_fp32(blocks[:, :4]).reshape(-1, 4, 1)
        q = blocks[:, 4:].to(torch.int64).reshape(-1, 4, 8)
        idx = torch.cat([q & 0xF, q >> 4], dim=2)
        return (const(KVALUES_FP4, torch.float32, blocks.device)[idx] * d).reshape(-1, 64)
