"""Conversion to GGUF: files llama.cpp loads and runs, byte-equal to llama.cpp's own quantizer."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf_util import STORIES

from lowbit.errors import LowbitError
from lowbit.gguf.convert import plan_types, quantize_to_gguf
from lowbit.gguf.names import gguf_tensor_name, permute_rotary
from lowbit.gguf.reader import GGUFFile, inspect_gguf

PROMPT = "Once upon a time, there was a"


@pytest.fixture(scope="module")
def stories(stories_dir):
    return str(stories_dir)


@pytest.fixture(scope="module")
def stories_files(stories, tmp_path_factory):
    d = tmp_path_factory.mktemp("stories")
    return {m: quantize_to_gguf(stories, d / f"st-{m}.gguf", m) for m in ("F32", "F16", "BF16", "Q8_0")}


def test_names_and_permutation():
    assert gguf_tensor_name("model.layers.3.self_attn.o_proj.weight", "llama") == "blk.3.attn_output.weight"
    assert gguf_tensor_name("model.layers.0.post_attention_layernorm.weight", "llama") == "blk.0.ffn_norm.weight"
    assert gguf_tensor_name("model.layers.0.post_attention_layernorm.weight", "gemma3") == "blk.0.post_attention_norm.weight"
    assert gguf_tensor_name("model.layers.0.pre_feedforward_layernorm.weight", "gemma3") == "blk.0.ffn_norm.weight"
    assert gguf_tensor_name("model.layers.0.self_attn.k_norm.weight", "qwen3") == "blk.0.attn_k_norm.weight"
    assert gguf_tensor_name("model.layers.0.self_attn.q_proj.bias", "qwen2") == "blk.0.attn_q.bias"
    assert gguf_tensor_name("lm_head.weight", "llama") == "output.weight"
    # llama.cpp's rotary layout interleaves the two halves of each head; the lead's inverse undoes it
    import torch

    from lowbit.models.gguf_source import unpermute_rotary

    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
    p = permute_rotary(w, 2)
    assert p[1, 0] == w[4, 0]  # head 0: rows 0..3 | 4..7 -> 0,4,1,5,...
    assert np.array_equal(unpermute_rotary(torch.from_numpy(p), 2).numpy(), w)


def test_metadata_and_types(stories_files):
    info = inspect_gguf(stories_files["F16"])
    md = info["metadata"]
    assert info["architecture"] == "llama" and info["file_type"] == "F16"
    assert md["llama.block_count"] == 5 and md["llama.attention.head_count_kv"] == 4
    assert md["llama.rope.dimension_count"] == 8 and md["tokenizer.ggml.model"] == "llama"
    assert md["tokenizer.ggml.bos_token_id"] == 1 and md["tokenizer.ggml.add_bos_token"] is True
    types = {t["name"]: t["type"] for t in info["tensors"]}
    assert "output.weight" not in types  # tied embeddings
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == "F16"
    q8 = {t["name"]: t["type"] for t in inspect_gguf(stories_files["Q8_0"])["tensors"]}
    assert q8["blk.0.ffn_down.weight"] == "F16"  # 172 columns: no 32-block fits -> F16, as llama.cpp
    assert q8["blk.0.ffn_up.weight"] == "Q8_0"


def test_errors(stories, tmp_path, stories_files):
    with pytest.raises(LowbitError, match="exists"):
        quantize_to_gguf(stories, stories_files["F16"], "F16")
    with pytest.raises(LowbitError, match="unknown quantization mix"):
        quantize_to_gguf(stories, tmp_path / "x.gguf", "Q9_K")
    # IQ2_XXS needs an importance matrix only where the IQ2 type survives the row fallback:
    # stories260K's 64-wide rows fall back to IQ4_NL, so no imatrix is needed (as in llama.cpp)
    iq = set(plan_types(stories, "IQ2_XXS").values())
    assert T.IQ4_NL in iq and T.IQ2_XXS not in iq
    from lowbit.gguf import mixes

    assert mixes.requires_imatrix("blk.0.attn_q.weight", T.IQ2_XXS, "IQ2_XXS")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "gpt_neox", "num_hidden_layers": 1}')
    from lowbit.gguf.sources import _hf_source

    with pytest.raises(LowbitError, match="gpt_neox"):
        _hf_source(bad)
    assert not list(tmp_path.glob(".*partial"))


def test_requantize_warns_and_copies_same_type(stories_files, tmp_path):
    src = stories_files["Q8_0"]
    with pytest.warns(UserWarning, match="already quantized"):
        out = quantize_to_gguf(src, tmp_path / "re.gguf", "Q4_0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=r".*fell back from Q8_0 to F16")  # rows of 172: reported, not requantized
        same = quantize_to_gguf(src, tmp_path / "same.gguf", "Q8_0")  # every type equal: plain copy
    a, b = GGUFFile(src), GGUFFile(same)
    assert all(np.array_equal(a.data(t.name), b.data(t.name)) for t in a.tensors)
    assert inspect_gguf(out)["file_type"] == "Q4_0"


@pytest.mark.llamacpp
def test_llamacpp_loads_and_generates(stories_files):
    pytest.importorskip("llama_cpp")
    import torch
    from gguf_util import LlamaRunner

    from lowbit.models import load

    lm = load(STORIES)
    ids = lm.tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        hf_logits = lm.model(torch.tensor([ids])).logits[0].numpy()
    for m in ("F32", "F16", "BF16", "Q8_0"):
        with LlamaRunner(stories_files[m], n_ctx=128) as r:
            toks = r.tokenize(PROMPT, True)
            assert toks == ids  # our SPM vocabulary tokenizes like the HF tokenizer
            text = r.detokenize(r.generate(toks, 12))
            assert text.startswith(" little girl named Lily"), (m, text)
            if m == "F32":
                lg = r.logits(toks)
                assert np.abs(lg - hf_logits).max() < 1e-3 * max(1.0, np.abs(hf_logits).max())


STORIES_MIXES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S",
                 "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS"]


@pytest.mark.llamacpp
@pytest.mark.parametrize("mix", [m if m in ("Q8_0", "Q4_0", "Q5_1", "Q3_K_M", "Q4_K_M", "IQ4_XS")
                                 else pytest.param(m, marks=pytest.mark.slow) for m in STORIES_MIXES])
def test_bytes_equal_llamacpp_stories(stories_files, mix, tmp_path):
    pytest.importorskip("llama_cpp")
    from gguf_util import gguf_tensor_bytes, llamacpp_quantize

    ours = quantize_to_gguf(stories_files["F32"], tmp_path / "ours.gguf", mix)
    theirs = llamacpp_quantize(stories_files["F32"], tmp_path / "theirs.gguf", mix)
    a, b = gguf_tensor_bytes(ours), gguf_tensor_bytes(theirs)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    # and straight from the HF folder: same types (values differ only by F32 rounding: none here)
    assert plan_types(STORIES, mix) == plan_types(stories_files["F32"], mix)


@pytest.fixture(scope="module")
def smol_f16(smollm2_gguf, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_to_gguf(smollm2_gguf, tmp_path_factory.mktemp("smol") / "smol-f16.gguf", "F16")


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M"])
def test_smollm2_equal_llamacpp(smol_f16, mix, tmp_path):
    """Real 576/1536-wide rows (K-quants without fallbacks): our file's bytes, and hence
    llama.cpp's logits on it, equal the file llama.cpp quantized itself from the same F16."""
    pytest.importorskip("llama_cpp")
    from gguf_util import LlamaRunner, gguf_tensor_bytes, llamacpp_quantize

    ours = quantize_to_gguf(smol_f16, tmp_path / "ours.gguf", mix)
    theirs = llamacpp_quantize(smol_f16, tmp_path / "theirs.gguf", mix)
    a, b = gguf_tensor_bytes(ours), gguf_tensor_bytes(theirs)
    assert [k for k in a if a[k] != b[k]] == []
    logits = []
    for p in (ours, theirs):
        with LlamaRunner(p, n_ctx=64) as r:
            logits.append(r.logits(r.tokenize("The capital of France is Paris, and the capital of Italy is", True)))
    assert np.array_equal(logits[0], logits[1])


