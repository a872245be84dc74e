"""lowbit.gguf.quants: byte equality with llama.cpp / gguf-py, dequantization, bad input."""

from __future__ import annotations

import os
import warnings

import llamacpp_util as lu
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from lowbit.errors import LowbitError
from lowbit.gguf import quants as Q

LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
KQUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
IQ4 = [T.IQ4_NL, T.IQ4_XS]
TERNARY = [T.TQ1_0, T.TQ2_0]
GRID = [T.IQ3_XXS, T.IQ2_S]  # llama.cpp insists on an importance matrix for these (except token_embd/output)
IMATRIX_ONLY = [T.IQ2_XXS, T.IQ2_XS]  # need an importance matrix, always (llama.cpp asserts)
SLOW_LLAMA = [T.IQ1_S, T.IQ1_M]  # llama.cpp's table setup for these alone takes 15-30 s
FP4 = [T.MXFP4, T.NVFP4]
WRITTEN = LEGACY + KQUANTS + IQ4 + TERNARY + FP4 + [T.IQ3_S] + GRID + IMATRIX_ONLY  # gguf-py dequantizes these
NO_FALLBACK = {T.Q1_0}  # llama.cpp refuses rows that are not whole blocks instead of falling back


# --------------------------------------------------------------------------- data


def synthetic(cols: int = 512, rows: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Small tensors with the distributions that trip quantizers up (``rows >= 8``)."""
    rng = np.random.default_rng(seed)
    g = lambda s=0.02: (rng.standard_normal((rows, cols)) * s).astype(np.float32)  # noqa: E731
    out = {}
    x = g()
    x[:, rng.choice(cols, 6, replace=False)] *= 40.0  # outlier columns
    out["outliers"] = x
    x = g()
    x[1] = 0.0  # an all-zero row
    x[3, :256] = 0.0  # all-zero blocks
    x[5, 32:64] = -0.0
    out["zeros"] = x
    out["tiny"] = g(1e-6)
    x = g(1e-39)  # float32 subnormals
    x[0] = g(1e-4)[0]
    out["subnormal"] = x
    out["huge"] = g(2e3)
    x = np.empty((rows, cols), np.float32)
    x[:] = np.resize(np.array([0.5, -0.25, 3.0, 0.0, 1e-3, -7.0, 1.0, -1.0], np.float32), rows)[:, None]
    out["constant"] = x
    x = (rng.standard_t(3, (rows, cols)) * 0.01).astype(np.float32)  # heavy tails
    x[2, 100] = 0.8
    out["student_t"] = x
    x = np.abs(g())  # one-signed rows (min > 0 paths)
    x[1] = -x[1]
    out["one_signed"] = x
    return out


def importance(cols: int, seed: int) -> np.ndarray:
    """A plausible imatrix row: mean squared activations, a few very large, a few zero."""
    rng = np.random.default_rng(seed)
    v = np.exp(rng.standard_normal(cols) * 1.5).astype(np.float32) * 0.1
    v[rng.choice(cols, 4, replace=False)] *= 100.0
    v[rng.choice(cols, 3, replace=False)] = 0.0
    return v


def real_tensors() -> dict[str, np.ndarray]:
    """A few SmolLM2-135M weights (dequantized from its Q4_1 GGUF), first rows only; none, with a
    warning saying why, when the demo model cannot be obtained."""
    names = ["blk.0.ffn_down.weight", "blk.3.attn_q.weight", "blk.7.ffn_down.weight", "token_embd.weight"]
    try:
        return lu.smollm2_tensors(names, max_rows=24)
    except LowbitError as e:
        warnings.warn(pytest.PytestWarning(f"SmolLM2 tensors left out of the quantizer cases: {e}"), stacklevel=2)
        return {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small torch ops: extra intra-op threads only contend on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cases() -> dict[str, np.ndarray]:
    """Named inputs (llama tensor names), synthetic and real."""
    syn = synthetic()
    names = lu.layer_names(len(syn), first_layer=20)
    out = {n: v for n, v in zip(names, syn.values())}
    out.update(real_tensors())
    return out


@pytest.fixture(scope="module")
def imatrices(cases) -> dict[str, np.ndarray]:
    return {n: importance(v.shape[1], i) for i, (n, v) in enumerate(sorted(cases.items()))}


def ours(x: np.ndarray, qtype: T, imatrix: np.ndarray | None = None) -> np.ndarray:
    im = None if imatrix is None else torch.from_numpy(imatrix)
    return Q.quantize(torch.from_numpy(x), qtype, im).numpy()


# --------------------------------------------------------------------------- gguf-py


@pytest.mark.parametrize("qtype", LEGACY + [T.BF16, T.F16])
def test_bytes_equal_ggufpy(qtype):
    for name, x in synthetic(cols=256, rows=8, seed=1).items():
        if name == "subnormal":
            continue  # gguf-py is not llama.cpp's twin here (1/d overflows; C's float->int cast of inf differs)
        x = x + np.float32(0.0)  # gguf-py loses the sign of an all -0.0 block's scale; llama.cpp keeps it
        ref = np.asarray(gq.quantize(x, qtype)).view(np.uint8).reshape(x.shape[0], -1)
        got = ours(x, qtype)
        assert np.array_equal(got, ref), f"{qtype.name} {name}: {(got != ref).sum()} bytes differ"


@pytest.mark.parametrize("qtype", WRITTEN)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_dequantize_matches_ggufpy(qtype, with_imatrix):
    if qtype in IMATRIX_ONLY + [T.IQ1_S] and not with_imatrix:
        with pytest.raises(LowbitError, match="importance"):
            Q.quantize(torch.zeros(2, 256), qtype)
        return
    x = synthetic(cols=512, rows=8, seed=2)["outliers"]
    im = importance(512, 3) if with_imatrix else None
    b = ours(x, qtype, im)
    got = Q.dequantize(torch.from_numpy(b), qtype, x.shape).numpy()
    ref = gq.dequantize(b, qtype).reshape(x.shape)
    assert np.array_equal(got, ref)
    rel = np.abs(got - x).mean() / np.abs(x).mean()
    # sanity only: 2-bit and ternary types are coarse on these outlier-heavy rows
    assert rel < (1.5 if qtype in TERNARY + IMATRIX_ONLY + SLOW_LLAMA + [T.IQ2_S] else 0.75)


IQ_GRID = [T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S]


@pytest.mark.parametrize("qtype", IQ_GRID, ids=lambda t: t.name)
def test_iq_dequantize_is_torch_and_equals_ggufpy(qtype, monkeypatch):
    """The grid types decode with their own module's torch ``dequantize_blocks``, exactly as
    gguf-py decodes our encoder's bytes (random tensors, with an importance matrix); gguf-py's
    dequantizers are made unusable while ours run."""
    from lowbit.gguf._base import REGISTRY

    cls = REGISTRY[qtype]
    assert "dequantize_blocks" in vars(cls) and cls.__module__ == f"lowbit.gguf.{qtype.name[:3].lower()}quants"
    rng = np.random.default_rng(int(qtype))
    inputs = list(synthetic(cols=512, rows=8, seed=11).values())
    inputs += [(rng.standard_normal((16, 768)) * s).astype(np.float32) for s in (0.02, 1.0)]
    encoded = [(x, ours(x, qtype, importance(x.shape[1], i))) for i, x in enumerate(inputs)]
    refs = [gq.dequantize(b, qtype).reshape(x.shape) for x, b in encoded]

    def refuse(*args, **kwargs):
        raise AssertionError("gguf-py's dequantizer was called")

    monkeypatch.setattr(gq, "dequantize", refuse)
    monkeypatch.setattr(getattr(gq, qtype.name), "dequantize_blocks", classmethod(refuse))
    for (x, b), ref in zip(encoded, refs):
        got = Q.dequantize(torch.from_numpy(b), qtype, x.shape).numpy()
        assert np.array_equal(got, ref, equal_nan=True), qtype.name
    assert not np.array_equal(refs[-1], 0 * refs[-1])


def test_dequantize_unknown_type_is_an_error():
    with pytest.raises(LowbitError, match="Q8_K"):
        Q.dequantize(torch.zeros(292, dtype=torch.uint8), T.Q8_K, (1, 256))


DEQ_ONLY = [t for t in T if t in gq._type_traits or t in (T.F32, T.F16)]


@pytest.mark.parametrize("qtype", DEQ_ONLY, ids=lambda t: t.name)
def test_dequantize_any_type_equals_ggufpy(qtype):
    bs, ts = GGML_QUANT_SIZES[qtype]
    rows, cols = 3, max(bs, 256)
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, size=(rows, cols // bs * ts), dtype=np.uint8)
    # keep fp16/bf16 fields finite: clear the top exponent bit of every odd byte
    if qtype in (T.F16, T.BF16, T.F32):
        data[:, 1::2] &= 0x3F
    ref = gq.dequantize(data, qtype).reshape(rows, cols)
    got = Q.dequantize(torch.from_numpy(data), qtype, (rows, cols)).numpy()
    assert np.array_equal(got, ref, equal_nan=True)


# --------------------------------------------------------------------------- llama.cpp


@pytest.fixture(scope="module")
def llama_bytes(cases, imatrices, tmp_path_factory):
    """Memoized llama.cpp output per (type, with_imatrix)."""
    pytest.importorskip("llama_cpp")
    memo: dict = {}
    work = tmp_path_factory.mktemp("llamacpp")

    def get(qtype: T, with_imatrix: bool):
        key = (qtype, with_imatrix)
        if key not in memo:
            use = cases
            if qtype in IMATRIX_ONLY + [T.IQ2_S]:  # slow in torch on CPU: one real 1536-column tensor is enough
                use = {k: v for k, v in cases.items() if k != "blk.7.ffn_down.weight"}
            if qtype in NO_FALLBACK:
                use = {k: v for k, v in cases.items() if v.shape[1] % Q.block_size(qtype)[0] == 0}
            ims = {k: imatrices[k] for k in use} if with_imatrix else None
            memo[key] = lu.llamacpp_quantize(use, qtype, ims, workdir=work)
        return memo[key]

    return get


@pytest.mark.llamacpp
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", WRITTEN + sorted(NO_FALLBACK) + [T.F16, T.BF16], ids=lambda t: t.name)
def test_bytes_equal_llamacpp(qtype, with_imatrix, cases, imatrices, llama_bytes):
    if qtype in GRID + IMATRIX_ONLY and not with_imatrix:
        pytest.skip("llama.cpp refuses this type without an imatrix (IQ3_XXS, IQ2_S: see test_grid_types_plain_llamacpp)")
    ref = llama_bytes(qtype, with_imatrix)
    bad = []
    for name, (wtype, rb) in ref.items():
        x = cases[name]  # llama.cpp falls back to another type for rows it cannot block
        got = ours(x, wtype, imatrices[name] if with_imatrix else None)
        if not np.array_equal(got, rb):
            bad.append(f"{name}[{wtype.name}]: {(got != rb).any(1).sum()}/{rb.shape[0]} rows")
    assert not bad, "; ".join(bad)


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LOWBIT_SLOW_TESTS") != "1", reason="set LOWBIT_SLOW_TESTS=1 (about a minute)")
@pytest.mark.parametrize("qtype", SLOW_LLAMA, ids=lambda t: t.name)
def test_slow_types_llamacpp(qtype, cases, imatrices, tmp_path):
    """IQ1_S / IQ1_M against llama.cpp with an importance matrix (and IQ1_M without, as token_embd)."""
    pytest.importorskip("llama_cpp")
    use = {k: v for k, v in cases.items() if k.startswith("blk.2") or k == "blk.0.ffn_down.weight"}
    ref = lu.llamacpp_quantize(use, qtype, {k: imatrices[k] for k in use}, workdir=tmp_path)
    for name, (wtype, rb) in ref.items():
        got = ours(use[name], wtype, imatrices[name])
        assert np.array_equal(got, rb), f"{name}[{wtype.name}]: {(got != rb).any(1).sum()} rows differ"
    if qtype == T.IQ1_M:
        x = cases["blk.20.attn_k.weight"]
        wtype, rb = lu.llamacpp_quantize({"token_embd.weight": x}, qtype, workdir=tmp_path)["token_embd.weight"]
        assert wtype == qtype and np.array_equal(ours(x, qtype), rb)


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", GRID, ids=lambda t: t.name)
def test_grid_types_plain_llamacpp(qtype, cases, tmp_path):
    """Without an imatrix llama.cpp quantizes only token_embd/output to these types: name each case so."""
    pytest.importorskip("llama_cpp")
    syn = synthetic(cols=512, rows=8, seed=11)
    picks = {k: syn[k] for k in ("outliers", "zeros", "subnormal", "constant")}
    picks["real"] = cases["blk.0.ffn_down.weight"][:8]
    for label, x in picks.items():
        ref = lu.llamacpp_quantize({"token_embd.weight": x}, qtype, workdir=tmp_path)
        wtype, rb = ref["token_embd.weight"]
        assert wtype == qtype
        got = ours(x, qtype)
        assert np.array_equal(got, rb), f"{label}: {(got != rb).any(1).sum()} rows differ"


# --------------------------------------------------------------------------- bad input and API


def test_q1_0_roundtrip():
    x = synthetic(cols=256, rows=8, seed=4)["outliers"]
    b = ours(x, T.Q1_0)
    got = Q.dequantize(torch.from_numpy(b), T.Q1_0, x.shape).numpy()
    d = np.abs(x).reshape(-1, 128).mean(axis=1).astype(np.float16).astype(np.float32).reshape(8, 2, 1)
    want = np.where(x.reshape(8, 2, 128) >= 0, d, -d).reshape(x.shape)
    assert np.allclose(got, want, rtol=1e-6, atol=0)


def test_bad_row_length():
    with pytest.raises(LowbitError, match="multiple"):
        Q.quantize(torch.zeros(2, 100), "q4_k")
    with pytest.raises(LowbitError, match="multiple"):
        Q.quantize(torch.zeros(2, 48), T.Q8_0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input(bad):
    x = torch.zeros(2, 256)
    x[1, 7] = bad
    with pytest.raises(LowbitError, match="NaN or Inf"):
        Q.quantize(x, T.Q6_K)
    im = torch.ones(256)
    im[3] = bad
    with pytest.raises(LowbitError, match="importance"):
        Q.quantize(torch.zeros(2, 256), T.Q4_K, im)


def test_fp16_scale_overflow_is_an_error():
    x = torch.full((2, 256), 1e6)
    with pytest.raises(LowbitError, match="overflow"):
        Q.quantize(x, T.TQ2_0)  # d = absmax does not fit in fp16
    with pytest.raises(LowbitError, match="overflow"):
        Q.quantize(x, T.F16)
    assert Q.quantize(x, T.Q8_0).shape == (2, 8 * 34)  # d = absmax / 127 fits
    assert Q.quantize(x, T.BF16).shape == (2, 512)


def test_api_helpers():
    assert Q.block_size("q4_k") == (256, 144)
    assert Q.block_size(T.Q8_0) == (32, 34)
    assert Q.can_quantize("IQ4_XS") and Q.can_quantize(T.Q2_K)
    assert Q.can_quantize(T.IQ2_XXS) and Q.can_quantize(T.IQ3_S) and Q.can_quantize(T.IQ2_S)
    assert Q.can_quantize(T.IQ1_S) and Q.can_quantize(T.IQ1_M) and Q.can_quantize(T.NVFP4)
    assert Q.can_quantize(T.TQ1_0) and Q.can_quantize(T.Q1_0)
    with pytest.raises(LowbitError):
        Q.parse_qtype("q9_z")
    with pytest.raises(LowbitError):
        Q.quantize(torch.zeros(1, 256), T.Q4_K, torch.ones(3))
    out = Q.quantize(torch.randn(3, 512), "q5_k")
    assert out.dtype == torch.uint8 and out.shape == (3, 2 * 176)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", WRITTEN, ids=lambda t: t.name)
def test_cuda_equals_cpu(qtype):
    x = torch.from_numpy(synthetic(cols=1024, rows=16, seed=7)["outliers"])
    im = torch.from_numpy(importance(1024, 8))
    for imx in (None, im):
        a = Q.quantize(x, qtype, imx)
        b = Q.quantize(x.cuda(), qtype, None if imx is None else imx.cuda()).cpu()
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.IQ4_NL], ids=lambda t: t.name)
def test_cuda_graphs_equal_cpu(qtype):
    """Large tensors take the CUDA-graph path (with a zero-padded last chunk)."""
    x = torch.from_numpy(synthetic(cols=4096, rows=1100, seed=9)["outliers"])
    a = Q.quantize(x, qtype)
    b = Q.quantize(x.cuda(), qtype).cpu()
    assert torch.equal(a, b)
