"""Calibration data: seeded windows from text, JSONL conversations with padding, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from paths import STORIES
from lowbit.methods import METHODS
from lowbit.errors import LowbitError
from lowbit.models.calibration import CalibrationConfig, load_calibration
from lowbit.text import pydoc_text


pytestmark = pytest.mark.skipif(not STORIES.exists(), reason="stories260K not available")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(STORIES))


TEXT = " ".join(f"Once upon a time there was a little cat number {i} who liked to play." for i in range(200))


def test_text_windows_are_seeded(tok) -> None:
    cfg = CalibrationConfig(text=TEXT, n_samples=5, seq_len=32, seed=3)
    a, b = load_calibration(tok, cfg), load_calibration(tok, cfg)
    assert a.input_ids.shape == (5, 32) and a.attention_mask is None
    assert torch.equal(a.input_ids, b.input_ids)
    c = load_calibration(tok, CalibrationConfig(text=TEXT, n_samples=5, seq_len=32, seed=4))
    assert not torch.equal(a.input_ids, c.input_ids)


def test_defaults_by_method(tok) -> None:
    assert CalibrationConfig().resolved(METHODS.get("gptq").calibration_default).n_samples == 128
    assert CalibrationConfig().resolved(METHODS.get("gptq").calibration_default).seq_len == 2048
    assert CalibrationConfig().resolved(METHODS.get("awq").calibration_default).seq_len == 512


def test_text_file_and_default_text(tok, tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text(TEXT)
    d = load_calibration(tok, CalibrationConfig(path=str(p), n_samples=2, seq_len=16))
    assert d.input_ids.shape == (2, 16) and d.source == str(p)
    assert len(pydoc_text()) > 100_000
    d = load_calibration(tok, CalibrationConfig(n_samples=2, seq_len=16))
    assert d.source == "pydoc_data.topics"


def test_too_short_text_is_a_clear_error(tok) -> None:
    with pytest.raises(LowbitError, match="too short"):
        load_calibration(tok, CalibrationConfig(text="a tiny text", n_samples=2, seq_len=512))


def test_jsonl_chat_padded_with_mask(tok, tmp_path: Path) -> None:
    p = tmp_path / "chat.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, cat."}]},
        [{"role": "user", "content": TEXT[:400]}],
        {"text": "A plain text sample about a dog."},
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    d = load_calibration(tok, CalibrationConfig(path=str(p), n_samples=3, seq_len=40))
    assert d.input_ids.shape == (3, 40)
    assert d.attention_mask is not None and d.attention_mask.sum(1).max() == 40
    assert d.attention_mask.sum(1).min() < 40  # the short ones are padded
    with pytest.raises(LowbitError, match="too short"):
        load_calibration(tok, CalibrationConfig(path=str(p), n_samples=10, seq_len=40))
    saved, tok.chat_template = getattr(tok, "chat_template", None), None
    try:
        with pytest.raises(LowbitError, match="chat template"):
            load_calibration(tok, CalibrationConfig(path=str(p), n_samples=3, seq_len=40, chat_template=True))
    finally:
        tok.chat_template = saved


def test_jsonl_chat_template_applied(tok, tmp_path: Path) -> None:
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}) + "\n")
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    try:
        d = load_calibration(tok, CalibrationConfig(path=str(p), n_samples=1, seq_len=64, chat_template=True))
    finally:
        tok.chat_template = None
    plain = tok("<user>Hi\n<assistant>Yo\n", add_special_tokens=False)["input_ids"]
    assert d.input_ids[0, : len(plain)].tolist() == plain


def test_bad_jsonl_line(tok, tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "ok"}]}\nnot json\n')
    with pytest.raises(LowbitError, match=":2"):
        load_calibration(tok, CalibrationConfig(path=str(p), n_samples=1, seq_len=8))


def test_selfgen_samples_are_deterministic_full_length_and_cached(stories_dir, tmp_path, monkeypatch):
    """The 'selfgen' named set: BOS + a word + sampled tokens, no special tokens, cached, seeded."""
    from lowbit.models import load
    from lowbit.models import selfgen
    from lowbit.models.calibration import CalibrationConfig, load_calibration

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    lm = load(stories_dir)
    cfg = CalibrationConfig(path="selfgen", n_samples=3, seq_len=12, seed=5)
    a = load_calibration(lm.tokenizer, cfg, source=stories_dir, device="cpu")
    assert a.input_ids.shape == (3, 12) and a.attention_mask is None
    ids = a.input_ids
    assert (ids[:, 0] == lm.tokenizer.bos_token_id).all()
    special = set(lm.tokenizer.all_special_ids)
    assert not any(int(t) in special for t in ids[:, 1:].flatten())
    assert len(list((tmp_path / "calibration").glob("selfgen-*.safetensors"))) == 1
    # the cached copy, and a fresh sampling with the same seed, give the same tokens
    b = load_calibration(lm.tokenizer, cfg, source=stories_dir, device="cpu")
    assert torch.equal(a.input_ids, b.input_ids)
    fresh = selfgen.sample_sequences(lm.model, lm.tokenizer, 3, 12, seed=5, bos_id=lm.tokenizer.bos_token_id)
    assert torch.equal(fresh, ids)
    other = selfgen.sample_sequences(lm.model, lm.tokenizer, 3, 12, seed=6, bos_id=lm.tokenizer.bos_token_id)
    assert not torch.equal(other, ids)
    with pytest.raises(LowbitError, match="selfgen"):
        load_calibration(lm.tokenizer, cfg)