def test_gguf_source_copies_metadata(smollm2_gguf, tmp_path):
    """A GGUF source keeps every key (tokenizer included) and its tensor names."""
    from gguf_util import make_skeleton

    skel = make_skeleton(smollm2_gguf, tmp_path / "g.gguf", rows=None, layers=1, keep_tokenizer=True)
    out = quantize_to_gguf(skel, tmp_path / "g8.gguf", "Q8_0")
    a, b = GGUFFile(skel), GGUFFile(out)
    for k, v in a.kv.items():
        if k in ("general.file_type",):
            continue
        w = b.kv[k]
        assert (np.array_equal(v, w) if isinstance(v, np.ndarray) else v == w), k
    assert b.kv["general.file_type"] == 7
    assert {t.name for t in a.tensors} == {t.name for t in b.tensors}
    types = {t.name: t.type for t in b.tensors}
    assert types["blk.0.ffn_down.weight"] == T.Q8_0 and types["blk.0.attn_norm.weight"] == T.F32
    assert len(b.kv["tokenizer.ggml.merges"]) == 48900


@pytest.mark.llamacpp
def test_spm_vocab_tokenizes_like_sentencepiece(stories_files, tmp_path):
    """Both SentencePiece routes (the .model file, and a tokenizer.json without it) give a
    vocabulary that llama.cpp tokenizes exactly like sentencepiece does."""
    pytest.importorskip("llama_cpp")
    import shutil

    import sentencepiece as spm
    from gguf_util import WIKI, LlamaRunner

    d = tmp_path / "nospm"
    d.mkdir()
    for n in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(STORIES) / n, d / n)
    nospm = quantize_to_gguf(d, tmp_path / "nospm.gguf", "F16")
    sp = spm.SentencePieceProcessor(model_file=str(Path(STORIES) / "tok512.model"))
    text = Path(WIKI).read_text()[:6000] if Path(WIKI).exists() else "Hello world.\n = A = \n" * 100
    want = [1] + sp.encode(text)
    for p in (stories_files["F16"], nospm):
        with LlamaRunner(p, n_ctx=64) as r:
            assert r.tokenize(text, True) == want


