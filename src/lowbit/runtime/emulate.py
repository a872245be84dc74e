"""llama.cpp's activation rounding, emulated in torch: what its CPU matmuls do to their inputs.

llama.cpp's CPU backend multiplies a weight of GGML type ``T`` with activations converted to
``T``'s *vec_dot type* (``type_traits_cpu[T].vec_dot_type`` in ggml-cpu.c) before the dot
product: the K-quants, the IQ types (except IQ4_NL) and the ternary types use ``Q8_K``; the
legacy types, IQ4_NL and the FP4 types ``Q8_0``, or ``Q8_1`` for the types with a minimum
(Q4_1, Q5_1); F16 and BF16 weights convert their inputs to F16 / BF16; F32 weights use F32.
So a quantized GGUF in llama.cpp also loses precision in every matmul's *input*, which
lowbit's own runtime (dequantized weights, float32 activations) does not see.

:func:`round_activations` rounds a float32 tensor exactly as ggml's x86 (AVX2) quantizers do
(``quantize_row_q8_0`` / ``quantize_row_q8_1`` / ``quantize_row_q8_K``, arch/x86/quants.c and
the repacked-weights variants in arch/x86/repack.cpp, which give the same values) and returns
the value each quantized activation stands for in the dot product:

* ``q8_0`` / ``q8_1`` (blocks of 32): ``amax = max|x|``, ``q = round_half_even(x * (127 / amax))``,
  value ``q * fp16(amax / 127)`` (the block scale is stored as F16);
* ``q8_K`` (blocks of 256): ``m`` = the element of largest magnitude (signed, first one),
  ``iscale = -127 / m``, ``q = min(127, round_half_even(iscale * x))``, value ``q * (1 / iscale)``
  (an F32 scale);
* ``f16`` / ``bf16``: round to nearest even in that format.

llama.cpp also keeps the attention's keys and values in an F16 cache (``--cache-type-k/v``
default ``f16``; keys after RoPE and, for Gemma-3, after their norm); its CPU flash attention
for prompt batches (micro-batches of 64 tokens or more per sequence, as llama-perplexity and
llama-imatrix run) reads them back to F32 and computes in F32. :data:`ATTN_F16_KV` is a
transformers attention function that rounds keys and values to F16 the same way before SDPA.

Gemma-3's GEGLU runs through ggml's F16 table (``GGML_GELU_FP16``, ggml-cpu/vec.h): for
``-10 < x < 10``, ``gelu(x) = fp16(gelu_tanh(fp16(x)))``; :class:`GeluFP16` does the same.

Q8_1 also stores each block's sum as F16 (``s = fp16(d * sum(q))``) and the Q4_1/Q5_1 dot
product multiplies it by the weight block's minimum: :func:`q8_1_sum_error` with the weights'
block minimums (:func:`gguf_block_mins`) adds that rounding too.

What is not emulated: the order of float summation and llama.cpp's own float functions (norms,
RoPE, softmax, SiLU); a difference of one ulp moves a value across a rounding boundary now and
then, and that difference grows through the layers, so logits are not llama.cpp's bit for bit
(their statistics are); the attention kernel for short micro-batches (under 64 tokens per
sequence: F16 queries and F16 accumulation). For llama.cpp's exact numbers run llama.cpp
(``lowbit eval --runtime llama.cpp``).

:func:`gguf_activation_formats` maps every linear of a model loaded from a GGUF file to its
weight's activation format; :func:`emulate_llamacpp` installs the rounding on those linears
and the F16 cache on the attention.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowbitError

__all__ = ["ACTIVATION_FORMAT", "ATTN_F16_KV", "NUMERICS_EMULATED", "NUMERICS_LOWBIT", "emulate_llamacpp", "gguf_activation_formats",
           "round_activations", "vec_dot_format"]

NUMERICS_LOWBIT = "dequantized weights, float32 activations (lowbit runtime)"
NUMERICS_EMULATED = ("dequantized weights, activations rounded as llama.cpp's CPU matmuls round them "
                     "(Q8_K / Q8_0 / Q8_1 / F16 by weight type) and an F16 KV cache (lowbit runtime, --emulate llama.cpp)")

#: the transformers attention implementation with llama.cpp's F16 KV cache (see the module docstring)
ATTN_F16_KV = "lowbit_llamacpp_f16kv"

#: GGML weight type name -> the format its matmul inputs are converted to (ggml-cpu.c type_traits_cpu)
ACTIVATION_FORMAT: dict[str, str] = {
    "F32": "f32", "F16": "f16", "BF16": "bf16",
    "Q4_0": "q8_0", "Q5_0": "q8_0", "Q8_0": "q8_0", "IQ4_NL": "q8_0", "MXFP4": "q8_0", "NVFP4": "q8_0",
    "Q1_0": "q8_0", "Q2_0": "q8_0",
    "Q4_1": "q8_1", "Q5_1": "q8_1",
    "Q2_K": "q8_K", "Q3_K": "q8_K", "Q4_K": "q8_K", "Q5_K": "q8_K", "Q6_K": "q8_K",
    "IQ2_XXS": "q8_K", "IQ2_XS": "q8_K", "IQ2_S": "q8_K", "IQ3_XXS": "q8_K", "IQ3_S": "q8_K",
    "IQ1_S": "q8_K", "IQ1_M": "q8_K", "IQ4_XS": "q8_K", "TQ1_0": "q8_K", "TQ2_0": "q8_K",
}

_BLOCK = {"q8_0": 32, "q8_1": 32, "q8_K": 256}


def vec_dot_format(type_name: str) -> str:
    """The activation format of a GGML weight type (``"q8_K"``, ``"q8_0"``, ``"f16"``...)."""
    fmt = ACTIVATION_FORMAT.get(type_name.upper())
    if fmt is None:
        raise LowbitError(None, f"no activation format known for GGML type {type_name}")
    return fmt


def _q8_0_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks ``[..., 32]`` -> (codes, F32 scale, F16 scale as stored) of quantize_row_q8_0/q8_1."""
    amax = x.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    d16 = d.to(torch.float16).to(torch.float32)
    # true IEEE divisions: torch turns ``scalar / tensor`` into a reciprocal times the scalar (two roundings)
    safe = torch.where(amax != 0, amax, torch.ones_like(amax))
    inv = torch.where(amax != 0, torch.full_like(amax, 127.0) / safe, torch.zeros_like(amax))
    return torch.round(x * inv), d, d16


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    q, _, d16 = _q8_0_parts(x)
    return q * d16


