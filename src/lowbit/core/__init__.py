"""Pure tensor math: numeric schemes, the quantized-weight result, integer grids, packing.

Knows nothing of models or files.
"""

from .affine import compute_qparams, dequantize, fake_quantize, quantize, quantize_weight, search_clip
from .packing import pack, unpack
from .quantized import QuantizedWeight
from .scheme import PER_CHANNEL, PER_TENSOR, QuantScheme

__all__ = [
    "PER_CHANNEL",
    "PER_TENSOR",
    "QuantScheme",
    "QuantizedWeight",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "pack",
    "quantize",
    "quantize_weight",
    "search_clip",
    "unpack",
]
