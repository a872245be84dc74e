"""The C quantizers of the IQ grid types (issue 16: 3) give the torch code's bytes.

The torch classes (gguf/iq1quants.py, iq2quants.py, iq3quants.py) are byte-identical to llama.cpp
(tests/test_gguf_quants.py); here each C type is compared with its torch class's own
``quantize_rows`` on the synthetic cases of test_gguf_quants (zeros, constants, subnormals,
outliers, real-like rows; two seeds), with and without an importance matrix, on 1-3 threads and
several chunks per call, float32 and float16 input. ``lowbit.gguf.quants.quantize`` now takes
the C path for these types, so test_gguf_quants' llama.cpp comparisons run the C code too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from test_gguf_quants import importance, synthetic

from lowbit.errors import LowbitError
from lowbit.gguf import native
from lowbit.gguf import quants as Q

IQ_NATIVE = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M]
NEEDS_IMATRIX = {T.IQ2_XXS, T.IQ2_XS, T.IQ1_S}

needs_native = pytest.mark.skipif(not native.enabled(), reason="native library not built (or LOWBIT_NATIVE=0)")


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    parts = [v for seed in (0, 1) for v in synthetic(cols=512, rows=8, seed=seed).values()]
    return np.concatenate(parts, axis=0)[::2].copy()  # every other row: the torch oracle is slow


def torch_bytes(x: np.ndarray, qtype: T, im: np.ndarray | None) -> np.ndarray:
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # many small torch ops: extra threads only contend
    try:
        return Q.REGISTRY[qtype].quantize_rows(torch.from_numpy(x), None if im is None else torch.from_numpy(im)).numpy()
    finally:
        torch.set_num_threads(n)


@needs_native
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", IQ_NATIVE, ids=lambda t: t.name)
def test_native_iq_equals_torch(qtype, with_imatrix, data, monkeypatch):
    im = importance(data.shape[1], 7) if with_imatrix else None
    row_bytes = data.shape[1] // 256 * Q.block_size(qtype)[1]
    if qtype in NEEDS_IMATRIX and im is None:  # the C code declines; the torch path says why
        assert native.quantize_array_absmax(int(qtype), data, None, row_bytes) is None
        with pytest.raises(LowbitError, match="importance matrix"):
            Q.quantize(torch.from_numpy(data), qtype)
        return
    want = torch_bytes(data, qtype, im)
    monkeypatch.setattr(native, "_ROW_CHUNK_ELEMENTS", 3 * 512)  # several chunks per call
    for threads in (1, 3):
        monkeypatch.setattr(native, "thread_count", lambda t=threads: t)
        res = native.quantize_array_absmax(int(qtype), data, im, row_bytes)
        assert res is not None
        np.testing.assert_array_equal(res[0], want, err_msg=f"{qtype.name} threads={threads}")
    x16 = np.clip(data, -6e4, 6e4).astype(np.float16)
    want16 = torch_bytes(x16.astype(np.float32), qtype, im)
    np.testing.assert_array_equal(native.quantize_array_absmax(int(qtype), x16, im, row_bytes)[0], want16)
    got = Q.quantize(torch.from_numpy(data), qtype, None if im is None else torch.from_numpy(im)).numpy()
    np.testing.assert_array_equal(got, want)  # quants.quantize takes the C path


@needs_native
def test_grid_given_to_each_library(tmp_path, data, monkeypatch):
    """A library opened later (another build) gets the grids too before quantizing."""
    lib = native.open_library(native._lib._name)
    monkeypatch.setattr(native, "_lib", lib)
    im = importance(data.shape[1], 3)
    res = native.quantize_array_absmax(int(T.IQ2_S), data[:4], im, 2 * 82)
    assert res is not None and res[0].shape == (4, 164)
