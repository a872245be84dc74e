"""Hugging Face quantized checkpoint formats: write, detect, read.

Public API::

    save(quantized_model, source_hf_dir, out_dir, format="compressed-tensors", overwrite=False,
         max_shard_bytes=None) -> Path
    detect_format(path) -> "compressed-tensors" | "gptq" | "awq" | None
    read(path) -> dict[str, QuantizedWeight]          # keyed by HF weight name "<module>.weight"
    read_checkpoint(path) -> (weights, float_tensors, config)

Formats:

* ``compressed-tensors``: llm-compressor's ``pack-quantized`` (vLLM, transformers).
* ``gptq``: AutoGPTQ / GPTQModel v1 layout (vLLM ``gptq`` / ``gptq_marlin``, transformers).
* ``awq``: AutoAWQ GEMM layout (vLLM ``awq`` / ``awq_marlin``, transformers).

Each output folder holds ``config.json`` (source config + ``quantization_config``),
``model.safetensors`` or shards with an index (quantized tensors plus the float tensors of the
source checkpoint that were not quantized: embeddings, norms, biases, an unquantized ``lm_head``) and the
tokenizer / generation files copied from the source. Writing goes through
:func:`lowbit.fileio.atomic_dir`: on any error no partial output is left behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import LowbitError
from ..fileio import atomic_dir, check_output_path
from ..memory import trim
from ..methods.base import QuantizedWeight
from . import awq, compressed_tensors, gptq
from ._common import ShardWriter, copy_side_files, linear_modules, load_config, model_dtype, module_of, write_json

FORMATS = ("compressed-tensors", "gptq", "awq")

__all__ = ["FORMATS", "detect_format", "read", "read_checkpoint", "save"]


class QuantizedModelLike(Protocol):
    """What :func:`save` needs of a ``QuantizedModel`` (from :mod:`lowbit.methods`)."""

    weights: Mapping[str, QuantizedWeight]
    float_overrides: Mapping[str, torch.Tensor]
    config: dict
    method: str


class Encoder(Protocol):
    """One format's writer: :meth:`add` validates and encodes a weight, :meth:`config` comes last."""

    def add(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]: ...

    def config(self) -> dict[str, Any]: ...


def save(
    quantized_model: QuantizedModelLike,
    source_hf_dir: str | Path,
    out_dir: str | Path,
    format: str = "compressed-tensors",  # noqa: A002 - the public keyword the CLI uses
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write ``quantized_model`` as a Hugging Face checkpoint in ``format``; returns ``out_dir``.

    The non-quantized tensors come from the float checkpoint in ``source_hf_dir`` (replaced
    by ``quantized_model.float_overrides`` where given); tokenizer and generation files are
    copied from it. Tensors are read, encoded and written one at a time into safetensors
    shards of at most ``max_shard_bytes`` (see :class:`~lowbit.formats._common.ShardWriter`),
    so memory stays about one shard whatever the model size. Raises :class:`LowbitError` when
    the weights break the format's rules (e.g. AWQ needs asymmetric grouped 4-bit), when the
    output exists and ``overwrite`` is false, or the source is not a model folder; nothing is
    left at ``out_dir`` then.
    """
    from ..models.checkpoint import Checkpoint

    if format not in FORMATS:
        raise LowbitError(None, f"unknown format {format!r} (choose from {', '.join(FORMATS)})")
    source = Path(source_hf_dir)
    out = check_output_path(out_dir, overwrite)
    weights = quantized_model.weights
    overrides = getattr(quantized_model, "float_overrides", None) or {}
    if not weights:
        raise LowbitError(None, "nothing to save: the model has no quantized weights")
    config = load_config(source)
    dtype = model_dtype(config)
    linears = linear_modules(config, source)
    missing = sorted(module_of(n) for n in weights if module_of(n) not in linears)
    if missing:
        raise LowbitError(source, f"quantized weights of modules that are not linear layers: {', '.join(missing[:5])}")
    both = sorted(n for n in overrides if n in weights)
    if both:
        raise LowbitError(both[0], "is both quantized and given as a float override")
    ckpt = Checkpoint(source)
    floats = set(overrides) | {n for n in ckpt.keys() if n not in weights}
    config = dict(config)
    if "lm_head.weight" in weights and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False  # the float embedding stays; lm_head becomes its own quantized tensor
    encoder: Encoder
    if format == "compressed-tensors":
        encoder = compressed_tensors.Encoder(dtype, linears)
    elif format == "gptq":
        encoder = gptq.Encoder(linears)
    else:
        encoder = awq.Encoder(linears)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        shards = ShardWriter(tmp, max_shard_bytes)
        for name in sorted(set(weights) | floats):  # one tensor (or one module's encoding) read at a time
            if name in weights:
                for k, t in encoder.add(name, weights[name]).items():
                    shards.add(k, t)
                trim()  # the encoding's temporaries are freed: return their pages, or the heap keeps growing
            else:
                shards.add(name, overrides[name] if name in overrides else ckpt.get(name))
        config["quantization_config"] = encoder.config()
        shards.finish()
        copy_side_files(source, tmp)
        write_json(tmp / "config.json", config)
        if format == "gptq":
            write_json(tmp / gptq.QUANTIZE_CONFIG, config["quantization_config"])
    return out


def detect_format(path: str | Path) -> str | None:
    """``"compressed-tensors"``, ``"gptq"`` or ``"awq"`` from a folder's config; ``None`` if float/unknown."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        if (folder / gptq.QUANTIZE_CONFIG).is_file():
            return "gptq"
        return None
    config = load_config(folder)
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return "gptq" if (folder / gptq.QUANTIZE_CONFIG).is_file() else None
    method = str(q.get("quant_method", "")).lower()
    if method == compressed_tensors.QUANT_METHOD:
        return "compressed-tensors"
    if method == "gptq":
        return "gptq"
    if method == "awq":
        return "awq"
    return None


def read_checkpoint(path: str | Path) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict[str, Any]]:
    """``(quantized weights, float tensors, config)`` of a quantized checkpoint folder.

    Float tensors are every stored tensor that is not part of a quantized layer's encoding
    (embeddings, norms, biases, unquantized linear weights), under their checkpoint names.
    """
    from ..models.checkpoint import Checkpoint

    folder = Path(path)
    fmt = detect_format(folder)
    if fmt is None:
        raise LowbitError(folder, "not a quantized checkpoint (no compressed-tensors, GPTQ or AWQ quantization_config)")
    config = load_config(folder)
    if fmt == "gptq" and not isinstance(config.get("quantization_config"), dict):
        import json

        config["quantization_config"] = json.loads((folder / gptq.QUANTIZE_CONFIG).read_text())
    ckpt = Checkpoint(folder)
    names = ckpt.keys()
    if fmt == "compressed-tensors":
        weights, used = compressed_tensors.decode(ckpt.get, names, config)
    elif fmt == "gptq":
        weights, used = gptq.decode(ckpt.get, names, config)
    else:
        weights, used = awq.decode(ckpt.get, names, config)
    if not weights:
        raise LowbitError(folder, f"{fmt} checkpoint without any quantized layer")
    floats = {n: ckpt.get(n) for n in names if n not in used}
    return weights, floats, config


def read(path: str | Path) -> dict[str, QuantizedWeight]:
    """The quantized weights of a checkpoint folder, keyed by HF weight name (``<module>.weight``)."""
    return read_checkpoint(path)[0]
