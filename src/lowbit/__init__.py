"""lowbit: quantize large language models and measure what the quantization cost."""

__version__ = "0.1.0"
