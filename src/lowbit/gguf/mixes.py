"""Per-tensor type choice of llama.cpp's quantization mixes ("ftypes": Q4_K_M, Q3_K_S, ...).

A mix is not one block type: llama.cpp's quantizer gives some tensors more bits (attn_v,
ffn_down of the first/last layers, output) and some fewer.  :func:`tensor_types` reproduces
that choice as a pure function of tensor names (GGUF naming, ``blk.N.attn_v.weight``),
shapes, and a few hyper-parameters, so our GGUF files use the same types as files written by
``llama-quantize``/``llama_model_quantize`` (version: llama.cpp as vendored by
llama-cpp-python 0.3.36).

Behaviour, in the order llama.cpp applies it:

* tensors that are never quantized (1-D, not ending in ``weight``, ``*_norm.weight``,
  ``ffn_gate_inp``, positional embeddings, ...) keep their source type;
* ``token_embedding_type`` / ``output_tensor_type`` (when given) win for those tensors;
* for quantized mixes: the first ``PATTERN=TYPE`` override whose pattern is found in the
  name (Python ``re.search``, i.e. a *regex* searched anywhere in the name, as
  ``llama-quantize --tensor-type``; the pattern is lower-cased like llama-quantize does)
  fixes the type; otherwise, unless ``pure``, the mix rules pick it;
* finally, rows (``ne[0]``, the last PyTorch dimension) that are not a multiple of the block
  size fall back: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ types ->
  IQ4_NL, and to F16 if even a 32-block does not fit.

The order of tensors matters for the counters (``i_attention_wv``): llama.cpp walks tensors
sorted by block number, then by name; :func:`tensor_types` sorts the same way itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ..errors import LowbitError

# llama_ftype ids (llama.h) and the default block type of each mix
FTYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21,
    "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27,
    "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
}
DEFAULT_TYPE: dict[str, T] = {
    "F32": T.F32, "F16": T.F16, "BF16": T.BF16, "Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q5_0": T.Q5_0,
    "Q5_1": T.Q5_1, "Q8_0": T.Q8_0, "Q2_K": T.Q2_K, "Q2_K_S": T.Q2_K, "Q3_K_S": T.Q3_K,
    "Q3_K_M": T.Q3_K, "Q3_K_L": T.Q3_K, "Q4_K_S": T.Q4_K, "Q4_K_M": T.Q4_K, "Q5_K_S": T.Q5_K,
    "Q5_K_M": T.Q5_K, "Q6_K": T.Q6_K, "IQ2_XXS": T.IQ2_XXS, "IQ2_XS": T.IQ2_XS, "IQ2_S": T.IQ2_XS,
    "IQ2_M": T.IQ2_S, "IQ3_XXS": T.IQ3_XXS, "IQ3_XS": T.IQ3_S, "IQ3_S": T.IQ3_S, "IQ3_M": T.IQ3_S,
    "IQ1_S": T.IQ1_S, "IQ1_M": T.IQ1_M, "IQ4_NL": T.IQ4_NL, "IQ4_XS": T.IQ4_XS,
    "TQ1_0": T.TQ1_0, "TQ2_0": T.TQ2_0,
}
MIXES: tuple[str, ...] = tuple(DEFAULT_TYPE)
FLOAT_MIXES = ("F32", "F16", "BF16")
_FTYPE_NAMES = {v: k for k, v in FTYPES.items()}

_IQ2_FAMILY = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
_FALLBACK = {
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL,
    T.IQ2_S: T.IQ4_NL, T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}
_UNQUANTIZED = (T.F32, T.F16, T.BF16, T.F64, T.I8, T.I16, T.I32, T.I64)


def ftype_name(ftype: int) -> str | None:
    """Mix name of a ``general.file_type`` value (e.g. 15 -> ``"Q4_K_M"``)."""
    return _FTYPE_NAMES.get(int(ftype) & ~1024)  # bit 10 = "guessed"


def normalize_mix(mix: str) -> str:
    """Canonical mix name (case-insensitive), or LowbitError listing the known ones."""
    m = str(mix).strip().upper().replace("-", "_")
    if m not in DEFAULT_TYPE:
        raise LowbitError(None, f"unknown quantization mix {mix!r}; known: {', '.join(MIXES)}")
    return m


def parse_type(name: str | T) -> T:
    """A ggml block type from its name (``q6_k``, ``Q8_0``, ``f16``...)."""
    if isinstance(name, T):
        return name
    try:
        return T[str(name).strip().upper()]
    except KeyError:
        known = ", ".join(t.name for t in T)
        raise LowbitError(None, f"unknown tensor type {name!r}; known: {known}") from None


def parse_overrides(items: Iterable[str]) -> list[tuple[str, T]]:
    """Parse ``PATTERN=TYPE`` strings (split at the first ``=``; pattern lower-cased, a regex)."""
    out = []
    for item in items:
        pat, sep, typ = str(item).partition("=")
        if not sep or not pat or not typ:
            raise LowbitError(None, f"tensor type override {item!r} is not PATTERN=TYPE")
        pat = pat.lower()
        try:
            re.compile(pat)
        except re.error as e:
            raise LowbitError(None, f"tensor type override {item!r}: bad regex ({e})") from None
        out.append((pat, parse_type(typ)))
    return out


@dataclass(frozen=True)
class ModelHParams:
    """What the type choice needs to know about the model (GGUF ``<arch>.*`` keys)."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:  # llama.cpp's LLM_TYPE_70B special case
        return self.arch == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv


