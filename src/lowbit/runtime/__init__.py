"""Running quantized checkpoints: :class:`QuantLinear` and :func:`load_quantized`."""

from .qlinear import QuantLinear, load_quantized, quantize_model_linears

__all__ = ["QuantLinear", "load_quantized", "quantize_model_linears"]