def q8_1_sum_error(x: torch.Tensor) -> torch.Tensor:
    """Per block of 32 (``[..., k/32]``): Q8_1's stored block sum ``fp16(d * sum(q))`` minus the
    sum of the block's rounded values ``fp16(d) * sum(q)``. The Q4_1/Q5_1 dot product multiplies
    the stored sum by the weight block's minimum, so ``y += error @ mins.T`` completes the
    emulation of those types (:func:`round_activations` gives the rest)."""
    xf = x.float()
    blocks = xf.reshape(*xf.shape[:-1], xf.shape[-1] // 32, 32)
    q, d, d16 = _q8_0_parts(blocks)
    total = q.sum(-1, keepdim=True)
    return ((d * total).to(torch.float16).to(torch.float32) - d16 * total).squeeze(-1)


def _q8_K(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    amax = a.amax(-1, keepdim=True)
    # the first element of largest magnitude, with its sign (quantize_row_q8_K_ref's strict '>')
    first = (a == amax).to(torch.int8).argmax(-1, keepdim=True)
    m = x.gather(-1, first)
    safe = torch.where(amax != 0, m, torch.ones_like(m))
    iscale = torch.full_like(safe, -127.0) / safe
    q = torch.round(iscale * x).clamp_max(127.0)
    d = torch.ones_like(iscale) / iscale
    return torch.where(amax != 0, q * d, torch.zeros_like(x))


def round_activations(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """``x`` (``[..., k]``) as llama.cpp's CPU matmul sees it after converting it to ``fmt``
    (``f32``, ``f16``, ``bf16``, ``q8_0``, ``q8_1``, ``q8_K``), in ``x``'s dtype."""
    if fmt == "f32":
        return x
    xf = x.float()
    if fmt == "f16":
        out = xf.to(torch.float16).to(torch.float32)
    elif fmt == "bf16":
        out = xf.to(torch.bfloat16).to(torch.float32)
    elif fmt in _BLOCK:
        bs = _BLOCK[fmt]
        k = xf.shape[-1]
        if k % bs:
            raise LowbitError(None, f"{fmt} activations need rows that are a multiple of {bs}, not {k}")
        blocks = xf.reshape(*xf.shape[:-1], k // bs, bs)
        out = (_q8_K(blocks) if fmt == "q8_K" else _q8_0(blocks)).reshape(xf.shape)
    else:
        raise LowbitError(None, f"unknown activation format {fmt!r}")
    return out.to(x.dtype)


def gguf_activation_formats(gguf_path: str | Path, linear_names: list[str] | None = None) -> dict[str, str]:
    """Hugging Face module name -> activation format, for every linear of the model stored in
    ``gguf_path`` (``lm_head`` takes ``output.weight``'s type, or ``token_embd.weight``'s when the
    output is tied to the embeddings, as llama.cpp does)."""
    from ..gguf.names import hf_tensor_name
    from ..gguf.reader import validate_gguf

    f = validate_gguf(gguf_path)
    arch = str(f.kv.get("general.architecture"))
    types = {t.name: t.type.name for t in f.tensors}
    out: dict[str, str] = {}
    for t in f.tensors:
        if len(t.shape) != 2 or not t.name.endswith(".weight"):
            continue
        hf = hf_tensor_name(t.name, arch)
        if hf is None or not (t.name.startswith("blk.") or t.name == "output.weight"):
            continue
        out[hf[: -len(".weight")]] = vec_dot_format(t.type.name)
    if "output.weight" not in types and "token_embd.weight" in types:
        out["lm_head"] = vec_dot_format(types["token_embd.weight"])
    if linear_names is not None:
        out = {k: v for k, v in out.items() if k in set(linear_names)}
    return out


def _f16_kv_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    key = key.to(torch.float16).to(key.dtype)
    value = value.to(torch.float16).to(value.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_f16_kv_attention() -> str:
    """Register :data:`ATTN_F16_KV` with transformers (SDPA's masks and kernel, F16-rounded keys
    and values); returns its name for ``config._attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_F16_KV, _f16_kv_attention)
    AttentionMaskInterface.register(ATTN_F16_KV, sdpa_mask)
    return ATTN_F16_KV


#: block bytes of the weight types with a per-block minimum (F16 at bytes 2..3 of each block)
_MIN_TYPES = {"Q4_1": 20, "Q5_1": 24}


def gguf_block_mins(gguf_path: str | Path) -> dict[str, torch.Tensor]:
    """Hugging Face module name -> the block minimums ``[out, in/32]`` (float32) of every Q4_1 /
    Q5_1 weight in the file (rows in the Hugging Face order), for :func:`q8_1_sum_error`."""
    import numpy as np

    from ..gguf.names import hf_tensor_name, unpermute_rotary
    from ..gguf.reader import GGUFFile
    from ..models.architectures import by_gguf_arch

    f = GGUFFile(gguf_path)
    arch = str(f.kv.get("general.architecture"))
    family = by_gguf_arch(arch, gguf_path)
    n_head = int(f.kv.get(f"{arch}.attention.head_count") or 1)
    n_kv = int(f.kv.get(f"{arch}.attention.head_count_kv") or n_head)
    out: dict[str, torch.Tensor] = {}
    for t in f.tensors:
        size = _MIN_TYPES.get(t.type.name)
        if size is None or len(t.shape) != 2:
            continue
        hf = hf_tensor_name(t.name, arch)
        if hf is None:
            continue
        rows, cols = t.shape
        raw = np.array(f.data(t.name)).reshape(-1, size)
        mins = torch.from_numpy(raw[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(rows, cols // 32))
        if family.rotary_permute and hf.endswith("q_proj.weight"):
            mins = unpermute_rotary(mins, n_head)
        elif family.rotary_permute and hf.endswith("k_proj.weight"):
            mins = unpermute_rotary(mins, n_kv)
        out[hf[: -len(".weight")]] = mins.contiguous()
    if "output.weight" not in f.by_name and "token_embd.weight" in f.by_name:
        t = f.by_name["token_embd.weight"]
        size = _MIN_TYPES.get(t.type.name)
        if size is not None:
            raw = np.array(f.data(t.name)).reshape(-1, size)
            out["lm_head"] = torch.from_numpy(raw[:, 2:4].copy().view(np.float16).astype(np.float32)
                                              .reshape(t.shape[0], t.shape[1] // 32))
    return out


class GeluFP16(nn.Module):
    """ggml's tanh-GELU through its F16 lookup table (``ggml_vec_geglu_f32``/``ggml_vec_gelu_f32``
    with ``GGML_GELU_FP16``): ``0`` below -10, ``x`` above 10, else ``fp16(gelu(fp16(x)))``."""

    _table: torch.Tensor | None = None

    @classmethod
    def table(cls) -> torch.Tensor:
        if cls._table is None:
            f = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
            inner = (0.7978845608028654 * f) * (1.0 + (0.044715 * f) * f)
            # ggml_gelu_f32 in float32, tanhf correctly rounded (glibc's): 1 of the 65536 entries differs
            # from ggml's table here (its compiler contracts a multiply-add), none by more than one F16 step
            g = (0.5 * f) * (1.0 + torch.tanh(inner.double()).float())
            t = torch.empty(1 << 16, dtype=torch.float32)
            t[(torch.arange(-(1 << 15), 1 << 15) & 0xFFFF)] = g.to(torch.float16).float()
            cls._table = t
        return cls._table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        idx = xf.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
        y = self.table().to(xf.device)[idx]
        y = torch.where(xf >= 10.0, xf, torch.where(xf <= -10.0, torch.zeros_like(xf), y))
        return y.to(x.dtype)


def _is_tanh_gelu(act: Any) -> bool:
    return type(act).__name__ in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUPytorchTanh")


def _emulated_forward(module: nn.Linear, fmt: str, mins: torch.Tensor | None) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = F.linear(round_activations(x, fmt), module.weight, module.bias)
        if mins is not None:
            y = y + F.linear(q8_1_sum_error(x).to(y.dtype), mins.to(y.device, y.dtype))
        return y

    return forward


def install(modules: Mapping[str, nn.Module], formats: Mapping[str, str],
            mins: Mapping[str, torch.Tensor] | None = None) -> list[nn.Module]:
    """Round the inputs of each named linear to its format (its forward replaced on the instance;
    input hooks still see the unrounded input, as llama-imatrix sees the F32 activations);
    ``mins`` (:func:`gguf_block_mins`) adds Q8_1's block-sum rounding for Q4_1 / Q5_1 weights.
    Returns the modules changed, for :func:`uninstall`."""
    changed = []
    for mod in modules.values():  # GEGLU through ggml's F16 table (Gemma-3's MLP)
        act = getattr(mod, "act_fn", None)
        if isinstance(act, nn.Module) and _is_tanh_gelu(act) and "_lowbit_act_fn" not in mod.__dict__:
            mod.__dict__["_lowbit_act_fn"] = act
            mod.act_fn = GeluFP16()
            changed.append(mod)
    for name, fmt in formats.items():
        mod = modules.get(name)
        if mod is None or fmt == "f32":
            continue
        if not isinstance(mod, nn.Linear):
            raise LowbitError(name, f"cannot emulate llama.cpp's activation rounding on a {type(mod).__name__}")
        m = (mins or {}).get(name) if fmt == "q8_1" else None
        mod.forward = _emulated_forward(mod, fmt, m)  # type: ignore[method-assign]
        changed.append(mod)
    return changed


def uninstall(modules: list[nn.Module]) -> None:
    for mod in modules:
        if "forward" in mod.__dict__:
            del mod.forward
        if "_lowbit_act_fn" in mod.__dict__:
            mod.act_fn = mod.__dict__.pop("_lowbit_act_fn")


def install_model(model: nn.Module, formats: Mapping[str, str],
                  mins: Mapping[str, torch.Tensor] | None = None) -> list[nn.Module]:
    """llama.cpp's numerics on a whole transformers model: the linears' input rounding
    (``formats``: :func:`gguf_activation_formats`; ``mins``: :func:`gguf_block_mins`) and the
    F16 KV cache."""
    model.config._attn_implementation = register_f16_kv_attention()
    return install(dict(model.named_modules()), formats, mins)


def install_gguf(model: nn.Module, gguf_path: str | Path | None) -> list[nn.Module]:
    """:func:`install_model` with the formats and minimums of the GGUF file ``model`` was loaded
    from (``None``: float weights, which llama.cpp runs in F32: only the F16 KV cache applies)."""
    if gguf_path is None:
        return install_model(model, {})
    return install_model(model, gguf_activation_formats(gguf_path), gguf_block_mins(gguf_path))


@contextmanager
def emulate_llamacpp(model: nn.Module, formats: Mapping[str, str],
                     mins: Mapping[str, torch.Tensor] | None = None) -> Iterator[nn.Module]:
    """``model`` running with llama.cpp's numerics (:func:`install_model`) inside the block."""
    before = model.config._attn_implementation
    changed = install_model(model, formats, mins)
    try:
        yield model
    finally:
        uninstall(changed)
        model.config._attn_implementation = before