@dataclass
class TypeOptions:
    pure: bool = False
    output_tensor_type: T | None = None
    token_embedding_type: T | None = None
    overrides: Sequence[tuple[str, T]] = field(default_factory=list)
    has_imatrix: bool = False
    quantize_output_tensor: bool = True


# ---------------------------------------------------------------------------------------------

_CAT_ORDER = (
    ("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
)


def category(name: str) -> str:
    """Broad role of a tensor: output, token_embd, attn_v, ffn_down, ... or other."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for needle, cat in _CAT_ORDER:
        if needle in name:
            return cat
    return "other"


_NO_QUANT_SUBSTR = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd",
    "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)


def allows_quantization(name: str, shape: Sequence[int], quantize_output_tensor: bool = True) -> bool:
    """Whether llama.cpp would quantize this tensor at all (else it keeps its source type)."""
    if _n_dims(shape) < 2:
        return False
    if not name.endswith("weight"):
        return False
    if not quantize_output_tensor and name == "output.weight":
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(s in name for s in _NO_QUANT_SUBSTR)


def _n_dims(shape: Sequence[int]) -> int:
    # ggml_n_dims: index of the last dimension > 1, plus one (GGUF order = reversed shape)
    ne = list(reversed(list(shape)))
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def _block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def _is_quantized(t: T) -> bool:
    return t not in _UNQUANTIZED


def _layer_of(name: str, n_layer: int) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    if not m:
        raise LowbitError(name, "cannot determine the layer of an expert tensor")
    i = int(m.group(1))
    if not 0 <= i < n_layer:
        raise LowbitError(name, f"layer {i} outside [0, {n_layer})")
    return i


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _sort_key(name: str) -> tuple[int, str]:
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


class _State:
    def __init__(self, names: Sequence[str], hp: ModelHParams, opts: TypeOptions) -> None:
        self.hp = hp
        self.opts = opts
        cats = [category(n) for n in names]
        self.n_attention_wv = sum(1 for c in cats if c in ("attn_v", "attn_qkv", "attn_kv_b"))
        self.tied = "output" not in cats
        self.n_ffn = hp.n_layer
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0


def _mix_rule(st: _State, new: T, name: str, ncols: int, mix: str, cat: str) -> T:
    """The mix rules proper (llama_tensor_get_type_impl), for a quantized default type."""
    hp = st.hp
    arch = hp.arch
    n_expert = max(1, hp.n_expert)
    attn_v_like = cat in ("attn_v", "attn_qkv", "attn_kv_b")

    def layer(i_counter: int) -> tuple[int, int]:
        if n_expert > 1:
            return _layer_of(name, st.n_ffn), st.n_ffn
        return i_counter, st.n_ffn

    if cat == "output" or (st.tied and cat == "token_embd"):
        if st.opts.output_tensor_type is not None:
            return st.opts.output_tensor_type
        if arch == "falcon" or ncols % _block_size(new) != 0:
            return T.Q8_0
        if mix in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            return T.Q5_K
        return new if new == T.Q8_0 else T.Q6_K

    if cat == "token_embd":
        if st.opts.token_embedding_type is not None:
            return st.opts.token_embedding_type
        if mix in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return T.Q2_K
        if mix in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return T.IQ3_S
        if mix in ("TQ1_0", "TQ2_0"):
            return T.Q4_K
        return new

    if mix in _IQ2_FAMILY:
        if attn_v_like:
            if hp.n_gqa >= 4 or hp.n_expert >= 4:
                new = T.Q4_K
            else:
                new = T.IQ3_S if mix in ("IQ2_S", "IQ2_M") else T.Q2_K
            st.i_attention_wv += 1
        elif hp.n_expert == 8 and cat == "attn_k":
            new = T.Q4_K
        elif cat == "ffn_down":
            if st.i_ffn_down < st.n_ffn // 8:
                new = T.IQ3_S if mix in ("IQ2_S", "IQ2_M") else T.Q2_K
            st.i_ffn_down += 1
        elif cat == "attn_output":
            if hp.n_expert == 8:
                new = T.Q5_K
            elif mix in ("IQ1_S", "IQ1_M"):
                new = T.IQ2_XXS
            elif mix in ("IQ2_S", "IQ2_M"):
                new = T.IQ3_S
        return new

    if attn_v_like:
        if mix == "Q2_K":
            new = T.Q4_K if hp.n_gqa >= 4 else T.Q3_K
        elif mix == "Q2_K_S" and hp.n_gqa >= 4:
            new = T.Q4_K
        elif mix == "IQ3_XXS":
            new = T.Q4_K if hp.n_gqa >= 4 else (T.IQ3_S if not st.opts.has_imatrix else T.IQ3_XXS)
        elif mix in ("IQ3_XS", "IQ3_S") and hp.n_gqa >= 4:
            new = T.Q4_K
        elif mix == "IQ3_M":
            new = T.Q4_K
        elif mix == "Q3_K_M":
            new = T.Q5_K if st.i_attention_wv < 2 else T.Q4_K
        elif mix == "Q3_K_L":
            new = T.Q5_K
        elif mix in ("IQ4_NL", "IQ4_XS") and hp.n_gqa >= 4:
            new = T.Q5_K
        elif mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new = T.Q6_K
        elif mix == "Q4_K_S" and st.i_attention_wv < 4:
            new = T.Q5_K
        if hp.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        if hp.n_expert == 8:
            new = T.Q8_0
        st.i_attention_wv += 1
        return new

    if cat == "attn_k":
        if hp.n_expert == 8:
            new = T.Q8_0
        elif mix == "IQ3_XS":
            new = T.IQ3_XXS
        elif mix == "IQ3_XXS":
            new = T.IQ2_S
        return new

    if cat == "attn_q":
        if mix == "IQ3_XS":
            new = T.IQ3_XXS
        elif mix == "IQ3_XXS":
            new = T.IQ2_S
        return new

    if cat == "ffn_down":
        i, n = layer(st.i_ffn_down)
        if mix == "Q2_K":
            new = T.Q3_K
        elif mix == "Q2_K_S":
            if i < n // 8:
                new = T.Q4_K
        elif mix == "IQ3_XXS" and not st.opts.has_imatrix:
            new = T.Q4_K if i < n // 8 else T.Q3_K
        elif mix == "Q3_K_M":
            if i < n // 16:
                new = T.Q5_K
            elif arch != "falcon" or _use_more_bits(i, n):
                new = T.Q4_K
            else:
                new = T.Q3_K
        elif mix == "IQ3_M" and (i < n // 8 or (hp.n_expert == 8 and _use_more_bits(i, n))):
            new = T.Q4_K
        elif mix == "Q3_K_L":
            new = T.Q4_K if arch == "falcon" else T.Q5_K
        elif mix == "Q4_K_M":
            if arch == "falcon":
                new = T.Q6_K if i < n // 16 else (T.Q5_K if _use_more_bits(i, n) else T.Q4_K)
            elif _use_more_bits(i, n):
                new = T.Q6_K
        elif i < n // 8 and mix in ("IQ4_NL", "IQ4_XS") and not st.opts.has_imatrix:
            new = T.Q5_K
        elif mix == "Q5_K_M" and _use_more_bits(i, n):
            new = T.Q6_K
        elif mix == "Q4_K_S" and arch != "falcon" and i < n // 8:
            new = T.Q5_K
        elif mix in ("Q4_0", "Q5_0") and st.opts.has_imatrix and i < n // 8:
            new = T.Q4_1 if mix == "Q4_0" else T.Q5_1
        st.i_ffn_down += 1
        return new

    if cat == "attn_output":
        if arch != "falcon":
            if hp.n_expert == 8:
                if mix in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S",
                           "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS"):
                    new = T.Q5_K
            else:
                new = {"Q2_K": T.Q3_K, "IQ3_XXS": T.IQ3_S, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K,
                       "IQ3_M": T.Q4_K}.get(mix, new)
        elif mix == "Q3_K_L":
            new = T.Q4_K
        return new

    if cat in ("ffn_gate", "ffn_up"):
        if cat == "ffn_gate":
            i, n = layer(st.i_ffn_gate)
            st.i_ffn_gate += 1
        else:
            i, n = layer(st.i_ffn_up)
            st.i_ffn_up += 1
        if mix == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            new = T.IQ3_XXS
        return new

    return new


def _fallback(t: T, ncols: int) -> T:
    blk = _block_size(t)
    if ncols % blk == 0:
        return t
    if t in _FALLBACK:
        r = _FALLBACK[t]
    elif blk <= 32:
        r = t
    else:
        raise LowbitError(None, f"no fallback type for {t.name}")
    if ncols % _block_size(r) != 0:
        r = T.F16
    return r


def tensor_types(
    tensors: Sequence[tuple[str, Sequence[int]]] | Mapping[str, Sequence[int]],
    hparams: ModelHParams,
    mix: str,
    options: TypeOptions | None = None,
    source_types: Mapping[str, T] | None = None,
    fallbacks: dict[str, tuple[T, T]] | None = None,
) -> dict[str, T]:
    """The type llama.cpp's quantizer would give each tensor.

    ``tensors``: GGUF tensor names with shapes in PyTorch order (``(rows, cols)``, experts
    ``(n_expert, rows, cols)``).  ``source_types``: the type each tensor has in the input
    (default F32 for 1-D tensors and F16 otherwise, as in an F16 conversion); tensors the mix
    does not quantize keep it.  Returns ``name -> GGMLQuantizationType`` in llama.cpp's order.
    ``fallbacks`` (filled when given): ``name -> (wanted, written)`` for every tensor whose rows
    the wanted type's blocks do not divide (llama.cpp's "fallback quantization").
    """
    opts = options or TypeOptions()
    mix = normalize_mix(mix)
    items = list(tensors.items()) if isinstance(tensors, Mapping) else [(n, tuple(s)) for n, s in tensors]
    items.sort(key=lambda it: _sort_key(it[0]))
    names = [n for n, _ in items]
    st = _State(names, hparams, opts)
    default = DEFAULT_TYPE[mix]
    patterns = [(re.compile(p), t) for p, t in opts.overrides]
    out: dict[str, T] = {}
    for name, shape in items:
        shape = tuple(int(d) for d in shape)
        src = (source_types or {}).get(name) or (T.F32 if len(shape) < 2 else T.F16)
        if not allows_quantization(name, shape, opts.quantize_output_tensor):
            out[name] = src
            continue
        cat = category(name)
        if opts.token_embedding_type is not None and cat == "token_embd":
            named = name == "per_layer_token_embd.weight" and any(p.search(name) for p, _ in patterns)
            if not named:
                out[name] = opts.token_embedding_type
                continue
        if opts.output_tensor_type is not None and cat == "output":
            out[name] = opts.output_tensor_type
            continue
        new = default
        if _is_quantized(default):
            manual = False
            for pat, typ in patterns:
                if pat.search(name):
                    new = typ
                    manual = True
                    break
            if not manual and not opts.pure:
                new = _mix_rule(st, new, name, shape[-1], mix, cat)
            wanted, new = new, _fallback(new, shape[-1])
            if fallbacks is not None and new != wanted:
                fallbacks[name] = (wanted, new)
        out[name] = new
    return out


def requires_imatrix(name: str, t: T, mix: str) -> bool:
    """llama.cpp refuses these (name, type) combinations without an importance matrix."""
    if category(name) in ("token_embd", "output"):
        return False
    if t in (T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S):
        return True
    return t == T.Q2_K and normalize_mix(mix) == "Q2_K_S"


def hparams_from_gguf_kv(kv: Mapping[str, object], n_layer_fallback: int | None = None,
                         where: str | Path | None = None) -> ModelHParams:
    """ModelHParams from GGUF metadata (``general.architecture`` and ``<arch>.*`` keys); ``where``
    (the file) names the source in errors."""
    arch = str(kv.get("general.architecture", ""))

    def g(key: str, default=0):
        v = kv.get(f"{arch}.{key}", default)
        if isinstance(v, (list, tuple)) or getattr(v, "ndim", 0) > 0:  # per-layer arrays: llama.cpp uses layer 0
            v = v[0] if len(v) else default  # type: ignore[arg-type, index]
        try:
            return int(v) if v is not None else default  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise LowbitError(where, f"metadata {arch}.{key} = {v!r} is not an integer") from None

    n_layer = g("block_count", n_layer_fallback or 0)
    n_head = g("attention.head_count", 0)
    n_head_kv = g("attention.head_count_kv", n_head)
    return ModelHParams(arch=arch, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                        n_expert=g("expert_count", 0))
