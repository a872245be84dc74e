"""``lowbit generate``: greedy continuations side by side and the garbled-output flags, on stories260K
(a model with 1-bit weights is flagged, the float model against itself is not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval.generate import compare_continuations, nonprintable_fraction, read_prompts, repetition_loop

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
PROMPTS = ["Once upon a time", "The little dog"]


def test_repetition_loop() -> None:
    assert repetition_loop([5] * 20) == (1, 20)
    assert repetition_loop(list(range(10)) + [1, 2, 3] * 6) == (3, 18)  # all six copies
    assert repetition_loop(list(range(40))) is None
    assert repetition_loop([1, 2] * 3) is None  # too short to call a loop
    assert repetition_loop(list(range(100)) + [7] * 13) is None  # a quarter of the output at least


def test_nonprintable_fraction() -> None:
    assert nonprintable_fraction("plain text\n\twith tabs") == 0
    assert nonprintable_fraction("ab\ufffd\x07") == 0.5


def test_read_prompts(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text('first\n\n{"prompt": "second"}\n  third  \n')
    assert read_prompts(f) == ["first", "second", "third"]
    f.write_text("\n\n")
    with pytest.raises(LowbitError, match="empty"):
        read_prompts(f)
    f.write_text('{"text": 1}\n')
    with pytest.raises(LowbitError, match="line 1: a JSON line needs"):
        read_prompts(f)


@pytest.fixture(scope="module")
def models() -> tuple:
    if not STORIES.exists():
        pytest.skip("stories260K not present")
    from lowbit.models import load

    ref, broken = load(STORIES), load(STORIES)
    with torch.no_grad():  # 1-bit weights: sign times the mean magnitude
        for name, p in broken.model.named_parameters():
            if p.dim() == 2 and "layers" in name:
                p.copy_(p.sign() * p.abs().mean())
    return ref, broken


def test_float_model_is_not_flagged(models: tuple) -> None:
    ref, _ = models
    rows = compare_continuations(ref.model, ref.model, ref.tokenizer, PROMPTS, max_new_tokens=24)
    for r in rows:
        assert r.first_diff is None and r.same_tokens == len(r.tokens) > 0 and r.text == r.ref_text
        assert not r.garbled and r.flags == r.ref_flags and r.kl_mean < 1e-6


def test_broken_model_is_flagged(models: tuple) -> None:
    ref, broken = models
    rows = compare_continuations(broken.model, ref.model, ref.tokenizer, PROMPTS, max_new_tokens=32)
    for r in rows:
        assert r.garbled and r.first_diff is not None and r.first_diff["index"] == r.same_tokens
        assert r.kl_mean > 1 and any("far from the reference" in f for f in r.flags)
        assert r.first_diff["ref"] == ref.tokenizer.decode([r.ref_tokens[r.same_tokens]])
    assert any(f.startswith("repetition loop") for r in rows for f in r.flags)  # "...ararararar..."


def test_cli_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not STORIES.exists():
        pytest.skip("stories260K not present")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n")
    assert main(["--quiet", "generate", str(STORIES), "--ref", str(STORIES), "--prompts", str(prompts),
                 "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"] == {"prompts": 1, "garbled": 0, "identical": 1, "mean_same_tokens": 8.0, "kl_mean": 0.0}
    assert main(["--quiet", "generate", str(STORIES), "--ref", str(STORIES), "--prompts", str(prompts),
                 "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "[1] prompt: 'Once upon a time'" in text and "same continuation" in text
