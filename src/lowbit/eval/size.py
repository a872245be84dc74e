"""Size of a model on disk: bytes and bits per weight, for quantized tensors and the whole file."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ..models.checkpoint import _DTYPE_BYTES, Checkpoint


@dataclass
class SizeReport:
    file_bytes: int
    params: int
    quantized_params: int
    quantized_bytes: int
    bpw_quantized: float  # bits per weight of the quantized tensors (codes + scales + zeros + g_idx)
    bpw_total: float  # bits per parameter of the whole file

    def as_dict(self) -> dict:
        return asdict(self)


def _tensor_bytes(ckpt: Checkpoint, name: str) -> int:
    return math.prod(ckpt.shape(name)) * _DTYPE_BYTES.get(ckpt.dtype(name), 4)


def _float_with_kv(folder: Path) -> bool:
    """Float weights with FP8 KV-cache scales (compressed-tensors ``dense``): sized as a float model."""
    from ..formats.kv_cache import is_float_with_kv
    from ..models.loader import read_config

    return is_float_with_kv(read_config(folder).get("quantization_config"))


def folder_size(folder: str | Path) -> SizeReport:
    """Sizes of a Hugging Face folder, float or quantized (compressed-tensors, GPTQ, AWQ)."""
    from ..formats import detect_format, read_checkpoint

    folder = Path(folder)
    ckpt = Checkpoint(folder)
    file_bytes = ckpt.total_bytes()
    all_bytes = sum(_tensor_bytes(ckpt, n) for n in ckpt.keys())
    if detect_format(folder) is None or _float_with_kv(folder):
        params = sum(math.prod(ckpt.shape(n)) for n in ckpt.keys())
        return SizeReport(file_bytes, params, 0, 0, 0.0, 8 * file_bytes / max(1, params))
    weights, floats, _ = read_checkpoint(folder)
    q_params = sum(qw.codes.numel() for qw in weights.values())
    f_params = sum(t.numel() for t in floats.values())
    q_bytes = all_bytes - sum(_tensor_bytes(ckpt, n) for n in floats)
    params = q_params + f_params
    return SizeReport(file_bytes, params, q_params, q_bytes, 8 * q_bytes / max(1, q_params), 8 * file_bytes / max(1, params))
