"""Model sources checked before any work: config values, and tensors against what the architecture expects.

A Hugging Face folder is two things that must agree: ``config.json`` (the architecture's
hyper-parameters) and the safetensors (the weights). Neither is trusted:

* :func:`validate_hf_config` checks the values of ``config.json`` alone: types, ranges, head
  counts that divide, a finite positive norm epsilon (one error naming the file and the key);
* :func:`check_checkpoint` checks them against the weights: ``num_hidden_layers`` against the
  layers present, ``hidden_size`` and ``vocab_size`` against the embedding, then every tensor
  name and shape against the model the config describes (:func:`expected_tensors`, built from
  the meta skeleton, so the table is transformers' own). Tied embeddings (``lm_head.weight``
  optional), non-persistent buffers (rotary ``inv_freq``) and either layout of mixture-of-experts
  weights (fused ``[E, ...]`` parameters or one tensor per expert) are accepted.

GGUF sources are checked by :func:`lowbit.gguf.hparams.validate_hparams` (metadata) and
:func:`check_gguf_tensors` (names and shapes, through the same skeleton).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LowbitError
from .architectures import find_model_type

MAX_LAYERS = 4096
MAX_WIDTH = 1 << 20
MAX_HEADS = 1 << 14
MAX_CONTEXT = 1 << 24
MAX_VOCAB = 1 << 24
MAX_EXPERTS = 1 << 12

#: checkpoint tensors every loader ignores (old rotary caches)
_IGNORED = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_hf_config(cfg: Mapping[str, Any], where: str | Path | None) -> None:
    """Check the values of a ``config.json`` (a supported architecture's; others pass untouched).

    Refuses, naming ``where`` and the key: non-integer or out-of-range sizes and counts, head
    counts that do not divide the hidden size (without an explicit ``head_dim``) or each other,
    a norm epsilon that is not a finite small positive number, a non-positive rope base, and
    token ids or expert counts out of range."""
    arch = find_model_type(cfg.get("model_type"))
    if arch is None:
        return  # unsupported architectures are refused where they are used, naming the supported ones

    def integer(key: str, lo: int, hi: int, required: bool = True) -> int | None:
        v = cfg.get(key)
        if v is None:
            if required:
                raise LowbitError(where, f"config.json has no {key!r} entry")
            return None
        if not _is_int(v):
            raise LowbitError(where, f"{key} = {v!r} is not an integer")
        if not lo <= v <= hi:
            raise LowbitError(where, f"{key} = {v} is out of range ({lo} to {hi})")
        return int(v)

    def number(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LowbitError(where, f"{key} = {value!r} is not a number")
        return float(value)

    integer("num_hidden_layers", 1, MAX_LAYERS)
    hidden = integer("hidden_size", 1, MAX_WIDTH)
    heads = integer("num_attention_heads", 1, MAX_HEADS)
    assert hidden is not None and heads is not None
    kv = integer("num_key_value_heads", 1, MAX_HEADS, required=False) or heads
    if heads % kv:
        raise LowbitError(where, f"num_key_value_heads = {kv} does not divide num_attention_heads = {heads}")
    head_dim = integer("head_dim", 1, MAX_WIDTH, required=False)
    if hidden % heads:  # transformers' configs require it even with an explicit head_dim
        raise LowbitError(where, f"num_attention_heads = {heads} does not divide hidden_size = {hidden}")
    if (head_dim or hidden // heads) % 2:
        raise LowbitError(where, f"the head dimension {head_dim or hidden // heads} is odd "
                                 "(rotary embeddings need an even one)")
    integer("intermediate_size", 1, MAX_WIDTH, required=not arch.moe)
    vocab = integer("vocab_size", 1, MAX_VOCAB, required=False)
    integer("max_position_embeddings", 1, MAX_CONTEXT, required=False)
    integer("sliding_window", 0, MAX_CONTEXT, required=False)
    for key in ("rms_norm_eps", "layer_norm_eps"):
        if key in cfg:
            eps = number(key, cfg[key])
            if not math.isfinite(eps) or not 0.0 < eps < 1.0:
                raise LowbitError(where, f"{key} = {eps} is not a small positive number (expected about 1e-6 to 1e-5)")
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise LowbitError(where, f"{key} = {cfg[key]!r} is not a JSON object")
    thetas = [("rope_theta", cfg.get("rope_theta"))]
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        thetas.append(("rope_parameters.rope_theta", rp.get("rope_theta")))
        thetas += [(f"rope_parameters.{k}.rope_theta", v.get("rope_theta")) for k, v in rp.items() if isinstance(v, dict)]
    for key, theta in thetas:
        if theta is not None and (not math.isfinite(t := number(key, theta)) or t <= 0.0):
            raise LowbitError(where, f"{key} = {theta} is not a positive number")
    tie = cfg.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise LowbitError(where, f"tie_word_embeddings = {tie!r} is not true or false")
    if arch.moe:
        n_exp = None
        for key in ("num_local_experts", "num_experts"):
            n_exp = integer(key, 1, MAX_EXPERTS, required=False) or n_exp
        top_k = integer("num_experts_per_tok", 1, n_exp or MAX_EXPERTS, required=False)
        if n_exp is None or top_k is None:
            raise LowbitError(where, "config.json of a mixture of experts needs num_experts (or num_local_experts) "
                                     "and num_experts_per_tok")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = cfg.get(key)
        for tok in ids if isinstance(ids, list) else [ids]:
            if tok is None:
                continue
            if not _is_int(tok) or tok < 0 or (vocab is not None and tok >= vocab):
                raise LowbitError(where, f"{key} = {ids!r} is not a token id of the vocabulary "
                                         f"(0 to {vocab - 1 if vocab else '...'})")


@contextmanager
def config_errors(where: str | Path | None) -> Iterator[None]:
    """Turn what transformers raises about a config it refuses (its own validators, values it
    cannot use) into one :class:`LowbitError` naming ``where`` (the config.json or GGUF file)."""
    try:
        yield
    except (LowbitError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - its validators raise their own types (huggingface_hub's StrictDataclassError)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = (lines[-1] if lines else "")[:200]
        raise LowbitError(where, f"transformers cannot use this config ({exc.__class__.__name__}"
                                 f"{': ' + detail if detail else ''})") from None


# --- tensors against the architecture -------------------------------------------------------------


@dataclass
class Expected:
    """What a checkpoint of a config must hold: ``required`` names (with their shapes), ``optional``
    ones (a tied ``lm_head``), and per fused expert parameter the per-expert alternative."""

    required: dict[str, tuple[int, ...]] = field(default_factory=dict)
    optional: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: fused name -> {per-expert name: shape}: either the fused tensor or every per-expert one
    alternatives: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    ignore: tuple[re.Pattern[str], ...] = ()

    def known(self, name: str) -> bool:
        return (name in self.required or name in self.optional or any(name in a for a in self.alternatives.values())
                or bool(_IGNORED.search(name)) or any(p.search(name) for p in self.ignore))


def expected_tensors(config: Any, model: Any = None) -> Expected:
    """The tensor names and shapes a checkpoint of ``config`` holds (on-disk names: the adapter's
    :func:`~lowbit.models.layers.disk_name`); ``model``: the meta skeleton when already built."""
    from .adapters import get_adapter
    from .capture import build_skeleton
    from .layers import disk_name, full_weight_name

    if model is None:
        model = build_skeleton(config)
    try:
        adapter = get_adapter(config)
    except LowbitError:
        adapter = None
    out = Expected()
    ignore = getattr(type(model), "_keys_to_ignore_on_load_unexpected", None) or ()
    out.ignore = tuple(re.compile(p) for p in ignore)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, t in model.state_dict(keep_vars=True).items():
        shape = tuple(int(d) for d in t.shape)
        if tied and name == "lm_head.weight":
            out.optional[name] = shape
            continue
        if adapter is None or not name.startswith(adapter.layers + "."):
            out.required[name] = shape
            continue
        i_str, _, rel = name[len(adapter.layers) + 1:].partition(".")
        i = int(i_str)
        disk = adapter.layer_prefix(i) + disk_name(adapter, rel)
        moe = adapter.moe
        if moe is not None and rel.startswith(moe.experts + ".") and rel.rsplit(".", 1)[-1] in ("gate_up_proj",
                                                                                                   "down_proj"):
            per: dict[str, tuple[int, ...]] = {}
            n_exp = shape[0]
            if rel.endswith("gate_up_proj"):
                for e in range(n_exp):
                    for proj in (0, 1):
                        per[full_weight_name(adapter, i, moe.expert_name(e, proj))] = (shape[1] // 2, shape[2])
            else:
                for e in range(n_exp):
                    per[full_weight_name(adapter, i, moe.expert_name(e, 2))] = shape[1:]
            out.alternatives[disk] = per
            out.optional[disk] = shape
            continue
        out.required[disk] = shape
    return out


def _first(names: Sequence[str], n: int = 1) -> str:
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(repr(x) for x in names[:n]) + more


def check_tensors(expected: Expected, shapes: Mapping[str, Sequence[int]], arch: str,
                  file_of: Callable[[str], Any], folder: Any) -> None:
    """Refuse a checkpoint whose tensor names or shapes differ from ``expected``.

    ``shapes``: the checkpoint's name -> shape; ``file_of(name)``: the file to name for a tensor it
    holds; ``folder``: what to name for tensors it lacks. One line: the unexpected tensors (a
    rename or another model), the missing ones, or the first shape that differs."""
    unexpected = [n for n in shapes if not expected.known(n)]
    missing = [n for n in expected.required if n not in shapes]
    for fused, per in expected.alternatives.items():
        if fused in shapes:
            continue
        lacking = [n for n in per if n not in shapes]
        if lacking:
            missing.append(fused if len(lacking) == len(per) else lacking[0])
    if unexpected:
        also = f"; it lacks {_first(missing)}" if missing else ""
        raise LowbitError(file_of(unexpected[0]), f"unexpected tensor {_first(unexpected)}: not part of the {arch} "
                                                  f"model its config describes{also} (renamed, or from another model?)")
    if missing:
        raise LowbitError(folder, f"missing tensor {_first(missing)} that the {arch} model its config describes needs")
    want_all: dict[str, tuple[int, ...]] = {**expected.required, **expected.optional}
    for per in expected.alternatives.values():
        want_all.update(per)
    for name, s in shapes.items():
        want = want_all.get(name)
        got = tuple(int(d) for d in s)
        if want is not None and got != want:
            raise LowbitError(file_of(name), f"tensor {name!r} has shape {got}, the config implies {want}")


def _layers_present(names: Sequence[str], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for n in names if (m := pat.match(n))})


def check_checkpoint(config: Any, ckpt: Any, where: str | Path | None = None, model: Any = None) -> None:
    """Check a Hugging Face checkpoint against its (validated) config, before any work.

    ``num_hidden_layers`` against the layers present, ``hidden_size``/``vocab_size`` against the
    embedding, then every name and shape (:func:`check_tensors`). ``where``: the file to name in
    every error instead of the checkpoint's own (a GGUF file the folder was converted from)."""
    from .adapters import get_adapter

    folder = where if where is not None else getattr(ckpt, "folder", None)
    cfg_file = where if where is not None else Path(str(folder)) / "config.json"
    names = list(ckpt.keys())
    try:
        adapter = get_adapter(config)
        layers, embed = adapter.layers + ".", f"{adapter.embed}.weight"
    except LowbitError:
        layers, embed = "model.layers.", "model.embed_tokens.weight"
    n_layer = int(config.num_hidden_layers)
    found = _layers_present(names, layers)
    if found and found != list(range(n_layer)):
        top = found[-1]
        have = f"layers 0-{top}" if found == list(range(top + 1)) else f"layers {found[:8]}"
        raise LowbitError(cfg_file, f"num_hidden_layers = {n_layer}, but the checkpoint holds {have}")
    if embed in ckpt:
        rows, *cols = ckpt.shape(embed)
        if cols and cols[0] != int(config.hidden_size):
            raise LowbitError(cfg_file, f"hidden_size = {config.hidden_size}, but {embed} has {cols[0]} columns")
        if rows != int(config.vocab_size):
            raise LowbitError(cfg_file, f"vocab_size = {config.vocab_size}, but {embed} has {rows} rows")
    with config_errors(cfg_file):
        expected = expected_tensors(config, model)

    def file_of(name: str) -> Any:
        return where if where is not None else ckpt.file_of(name)

    check_tensors(expected, {n: ckpt.shape(n) for n in names}, str(config.model_type), file_of, folder)


def check_gguf_tensors(cfg: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], arch: str,
                       path: str | Path) -> None:
    """Check a GGUF file's tensor names and shapes against the model its metadata describes
    (``cfg``: the Hugging Face config made from that metadata). Only ``rope_freqs.weight``
    (llama.cpp's precomputed rope factors) may come in addition."""
    import warnings

    from transformers import AutoConfig

    from ..gguf.names import gguf_tensor_name

    with warnings.catch_warnings(), config_errors(path):
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
        hf = expected_tensors(config)
    exp = Expected()
    for src, dst in ((hf.required, exp.required), (hf.optional, exp.optional)):
        for name, shape in src.items():
            g = gguf_tensor_name(name, arch)
            if g is not None:
                dst[g] = shape
            elif src is hf.required:
                raise LowbitError(path, f"the {arch} model needs {name}, which has no GGUF equivalent")
    exp.ignore = (re.compile(r"^rope_freqs\.weight$"),)
    check_tensors(exp, shapes, arch, lambda _n: path, path)
