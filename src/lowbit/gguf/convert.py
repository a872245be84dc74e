"""Any model lowbit loads -> a GGUF file llama.cpp loads and runs.

Two routes:

* GGUF source (``lowbit.models.resolve(...).gguf_path`` is set): tensor names and every
  metadata key (architecture, tokenizer.*) are copied from the original file; tensors are
  dequantized and re-encoded.  Re-quantizing an already-quantized file works but warns
  (quality is lost twice).  A tensor whose target type equals its type in the source is
  copied byte for byte, as llama.cpp's quantizer does.
* Hugging Face folder (llama/mistral, qwen2, qwen3, gemma3 text): names are mapped to GGUF
  names, llama's q/k rows are permuted into llama.cpp's rotary layout, Gemma's RMSNorm
  weights are stored as ``1 + w``, tied embeddings write no ``output.weight``; architecture
  and tokenizer metadata (SentencePiece "llama" vocabularies, GPT-2 style BPE from
  tokenizer.json) are built the way llama.cpp's converter builds them.

Output types: ``F32``, ``F16``, ``BF16`` (1-D and norm tensors stay F32) or any llama.cpp mix
(``Q8_0``, ``Q4_K_M``, ...), typed per tensor by :mod:`lowbit.gguf.mixes` and encoded by
``lowbit.gguf.quants`` (optionally with an importance matrix).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFValueType as V

from ..errors import LowbitError
from ..fileio import atomic_file, check_output_path
from ..progress import track
from . import mixes
from .names import gguf_tensor_name, permute_rotary
from .reader import GGUFFile
from .writer import KV, PlannedTensor, can_quantize, quantize_array, write_gguf

ARCH_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                      "gemma3_text": "gemma3", "gemma3": "gemma3"}
GGUF_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")

# ---------------------------------------------------------------------------------------------
# sources


@dataclass
class _Source:
    arch: str
    kvs: list[KV]
    shapes: dict[str, tuple[int, ...]]  # GGUF name -> PyTorch-order shape, in source order
    source_types: dict[str, T]
    hparams: mixes.ModelHParams
    get: Callable[[str], np.ndarray]  # float32 values
    raw: Callable[[str], np.ndarray] | None = None  # raw bytes (GGUF source only)
    compact: Callable[[str], np.ndarray] | None = None  # F16 tensors as float16 (exact, half the memory)
    description: str = ""
    quantized_source: bool = False
    extra: dict = field(default_factory=dict)


_SKIP_KEYS = ("general.file_type", "general.quantization_version", "general.alignment",
              "split.no", "split.count", "split.tensors.count")


def _gguf_source(path: Path) -> _Source:
    f = GGUFFile(path)
    kvs = [KV(k, vt, v, sub) for k, vt, v, sub in f.kv_entries() if k not in _SKIP_KEYS]
    arch = str(f.kv.get("general.architecture", ""))
    shapes = {t.name: t.shape for t in f.tensors}
    stypes = {t.name: t.type for t in f.tensors}
    hp = mixes.hparams_from_gguf_kv(f.kv)

    def raw(name: str) -> np.ndarray:
        return np.array(f.data(name))

    def compact(name: str) -> np.ndarray:
        if stypes[name] == T.F16:
            return np.asarray(f.data(name)).view(np.float16).reshape(shapes[name])
        return f.array(name)

    quantized = any(t not in (T.F32, T.F16, T.BF16) for t in stypes.values())
    return _Source(arch, kvs, shapes, stypes, hp, f.array, raw, compact=compact, description=str(path),
                   quantized_source=quantized)


def _rope_theta(cfg: dict, default: float) -> float:
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


def _rope_scaling(cfg: dict) -> dict | None:
    rs = cfg.get("rope_scaling")
    if not rs:
        rp = cfg.get("rope_parameters") or {}
        if isinstance(rp, dict) and isinstance(rp.get("full_attention"), dict):
            rp = rp["full_attention"]
        rs = rp if isinstance(rp, dict) and rp.get("rope_type", "default") != "default" else None
    return rs or None


def hf_to_gguf_layout(name: str, w: np.ndarray, arch: str, n_head: int, n_kv: int) -> np.ndarray:
    """A Hugging Face tensor in llama.cpp's layout for GGUF tensor ``name`` (rotary rows, Gemma's 1 + w)."""
    if arch == "llama" and name.endswith("attn_q.weight"):
        w = permute_rotary(w, n_head)
    elif arch == "llama" and name.endswith("attn_k.weight"):
        w = permute_rotary(w, n_kv)
    if arch == "gemma3" and name.endswith("norm.weight"):
        w = w + 1.0
    return w


def _hf_source(hf_dir: Path) -> _Source:
    from ..models import Checkpoint

    cfg_path = hf_dir / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(cfg_path, f"cannot read config.json ({e})") from None
    model_type = cfg.get("model_type", "")
    if model_type == "gemma3" and "text_config" in cfg:
        raise LowbitError(hf_dir, "multimodal gemma3 checkpoints are not supported for GGUF output; "
                          "use the text-only Gemma3ForCausalLM")
    arch = ARCH_OF_MODEL_TYPE.get(model_type)
    if arch is None:
        raise LowbitError(hf_dir, f"GGUF conversion does not support architecture {model_type!r} "
                          f"(supported: {', '.join(sorted(ARCH_OF_MODEL_TYPE))})")
    ck = Checkpoint(hf_dir)
    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    tied = bool(cfg.get("tie_word_embeddings", arch == "gemma3"))

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
        w = hf_to_gguf_layout(name, ck.get(names[name]).float().numpy(), arch, n_head, n_kv)
        return np.ascontiguousarray(w, dtype=np.float32)

    a = arch
    vocab_size = shapes["token_embd.weight"][0]
    kvs = [
        KV("general.type", V.STRING, "model"),
        KV("general.name", V.STRING, cfg.get("_name_or_path") or hf_dir.name),
        KV(f"{a}.context_length", V.UINT32, int(cfg.get("max_position_embeddings", 2048))),
        KV(f"{a}.embedding_length", V.UINT32, hidden),
        KV(f"{a}.block_count", V.UINT32, n_layer),
        KV(f"{a}.feed_forward_length", V.UINT32, int(cfg["intermediate_size"])),
        KV(f"{a}.attention.head_count", V.UINT32, n_head),
        KV(f"{a}.attention.head_count_kv", V.UINT32, n_kv),
        KV(f"{a}.rope.freq_base", V.FLOAT32, _rope_theta(cfg, 1_000_000.0 if a == "gemma3" else 10000.0)),
        KV(f"{a}.attention.layer_norm_rms_epsilon", V.FLOAT32, float(cfg.get("rms_norm_eps", 1e-6))),
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
        kvs += [KV("gemma3.attention.key_length", V.UINT32, head_dim),
                KV("gemma3.attention.value_length", V.UINT32, head_dim),
                KV("gemma3.attention.sliding_window", V.UINT32, int(cfg.get("sliding_window") or 4096))]
    rs = _rope_scaling(cfg)
    if rs:
        rtype = rs.get("rope_type") or rs.get("type")
        if rtype == "linear":
            kvs += [KV(f"{a}.rope.scaling.type", V.STRING, "linear"),
                    KV(f"{a}.rope.scaling.factor", V.FLOAT32, float(rs["factor"]))]
        else:
            raise LowbitError(hf_dir, f"rope scaling {rtype!r} is not supported for GGUF output yet")
    kvs += _hf_tokenizer_kvs(hf_dir, cfg, arch, vocab_size)
    hp = mixes.ModelHParams(arch=arch, n_layer=n_layer, n_head=n_head, n_head_kv=n_kv,
                            n_expert=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0))
    stypes = {g: (T.F32 if len(s) < 2 or g.endswith("norm.weight") else T.F16) for g, s in shapes.items()}
    return _Source(arch, kvs, shapes, stypes, hp, get, None, description=str(hf_dir))


# ---------------------------------------------------------------------------------------------
# tokenizer metadata for Hugging Face folders

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def _special_ids(hf_dir: Path, cfg: dict) -> dict[str, int]:
    """bos/eos/unk/pad ids from tokenizer_config.json + tokenizer.json, falling back to config.json."""
    out: dict[str, int] = {}
    tc = {}
    if (hf_dir / "tokenizer_config.json").exists():
        tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    vocab: dict[str, int] = {}
    if (hf_dir / "tokenizer.json").exists():
        tj = json.loads((hf_dir / "tokenizer.json").read_text())
        vocab = dict(tj.get("model", {}).get("vocab") or {}) if isinstance(tj.get("model", {}).get("vocab"), dict) else {}
        for at in tj.get("added_tokens") or []:
            vocab[at["content"]] = at["id"]
    for kind in ("bos", "eos", "unk", "pad"):
        tok = tc.get(f"{kind}_token")
        if isinstance(tok, dict):
            tok = tok.get("content")
        if isinstance(tok, str) and tok in vocab:
            out[kind] = vocab[tok]
        elif isinstance(cfg.get(f"{kind}_token_id"), int):
            out[kind] = cfg[f"{kind}_token_id"]
    return out


def _hf_tokenizer_kvs(hf_dir: Path, cfg: dict, arch: str, vocab_size: int) -> list[KV]:
    spm = None
    for cand in ("tokenizer.model", *sorted(p.name for p in hf_dir.glob("*.model"))):
        if (hf_dir / cand).exists():
            spm = hf_dir / cand
            break
    tj_path = hf_dir / "tokenizer.json"
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text()) if (hf_dir / "tokenizer_config.json").exists() else {}
    ids = _special_ids(hf_dir, cfg)
    kvs: list[KV] = []
    if spm is not None:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(spm))
        n = sp.vocab_size()
        tokens, scores, types = [], [], []
        for i in range(n):
            tokens.append(sp.id_to_piece(i))
            scores.append(float(sp.get_score(i)))
            if sp.is_unknown(i):
                types.append(TOKEN_UNKNOWN)
            elif sp.is_control(i):
                types.append(TOKEN_CONTROL)
            elif sp.is_unused(i):
                types.append(TOKEN_UNUSED)
            elif sp.is_byte(i):
                types.append(TOKEN_BYTE)
            else:
                types.append(TOKEN_NORMAL)
        added = {}
        if (hf_dir / "added_tokens.json").exists():
            added = json.loads((hf_dir / "added_tokens.json").read_text())
        for piece, idx in sorted(added.items(), key=lambda kv: kv[1]):
            if idx < n:
                tokens[idx] = piece
                types[idx] = TOKEN_USER_DEFINED
            elif idx == len(tokens):
                tokens.append(piece)
                scores.append(-1000.0)
                types.append(TOKEN_USER_DEFINED)
        while len(tokens) < vocab_size:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(TOKEN_UNUSED)
        add_prefix = _spm_add_dummy_prefix(spm)
        if arch == "gemma3":
            add_prefix = False
        kvs += [KV("tokenizer.ggml.model", V.STRING, "llama"), KV("tokenizer.ggml.pre", V.STRING, "default"),
                KV("tokenizer.ggml.tokens", V.ARRAY, tokens, V.STRING),
                KV("tokenizer.ggml.scores", V.ARRAY, scores, V.FLOAT32),
                KV("tokenizer.ggml.token_type", V.ARRAY, types, V.INT32)]
        for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
            default = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}[kind]
            v = ids.get(kind, default)
            if v is not None and v >= 0:
                kvs.append(KV(f"tokenizer.ggml.{key}_token_id", V.UINT32, int(v)))
        kvs += [KV("tokenizer.ggml.add_bos_token", V.BOOL, bool(tc.get("add_bos_token", True))),
                KV("tokenizer.ggml.add_eos_token", V.BOOL, bool(tc.get("add_eos_token", False))),
                KV("tokenizer.ggml.add_space_prefix", V.BOOL, bool(add_prefix))]
    elif tj_path.exists() and _is_spm_style_bpe(json.loads(tj_path.read_text())):
        kvs += _spm_kvs_from_tokenizer_json(json.loads(tj_path.read_text()), ids, tc, arch, vocab_size)
    elif tj_path.exists():
        tj = json.loads(tj_path.read_text())
        model = tj.get("model", {})
        if model.get("type") != "BPE":
            raise LowbitError(tj_path, f"tokenizer model {model.get('type')!r} is not supported for GGUF output "
                              "(supported: SentencePiece .model files and BPE tokenizer.json)")
        vocab: dict[str, int] = model["vocab"]
        added = {at["id"]: at for at in tj.get("added_tokens") or []}
        size = max(vocab_size, max(vocab.values()) + 1, max(added, default=-1) + 1)
        tokens = [f"[PAD{i}]" for i in range(size)]
        types = [TOKEN_UNUSED] * size
        for tok, i in vocab.items():
            tokens[i] = tok
            types[i] = TOKEN_NORMAL
        for i, at in added.items():
            tokens[i] = at["content"]
            types[i] = TOKEN_CONTROL if at.get("special") else TOKEN_USER_DEFINED
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        kvs += [KV("tokenizer.ggml.model", V.STRING, "gpt2"),
                KV("tokenizer.ggml.pre", V.STRING, _bpe_pre(cfg, tj)),
                KV("tokenizer.ggml.tokens", V.ARRAY, tokens, V.STRING),
                KV("tokenizer.ggml.token_type", V.ARRAY, types, V.INT32),
                KV("tokenizer.ggml.merges", V.ARRAY, merges, V.STRING)]
        for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
            if kind in ids:
                kvs.append(KV(f"tokenizer.ggml.{key}_token_id", V.UINT32, int(ids[kind])))
        if "add_bos_token" in tc:
            kvs.append(KV("tokenizer.ggml.add_bos_token", V.BOOL, bool(tc["add_bos_token"])))
    else:
        raise LowbitError(hf_dir, "no tokenizer (tokenizer.model or tokenizer.json) to write into the GGUF file")
    template = tc.get("chat_template")
    if not isinstance(template, str) and (hf_dir / "chat_template.jinja").exists():
        template = (hf_dir / "chat_template.jinja").read_text()
    if isinstance(template, str):
        kvs.append(KV("tokenizer.chat_template", V.STRING, template))
    return kvs


def _is_spm_style_bpe(tj: dict) -> bool:
    """A tokenizer.json converted from a SentencePiece BPE model (Metaspace + byte fallback)."""
    model = tj.get("model", {})
    pre = json.dumps(tj.get("pre_tokenizer") or {}) + json.dumps(tj.get("normalizer") or {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and ("Metaspace" in pre or "\u2581" in pre or "▁" in pre)


def _spm_kvs_from_tokenizer_json(tj: dict, ids: dict, tc: dict, arch: str, vocab_size: int) -> list[KV]:
    """llama.cpp "llama" (SentencePiece) vocabulary from a SentencePiece-style tokenizer.json.

    Without the .model file the piece scores are not available; SentencePiece BPE stores
    pieces in score order, so score = -id reproduces the merge priority llama.cpp needs."""
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    added = {at["id"]: at for at in tj.get("added_tokens") or []}
    size = max(vocab_size, max(vocab.values()) + 1, max(added, default=-1) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-1000.0] * size
    types = [TOKEN_UNUSED] * size
    byte_re = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
    for tok, i in vocab.items():
        tokens[i] = tok
        scores[i] = -float(i)
        types[i] = TOKEN_BYTE if byte_re.match(tok) else TOKEN_NORMAL
    for i, at in added.items():
        tokens[i] = at["content"]
        scores[i] = 0.0
        types[i] = TOKEN_CONTROL if at.get("special") else TOKEN_USER_DEFINED
    unk = model.get("unk_token")
    if unk in vocab:
        types[vocab[unk]] = TOKEN_UNKNOWN
    pre = json.dumps(tj.get("pre_tokenizer") or {}) + json.dumps(tj.get("normalizer") or {})
    add_prefix = arch != "gemma3" and ('"prepend_scheme": "first"' in pre or '"prepend_scheme": "always"' in pre
                                       or '"add_prefix_space": true' in pre or "Prepend" in pre)
    kvs = [KV("tokenizer.ggml.model", V.STRING, "llama"), KV("tokenizer.ggml.pre", V.STRING, "default"),
           KV("tokenizer.ggml.tokens", V.ARRAY, tokens, V.STRING),
           KV("tokenizer.ggml.scores", V.ARRAY, scores, V.FLOAT32),
           KV("tokenizer.ggml.token_type", V.ARRAY, types, V.INT32)]
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        if kind in ids:
            kvs.append(KV(f"tokenizer.ggml.{key}_token_id", V.UINT32, int(ids[kind])))
    kvs += [KV("tokenizer.ggml.add_bos_token", V.BOOL, bool(tc.get("add_bos_token", True))),
            KV("tokenizer.ggml.add_eos_token", V.BOOL, bool(tc.get("add_eos_token", False))),
            KV("tokenizer.ggml.add_space_prefix", V.BOOL, add_prefix)]
    return kvs


def _spm_add_dummy_prefix(path: Path) -> bool:
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb

        m = pb.ModelProto()
        m.ParseFromString(path.read_bytes())
        return bool(m.normalizer_spec.add_dummy_prefix)
    except Exception:  # protobuf missing: llama's SPM default
        return True


def _bpe_pre(cfg: dict, tj: dict) -> str:
    """llama.cpp pre-tokenizer name for a BPE vocabulary (by model family; 'default' otherwise)."""
    mt = cfg.get("model_type", "")
    if mt in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        return "qwen2"
    pre = json.dumps(tj.get("pre_tokenizer") or {})
    if mt == "llama" and "Split" in pre and "\\\\p{N}{1,3}" in pre:
        return "llama-bpe"
    if "Digits" in pre and "ByteLevel" in pre:
        return "smollm"
    if '"ByteLevel"' in pre and "Split" not in pre:
        return "gpt-2"
    warnings.warn("unknown BPE pre-tokenizer; writing tokenizer.ggml.pre='default'", stacklevel=3)
    return "default"


# ---------------------------------------------------------------------------------------------
# public API


def _open_source(source) -> _Source:
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


def plan_types(source, mix: str, *, pure: bool = False, output_tensor_type: str | None = None,
               token_embedding_type: str | None = None, tensor_types: list[str] | tuple[str, ...] = (),
               has_imatrix: bool = False) -> dict[str, T]:
    """The per-tensor types :func:`quantize_to_gguf` would write (GGUF names, llama.cpp order)."""
    src = _open_source(source)
    return _plan(src, mix, pure, output_tensor_type, token_embedding_type, tensor_types, has_imatrix)


def _plan(src: _Source, mix: str, pure, output_tensor_type, token_embedding_type, tensor_types, has_imatrix):
    mix = mixes.normalize_mix(mix)
    if mix in mixes.FLOAT_MIXES:
        ft = mixes.DEFAULT_TYPE[mix]
        out = {}
        for n, s in sorted(src.shapes.items(), key=lambda kv: mixes._sort_key(kv[0])):
            out[n] = ft if mixes.allows_quantization(n, s) else T.F32
        return out
    opts = mixes.TypeOptions(
        pure=pure,
        output_tensor_type=mixes.parse_type(output_tensor_type) if output_tensor_type else None,
        token_embedding_type=mixes.parse_type(token_embedding_type) if token_embedding_type else None,
        overrides=mixes.parse_overrides(tensor_types),
        has_imatrix=has_imatrix,
    )
    return mixes.tensor_types(list(src.shapes.items()), src.hparams, mix, opts, src.source_types)


def quantize_to_gguf(source, out_path, mix: str, imatrix_path=None, pure: bool = False,
                     output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                     tensor_types: list[str] | tuple[str, ...] = (), overwrite: bool = False,
                     values: Callable[[str, _Source], np.ndarray | None] | None = None,
                     encoded: Callable[[PlannedTensor, _Source], np.ndarray | None] | None = None,
                     device: str | None = None) -> Path:
    """Write ``source`` as a GGUF file of ``mix`` at ``out_path``; returns the path.

    ``source``: anything ``lowbit.models.resolve`` accepts (HF folder, GGUF file, ...).
    ``mix``: ``F32``, ``F16``, ``BF16``, ``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``,
    ``Q2_K``, ``Q3_K_S/M/L``, ``Q4_K_S/M``, ``Q5_K_S/M``, ``Q6_K``, ``IQ4_NL``, ``IQ4_XS``
    (IQ1-IQ3 mixes when ``lowbit.gguf.quants`` can encode them).  ``imatrix_path``: a
    llama.cpp imatrix file (GGUF or legacy .dat).  ``pure``: one type for every quantized
    tensor.  ``output_tensor_type``/``token_embedding_type``: type names (``q8_0``) for
    output.weight/token_embd.weight.  ``tensor_types``: ``PATTERN=TYPE`` overrides, PATTERN a
    regex searched in the GGUF tensor name (first match wins), as ``llama-quantize
    --tensor-type``.  The file is written atomically; an existing one needs ``overwrite``.
    ``device``: where the block encoders run (``"cuda"``; default the CPU); same bytes.

    Hooks (used by :mod:`lowbit.gguf.from_quantized`): ``values(name, src)`` may return float32
    values (GGUF layout) replacing the source's for tensor ``name``; ``encoded(planned, src)``
    may return the finished data of a tensor (uint8 ``[rows, bytes_per_row]`` of its planned
    type).  Either returns ``None`` to leave a tensor to the normal path.
    """
    out = check_output_path(out_path, overwrite)
    src = _open_source(source)
    mixname = mixes.normalize_mix(mix)
    imat = None
    if imatrix_path is not None:
        from .imatrix import load_imatrix_values

        imat = load_imatrix_values(imatrix_path)
    types = _plan(src, mixname, pure, output_tensor_type, token_embedding_type, tensor_types, imat is not None)
    for name, t in types.items():
        if t != src.source_types.get(name) and not can_quantize(t):
            raise LowbitError(out, f"tensor {name}: type {t.name} cannot be encoded by this build of lowbit "
                              f"(lowbit.gguf.quants lacks it); pick another mix")
        if imat is None and mixes.requires_imatrix(name, t, mixname):
            raise LowbitError(out, f"mix {mixname} needs an importance matrix ({name} -> {t.name}); "
                              "pass imatrix_path (compute one with compute_imatrix)")
    requant = [n for n, t in types.items()
               if src.quantized_source and src.source_types[n] not in (T.F32, T.F16, T.BF16)
               and t != src.source_types[n] and t not in (T.F32, T.F16, T.BF16)]
    if requant:
        warnings.warn(f"{src.description} is already quantized; re-quantizing {len(requant)} tensors "
                      f"to {mixname} compounds the error (quantize from the original weights when you can)",
                      stacklevel=2)
    if imat is not None:
        for name, t in types.items():
            if name in imat and len(src.shapes[name]) >= 2:
                s = src.shapes[name]
                want = s[-1] * (s[0] if len(s) == 3 else 1)
                if imat[name].size != want and mixes.category(name) != "token_embd":
                    raise LowbitError(imatrix_path, f"imatrix entry {name} has {imat[name].size} values, "
                                      f"the tensor needs {want}; was it computed for another model?")

    planned = [PlannedTensor(n, src.shapes[n], t) for n, t in types.items()]
    ftype = mixes.FTYPES.get(mixname, 1)

    kvs = list(src.kvs)
    kvs.append(KV("general.quantization_version", V.UINT32, 2))
    kvs.append(KV("general.file_type", V.UINT32, ftype))
    if imat is not None:
        kvs.append(KV("quantize.imatrix.file", V.STRING, str(imatrix_path)))
        kvs.append(KV("quantize.imatrix.entries_count", V.UINT32, len(imat)))

    def produce(t: PlannedTensor) -> np.ndarray:
        if encoded is not None:
            data = encoded(t, src)
            if data is not None:
                return data
        x = values(t.name, src) if values is not None else None
        st = src.source_types.get(t.name)
        if x is None and src.raw is not None and st == t.qtype:
            return src.raw(t.name)
        if x is None:
            x = src.compact(t.name) if src.compact is not None else src.get(t.name)
        float_out = t.qtype in (T.F32, T.F16, T.BF16)
        if (x.dtype != np.float16 or float_out) and not np.isfinite(x).all():  # else the block quantizer checks
            raise LowbitError(src.description, f"tensor {t.name} has NaN or Inf values")
        im = None
        if imat is not None and not float_out:
            v = imat.get(t.name)
            if v is not None and v.size == x.shape[-1] * (x.shape[0] if x.ndim == 3 else 1):
                im = v
        try:
            return quantize_array(x, t.qtype, im, device)
        except LowbitError as e:
            raise LowbitError(src.description, f"tensor {t.name}: {e.problem}") from e

    def progress(items):
        return track(items, desc=f"GGUF {mixname}", total=len(planned), unit="tensor")

    with atomic_file(out, overwrite=overwrite) as tmp:
        write_gguf(tmp, src.arch, kvs, planned, produce, progress)
    return out


def convert_to_gguf(source, out_path, outtype: str = "F16", overwrite: bool = False) -> Path:
    """Unquantized (F32/F16/BF16) or Q8_0 conversion; same as ``quantize_to_gguf`` with that mix."""
    return quantize_to_gguf(source, out_path, outtype, overwrite=overwrite)


def compute_imatrix(source, text_path, out_path, ctx: int = 512, chunks: int | None = None,
                    overwrite: bool = False) -> Path:
    """Compute an importance matrix on ``text_path`` and write it (see :mod:`lowbit.gguf.imatrix`)."""
    from .imatrix import compute_imatrix as _ci

    return _ci(source, text_path, out_path, ctx=ctx, chunks=chunks, overwrite=overwrite)
