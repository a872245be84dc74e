"""Calibrated codes into GGUF blocks: exact codes, fp16-rounded scales, files llama.cpp runs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.gguf.from_quantized import blocks_from_quantized, quantized_to_gguf
from lowbit.gguf.quants import _unpack_nibbles, dequantize, quantize
from lowbit.gguf.reader import GGUFFile
from lowbit.core.quantized import QuantizedModel, QuantizedWeight

from gguf_util import STORIES


def _fp16(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).float()


def _quantize(method: str, scheme: QuantScheme) -> QuantizedModel:
    from lowbit.pipeline import quantize_model
    from lowbit.models.calibration import CalibrationConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ffn_down (172 columns) stays float
        return quantize_model(STORIES, method, scheme, CalibrationConfig(n_samples=4, seq_len=64))


@pytest.fixture(scope="module")
def stories() -> str:
    if not Path(STORIES).exists():
        pytest.skip("stories260K missing")
    return STORIES


@pytest.fixture(scope="module")
def gptq_q4(stories) -> QuantizedModel:
    return _quantize("gptq", QuantScheme(4, 32, True))


def _random_qw(scheme: QuantScheme, rows: int = 16, cols: int = 128, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, scheme.qmax + 1, (rows, cols), generator=g, dtype=torch.int32)
    n_groups = scheme.n_groups(cols)
    scale = torch.rand(rows, n_groups, generator=g) * 0.1 + 1e-3
    if scheme.symmetric:
        zero = torch.full((rows, n_groups), float(scheme.mid))
    else:
        zero = torch.randint(0, scheme.qmax + 1, (rows, n_groups), generator=g).float()
    return QuantizedWeight(codes, scale, zero, scheme)


@pytest.mark.parametrize("qtype,scheme", [("Q4_0", QuantScheme(4, 32, True)), ("Q4_0", QuantScheme(4, 128, True)),
                                          ("Q4_1", QuantScheme(4, 32, False)), ("Q4_1", QuantScheme(4, 64, True)),
                                          ("Q8_0", QuantScheme(8, 32, True)), ("Q8_0", QuantScheme(8, -1, True))])
def test_blocks_dequantize_to_codes_within_fp16(qtype, scheme):
    qw = _random_qw(scheme)
    b = blocks_from_quantized(qw, qtype)
    assert b.dtype == torch.uint8 and b.shape == (16, 128 // 32 * {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[qtype])
    got = dequantize(b, qtype, tuple(qw.shape))
    ref = qw.dequantize()
    # the only change is fp16 rounding of d (and of m = -zero * scale)
    s_err = (qw.scale - _fp16(qw.scale)).abs().max()
    m_err = (qw.zero * qw.scale - _fp16(qw.zero * qw.scale)).abs().max()
    bound = float(scheme.qmax * s_err + m_err) + 1e-6
    diff = float((got - ref).abs().max())
    assert diff <= bound, (diff, bound)
    if qtype != "Q4_1":  # symmetric types: exactly (code - zero) * fp16(scale)
        exp = QuantizedWeight(qw.codes, _fp16(qw.scale), qw.zero, scheme).dequantize()
        assert torch.equal(got, exp)


def test_llamacpp_q4_0_grid_roundtrips_byte_for_byte():
    """A weight already on llama.cpp's Q4_0 grid (its codes, its fp16 d) re-encodes to the same bytes."""
    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(1))
    ref = quantize(x, T.Q4_0)
    blocks = ref.reshape(-1, 18)
    d = blocks[:, :2].contiguous().view(torch.float16).float().reshape(8, 3)
    codes = _unpack_nibbles(blocks[:, 2:]).reshape(8, 96)
    qw = QuantizedWeight(codes, d, torch.full_like(d, 8.0), QuantScheme(4, 32, True))
    assert torch.equal(blocks_from_quantized(qw, "Q4_0"), ref)


