"""Hugging Face quantized checkpoint formats: write, detect, read.

Public API::

    save(quantized_model, source_hf_dir, out_dir, format="compressed-tensors", overwrite=False) -> Path
    detect_format(path) -> "compressed-tensors" | "gptq" | "awq" | None
    read(path) -> dict[str, QuantizedWeight]          # keyed by HF weight name "<module>.weight"
    read_checkpoint(path) -> (weights, float_tensors, config)

Formats:

* ``compressed-tensors``: llm-compressor's ``pack-quantized`` (vLLM, transformers).
* ``gptq``: AutoGPTQ / GPTQModel v1 layout (vLLM ``gptq`` / ``gptq_marlin``, transformers).
* ``awq``: AutoAWQ GEMM layout (vLLM ``awq`` / ``awq_marlin``, transformers).

Each output folder holds ``config.json`` (source config + ``quantization_config``),
``model.safetensors`` (quantized tensors plus the float tensors of the source checkpoint
that were not quantized: embeddings, norms, biases, an unquantized ``lm_head``) and the
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
from ..methods.base import QuantizedWeight
from . import awq, compressed_tensors, gptq
from ._common import (
    copy_side_files,
    float_tensors,
    linear_modules,
    load_config,
    model_dtype,
    module_of,
    save_tensors,
    write_json,
)

FORMATS = ("compressed-tensors", "gptq", "awq")

__all__ = ["FORMATS", "detect_format", "read", "read_checkpoint", "save"]


class QuantizedModelLike(Protocol):
    """What :func:`save` needs of a ``QuantizedModel`` (from :mod:`lowbit.methods`)."""

    weights: dict[str, QuantizedWeight]
    float_overrides: dict[str, torch.Tensor]
    config: dict
    method: str


def _validate(fmt: str, weights: Mapping[str, QuantizedWeight]) -> None:
    if not weights:
        raise LowbitError(None, "nothing to save: the model has no quantized weights")
    for name, qw in weights.items():
        module_of(name)
        if fmt == "compressed-tensors":
            compressed_tensors.validate(name, qw)
        elif fmt == "gptq":
            gptq.validate(name, qw)
        else:
            awq.validate(name, qw)


def save(
    quantized_model: QuantizedModelLike,
    source_hf_dir: str | Path,
    out_dir: str | Path,
    format: str = "compressed-tensors",  # noqa: A002 - the public keyword the CLI uses
    overwrite: bool = False,
) -> Path:
    """Write ``quantized_model`` as a Hugging Face checkpoint in ``format``; returns ``out_dir``.

    The non-quantized tensors come from the float checkpoint in ``source_hf_dir`` (replaced
    by ``quantized_model.float_overrides`` where given); tokenizer and generation files are
    copied from it. Raises :class:`LowbitError` when the weights break the format's rules
    (e.g. AWQ needs asymmetric grouped 4-bit), when the output exists and ``overwrite`` is
    false, or the source is not a model folder; nothing is left at ``out_dir`` then.
    """
    if format not in FORMATS:
        raise LowbitError(None, f"unknown format {format!r} (choose from {', '.join(FORMATS)})")
    source = Path(source_hf_dir)
    out = check_output_path(out_dir, overwrite)
    weights = dict(quantized_model.weights)
    overrides = dict(getattr(quantized_model, "float_overrides", None) or {})
    _validate(format, weights)
    config = load_config(source)
    dtype = model_dtype(config)
    linears = linear_modules(config, source)
    missing = sorted(module_of(n) for n in weights if module_of(n) not in linears)
    if missing:
        raise LowbitError(source, f"quantized weights of modules that are not linear layers: {', '.join(missing[:5])}")
    floats = float_tensors(source, weights, overrides)
    config = dict(config)
    if "lm_head.weight" in weights and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False  # the float embedding stays; lm_head becomes its own quantized tensor
    extra_files: dict[str, dict[str, Any]] = {}
    if format == "compressed-tensors":
        qtensors, qconfig = compressed_tensors.encode(weights, dtype, linears)
    elif format == "gptq":
        qtensors, qconfig = gptq.encode(weights, linears)
        extra_files[gptq.QUANTIZE_CONFIG] = qconfig
        gptq.warn_if_not_marlin(weights)
    else:
        qtensors, qconfig = awq.encode(weights, linears)
        awq.warn_if_not_marlin(weights)
    clash = sorted(set(qtensors) & set(floats))
    if clash:
        raise LowbitError(source, f"float tensors clash with quantized tensor names: {', '.join(clash[:5])}")
    config["quantization_config"] = qconfig
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_tensors(tmp, {**floats, **qtensors})
        copy_side_files(source, tmp)
        write_json(tmp / "config.json", config)
        for fname, data in extra_files.items():
            write_json(tmp / fname, data)
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
