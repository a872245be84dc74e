"""lowbit.gguf.native: the C quantizers give the torch code's bytes; the torch fallback switch."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from lowbit.errors import LowbitError
from lowbit.gguf import native
from lowbit.gguf import quants as Q
from test_gguf_quants import importance, synthetic

NATIVE = [T.Q4_0, T.Q8_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q6_K, T.Q4_K, T.Q5_K, T.Q3_K, T.Q2_K, T.IQ4_NL, T.IQ4_XS]

needs_native = pytest.mark.skipif(not native.enabled(), reason="native library not built (or LOWBIT_NATIVE=0)")


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    """All synthetic cases of test_gguf_quants (two seeds) stacked into one [rows, 512] tensor."""
    parts = [v for seed in (0, 1) for v in synthetic(cols=512, rows=8, seed=seed).values()]
    return np.concatenate(parts, axis=0)


def quantize(x: np.ndarray, qtype: T, im: np.ndarray | None) -> np.ndarray:
    return Q.quantize(torch.from_numpy(x), qtype, None if im is None else torch.from_numpy(im)).numpy()


@needs_native
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", NATIVE, ids=lambda t: t.name)
def test_native_equals_torch(qtype, with_imatrix, data, monkeypatch):
    im = importance(data.shape[1], 7) if with_imatrix else None
    n = torch.get_num_threads()
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    torch.set_num_threads(1)  # many small torch ops: extra threads only contend
    try:
        want = quantize(data, qtype, im)
        monkeypatch.setenv("LOWBIT_NATIVE", "1")
        monkeypatch.setattr(native, "_ROW_CHUNK_ELEMENTS", 3 * 512)  # several chunks per call
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got = native.quantize_rows(int(qtype), torch.from_numpy(data), None if im is None else torch.from_numpy(im),
                                       want.shape[1])
            assert got is not None
            np.testing.assert_array_equal(got.numpy(), want, err_msg=f"{qtype.name} threads={threads}")
    finally:
        torch.set_num_threads(n)


@needs_native
def test_cpu_quantize_uses_native(monkeypatch):
    x = torch.randn(4, 256)
    cls = Q.REGISTRY[T.Q4_K]

    def boom(*a, **k):
        raise AssertionError("torch path used")

    monkeypatch.setattr(cls, "quantize_rows", boom)
    assert Q.quantize(x, T.Q4_K).shape == (4, 144)
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    with pytest.raises(AssertionError):
        Q.quantize(x, T.Q4_K)


def test_fallback_without_library(monkeypatch):
    """No library (compiler missing or build failed): everything runs through torch."""
    x = torch.randn(4, 256)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_loaded", True)
    assert not native.enabled()
    assert native.quantize_rows(int(T.Q4_0), x, None, 144) is None
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    want = Q.quantize(x, T.Q4_K)
    monkeypatch.delenv("LOWBIT_NATIVE")
    np.testing.assert_array_equal(Q.quantize(x, T.Q4_K).numpy(), want.numpy())


def test_not_native_cases():
    x = torch.randn(2, 256)
    assert native.quantize_rows(int(T.TQ2_0), x, None, 66) is None  # type without a C quantizer
    assert native.quantize_rows(int(T.Q4_0), x.double(), None, 144) is None  # only float32 and float16


@needs_native
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_float16_input_equals_widened(data, with_imatrix, monkeypatch):
    """float16 rows widened inside the C loop (F16C or scalar) give the bytes of widening first."""
    x16 = torch.from_numpy(np.clip(data, -6e4, 6e4)).half()
    x16[1, :8] = torch.tensor([6.0e-8, -6.0e-8, 1e-5, -1e-5, 0.0, -0.0, 65504.0, -65504.0]).half()  # subnormals, extremes
    im = torch.from_numpy(importance(data.shape[1], 5)) if with_imatrix else None
    monkeypatch.setattr(native, "_ROW_CHUNK_ELEMENTS", 5 * 512)
    for t in NATIVE:
        want = Q.quantize(x16.float(), t, im)
        got = native.quantize_rows(int(t), x16, im, want.shape[1])
        assert got is not None
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=t.name)
        np.testing.assert_array_equal(Q.quantize(x16, t, im).numpy(), want.numpy(), err_msg=t.name)
    bad = x16.clone()
    bad[3, 7] = float("inf")
    with pytest.raises(LowbitError, match="NaN or Inf"):
        Q.quantize(bad, T.Q4_K)


@needs_native
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_portable_build_equals_installed(data, tmp_path, monkeypatch):
    """The build without the AVX2 clones (what CPUs without AVX2 run) gives the same bytes."""
    src = Path(native.__file__).parent / "native" / "lowbit_quants.c"
    if not src.exists():
        pytest.skip("C source not installed")
    so = tmp_path / "portable.so"
    subprocess.run(["cc", "-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-DLOWBIT_NO_CLONES", "-shared",
                    "-fPIC", "-o", str(so), str(src), "-lm"], check=True)
    x = torch.from_numpy(data[::3].copy())
    im = torch.from_numpy(importance(data.shape[1], 9))
    x16 = x.clamp(-6e4, 6e4).half()  # the portable build widens float16 without F16C
    want = {(t, w is not None, h): Q.quantize(x16 if h else x, t, w) for t in NATIVE for w in (None, im) for h in (0, 1)}
    monkeypatch.setattr(native, "_lib", native.open_library(so))
    for (t, with_im, h), ref in want.items():
        got = Q.quantize(x16 if h else x, t, im if with_im else None)
        np.testing.assert_array_equal(got.numpy(), ref.numpy(), err_msg=f"{t.name} imatrix={with_im} float16={h}")


@needs_native
def test_stale_build_is_refused(monkeypatch):
    path = native._lib._name
    monkeypatch.setattr(native, "ABI_VERSION", native.ABI_VERSION + 1)
    with pytest.raises(OSError, match="rebuild"):
        native.open_library(path)
