"""Model sources for GGUF output: a GGUF file or a Hugging Face folder, seen as GGUF tensors.

:func:`open_source` turns anything ``lowbit.models.resolve`` accepts into a :class:`Source`:
GGUF tensor names and PyTorch-order shapes, the types they are stored as, the metadata to
write, the hyper-parameters the mixes need, and functions that read one tensor at a time.

* GGUF file: names and every metadata key (architecture, tokenizer.*) are copied; tensors are
  dequantized on read, and their raw bytes are available for copying unchanged.
* Hugging Face folder (the families of :mod:`lowbit.models.architectures` with a GGUF
  architecture): names are mapped to GGUF names, llama's q/k rows are permuted into llama.cpp's
  rotary layout and Gemma's RMSNorm weights stored as ``1 + w`` (:func:`hf_to_gguf_layout`), tied
  embeddings write no ``output.weight``; architecture metadata is built the way llama.cpp's
  converter builds it and the tokenizer's by :mod:`lowbit.gguf.vocab`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from ..errors import LowbitError
from ..models.architectures import by_model_type, find_gguf_arch
from . import mixes
from .names import gguf_tensor_name, permute_rotary
from .reader import GGUFFile
from .vocab import hf_tokenizer_kvs
from .writer import KV


@dataclass
class Source:
    """A model as GGUF tensors, read one at a time."""

    arch: str  # GGUF general.architecture
    kvs: list[KV]  # metadata to write (general.architecture, file type and quantization keys excluded)
    shapes: dict[str, tuple[int, ...]]  # GGUF name -> PyTorch-order shape, in source order
    source_types: dict[str, T]
    hparams: mixes.ModelHParams
    get: Callable[[str], np.ndarray]  # float32 values
    raw: Callable[[str], np.ndarray] | None = None  # raw bytes (GGUF source only)
    compact: Callable[[str], np.ndarray] | None = None  # F16 tensors as float16 (exact, half the memory)
    description: str = ""
    quantized_source: bool = False


_SKIP_KEYS = ("general.file_type", "general.quantization_version", "general.alignment",
              "split.no", "split.count", "split.tensors.count")


def _gguf_source(path: Path, tensor_check: Callable[[GGUFFile, Path], None] | None = None) -> Source:
    """A GGUF file as a :class:`Source` (metadata copied, tensors memory-mapped). ``tensor_check``:
    replaces the check of the tensors against the architecture (:mod:`lowbit.gguf.fastpath`'s torch-free one)."""
    f = GGUFFile(path)
    arch_v = f.kv.get("general.architecture")
    if not isinstance(arch_v, str) or not arch_v:
        raise LowbitError(path, "missing metadata key general.architecture (not a model file?)")
    arch = arch_v
    if find_gguf_arch(arch) is not None:  # a family lowbit knows: its metadata against the tensors, then
        # the tensors against the architecture (other families are re-quantized as llama-quantize does)
        if tensor_check is not None:
            tensor_check(f, path)
        else:
            from ..models.gguf_source import hf_config
            from ..models.validate import check_gguf_tensors

            check_gguf_tensors(hf_config(f, path), {t.name: t.shape for t in f.tensors}, arch, path)
    kvs = [KV(k, vt, v, sub) for k, vt, v, sub in f.kv_entries() if k not in _SKIP_KEYS]
    shapes = {t.name: t.shape for t in f.tensors}
    stypes = {t.name: t.type for t in f.tensors}
    hp = mixes.hparams_from_gguf_kv(f.kv, where=path)

    def raw(name: str) -> np.ndarray:
        return np.array(f.data(name))

    def compact(name: str) -> np.ndarray:
        if stypes[name] == T.F16:
            return np.asarray(f.data(name)).view(np.float16).reshape(shapes[name])
        return f.array(name)

    quantized = any(t not in (T.F32, T.F16, T.BF16) for t in stypes.values())
    return Source(arch, kvs, shapes, stypes, hp, f.array, raw, compact=compact, description=str(path),
                  quantized_source=quantized)


def rope_theta(cfg: dict, default: float) -> float:
    """``rope_theta`` of a config.json (top level, or under ``rope_parameters``)."""
    if "rope_theta" in cfg and cfg["rope_theta"] is not None:
        return float(cfg["rope_theta"])
    rp = cfg.get("rope_parameters") or {}
    if isinstance(rp, dict):
        if "rope_theta" in rp:
            return float(rp["rope_theta"])
        full = rp.get("full_attention")
        if isinstance(full, dict) and "rope_theta" in full:
            return float(full["rope_theta"])
    return default


def rope_scaling(cfg: dict) -> dict | None:
    """The rope scaling of a config.json (``rope_scaling``, or a non-default ``rope_parameters``), if any."""
    rs = cfg.get("rope_scaling")
    if not rs:
        rp = cfg.get("rope_parameters") or {}
        if isinstance(rp, dict) and isinstance(rp.get("full_attention"), dict):
            rp = rp["full_attention"]
        rs = rp if isinstance(rp, dict) and rp.get("rope_type", "default") != "default" else None
    return rs or None


def hf_to_gguf_layout(name: str, w: np.ndarray, arch: str, n_head: int, n_kv: int) -> np.ndarray:
    """A Hugging Face tensor in llama.cpp's layout for GGUF tensor ``name`` (rotary rows, Gemma's 1 + w)."""
    a = find_gguf_arch(arch)
    if a is not None and a.rotary_permute and name.endswith("attn_q.weight"):
        w = permute_rotary(w, n_head)
    elif a is not None and a.rotary_permute and name.endswith("attn_k.weight"):
        w = permute_rotary(w, n_kv)
    if a is not None and a.norm_plus_one and name.endswith("norm.weight"):
        w = w + 1.0
    return w


def _hf_source(hf_dir: Path) -> Source:
    """A Hugging Face folder as a :class:`Source` in llama.cpp's names, layout and metadata."""
    from transformers import AutoConfig

    from ..models import Checkpoint
    from ..models.checkpoint import read_json
    from ..models.validate import check_checkpoint, config_errors, validate_hf_config

    cfg_path = hf_dir / "config.json"
    cfg = read_json(cfg_path, "config.json", strict=False)
    if not isinstance(cfg, dict):
        raise LowbitError(cfg_path, "config.json is not a JSON object")
    model_type = cfg.get("model_type", "")
    if model_type == "gemma3" and "text_config" in cfg:
        raise LowbitError(hf_dir, "multimodal gemma3 checkpoints are not supported for GGUF output; "
                          "use the text-only Gemma3ForCausalLM")
    family = by_model_type(model_type, hf_dir, gguf=True)
    validate_hf_config(cfg, cfg_path)
    arch = a = str(family.gguf_arch)
    try:
        n_layer = int(cfg["num_hidden_layers"])
        n_head = int(cfg["num_attention_heads"])
        n_kv = int(cfg.get("num_key_value_heads") or n_head)
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // n_head)
        n_ff = int(cfg["intermediate_size"])
        n_ctx = int(cfg.get("max_position_embeddings", 2048))
        eps = float(cfg.get("rms_norm_eps", 1e-6))
        theta = rope_theta(cfg, 1_000_000.0 if a == "gemma3" else 10000.0)
        n_expert = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        rs = rope_scaling(cfg)
        rtype = (rs.get("rope_type") or rs.get("type")) if rs else None
        rfactor = float(rs["factor"]) if rs and rtype == "linear" else None
    except KeyError as e:
        raise LowbitError(cfg_path, f"config.json has no {e.args[0]!r} entry") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise LowbitError(cfg_path, f"config.json has a bad value ({e.__class__.__name__}: {e})") from None
    if rs and rtype != "linear":
        raise LowbitError(hf_dir, f"rope scaling {rtype!r} is not supported for GGUF output yet")
    tied = bool(cfg.get("tie_word_embeddings", arch == "gemma3"))
    ck = Checkpoint(hf_dir)
    with warnings.catch_warnings(), config_errors(cfg_path):
        warnings.simplefilter("ignore")
        config = AutoConfig.from_pretrained(str(hf_dir))
    check_checkpoint(config, ck)  # names and shapes against the architecture, before any work

    names: dict[str, str] = {}
    for k in ck.keys():
        g = gguf_tensor_name(k, arch)
        if g is None:
            if "rotary_emb" in k:
                continue
            raise LowbitError(hf_dir, f"tensor {k!r} has no GGUF equivalent for {arch}")
        if g == "output.weight" and tied:
            continue
        names[g] = k
    if "token_embd.weight" not in names:
        raise LowbitError(hf_dir, "no model.embed_tokens.weight tensor")
    shapes = {g: tuple(int(d) for d in ck.shape(k)) for g, k in names.items()}

    def get(name: str) -> np.ndarray:
        t = ck.get(names[name])
        ck.close()  # unmap the shard: its pages would otherwise stay in the resident set, tensor after tensor
        w = hf_to_gguf_layout(name, t.float().numpy(), arch, n_head, n_kv)
        return np.ascontiguousarray(w, dtype=np.float32)

    vocab_size = shapes["token_embd.weight"][0]
    kvs = [
        KV("general.type", V.STRING, "model"),
        KV("general.name", V.STRING, cfg.get("_name_or_path") or hf_dir.name),
        KV(f"{a}.context_length", V.UINT32, n_ctx),
        KV(f"{a}.embedding_length", V.UINT32, hidden),
        KV(f"{a}.block_count", V.UINT32, n_layer),
        KV(f"{a}.feed_forward_length", V.UINT32, n_ff),
        KV(f"{a}.attention.head_count", V.UINT32, n_head),
        KV(f"{a}.attention.head_count_kv", V.UINT32, n_kv),
        KV(f"{a}.rope.freq_base", V.FLOAT32, theta),
        KV(f"{a}.attention.layer_norm_rms_epsilon", V.FLOAT32, eps),
    ]
    if a == "llama":
        kvs += [KV("llama.vocab_size", V.UINT32, vocab_size), KV("llama.rope.dimension_count", V.UINT32, head_dim)]
        if head_dim != hidden // n_head:
            kvs += [KV("llama.attention.key_length", V.UINT32, head_dim),
                    KV("llama.attention.value_length", V.UINT32, head_dim)]
    elif a in ("qwen2", "qwen3"):
        if a == "qwen3" or head_dim != hidden // n_head:
            kvs += [KV(f"{a}.attention.key_length", V.UINT32, head_dim),
                    KV(f"{a}.attention.value_length", V.UINT32, head_dim)]
    elif a == "gemma3":
        try:
            window = int(cfg.get("sliding_window") or 4096)
        except (TypeError, ValueError) as e:
            raise LowbitError(cfg_path, f"config.json has a bad value ({e.__class__.__name__}: {e})") from None
        kvs += [KV("gemma3.attention.key_length", V.UINT32, head_dim),
                KV("gemma3.attention.value_length", V.UINT32, head_dim),
                KV("gemma3.attention.sliding_window", V.UINT32, window)]
    if rfactor is not None:
        kvs += [KV(f"{a}.rope.scaling.type", V.STRING, "linear"),
                KV(f"{a}.rope.scaling.factor", V.FLOAT32, rfactor)]
    kvs += hf_tokenizer_kvs(hf_dir, cfg, arch, vocab_size)
    hp = mixes.ModelHParams(arch=arch, n_layer=n_layer, n_head=n_head, n_head_kv=n_kv, n_expert=n_expert)
    stypes = {g: (T.F32 if len(s) < 2 or g.endswith("norm.weight") else T.F16) for g, s in shapes.items()}
    return Source(arch, kvs, shapes, stypes, hp, get, None, description=str(hf_dir))


def open_source(source) -> Source:
    """Anything ``lowbit.models.resolve`` accepts (a GGUF file is read as it is) as a :class:`Source`."""
    p = Path(str(source)) if not hasattr(source, "hf_dir") else None
    if p is not None and p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return _gguf_source(p)
    from ..models import resolve

    ms = resolve(source)
    if ms.gguf_path is not None:
        return _gguf_source(Path(ms.gguf_path))
    return _hf_source(Path(ms.hf_dir))
