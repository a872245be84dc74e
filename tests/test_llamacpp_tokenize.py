"""GGUF sources are tokenized exactly as llama.cpp tokenizes them (issue 17, item 1).

The ids lowbit uses for evaluation, calibration and importance-matrix text of a GGUF source
(:func:`lowbit.text.tokenize` with the loader's tokenizer) are compared with the ids llama.cpp
gives loading the whole model (tests/gguf_util.py's ``LlamaRunner``), on texts with whitespace
runs, tabs, newlines, digits and non-Latin scripts, for SmolLM2 (GPT-2 style BPE), Gemma-3
(SentencePiece-style BPE, where the transformers conversion splits runs of spaces differently)
and stories260K converted to GGUF (llama SPM).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.llamacpp

TEXTS = {
    "spaces": "Hello world\n\n" + " " * 32 + "indented" + " " * 7 + "x" + " " * 2 + "y  \n   z",
    "tabs_newlines": "a\tb\t\tc\n\td\r\ne\n\n\n\nf \t \n" + "\t" * 9 + "g",
    "digits": "1234567890 3.14159 2,718,281 0x1F 1e-5 12345678901234567890 -42 +7 1/3 100%",
    "cjk": "中文测试，这是一个句子。日本語のテキストです。한국어 문장입니다.",
    "cyrillic": "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "emoji": "smile 😀 party 🎉 thumbs 👍🏽 family 👨‍👩‍👧 flag 🇫🇷 end",
    "mixed": " = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 ) ",
    "code": "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\n        if x:\n\t\tpass\n",
}


def _ids_match(gguf: Path, source) -> None:
    pytest.importorskip("llama_cpp")
    from gguf_util import LlamaRunner

    from lowbit.gguf.llamacpp import LlamaCppTokenizer
    from lowbit.models import resolve
    from lowbit.models.loader import load_tokenizer
    from lowbit.text import tokenize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = resolve(source)
        tok = load_tokenizer(src.hf_dir, src.gguf_path)
    assert isinstance(tok, LlamaCppTokenizer)
    with LlamaRunner(gguf, n_ctx=64) as r:
        for name, text in TEXTS.items():
            ours = tokenize(tok, text).tolist()
            theirs = r.tokenize(text, True)
            assert ours == theirs, f"{name}: {ours[:20]} != {theirs[:20]}"
        from lowbit.text import pydoc_text

        for name, text in (("wikitext", _wiki()), ("pydoc", pydoc_text()[:40_000])):
            if not text:
                continue
            assert tokenize(tok, text).tolist() == r.tokenize(text, True), name


def _wiki() -> str:
    from paths import WIKITEXT

    return WIKITEXT.read_text(encoding="utf-8")[:60_000] if WIKITEXT.exists() else ""


def test_smollm2_ids_equal_llamacpp(smollm2_gguf):
    _ids_match(smollm2_gguf, "smollm2-135m")


def test_gemma3_ids_equal_llamacpp(gemma3_gguf):
    _ids_match(gemma3_gguf, "gemma3-270m")


def test_gemma3_transformers_tokenizer_differs_on_space_runs(gemma3_gguf):
    """Why the llama.cpp tokenizer is needed: the converted transformers tokenizer splits a run of
    32 spaces differently from llama.cpp (every later chunk would shift)."""
    pytest.importorskip("llama_cpp")
    from gguf_util import LlamaRunner

    from lowbit.models import resolve
    from lowbit.models.loader import load_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = resolve("gemma3-270m")
        hf = load_tokenizer(src.hf_dir, src.gguf_path)._hf
    text = "a" + " " * 32 + "b"
    with LlamaRunner(gemma3_gguf, n_ctx=64) as r:
        assert hf(text, add_special_tokens=False)["input_ids"] != r.tokenize(text, False)


def test_stories_gguf_ids_equal_llamacpp(stories_dir, tmp_path):
    from lowbit.gguf.convert import quantize_to_gguf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gguf = quantize_to_gguf(stories_dir, tmp_path / "stories-f32.gguf", "F32")
    _ids_match(gguf, gguf)


def test_outputs_quantized_from_a_gguf_keep_its_tokenizer(tmp_path):
    """A folder converted from a GGUF (and any output quantized from it, which copies its
    lowbit_source.json) tokenizes through that GGUF."""
    pytest.importorskip("llama_cpp")
    from lowbit.gguf.llamacpp import LlamaCppTokenizer
    from lowbit.models import resolve
    from lowbit.models.loader import load_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = resolve("smollm2-135m")
        assert isinstance(load_tokenizer(src.hf_dir), LlamaCppTokenizer)


def test_without_llamacpp_falls_back_with_one_warning(monkeypatch, smollm2_gguf):
    """No llama-cpp-python: the transformers tokenizer, and a one-line warning that ids may differ."""
    from lowbit.gguf import llamacpp
    from lowbit.models import resolve
    from lowbit.models.loader import load_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = resolve("smollm2-135m")
    monkeypatch.setenv("LOWBIT_LLAMACPP", "0")
    monkeypatch.setattr(llamacpp, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = load_tokenizer(src.hf_dir, src.gguf_path)
        load_tokenizer(src.hf_dir, src.gguf_path)
    assert not isinstance(tok, llamacpp.LlamaCppTokenizer)
    msgs = [str(w.message) for w in caught if "token ids may differ" in str(w.message)]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert tok("hello", add_special_tokens=False)["input_ids"]
