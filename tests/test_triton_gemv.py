"""The Triton GEMV kernel (runtime/kernels/triton_gemv.py): its tile rules on any machine, its
output against the torch reference under Triton's CPU interpreter (when Triton is installed)
and on CUDA (when there is one)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from lowbit.core.scheme import QuantScheme
from lowbit.methods.rtn import rtn
from lowbit.runtime import QuantLinear
from lowbit.runtime.kernels.triton_gemv import MAX_TOKENS, config


@pytest.mark.parametrize("k", [384, 4096, 14336])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_tiles_divide_the_groups_and_the_row(k, group, bits, m):
    g = k if group == -1 else group
    cfg = config(m, 4096, k, g, bits)
    assert cfg is not None
    assert g % cfg.block_k == 0 and cfg.block_k % (32 // bits) == 0  # a step never straddles a group or a word
    assert k % (cfg.split_k * cfg.block_k) == 0  # every K slice is whole steps
    assert k // cfg.split_k >= min(k, 4 * cfg.block_k)


def test_tiles_refuse_what_they_cannot_cut():
    assert config(1, 64, 100, 100, 4) is None  # no step of 32+ columns divides 100
    assert config(1, 64, 48, 16, 4) is None  # groups of 16: smaller than the smallest step


def test_split_k_fills_the_machine_for_few_rows():
    assert config(1, 1024, 4096, 128, 4, sms=132).split_k > 1  # 32 row blocks: K is split
    assert config(1, 65536, 4096, 128, 4, sms=132).split_k == 1  # 2048 row blocks: no atomics


_INTERPRETED = textwrap.dedent("""
    import itertools, torch, torch.nn.functional as F
    from lowbit.core.scheme import QuantScheme
    from lowbit.methods.rtn import rtn
    from lowbit.runtime import QuantLinear
    from lowbit.runtime.kernels.triton_gemv import GemvConfig, config, gemv_linear, prepared
    torch.manual_seed(0)
    for bits, group, (n, k), m, split in itertools.product((4, 2, 8), (64, 128), [(40, 256), (24, 512)], (1, 3, 16), (1, 2)):
        w = torch.randn(n, k)
        q = QuantLinear.from_quantized(rtn(w, QuantScheme(bits, group, False)), bias=torch.randn(n))
        x = torch.randn(m, k)
        ref = F.linear(x, q.dequantized_weight(), q.bias)
        c = config(m, n, k, group, bits)
        y = gemv_linear(x, q.qweight, prepared(q), bits, q.bias, GemvConfig(c.block_n, min(c.block_k, 64), split))
        err = float((y - ref).abs().max() / ref.abs().max())
        assert y.shape == ref.shape and err < 1e-5, (bits, group, n, k, m, split, err)
    print("ok")
""")


def test_gemv_matches_the_reference_in_the_triton_interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (its CPU interpreter runs this test where it is)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]


cuda = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                          reason="needs CUDA and Triton")


@cuda
@pytest.mark.parametrize("bits, group", [(4, 128), (4, 32), (8, 128), (2, 64), (4, -1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("out_f, in_f", [(200, 384), (1024, 4096)])
def test_gemv_on_cuda_matches_the_reference(bits, group, dtype, m, out_f, in_f):
    from lowbit.runtime.kernels import select

    torch.manual_seed(bits + m)
    layer = QuantLinear.from_quantized(rtn(torch.randn(out_f, in_f), QuantScheme(bits, group, False)),
                                       bias=torch.randn(out_f)).cuda()
    x = torch.randn(m, in_f, device="cuda", dtype=dtype)
    assert select(layer, x).name == "triton-gemv"
    ref = F.linear(x.float(), layer.dequantized_weight(torch.float32), layer.bias)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (m, out_f)
    assert float((y.float() - ref).abs().max()) <= 1e-2 * float(ref.abs().max())
    assert select(layer, torch.randn(MAX_TOKENS + 1, in_f, device="cuda", dtype=dtype)).name != "triton-gemv"
