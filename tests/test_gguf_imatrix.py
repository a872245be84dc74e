"""Importance matrix: file formats, our collection vs llama.cpp's, and use in quantization."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.gguf.imatrix import IMatrix, load_imatrix, load_imatrix_values, relative_difference, save_imatrix


def _sample() -> IMatrix:
    rng = np.random.default_rng(0)
    im = IMatrix(datasets=["calib.txt"], chunk_count=3, chunk_size=512)
    im.sums["blk.0.attn_q.weight"] = rng.random((1, 64)) * 100
    im.counts["blk.0.attn_q.weight"] = np.array([1536.0])
    im.sums["blk.0.ffn_down_exps.weight"] = rng.random((4, 32)) * 10
    im.counts["blk.0.ffn_down_exps.weight"] = np.array([100.0, 0.0, 7.0, 1536.0])
    return im


def test_gguf_roundtrip(tmp_path):
    im = _sample()
    p = save_imatrix(im, tmp_path / "im.gguf")
    back, legacy = load_imatrix(p)
    assert not legacy and back.datasets == ["calib.txt"] and back.chunk_count == 3 and back.chunk_size == 512
    for k in im.sums:
        assert np.allclose(back.sums[k], im.sums[k], rtol=1e-6) and np.array_equal(back.counts[k], im.counts[k])
    v = back.values()
    assert v["blk.0.ffn_down_exps.weight"].shape == (128,)
    assert np.all(v["blk.0.ffn_down_exps.weight"][32:64] == 1.0)  # expert never routed to
    # the file layout llama.cpp expects: <name>.in_sum2 [n_mat, cols], <name>.counts [n_mat, 1], F32
    from lowbit.gguf.reader import GGUFFile

    f = GGUFFile(p)
    assert f.kv["general.type"] == "imatrix" and f.kv["imatrix.chunk_size"] == 512
    t = f.by_name["blk.0.ffn_down_exps.weight.in_sum2"]
    assert t.shape == (4, 32) and t.type.name == "F32"
    assert f.by_name["blk.0.ffn_down_exps.weight.counts"].shape == (4, 1)


def test_legacy_roundtrip(tmp_path):
    im = _sample()
    p = save_imatrix(im, tmp_path / "im.dat")
    raw = p.read_bytes()
    assert struct.unpack_from("<i", raw)[0] == 2
    back, legacy = load_imatrix(p)
    assert legacy and back.chunk_count == 3 and back.datasets == ["calib.txt"]
    a, b = im.values(), back.values()
    for k in a:
        assert np.allclose(a[k], b[k], rtol=1e-5)
    # ncall = ceil(max count / chunk size); values stored as mean * ncall
    ln = struct.unpack_from("<i", raw, 4)[0]
    ncall, nval = struct.unpack_from("<ii", raw, 8 + ln)
    assert (ncall, nval) == (3, 64)


def test_bad_files(tmp_path):
    (tmp_path / "x.dat").write_bytes(b"\xff\xff\xff\xff")
    with pytest.raises(LowbitError):
        load_imatrix(tmp_path / "x.dat")
    (tmp_path / "y.dat").write_bytes(struct.pack("<ii", 1, 5) + b"ab")
    with pytest.raises(LowbitError, match="truncated"):
        load_imatrix(tmp_path / "y.dat")
    with pytest.raises(LowbitError, match="no such"):
        load_imatrix(tmp_path / "none.gguf")


def test_chunks_like_llama_imatrix():
    """BOS first, then ctx windows whose first token is BOS (lowbit.text, shared with perplexity)."""
    import torch

    from lowbit.text import make_chunks, tokenize

    class Tok:
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    toks = tokenize(Tok(), "abcdefghij" * 3, add_bos=True)
    ch = make_chunks(toks, 8, bos_id=1)
    assert ch.shape == (3, 8) and bool((ch[:, 0] == 1).all())
    assert ch[1, 1:].tolist() == [ord(c) for c in ("abcdefghij" * 3)[8:15]]
    with pytest.raises(LowbitError):
        make_chunks(tokenize(Tok(), "ab", add_bos=False), 8, None)
    assert torch.equal(tokenize(Tok(), "ab", add_bos=False), torch.tensor([97, 98]))


def test_imatrix_streams_one_layer_at_a_time(monkeypatch, tmp_path):
    """compute_imatrix never loads the whole model: at most one decoder layer is materialised."""
    from gguf_util import STORIES, WIKI

    from lowbit.gguf.imatrix import compute_imatrix
    from lowbit.models import engine, loader

    live, peak = set(), [0]
    load_layer, free_layer = engine.load_layer_weights, engine.free_layer

    def counting_load(adapter, layer, *args, **kwargs):
        load_layer(adapter, layer, *args, **kwargs)
        live.add(id(layer))
        peak[0] = max(peak[0], len(live))

    def counting_free(layer):
        free_layer(layer)
        live.discard(id(layer))

    def no_whole_model(*_a, **_k):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(engine, "load_layer_weights", counting_load)
    monkeypatch.setattr(engine, "free_layer", counting_free)
    monkeypatch.setattr(loader, "load", no_whole_model)
    out = compute_imatrix(STORIES, WIKI, tmp_path / "im.gguf", ctx=64, chunks=3)
    assert peak[0] == 1 and not live
    im, _ = load_imatrix(out)
    assert len(im.sums) == 5 * 7 and all(c[0] == 3 * 64 for c in im.counts.values())


@pytest.fixture(scope="module")
def stories_f32(tmp_path_factory):
    from gguf_util import STORIES

    if not Path(STORIES).exists():
        pytest.skip("stories260K missing")
    from lowbit.gguf.convert import quantize_to_gguf

    return quantize_to_gguf(STORIES, tmp_path_factory.mktemp("st") / "st-f32.gguf", "F32")


@pytest.mark.llamacpp
def test_imatrix_matches_llamacpp(stories_f32):
    """Our hooks vs. llama.cpp's own activations (eval callback at every MUL_MAT, as
    llama-imatrix collects them) on the same token chunks."""
    pytest.importorskip("llama_cpp")
    from gguf_util import STORIES, WIKI, LlamaRunner, chunks_of

    from lowbit.gguf.imatrix import collect

    text = Path(WIKI).read_text()[:12000] if Path(WIKI).exists() else "Once upon a time. " * 800
    with LlamaRunner(stories_f32, n_ctx=128, collect_imatrix=True) as r:
        toks = r.tokenize(text, True)
        chunks = chunks_of(toks, 128, 3, r.bos if r.add_bos else None)
        for c in chunks:
            r.logits(c)
        theirs = {k: v[0] / v[1] for k, v in r.stats.items()}
        their_counts = {k: v[1] for k, v in r.stats.items()}
    im = collect(STORIES, chunks, "llama")
    assert set(im.sums) == set(theirs) and len(theirs) == 5 * 7
    assert all(im.counts[k][0] == their_counts[k] == 3 * 128 for k in theirs)
    rd = relative_difference(im.values(), theirs)
    assert max(rd.values()) < 2e-3, sorted(rd.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.llamacpp
def test_compute_and_quantize_with_imatrix_equals_llamacpp(stories_f32, tmp_path):
    """compute_imatrix end to end, then Q4_K_M/IQ4_XS with it: bytes equal llama.cpp's
    quantizer given the same importance vectors."""
    pytest.importorskip("llama_cpp")
    import pydoc_data.topics as topics

    from gguf_util import STORIES, gguf_tensor_bytes, llamacpp_quantize

    from lowbit.gguf.convert import quantize_to_gguf
    from lowbit.gguf.imatrix import compute_imatrix

    calib = tmp_path / "calib.txt"  # calibration: Python's pydoc topics text, not WikiText
    calib.write_text("\n".join(topics.topics.values())[:40000])
    imp = compute_imatrix(STORIES, calib, tmp_path / "im.gguf", ctx=128, chunks=4)
    vals = load_imatrix_values(imp)
    assert "blk.0.ffn_down.weight" in vals and vals["blk.0.ffn_down.weight"].shape == (172,)
    for mix in ("Q4_K_M", "IQ4_XS", "Q4_0"):
        ours = quantize_to_gguf(stories_f32, tmp_path / f"o-{mix}.gguf", mix, imatrix_path=imp)
        theirs = llamacpp_quantize(stories_f32, tmp_path / f"l-{mix}.gguf", mix, imatrix=vals)
        a, b = gguf_tensor_bytes(ours), gguf_tensor_bytes(theirs)
        assert a.keys() == b.keys()
        assert [k for k in a if a[k] != b[k]] == [], mix


def test_counted_tokens_follow_llama_imatrix_micro_batches():
    """llama-imatrix (-b 2048 -ub 512) decodes 2048 // ctx chunks at once; llama.cpp splits them into
    micro-batches of an equal share of 512 tokens per sequence; matmuls under 16 rows are skipped."""
    from lowbit.gguf.imatrix import counted_tokens

    k = counted_tokens(51, 512)  # 12 groups of 4 (128 tokens each per micro-batch), then 3: 170+170+170+2
    assert int(k.sum()) == 26106 and (~k).nonzero().tolist() == [[c, p] for c in (48, 49, 50) for p in (510, 511)]
    assert bool(counted_tokens(52, 512).all())  # groups of 4 and 2 divide 512
    assert bool(counted_tokens(8, 64).all())  # one group of 8: 64 tokens each, 512 rows
    assert int(counted_tokens(3, 520, n_batch=520).sum()) == 3 * 512  # one sequence: 512 + 8 (skipped)
    assert int(counted_tokens(5, 128).sum()) == 5 * 128  # 512 // 5 = 102: 510 + 130 rows


@pytest.mark.llamacpp
def test_imatrix_equals_llama_imatrix(stories_f32, tmp_path):
    """compute_imatrix on a GGUF file (llama.cpp's tokenizer, llama-imatrix's grouping of chunks and
    micro-batch rule, llama.cpp's F16 KV cache) against llama.cpp run as llama-imatrix runs it:
    3 chunks of 512 (one group: 170 + 170 + 170 + 2 tokens each, the 6-row micro-batch skipped),
    counts equal, values within 1e-3 relative."""
    pytest.importorskip("llama_cpp")
    from gguf_util import WIKI, LlamaRunner, chunks_of, llama_imatrix

    from lowbit.gguf.imatrix import compute_imatrix

    text = tmp_path / "text.txt"
    text.write_text(Path(WIKI).read_text()[:30000] if Path(WIKI).exists() else "Once upon a time. " * 1500)
    with LlamaRunner(stories_f32, n_ctx=64) as r:
        toks = r.tokenize(text.read_text(), True)
        bos = r.bos if r.add_bos else None
    chunks = chunks_of(toks, 512, 3, bos)
    assert len(chunks) == 3
    stats = llama_imatrix(stories_f32, chunks, 512)
    im, _ = load_imatrix(compute_imatrix(stories_f32, text, tmp_path / "im.gguf", ctx=512, chunks=3))
    assert set(im.sums) == set(stats) and len(stats) == 5 * 7
    assert all(im.counts[k][0] == stats[k][1] == 3 * 512 - 6 for k in stats)
    assert im.chunk_count == 2  # (3 * 512 - 6) // 512, llama-imatrix's m_last_chunk
    rd = relative_difference(im.values(), {k: v[0] / v[1] for k, v in stats.items()})
    assert max(rd.values()) < 1e-3, sorted(rd.items(), key=lambda kv: -kv[1])[:3]
