"""Tensor names and layouts between Hugging Face checkpoints and llama.cpp's GGUF files.

llama.cpp renames every tensor, and for llama-family models stores q/k rows interleaved for
its rotary implementation. Both directions live here so conversion to GGUF and loading from
GGUF cannot drift apart.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:  # torch-free at run time: the GGUF fast path (gguf/fastpath.py) reads names without torch
    import torch

_HF_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_HF_BLOCK_GEMMA3 = {**_HF_BLOCK, "post_attention_layernorm": "post_attention_norm",
                    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
_HF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_GGUF_TOP = {v: k for k, v in _HF_TOP.items()}
_HF_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_GGUF_RE = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")


def _block_table(arch: str) -> dict[str, str]:
    return _HF_BLOCK_GEMMA3 if arch == "gemma3" else _HF_BLOCK


def gguf_tensor_name(hf_name: str, arch: str) -> str | None:
    """GGUF name of a Hugging Face tensor (None: not part of the GGUF model, e.g. rotary caches)."""
    if hf_name in _HF_TOP:
        return _HF_TOP[hf_name]
    m = _HF_RE.match(hf_name)
    if not m:
        return None
    layer, part, kind = m.groups()
    table = _block_table(arch)
    return f"blk.{layer}.{table[part]}.{kind}" if part in table else None


def hf_tensor_name(gguf_name: str, arch: str) -> str | None:
    """Hugging Face name of a GGUF tensor (None for tensors the HF model lacks)."""
    if gguf_name in _GGUF_TOP:
        return _GGUF_TOP[gguf_name]
    m = _GGUF_RE.match(gguf_name)
    if not m:
        return None
    layer, part, kind = m.groups()
    inverse = {v: k for k, v in _block_table(arch).items()}
    return f"model.layers.{layer}.{inverse[part]}.{kind}" if part in inverse else None


A = TypeVar("A", np.ndarray, "torch.Tensor")


def permute_rotary(w: A, n_head: int) -> A:
    """Reorder q/k rows from Hugging Face's half-split rotary layout to llama.cpp's interleaved one."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: A, n_head: int) -> A:
    """Inverse of :func:`permute_rotary`."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
