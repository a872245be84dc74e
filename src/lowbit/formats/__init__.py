"""Hugging Face quantized checkpoint formats: write, detect, read.

Public API::

    save(quantized_model, source_hf_dir, out_dir, format="compressed-tensors", overwrite=False,
         max_shard_bytes=None) -> Path
    detect_format(path) -> "compressed-tensors" | "gptq" | "awq" | None
    read(path) -> dict[str, QuantizedWeight]          # keyed by HF weight name "<module>.weight"
    read_checkpoint(path) -> (weights, float_tensors, config)
    check_holds(plan: {name: QuantScheme}, format, shapes=None)   # refuse a plan up front
    FORMATS                                           # the registry: names(), help_text(), get(name)

Each format is one module of this package holding one :class:`~lowbit.formats.base.Format`
subclass that registers itself (see :mod:`lowbit.formats.base`); nothing here names a format.
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

from ..core.quantized import QuantizedWeight
from ..core.scheme import QuantScheme
from ..errors import LowbitError
from ..fileio import atomic_dir, check_output_path
from ..memory import trim
from . import awq, compressed_tensors, gptq, kv_cache  # noqa: F401 - the built-in formats
from ._common import ShardWriter, copy_side_files, linear_modules, load_config, model_dtype, module_of, write_json
from .base import FORMATS, Encoder, Format, cannot_hold, check_holds, register

__all__ = ["FORMATS", "Encoder", "Format", "cannot_hold", "check_holds", "detect_format", "get_format", "read", "read_checkpoint",
           "register", "save"]


class QuantizedModelLike(Protocol):
    """What :func:`save` needs of a ``QuantizedModel`` (:class:`lowbit.core.quantized.QuantizedModel`)."""

    weights: Mapping[str, QuantizedWeight]
    float_overrides: Mapping[str, torch.Tensor]
    config: dict
    method: str


def get_format(name: str | Format) -> Format:
    """The registered :class:`Format` called ``name`` (one-line error listing the choices otherwise)."""
    return name if isinstance(name, Format) else FORMATS.get(name)


def _planned_schemes(weights: Mapping[str, QuantizedWeight]) -> dict[str, QuantScheme] | None:
    """Every weight's scheme without reading the weights, when the mapping can tell (else ``None``)."""
    schemes = getattr(weights, "schemes", None)
    if callable(schemes):
        return dict(schemes())
    if isinstance(weights, dict):
        return {n: qw.scheme for n, qw in weights.items()}
    return None


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
    the weights break the format's rules (e.g. AWQ needs asymmetric grouped 4-bit: every such
    tensor is listed at once, before anything is written, see :func:`check_holds`), when the
    output exists and ``overwrite`` is false, or the source is not a model folder; nothing is
    left at ``out_dir`` then.
    """
    from ..models.checkpoint import Checkpoint

    fmt = get_format(format)
    source = Path(source_hf_dir)
    out = check_output_path(out_dir, overwrite)
    weights = quantized_model.weights
    overrides = getattr(quantized_model, "float_overrides", None) or {}
    kv_strategy = kv_cache.strategy_of(getattr(quantized_model, "config", None) or {})  # --kv-cache: k/v scales
    if kv_strategy is not None:
        kv_cache.check_format(fmt.name)
    if not weights and kv_strategy is None:
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
    source_names = set(ckpt.keys())
    plan = _planned_schemes(weights)
    if plan is not None:  # refuse before writing anything, naming every tensor at once
        check_holds(plan, fmt, {n: tuple(ckpt.shape(n)) for n in plan if n in source_names})
    floats = set(overrides) | {n for n in source_names if n not in weights}
    config = dict(config)
    if "lm_head.weight" in weights and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False  # the float embedding stays; lm_head becomes its own quantized tensor
    encoder = fmt.encoder(config, linears, dtype)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        shards = ShardWriter(tmp, max_shard_bytes, getattr(encoder, "file_metadata", None))
        for name in sorted(set(weights) | floats):  # one tensor (or one module's encoding) read at a time
            if name in weights:
                for k, t in encoder.add(name, weights[name]).items():
                    shards.add(k, t)
                trim()  # the encoding's temporaries are freed: return their pages, or the heap keeps growing
            else:
                shards.add(name, overrides[name] if name in overrides else ckpt.get(name))
        config["quantization_config"] = encoder.config() if weights else kv_cache.float_config(str(kv_strategy))
        if kv_strategy is not None:
            for k, t in kv_cache.tensors(quantized_model.config).items():
                shards.add(k, t)
            config["quantization_config"] = kv_cache.annotate(config["quantization_config"], kv_strategy)
        shards.finish()
        copy_side_files(source, tmp)
        write_json(tmp / "config.json", config)
        fmt.side_files(tmp, config["quantization_config"])
    return out


def _detect(folder: Path) -> tuple[Format | None, dict[str, Any]]:
    config = load_config(folder) if (folder / "config.json").is_file() else {}
    for _, fmt in FORMATS.items():
        if fmt.detect(config, folder):
            return fmt, config
    return None, config


def detect_format(path: str | Path) -> str | None:
    """The registered format (``"compressed-tensors"``, ``"gptq"``, ``"awq"``...) of a folder; ``None`` if float/unknown."""
    fmt, _ = _detect(Path(path))
    return None if fmt is None else fmt.name


def read_checkpoint(path: str | Path) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict[str, Any]]:
    """``(quantized weights, float tensors, config)`` of a quantized checkpoint folder.

    Float tensors are every stored tensor that is not part of a quantized layer's encoding
    (embeddings, norms, biases, unquantized linear weights), under their checkpoint names.
    """
    from ..models.checkpoint import Checkpoint

    folder = Path(path)
    fmt, config = _detect(folder)
    if fmt is None:
        raise LowbitError(folder, f"not a quantized checkpoint (no {', '.join(FORMATS.names())} quantization_config)")
    config = fmt.read_config(folder, config)
    ckpt = Checkpoint(folder)
    names = ckpt.keys()
    weights, used = fmt.decode(ckpt.get, names, config)
    if not weights:
        raise LowbitError(folder, f"{fmt.name} checkpoint without any quantized layer")
    floats = {n: ckpt.get(n) for n in names if n not in used}
    return weights, floats, config


def read(path: str | Path) -> dict[str, QuantizedWeight]:
    """The quantized weights of a checkpoint folder, keyed by HF weight name (``<module>.weight``)."""
    return read_checkpoint(path)[0]
