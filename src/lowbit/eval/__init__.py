"""Measurement: perplexity, KL-divergence, top-1 agreement, size and speed."""

from ..text import chunk_bos, default_text, model_adds_bos, read_text, tokenize
from .perplexity import KLResult, PerplexityResult, compare_models, kl_divergence, perplexity
from .size import SizeReport, folder_size

__all__ = [
    "KLResult",
    "PerplexityResult",
    "SizeReport",
    "chunk_bos",
    "compare_models",
    "default_text",
    "folder_size",
    "kl_divergence",
    "model_adds_bos",
    "perplexity",
    "read_text",
    "tokenize",
]
