"""``lowbit generate``: greedy continuations of a model and its reference, side by side, with flags
for garbled output.

Both models continue the same prompt ids (the reference's tokenizer; the vocabularies must match)
greedily. For each prompt the result has both texts, the first token where they part, and flags:

- ``repetition loop``: the continuation ends in a period of at most 16 tokens repeated over at least
  12 tokens and a quarter of what was generated (a quantized model stuck on a phrase);
- ``non-printable text``: more than 2% of the characters are control characters or U+FFFD (bytes that
  do not decode: broken token choices);
- ``entropy spikes``: the model's next-token entropy, read on the reference's own continuation
  (teacher-forced, so both see the same prefix), exceeds the reference's by more than 2 nats at more
  than 20% of the positions (a model that no longer knows what comes next);
- ``far from the reference``: the mean KL-divergence on the reference's continuation is over 1 nat.

A prompt is ``garbled`` when the model has a flag the reference does not have (a tiny float model
loops too; what matters is what quantization added). The teacher-forced pass also gives the mean
KL-divergence on the continuation.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import LowbitError

LOOP_MAX_PERIOD = 16
LOOP_MIN_TOKENS = 12
NONPRINTABLE_FRACTION = 0.02
ENTROPY_MARGIN = 2.0  # nats above the reference's
ENTROPY_SPIKE_FRACTION = 0.2
KL_FLAG = 1.0  # nats, mean over the reference's continuation


@dataclass
class Continuation:
    """One prompt's two continuations and what was found in them."""

    prompt: str
    ref_text: str
    text: str
    ref_tokens: list[int]
    tokens: list[int]
    same_tokens: int  # leading tokens both generated alike
    first_diff: dict[str, Any] | None  # {"index", "ref", "model"} (decoded tokens) or None when identical
    flags: list[str] = field(default_factory=list)
    ref_flags: list[str] = field(default_factory=list)
    garbled: bool = False
    kl_mean: float = 0.0  # KL(ref || model) on the reference's continuation
    entropy_mean: float = 0.0
    ref_entropy_mean: float = 0.0


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: one per line, or JSON lines with a ``prompt`` field; blank lines skipped."""
    from ..text import read_text

    prompts = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise LowbitError(path, f"line {n}: not valid JSON ({exc})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise LowbitError(path, f"line {n}: a JSON line needs a string field 'prompt'")
            line = item["prompt"]
        prompts.append(line)
    if not prompts:
        raise LowbitError(path, "no prompts (one per line)")
    return prompts


def repetition_loop(ids: list[int]) -> tuple[int, int] | None:
    """``(period, tokens)`` of the periodic tail of ``ids`` when it is a loop (see the module), else None."""
    best: tuple[int, int] | None = None
    for p in range(1, min(LOOP_MAX_PERIOD, len(ids) // 3) + 1):
        run = 0
        for i in range(len(ids) - 1, p - 1, -1):
            if ids[i] != ids[i - p]:
                break
            run += 1
        length = run + p
        if length >= max(3 * p, LOOP_MIN_TOKENS, len(ids) // 4) and (best is None or length > best[1]):
            best = (p, length)
    return best


def nonprintable_fraction(text: str) -> float:
    bad = sum(1 for c in text if c == "\ufffd" or (unicodedata.category(c).startswith("C") and c not in "\n\t\r"))
    return bad / max(1, len(text))


@torch.inference_mode()
def greedy(model: torch.nn.Module, ids: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    """Greedy continuation of ``ids`` (KV cache; stops at ``eos``)."""
    import inspect

    # transformers 5.x names the KV cache ``cache`` (``past_key_values`` before, deprecated since)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    new: list[int] = []
    for _ in range(max_new_tokens):
        t = int(out.logits[0, -1].argmax())
        new.append(t)
        if t == eos:
            break
        out = model(input_ids=torch.tensor([[t]]), use_cache=True, **{key: getattr(out, key)})
    return new


@torch.inference_mode()
def _log_probs(model: torch.nn.Module, ids: list[int], start: int) -> torch.Tensor:
    """Log-probabilities of the next token at positions ``start-1 .. len(ids)-2`` (those predicting ``ids[start:]``)."""
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, start - 1 : -1].float()
    return F.log_softmax(logits, dim=-1)


def _entropy(lp: torch.Tensor) -> torch.Tensor:
    return -(lp.exp() * lp).sum(-1)


def _flags(ids: list[int], text: str, spikes: float | None, kl: float | None) -> list[str]:
    flags = []
    loop = repetition_loop(ids)
    if loop is not None:
        flags.append(f"repetition loop (period {loop[0]}, last {loop[1]} tokens)")
    frac = nonprintable_fraction(text)
    if frac > NONPRINTABLE_FRACTION:
        flags.append(f"non-printable text ({100 * frac:.0f}% of characters)")
    if kl is not None and kl > KL_FLAG:
        flags.append(f"far from the reference (KL {kl:.2f} nats on its continuation)")
    if spikes is not None and spikes > ENTROPY_SPIKE_FRACTION:
        flags.append(f"entropy spikes ({100 * spikes:.0f}% of positions > {ENTROPY_MARGIN:g} nats above the reference)")
    return flags


def _token_at(tokenizer: Any, seq: list[int], i: int) -> str | None:
    return tokenizer.decode([seq[i]]) if i < len(seq) else None


def _kind(flag: str) -> str:
    return flag.split(" (")[0]


def compare_continuations(model: torch.nn.Module, ref: torch.nn.Module, tokenizer: Any, prompts: list[str],
                          max_new_tokens: int = 64) -> list[Continuation]:
    """Greedy continuations of every prompt by ``model`` and ``ref``, compared (see the module)."""
    from ..progress import track
    from ..text import encode, model_adds_bos

    bos = getattr(tokenizer, "bos_token_id", None) if model_adds_bos(tokenizer) else None
    eos = getattr(tokenizer, "eos_token_id", None)
    results = []
    for prompt in track(prompts, "generate", unit="prompt"):
        ids = ([bos] if bos is not None else []) + encode(tokenizer, prompt)
        if not ids:
            raise LowbitError(prompt, "the prompt has no tokens")
        ref_new = greedy(ref, ids, max_new_tokens, eos)
        new = greedy(model, ids, max_new_tokens, eos)
        same = next((i for i, (a, b) in enumerate(zip(ref_new, new, strict=False)) if a != b), min(len(ref_new), len(new)))
        diff = None
        if same < max(len(ref_new), len(new)):
            diff = {"index": same, "ref": _token_at(tokenizer, ref_new, same), "model": _token_at(tokenizer, new, same)}
        kl = ent = ref_ent = 0.0
        spikes = None
        if ref_new:
            lp_ref = _log_probs(ref, ids + ref_new, len(ids))
            lp_q = _log_probs(model, ids + ref_new, len(ids))
            h_ref, h_q = _entropy(lp_ref), _entropy(lp_q)
            kl = float((lp_ref.exp() * (lp_ref - lp_q)).sum(-1).clamp_min(0).mean())
            ent, ref_ent = float(h_q.mean()), float(h_ref.mean())
            spikes = float((h_q > h_ref + ENTROPY_MARGIN).float().mean())
        text, ref_text = tokenizer.decode(new), tokenizer.decode(ref_new)
        flags, ref_flags = _flags(new, text, spikes, kl if ref_new else None), _flags(ref_new, ref_text, None, None)
        garbled = bool({_kind(f) for f in flags} - {_kind(f) for f in ref_flags})
        results.append(Continuation(prompt, ref_text, text, ref_new, new, same, diff, flags, ref_flags, garbled,
                                    kl, ent, ref_ent))
    return results


def generate(model: Any, ref: Any, prompts: str | Path | list[str], max_new_tokens: int = 64) -> dict[str, Any]:
    """Load ``model`` and ``ref`` (any source lowbit loads) and compare their continuations of ``prompts``
    (a file, or a list of strings)."""
    from ..models import load

    texts = read_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
    if max_new_tokens < 1:
        raise LowbitError("--max-new-tokens", "must be at least 1")
    ref_loaded = load(ref)
    loaded = load(model)
    if loaded.model.config.vocab_size != ref_loaded.model.config.vocab_size:
        raise LowbitError(model, f"vocabulary of {loaded.model.config.vocab_size} tokens, the reference's has "
                                 f"{ref_loaded.model.config.vocab_size}: continuations cannot be compared token by token")
    rows = compare_continuations(loaded.model.eval(), ref_loaded.model.eval(), ref_loaded.tokenizer, texts,
                                 max_new_tokens)
    garbled = sum(r.garbled for r in rows)
    return {"model": str(model), "ref": str(ref), "max_new_tokens": max_new_tokens,
            "prompts": [asdict(r) for r in rows],
            "summary": {"prompts": len(rows), "garbled": garbled,
                        "identical": sum(r.first_diff is None for r in rows),
                        "mean_same_tokens": sum(r.same_tokens for r in rows) / len(rows),
                        "kl_mean": sum(r.kl_mean for r in rows) / len(rows)}}


def format_generate(result: dict[str, Any], width: int = 100) -> str:
    """The continuations as text: reference and model under each prompt, the first difference, the flags."""
    import textwrap

    lines = [f"model: {result['model']}   ref: {result['ref']}   greedy, {result['max_new_tokens']} new tokens at most"]
    for n, r in enumerate(result["prompts"], 1):
        lines += ["", f"[{n}] prompt: {r['prompt']!r}"]
        for label, text in (("ref  ", r["ref_text"]), ("model", r["text"])):
            wrapped = textwrap.wrap(repr(text)[1:-1], width - 9) or [""]
            lines += [f"  {label}: {wrapped[0]}"] + [f"         {w}" for w in wrapped[1:]]
        d = r["first_diff"]
        lines.append("  same continuation" if d is None else
                     f"  first difference at new token {d['index']}: ref {d['ref']!r}, model {d['model']!r}")
        lines.append(f"  KL on the reference's continuation: {r['kl_mean']:.4f} nats; "
                     f"entropy {r['entropy_mean']:.2f} (ref {r['ref_entropy_mean']:.2f})")
        if r["flags"] or r["ref_flags"]:
            lines.append(f"  flags: model: {'; '.join(r['flags']) or 'none'}; ref: {'; '.join(r['ref_flags']) or 'none'}")
        if r["garbled"]:
            lines.append("  GARBLED: the model's output has faults the reference's does not")
    s = result["summary"]
    lines += ["", f"{s['garbled']} of {s['prompts']} prompts garbled, {s['identical']} identical; "
                  f"{s['mean_same_tokens']:.1f} leading tokens alike on average; KL {s['kl_mean']:.4f}"]
    return "\n".join(lines)
