"""GGUF files as model sources: dequantize into a cached Hugging Face folder.

llama.cpp's converter renames tensors, permutes llama's q/k rows for its rotary layout and
stores Gemma's RMSNorm weights as ``1 + w``; this module undoes each step so the result is
the Hugging Face model those weights came from (to the precision of the GGUF's blocks).
Tensors are processed one at a time, so memory stays about one tensor plus the output.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import LowbitError
from ..fileio import atomic_dir
from ..gguf.hparams import validate_hparams
from ..gguf.names import hf_tensor_name, unpermute_rotary
from ..gguf.reader import GGUFFile
from ..progress import track
from .architectures import by_gguf_arch
from .validate import check_gguf_tensors


def _field(reader: Any, key: str, default: Any = None) -> Any:
    value = reader.kv.get(key)
    return default if value is None else value


def hf_config(reader: Any, path: Path) -> dict[str, Any]:
    """A Hugging Face config.json dict from GGUF metadata, validated against the tensors first
    (:func:`lowbit.gguf.hparams.validate_hparams`)."""
    hp = validate_hparams(reader.kv, {t.name: t.shape for t in reader.tensors}, path)
    family = by_gguf_arch(hp.arch, path)
    names = {t.name for t in reader.tensors}
    hidden, n_head = hp.n_embd, hp.n_head
    cfg: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": hp.n_ff,
        "num_hidden_layers": hp.n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": hp.n_head_kv,
        "rms_norm_eps": hp.eps,
        "max_position_embeddings": hp.n_ctx,
        "vocab_size": hp.n_vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if hp.explicit_head_dim:
        cfg["head_dim"] = hp.head_dim
    theta = hp.rope_base
    cfg.update(model_type=family.model_types[0], architectures=[family.hf_class])
    if family.name == "gemma3":
        cfg["sliding_window"] = hp.sliding_window
        cfg["query_pre_attn_scalar"] = cfg.get("head_dim", hidden // n_head)
        cfg["rope_theta"] = float(theta or 1_000_000.0)
    else:
        cfg["rope_theta"] = float(theta or 10000.0)
        if family.name == "llama":
            cfg["attention_bias"] = "blk.0.attn_q.bias" in names
            cfg["mlp_bias"] = False
    return cfg


#: a file changed less than this long ago is hashed again next time (its timestamps may not show
#: a change made within the same clock tick: git's "racily clean" rule)
_SETTLED_NS = 2_000_000_000


def _identity(path: Path) -> tuple[str, os.stat_result]:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest(), st


def content_digest(path: Path) -> str:
    """SHA-256 of the whole file, read once in 16 MiB chunks.

    The digest is remembered in ``<cache>/digests`` under the file's identity (path, device,
    inode, size, modification and change times), so an unchanged file is not read again; any
    write changes the change time, so an edited file is hashed again."""
    from .cache import cache_dir

    memo_dir = cache_dir() / "digests"
    ident, st = _identity(path)
    memo = memo_dir / ident
    try:
        known = memo.read_text().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    after, st2 = _identity(path)
    settled = time.time_ns() - max(st2.st_mtime_ns, st2.st_ctime_ns) > _SETTLED_NS
    if after == ident and settled:  # unchanged while it was read, and not racily recent
        try:
            memo_dir.mkdir(parents=True, exist_ok=True)
            tmp = memo_dir / f".{ident}.{os.getpid()}"
            tmp.write_text(digest)
            os.replace(tmp, memo)
        except OSError:
            pass  # a read-only cache only costs hashing again
    return digest


def convert_gguf_to_hf(path: Path, out_dir: Path, sha256: str | None = None) -> Path:
    """Dequantize a GGUF model into a Hugging Face folder (config, safetensors, tokenizer);
    ``sha256``: the file's :func:`content_digest` when the caller has it."""
    reader = GGUFFile(path)  # bounded header validation, memory-mapped tensors
    cfg = hf_config(reader, path)  # metadata validated against the tensors
    check_gguf_tensors(cfg, {t.name: t.shape for t in reader.tensors}, str(reader.kv["general.architecture"]), path)
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
        (tmp / "lowbit_source.json").write_text(json.dumps({"gguf": str(path), "sha256": sha256 or content_digest(path)}))
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
