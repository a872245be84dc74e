"""Tokenizer metadata (``tokenizer.ggml.*``) for Hugging Face folders, as llama.cpp's converter writes it.

SentencePiece vocabularies (a ``.model`` file, or a tokenizer.json converted from one) become
llama.cpp's "llama" vocabulary with scores and token types; GPT-2 style BPE tokenizer.json files
become its "gpt2" vocabulary with merges and a pre-tokenizer name (:func:`_bpe_pre`). Special
token ids come from tokenizer_config.json + tokenizer.json, falling back to config.json; the
chat template is copied.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from gguf import GGUFValueType as V

from ..errors import LowbitError
from .writer import KV

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def _special_ids(hf_dir: Path, cfg: dict) -> dict[str, int]:
    """bos/eos/unk/pad ids from tokenizer_config.json + tokenizer.json, falling back to config.json."""
    out: dict[str, int] = {}
    tc = _read_json(hf_dir / "tokenizer_config.json", {})
    vocab: dict[str, int] = {}
    if (hf_dir / "tokenizer.json").exists():
        tj = _read_json(hf_dir / "tokenizer.json")
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


def hf_tokenizer_kvs(hf_dir: Path, cfg: dict, arch: str, vocab_size: int) -> list[KV]:
    """The ``tokenizer.*`` metadata of a Hugging Face folder (``arch``: its GGUF architecture).

    A SentencePiece ``.model`` file gives a "llama" vocabulary; a SentencePiece-style BPE
    tokenizer.json (Metaspace, byte fallback) also does; any other BPE tokenizer.json gives a
    "gpt2" vocabulary with merges. Raises :class:`LowbitError` for other tokenizers and for
    malformed tokenizer files."""
    try:
        return _tokenizer_kvs(hf_dir, cfg, arch, vocab_size)
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise LowbitError(hf_dir, f"malformed tokenizer files ({e.__class__.__name__}: {e})") from None


def _read_json(path: Path, default=None):
    """A JSON file's content (``default`` when it is absent and a default is given)."""
    if default is not None and not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowbitError(path, f"cannot read {path.name} ({e.__class__.__name__}: {e})") from None


def _tokenizer_kvs(hf_dir: Path, cfg: dict, arch: str, vocab_size: int) -> list[KV]:
    spm = None
    for cand in ("tokenizer.model", *sorted(p.name for p in hf_dir.glob("*.model"))):
        if (hf_dir / cand).exists():
            spm = hf_dir / cand
            break
    tj_path = hf_dir / "tokenizer.json"
    tc = _read_json(hf_dir / "tokenizer_config.json", {})
    ids = _special_ids(hf_dir, cfg)
    kvs: list[KV] = []
    if spm is not None:
        import sentencepiece

        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(spm))
        except (OSError, RuntimeError) as e:
            raise LowbitError(spm, f"cannot read the SentencePiece model ({e})") from None
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
        added = _read_json(hf_dir / "added_tokens.json", {})
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
    elif tj_path.exists() and _is_spm_style_bpe(_read_json(tj_path)):
        kvs += _spm_kvs_from_tokenizer_json(_read_json(tj_path), ids, tc, arch, vocab_size)
    elif tj_path.exists():
        tj = _read_json(tj_path)
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