def test_rtn_codes_match_values_not_bytes(stories):
    """lowbit's RTN (scale = amax / 7.5) and llama.cpp's Q4_0 (d = max / -8) choose different grids:
    the encoded RTN codes reproduce lowbit's values, not llama.cpp's bytes."""
    qm = _quantize("rtn", QuantScheme(4, 32, True))
    name = "model.layers.0.self_attn.q_proj.weight"
    qw = qm.weights[name]
    ours = blocks_from_quantized(qw, "Q4_0", name)
    got = dequantize(ours, "Q4_0", tuple(qw.shape))
    diff = float((got - qw.dequantize()).abs().max())
    assert diff <= 8 * float((qw.scale - _fp16(qw.scale)).abs().max()) + 1e-7
    print(f"RTN Q4_0 max |gguf - lowbit| = {diff:.3g}")


def test_scheme_and_act_order_errors():
    qw = _random_qw(QuantScheme(4, 32, False))
    with pytest.raises(LowbitError, match=r"blk\.0\.attn_q\.weight.*int4 asym g32.*Q4_0"):
        blocks_from_quantized(qw, "Q4_0", "blk.0.attn_q.weight")
    with pytest.raises(LowbitError, match="int4 sym g16.*Q4_0"):
        blocks_from_quantized(_random_qw(QuantScheme(4, 16, True)), "Q4_0")
    with pytest.raises(LowbitError, match="int4 sym g32.*Q8_0"):
        blocks_from_quantized(_random_qw(QuantScheme(4, 32, True)), "Q8_0")
    with pytest.raises(LowbitError, match="Q5_K"):
        blocks_from_quantized(_random_qw(QuantScheme(4, 32, True)), "Q5_K")
    ao = _random_qw(QuantScheme(4, 32, True))
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    ao.g_idx = (torch.arange(128) // 32)[perm].to(torch.int32)
    with pytest.raises(LowbitError, match="act-order g_idx"):
        blocks_from_quantized(ao, "Q4_0")
    ao.g_idx = (torch.arange(128) // 32).to(torch.int32)  # static groups: contiguous again
    assert torch.equal(blocks_from_quantized(ao, "Q4_0"), blocks_from_quantized(_random_qw(QuantScheme(4, 32, True)), "Q4_0"))


def _lowbit_model(qm: QuantizedModel):
    from lowbit.models import load

    lm = load(STORIES)
    sd = lm.model.state_dict()
    with torch.no_grad():
        for n, qw in qm.weights.items():
            sd[n].copy_(qw.dequantize())
        for n, t in qm.float_overrides.items():
            sd[n].copy_(t)
    return lm


def test_gptq_file_tensors(gptq_q4, tmp_path):
    from lowbit.gguf.names import permute_rotary

    out = quantized_to_gguf(STORIES, gptq_q4, tmp_path / "g.gguf", "Q4_0")
    f = GGUFFile(out)
    types = {t.name: t.type for t in f.tensors}
    assert types["blk.0.attn_q.weight"] == T.Q4_0 and types["blk.0.ffn_gate.weight"] == T.Q4_0
    assert types["blk.0.ffn_down.weight"] != T.Q4_0  # 172-long rows: convert.py's fallback
    q = gptq_q4.weights["model.layers.0.self_attn.k_proj.weight"]
    raw = torch.from_numpy(np.array(f.data("blk.0.attn_k.weight")))
    got = dequantize(raw, "Q4_0", tuple(q.shape))
    assert float((got - permute_rotary(q.dequantize(), 4)).abs().max()) < 1e-3
    with pytest.raises(LowbitError):
        quantized_to_gguf(STORIES, gptq_q4, out, "Q4_0")  # exists, no overwrite


def _llama_logits(path: Path, tokens: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=False, n_ctx=64, verbose=False, logits_all=True)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.llamacpp
def test_gptq_q4_0_runs_in_llamacpp_like_lowbit(gptq_q4, tmp_path):
    pytest.importorskip("llama_cpp")
    from lowbit.gguf.convert import quantize_to_gguf

    lm = _lowbit_model(gptq_q4)
    ids = lm.tokenizer("Once upon a time, there was a little girl")["input_ids"]
    with torch.inference_mode():
        ref = lm.model(torch.tensor([ids])).logits[0].numpy()
    ours = quantized_to_gguf(STORIES, gptq_q4, tmp_path / "gptq.gguf", "Q4_0", token_embedding_type="f16")
    theirs = quantize_to_gguf(STORIES, tmp_path / "llama.gguf", "Q4_0", pure=True, token_embedding_type="f16")
    lg = _llama_logits(ours, ids)
    lg_theirs = _llama_logits(theirs, ids)
    assert np.isfinite(lg).all() and np.isfinite(lg_theirs).all()
    d_ours = float(np.abs(lg - ref).max())
    d_theirs = float(np.abs(lg_theirs - ref).max())
    print(f"max |llama.cpp - lowbit GPTQ| logits: GPTQ-Q4_0 file {d_ours:.4f}, "
          f"llama.cpp's Q4_0 file {d_theirs:.4f} (|logits| max {np.abs(ref).max():.2f})")
    # llama.cpp's Q4_0 kernels quantize activations to Q8_0: close, not exact
    assert d_ours < 0.05 * np.abs(ref).max()
    assert d_ours < d_theirs


def test_all_gptq_weights_within_fp16(gptq_q4):
    """Every GPTQ weight of stories260K: GGUF values differ from lowbit's only by fp16 scale rounding."""
    worst, worst_rel = 0.0, 0.0
    for name, qw in gptq_q4.weights.items():
        got = dequantize(blocks_from_quantized(qw, "Q4_0", name), "Q4_0", tuple(qw.shape))
        diff = float((got - qw.dequantize()).abs().max())
        assert diff <= 8 * float((qw.scale - _fp16(qw.scale)).abs().max()) + 1e-7, name
        worst = max(worst, diff)
        worst_rel = max(worst_rel, diff / float(qw.scale.abs().max()))
    print(f"GPTQ Q4_0 max |gguf - lowbit| = {worst:.3g} ({worst_rel:.3g} of the largest scale)")


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype,scheme", [("Q4_1", QuantScheme(4, 32, False)), ("Q8_0", QuantScheme(8, 32, True))])
def test_rtn_file_runs_in_llamacpp(stories, qtype, scheme, tmp_path):
    pytest.importorskip("llama_cpp")
    qm = _quantize("rtn", scheme)
    lm = _lowbit_model(qm)
    ids = lm.tokenizer("Once upon a time")["input_ids"]
    with torch.inference_mode():
        ref = lm.model(torch.tensor([ids])).logits[0].numpy()
    out = quantized_to_gguf(STORIES, qm, tmp_path / f"{qtype}.gguf", qtype, token_embedding_type="f16")
    assert {t.type for t in GGUFFile(out).tensors} >= {T[qtype]}
    lg = _llama_logits(out, ids)
    assert np.isfinite(lg).all()
    assert float(np.abs(lg - ref).max()) < 0.05 * np.abs(ref).max()


@pytest.mark.slow
@pytest.mark.llamacpp
def test_awq_q4_1_with_folded_norms_runs_in_llamacpp(stories, tmp_path):
    """AWQ's float_overrides (folded norms) reach the file: llama.cpp agrees with lowbit (~25 s)."""
    pytest.importorskip("llama_cpp")
    from lowbit.pipeline import quantize_model
    from lowbit.models.calibration import CalibrationConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = quantize_model(STORIES, "awq", QuantScheme(4, 32, False), CalibrationConfig(n_samples=4, seq_len=64))
    assert qm.float_overrides
    lm = _lowbit_model(qm)
    ids = lm.tokenizer("Once upon a time, there was a little girl")["input_ids"]
    with torch.inference_mode():
        ref = lm.model(torch.tensor([ids])).logits[0].numpy()
    out = quantized_to_gguf(STORIES, qm, tmp_path / "awq.gguf", "Q4_1", token_embedding_type="f16")
    lg = _llama_logits(out, ids)
    assert float(np.abs(lg - ref).max()) < 0.05 * np.abs(ref).max()
