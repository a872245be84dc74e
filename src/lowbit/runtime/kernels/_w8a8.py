"""What the W8A8 GEMM kernels (:mod:`.scaled_mm_fp8`, :mod:`.int_mm_w8a8`) share.

* the shapes torch's 8-bit GEMMs accept, as measured with torch 2.11 on an H100 (cuBLASLt):
  ``torch._scaled_mm`` (FP8) takes ``[M, K] @ [K, N]`` with ``K`` and ``N`` multiples of 16, any
  ``M``, the first operand row-major and the second column-major; its scales are both per tensor
  (0-dim) or both per row / column (``[M, 1]`` and ``[1, N]`` float32: a per-token scale with a
  per-tensor weight scale is refused, so the scalar is expanded). ``torch._int_mm`` (int8 x int8
  -> int32) takes ``K`` and ``N`` multiples of 8 and needs ``M > 16`` on CUDA (smaller inputs are
  zero-padded to :data:`INT_MM_PAD_ROWS` rows here); with a column-major second operand it runs
  for every ``M > 16`` (row-major failed for ``M`` = 17 and 24);
* the weight in the layout the GEMM wants, made once per layer and kept beside it (keyed on the
  buffers' storage and version, so moving or editing the layer remakes it).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..qlinear import QuantLinear

__all__ = ["INT_MM_MIN_ROWS", "INT_MM_PAD_ROWS", "int_mm_accepts", "int_mm_rows", "scaled_mm_accepts", "weight_cache"]

#: ``torch._scaled_mm``: both dimensions of the (column-major) weight operand must be multiples of this.
SCALED_MM_MULTIPLE = 16
#: ``torch._int_mm``: ``K`` and ``N`` must be multiples of this.
INT_MM_MULTIPLE = 8
#: ``torch._int_mm`` on CUDA needs at least this many rows (``M > 16``).
INT_MM_MIN_ROWS = 17
#: Inputs of fewer than :data:`INT_MM_MIN_ROWS` rows are zero-padded to this many (a multiple of 16).
INT_MM_PAD_ROWS = 32

#: Input dtypes the kernels take (the output has the input's dtype).
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def scaled_mm_accepts(k: int, n: int) -> bool:
    """Whether ``torch._scaled_mm`` multiplies ``[M, k]`` FP8 inputs by a ``[k, n]`` FP8 weight (any ``M``)."""
    return k > 0 and n > 0 and k % SCALED_MM_MULTIPLE == 0 and n % SCALED_MM_MULTIPLE == 0


def int_mm_accepts(k: int, n: int) -> bool:
    """Whether ``torch._int_mm`` multiplies ``[M, k]`` int8 inputs by a ``[k, n]`` int8 weight (``M`` padded)."""
    return k > 0 and n > 0 and k % INT_MM_MULTIPLE == 0 and n % INT_MM_MULTIPLE == 0


def int_mm_rows(m: int) -> int:
    """The rows ``torch._int_mm`` is given for an input of ``m`` rows (``m`` itself when CUDA takes it)."""
    return m if m >= INT_MM_MIN_ROWS else INT_MM_PAD_ROWS


def rows(shape: tuple[int, ...]) -> int:
    """The rows of an input of ``shape`` flattened to ``[M, K]``."""
    m = 1
    for d in shape[:-1]:
        m *= d
    return m


_CACHE: weakref.WeakKeyDictionary[QuantLinear, tuple[tuple[object, ...], tuple[torch.Tensor, torch.Tensor]]]
_CACHE = weakref.WeakKeyDictionary()


def _key(layer: QuantLinear) -> tuple[object, ...]:
    return tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in (layer.qweight, layer.scales))


def weight_cache(layer: QuantLinear, make: Callable[[QuantLinear], tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``make(layer)`` (the GEMM's weight operand and its float32 scales), made once per layer state."""
    key = _key(layer)
    hit = _CACHE.get(layer)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = make(layer)
    _CACHE[layer] = (key, value)
    return value
