"""Running quantized checkpoints: :class:`QuantLinear`, its kernels and :func:`load_quantized`."""

from .activations import fake_quantize_input
from .kernels import KERNELS, Kernel
from .qlinear import QuantLinear, load_quantized, quantize_model_linears

__all__ = ["KERNELS", "Kernel", "QuantLinear", "fake_quantize_input", "load_quantized", "quantize_model_linears"]
