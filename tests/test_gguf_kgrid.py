"""GPTQ on llama.cpp's Q4_K grid: codes chosen by GPTQ, blocks llama.cpp reads, grid from llama.cpp's own search."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from paths import STORIES as _STORIES
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.gguf.from_quantized import blocks_from_quantized, kquant_grid, quantized_to_gguf
from lowbit.gguf.quants import dequantize, quantize
from lowbit.methods.gptq import gptq_quantize

STORIES = str(_STORIES)
SCHEME = QuantScheme(4, 32, False)


def _weight(rows: int = 48, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[:, 7] *= 30  # an outlier column
    w[3] = 0.0  # an all-zero row
    w[5, :256] = 1e-6  # a tiny super-block
    w[9] += 0.2  # rows with an offset: non-zero minimums
    return w


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_identity_hessian_gives_llamacpp_bytes(with_imatrix):
    """With no error to propagate (H = I), GPTQ on the grid is rounding: llama.cpp's Q4_K bytes exactly."""
    w = _weight()
    im = torch.rand(512, generator=torch.Generator().manual_seed(3)) + 0.05 if with_imatrix else None
    qw = gptq_quantize(w, torch.eye(512), SCHEME, grid=kquant_grid(w, "Q4_K", im), damp=0.0)
    ours = blocks_from_quantized(qw, "Q4_K")
    ref = quantize(w, T.Q4_K, im)  # lowbit's Q4_K == llama.cpp's (tests/test_gguf_quants.py)
    a, b = ours.reshape(-1, 144), ref.reshape(-1, 144)
    live = (b[:, :4] != 0).any(1)  # super-blocks whose fp16 d or dmin is not 0
    assert torch.equal(a[live], b[live])
    # where both fp16 scales underflowed to 0 every value is 0 either way; the unused bytes differ
    assert not live[10] and int((~live).sum()) == 3  # the zero row (2) and the tiny super-block
    assert torch.equal(dequantize(ours, T.Q4_K, tuple(w.shape)), dequantize(ref, T.Q4_K, tuple(w.shape)))
    assert torch.allclose(dequantize(ours, T.Q4_K, tuple(w.shape)), qw.dequantize(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_grid_beats_llamacpp_q4_k(act_order):
    """With correlated inputs GPTQ's codes lower the layer error ||(W - Q) X||^2 below llama.cpp's Q4_K."""
    w = _weight(seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4096, 64, generator=g) @ torch.randn(64, 512, generator=g) + 0.3 * torch.randn(4096, 512, generator=g)
    H = x.T @ x / x.shape[0]
    qw = gptq_quantize(w, H, SCHEME, grid=kquant_grid(w, "Q4_K"), act_order=act_order)
    blocks = blocks_from_quantized(qw, "Q4_K")
    ours = dequantize(blocks, T.Q4_K, tuple(w.shape))
    theirs = dequantize(quantize(w, T.Q4_K), T.Q4_K, tuple(w.shape))
    err = lambda q: float(torch.trace((w - q) @ H @ (w - q).T))  # noqa: E731
    assert torch.allclose(ours, qw.dequantize(), rtol=0, atol=1e-6)
    assert err(ours) < 0.9 * err(theirs), (err(ours), err(theirs))
    assert torch.equal(blocks, blocks_from_quantized(gptq_quantize(w, H, SCHEME, grid=kquant_grid(w), act_order=act_order),
                                                     "Q4_K"))  # deterministic


def test_not_a_grid_is_refused():
    w = _weight()
    from lowbit.methods.rtn import rtn

    with pytest.raises(LowbitError, match="not a Q4_K grid"):
        blocks_from_quantized(rtn(w, SCHEME), "Q4_K", "blk.0.ffn_down.weight")
    with pytest.raises(LowbitError, match="groups of 32"):
        blocks_from_quantized(rtn(w, QuantScheme(4, 64, False)), "Q4_K")
    with pytest.raises(LowbitError, match="multiple of 256"):
        kquant_grid(w[:, :320])
    with pytest.raises(LowbitError, match="Q6_K"):
        kquant_grid(w, "Q6_K")


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """A tiny random Llama whose rows are multiples of 256 (stories260K's tokenizer)."""
    if not Path(STORIES).exists():
        pytest.skip("stories260K missing")
    import transformers as tf

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("wide")
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    m = tf.LlamaForCausalLM(cfg).eval()
    m.save_pretrained(d)
    for f in ("tok512.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(STORIES) / f, d / f)
    return d


def test_gptq_q4_k_file(wide_llama, tmp_path):
    from lowbit.gguf.reader import GGUFFile
    from lowbit.pipeline import quantize_model
    from lowbit.models.calibration import CalibrationConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = quantize_model(wide_llama, "gptq", SCHEME, CalibrationConfig(n_samples=4, seq_len=64), grid="Q4_K")
    assert len(qm.weights) == 14  # 7 linears x 2 layers, every row length a multiple of 256
    out = quantized_to_gguf(wide_llama, qm, tmp_path / "gptq-q4k.gguf", "Q4_K")
    f = GGUFFile(out)
    for hf, gname in (("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
                      ("model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight")):
        assert f.by_name[gname].type == T.Q4_K
        got = torch.from_numpy(np.asarray(f.array(gname)))
        assert torch.allclose(got, qm.weights[hf].dequantize(), rtol=0, atol=1e-6), gname


@pytest.mark.llamacpp
def test_gptq_q4_k_runs_in_llamacpp(wide_llama, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from lowbit.pipeline import quantize_model
    from lowbit.models import load
    from lowbit.models.calibration import CalibrationConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = quantize_model(wide_llama, "gptq", SCHEME, CalibrationConfig(n_samples=4, seq_len=64), grid="Q4_K")
    out = quantized_to_gguf(wide_llama, qm, tmp_path / "gptq-q4k.gguf", "Q4_K", token_embedding_type="f16",
                            output_tensor_type="f16")
    lm = load(wide_llama)
    sd = lm.model.state_dict()
    with torch.no_grad():
        for n, qw in qm.weights.items():
            sd[n].copy_(qw.dequantize())
    ids = [1, 40, 75, 300, 12, 99, 250, 7]
    with torch.inference_mode():
        ref = lm.model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False, logits_all=True)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    # llama.cpp's Q4_K kernels quantize activations to Q8_K: close, not exact
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max() + 1e-3


def test_cli_rejects_awq_into_q4_k(tmp_path, capsys):
    from lowbit.cli import main

    rc = main(["quantize", STORIES, "--method", "awq", "--format", "gguf", "--to", "Q4_K", "-o", str(tmp_path / "x.gguf")])
    assert rc != 0 and "needs --method gptq" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_cli_gptq_to_q4_k(wide_llama, tmp_path):
    from lowbit.cli import main
    from lowbit.gguf.reader import GGUFFile

    out = tmp_path / "cli-q4k.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["quantize", str(wide_llama), "--method", "gptq", "--format", "gguf", "--to", "Q4_K",
                   "--samples", "4", "--seq-len", "64", "-o", str(out)])
    assert rc == 0
    types = {t.name: t.type for t in GGUFFile(out).tensors}
    assert types["blk.0.ffn_down.weight"] == T.Q4_K and types["blk.1.attn_q.weight"] == T.Q4_K
