"""GGUF files as model sources: dequantize into a cached Hugging Face folder.

llama.cpp's converter renames tensors, permutes llama's q/k rows for its rotary layout and
stores Gemma's RMSNorm weights as ``1 + w``; this module undoes each step so the result is
the Hugging Face model those weights came from (to the precision of the GGUF's blocks).
Tensors are processed one at a time, so memory stays about one tensor plus the output.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import LowbitError
from ..fileio import atomic_dir
from ..gguf.names import hf_tensor_name, unpermute_rotary
from ..gguf.reader import GGUFFile
from ..progress import track
from .architectures import by_gguf_arch


def _field(reader: Any, key: str, default: Any = None) -> Any:
    value = reader.kv.get(key)
    return default if value is None else value


def hf_config(reader: Any, path: Path) -> dict[str, Any]:
    """A Hugging Face config.json dict from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    family = by_gguf_arch(arch, path)
    names = {t.name for t in reader.tensors}

    def need(key: str) -> Any:
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise LowbitError(path, f"missing metadata key {arch}.{key}")
        return v

    embd = reader.by_name.get("token_embd.weight")
    if embd is None:
        raise LowbitError(path, "missing tensor token_embd.weight")
    n_head = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    cfg: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "vocab_size": int(embd.shape[0]),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    head_dim = _field(reader, f"{arch}.attention.key_length") or _field(reader, f"{arch}.rope.dimension_count")
    if head_dim:
        cfg["head_dim"] = int(head_dim)
    theta = _field(reader, f"{arch}.rope.freq_base")
    cfg.update(model_type=family.model_types[0], architectures=[family.hf_class])
    if family.name == "gemma3":
        cfg["sliding_window"] = int(_field(reader, "gemma3.attention.sliding_window", 4096))
        cfg["query_pre_attn_scalar"] = cfg.get("head_dim", hidden // n_head)
        cfg["rope_theta"] = float(theta or 1_000_000.0)
    else:
        cfg["rope_theta"] = float(theta or 10000.0)
        if family.name == "llama":
            cfg["attention_bias"] = "blk.0.attn_q.bias" in names
            cfg["mlp_bias"] = False
    return cfg


def cache_key(path: Path) -> str:
    """A key that changes when the file changes (name, size, first and last MiB)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def convert_gguf_to_hf(path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF model into a Hugging Face folder (config, safetensors, tokenizer)."""
    reader = GGUFFile(path)  # bounded header validation, memory-mapped tensors
    cfg = hf_config(reader, path)
    arch = _field(reader, "general.architecture")
    family = by_gguf_arch(arch, path)
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors: dict[str, torch.Tensor] = {}
    for t in track(reader.tensors, desc=f"dequantize {path.name}", total=len(reader.tensors), unit="tensor"):
        name = hf_tensor_name(t.name, arch)
        if name is None:
            continue
        w = torch.from_numpy(np.array(reader.array(t.name), dtype=np.float32))
        if not torch.isfinite(w).all():
            raise LowbitError(path, f"tensor {t.name} has NaN or Inf values")
        if family.rotary_permute and name.endswith("q_proj.weight"):
            w = unpermute_rotary(w, n_head)
        elif family.rotary_permute and name.endswith("k_proj.weight"):
            w = unpermute_rotary(w, n_kv)
        if family.norm_plus_one and name.endswith("norm.weight"):
            w = w - 1.0
        tensors[name] = w.contiguous()
    with atomic_dir(out_dir, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": path.name})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        _save_tokenizer(path, tmp)
        (tmp / "lowbit_source.json").write_text(json.dumps({"gguf": str(path), "key": cache_key(path)}))
    return out_dir


def _save_tokenizer(path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as exc:  # noqa: BLE001
            raise LowbitError(path, f"could not read the tokenizer ({exc.__class__.__name__}: {exc})") from None
    tok.save_pretrained(str(out))
