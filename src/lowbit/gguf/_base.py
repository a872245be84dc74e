"""The block-type interface and registry behind :mod:`lowbit.gguf.quants`."""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


class BlockType:
    """One GGUF tensor type: ``block_size`` values stored in ``type_size`` bytes.

    Subclasses implement :meth:`quantize_rows` (if the type can be written) and
    :meth:`dequantize_blocks`. All methods take and return torch tensors on any device.
    """

    qtype: GGMLQuantizationType
    block_size: int
    type_size: int
    #: True when :meth:`quantize_rows` reads whole-row statistics (keeps row chunks whole).
    can_quantize: bool = True

    @classmethod
    def quantize_rows(cls, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        """float32 ``[R, C]`` (and importance ``[C]`` or None) -> uint8 ``[R, C // block_size * type_size]``."""
        raise NotImplementedError(f"quantization to {cls.qtype.name} is not implemented")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, type_size]`` -> float32 ``[N, block_size]``."""
        raise NotImplementedError(f"dequantization of {cls.qtype.name} is not implemented")


REGISTRY: dict[GGMLQuantizationType, type[BlockType]] = {}


def register(qtype: GGMLQuantizationType, can_quantize: bool = True):
    """Class decorator: fill in the type's sizes and add it to :data:`REGISTRY`."""

    def wrap(cls: type[BlockType]) -> type[BlockType]:
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        cls.can_quantize = can_quantize
        REGISTRY[qtype] = cls
        return cls

    return wrap


def blocks_of(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[R, C]`` -> ``[R * C / block, block]`` (a view when possible)."""
    return x.reshape(-1, block)


def element_major(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[..., n]``-grouped values -> contiguous ``[n, M]`` for the per-element loops."""
    return x.reshape(-1, n).t().contiguous()


def bytes_rows(blocks: torch.Tensor, rows: int) -> torch.Tensor:
    """uint8 ``[N, type_size]`` -> ``[rows, N / rows * type_size]``."""
    return blocks.reshape(rows, -1)