def _tiny_hf(arch: str, d: Path):
    """A randomly initialised tiny transformers model of ``arch`` (random norms and biases, so
    Gemma's 1 + w and Qwen2's biases matter) with stories260K's SentencePiece tokenizer."""
    import shutil

    import torch
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "qwen3":
        m = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=16, tie_word_embeddings=False, **common))
    elif arch == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(tie_word_embeddings=True, **common))
    elif arch == "gemma3":
        m = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, sliding_window=128, **common))
    else:
        m = tf.MistralForCausalLM(tf.MistralConfig(head_dim=16, tie_word_embeddings=False, sliding_window=None, **common))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if arch == "gemma3" else 1.0))
            elif "bias" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    m.eval()
    m.save_pretrained(d)
    for f in ("tok512.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(STORIES) / f, d / f)
    return m


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "gemma3", "mistral"])
def test_hf_architectures_run_in_llamacpp(stories, arch, tmp_path):
    """HF -> GGUF metadata and tensor conventions of each architecture: llama.cpp's logits on
    our F32 file equal transformers' (up to llama.cpp's F16 KV cache)."""
    pytest.importorskip("llama_cpp")
    import torch
    from gguf_util import LlamaRunner

    m = _tiny_hf(arch, tmp_path / arch)
    ids = [1] + list(range(300, 340))
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0].numpy()
    p = quantize_to_gguf(tmp_path / arch, tmp_path / f"{arch}.gguf", "F32")
    with LlamaRunner(p, n_ctx=64) as r:
        got = r.logits(ids)
    assert np.abs(got - ref).max() < 3e-3 * np.abs(ref).max()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs CUDA"))])
def test_device_gives_same_bytes(stories_files, tmp_path, device):
    """Block encoding on an explicit device writes the same file as the default CPU path."""
    src = stories_files["F32"]
    ref = quantize_to_gguf(src, tmp_path / "ref.gguf", "Q4_K_M")
    out = quantize_to_gguf(src, tmp_path / "dev.gguf", "Q4_K_M", device=device)
    assert out.read_bytes() == ref.read_bytes()


def test_nan_in_float16_source_names_tensor(stories_files, tmp_path):
    """An F16 source goes to the block quantizers as float16; a NaN still gets a clear error."""
    src = tmp_path / "nan.gguf"
    src.write_bytes(stories_files["F16"].read_bytes())
    f = GGUFFile(src)
    name = "blk.1.attn_q.weight"  # rows of 64: block types in both mixes
    start = f.header.data_offset + f.by_name[name].offset
    del f
    with open(src, "r+b") as fh:
        fh.seek(start + 2 * 10)
        fh.write(np.array([np.nan], dtype=np.float16).tobytes())
    for mix in ("Q4_0", "Q4_K_M"):
        with pytest.raises(LowbitError, match=f"{name}.*NaN or Inf"):
            quantize_to_gguf(src, tmp_path / f"out-{mix}.gguf", mix)
        assert not (tmp_path / f"out-{mix}.gguf").exists()
