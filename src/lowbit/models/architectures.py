"""The model architectures lowbit supports, in one table (pure data: no torch, no transformers).

Each :class:`Architecture` is one family of decoder-only models: the Hugging Face
``config.model_type`` values it covers, llama.cpp's ``general.architecture`` name for it
(``None`` where lowbit does not convert it to GGUF), the transformers class that loads it, how
llama.cpp's converter changes its tensors (q/k rows permuted for the rotary layout; RMSNorm
weights stored as ``1 + w``), whether it is a mixture of experts, and the layer adapter family
of :mod:`lowbit.models.adapters` that quantizes it layer by layer.

Adding an architecture is one entry in :data:`ARCHITECTURES` (plus its adapter in
``models/adapters.py`` and, for GGUF, its tensor names in ``gguf/names.py``).

Lookups: :func:`by_model_type` (a transformers config's ``model_type``; ``gguf=True`` also
requires GGUF conversion) and :func:`by_gguf_arch` (a GGUF file's ``general.architecture``)
raise :class:`~lowbit.errors.LowbitError` naming the supported values; :func:`find_model_type`
and :func:`find_gguf_arch` return ``None`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import LowbitError


@dataclass(frozen=True)
class Architecture:
    """One model family (see the module docstring for each field's use)."""

    #: short family name (``"llama"``)
    name: str
    #: Hugging Face ``config.model_type`` values; the first is written into configs made from GGUF files
    model_types: tuple[str, ...]
    #: transformers class (``config.architectures[0]`` of configs made from GGUF files)
    hf_class: str
    #: llama.cpp's ``general.architecture``; ``None``: no GGUF conversion
    gguf_arch: str | None = None
    #: other ``general.architecture`` values read as this family
    gguf_aliases: tuple[str, ...] = ()
    #: llama.cpp stores q/k rows interleaved for its rotary implementation (``permute_rotary``)
    rotary_permute: bool = False
    #: RMSNorm computes ``n(x) * (1 + w)``; GGUF stores ``1 + w``
    norm_plus_one: bool = False
    #: mixture of experts
    moe: bool = False
    #: layer adapter family in :mod:`lowbit.models.adapters` (``None``: loads and evaluates, but has no layer adapter)
    adapter: str | None = None


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama", "mistral"), "LlamaForCausalLM", gguf_arch="llama", gguf_aliases=("mistral",),
                 rotary_permute=True, adapter="llama"),
    Architecture("qwen2", ("qwen2",), "Qwen2ForCausalLM", gguf_arch="qwen2", adapter="llama"),
    Architecture("qwen3", ("qwen3",), "Qwen3ForCausalLM", gguf_arch="qwen3", adapter="llama"),
    Architecture("gemma3", ("gemma3_text",), "Gemma3ForCausalLM", gguf_arch="gemma3", norm_plus_one=True,
                 adapter="gemma3"),
    Architecture("qwen2_moe", ("qwen2_moe",), "Qwen2MoeForCausalLM", moe=True, adapter="qwen2_moe"),
    Architecture("qwen3_moe", ("qwen3_moe",), "Qwen3MoeForCausalLM", moe=True),
    Architecture("mixtral", ("mixtral",), "MixtralForCausalLM", rotary_permute=True, moe=True, adapter="mixtral"),
)

_BY_MODEL_TYPE = {mt: a for a in ARCHITECTURES for mt in a.model_types}
_BY_GGUF_ARCH = {name: a for a in ARCHITECTURES if a.gguf_arch for name in (a.gguf_arch, *a.gguf_aliases)}

#: every supported ``config.model_type``, in table order
MODEL_TYPES: tuple[str, ...] = tuple(_BY_MODEL_TYPE)
#: the ``config.model_type`` values that convert to GGUF
GGUF_MODEL_TYPES: tuple[str, ...] = tuple(mt for mt, a in _BY_MODEL_TYPE.items() if a.gguf_arch)
#: every ``general.architecture`` read from GGUF files (aliases included)
GGUF_ARCHS: tuple[str, ...] = tuple(_BY_GGUF_ARCH)


def find_model_type(model_type: str | None) -> Architecture | None:
    """The family of a Hugging Face ``model_type``, or ``None``."""
    return _BY_MODEL_TYPE.get(model_type or "")


def find_gguf_arch(arch: str | None) -> Architecture | None:
    """The family of a GGUF ``general.architecture``, or ``None``."""
    return _BY_GGUF_ARCH.get(arch or "")


def by_model_type(model_type: str | None, where: str | Path | None = None, *, gguf: bool = False) -> Architecture:
    """The family of a Hugging Face ``model_type``; ``gguf=True``: one that converts to GGUF.

    Raises :class:`LowbitError` at ``where`` listing the supported model types."""
    a = find_model_type(model_type)
    if gguf and (a is None or a.gguf_arch is None):
        raise LowbitError(where, f"GGUF conversion does not support architecture {model_type!r} "
                          f"(supported: {', '.join(GGUF_MODEL_TYPES)})")
    if a is None:
        raise LowbitError(where, f"unsupported architecture {model_type!r} (supported: {', '.join(MODEL_TYPES)})")
    return a


def by_gguf_arch(arch: str | None, where: str | Path | None = None) -> Architecture:
    """The family of a GGUF ``general.architecture``; raises :class:`LowbitError` at ``where``
    listing the supported ones."""
    a = find_gguf_arch(arch)
    if a is None:
        raise LowbitError(where, f"unsupported architecture {arch!r} (supported: {', '.join(GGUF_ARCHS)})")
    return a
