"""QuantLinear's Triton CUDA kernel (triton-wna16) against the torch reference (skipped without CUDA + Triton)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.core.scheme import QuantScheme
from lowbit.runtime import QuantLinear

from formats_util import synthetic

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
triton = pytest.importorskip("triton")


@pytest.mark.parametrize("bits, group, g_idx", [(4, 128, False), (4, 32, True), (8, -1, False), (2, 64, False), (4, -1, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 33, 130])
@pytest.mark.parametrize("in_f", [384, 2048])  # 2048 with few rows splits K across programs
def test_triton_matches_reference(bits, group, g_idx, dtype, m, in_f):
    out_f = 200  # not a multiple of the output tiles
    qw = synthetic(out_f, in_f, QuantScheme(bits, group, bits != 2), seed=bits + m, g_idx=g_idx)
    bias = torch.randn(out_f)
    layer = QuantLinear.from_quantized(qw, bias).cuda()
    x = torch.randn(3, m, in_f, device="cuda", dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, m, out_f)
    ref = F.linear(x.float(), qw.dequantize().cuda(), bias.cuda())
    err = (y.float() - ref).abs().max().item()
    assert err <= 2e-2 * ref.abs().max().item(), err
    from lowbit.runtime.kernels import select

    # the best kernel for this layer on CUDA: tinygemm for a few bf16 tokens of 4-bit groups, else the tile kernel
    tiny = (x.shape[0] * x.shape[1] <= 16 and dtype == torch.bfloat16 and bits == 4 and layer.default_groups()
            and in_f % 128 == 0 and in_f // layer.scales.shape[1] in (32, 64, 128, 256))
    assert select(layer, x).name == ("torch-int4pack" if tiny else "triton-wna16")
    layer.kernel = "torch"
    assert select(layer, x).name == "torch"
    assert torch.allclose(layer(x).float(), ref, atol=2e-2 * ref.abs().max().item())


def test_layers_triton_cannot_run_fall_back_to_the_reference():
    from lowbit.runtime.kernels import select

    x = torch.randn(4, 128, device="cuda", dtype=torch.float16)
    qw = synthetic(64, 128, QuantScheme(3, 32, False), seed=1)  # 3-bit: not a Triton layer
    layer = QuantLinear.from_quantized(qw).cuda()
    assert select(layer, x).name == "torch"
    assert torch.allclose(layer(x).float(), F.linear(x.float(), qw.dequantize().cuda()), atol=2e-2)
    qw = synthetic(64, 128, QuantScheme(4, 32, True), seed=2)
    token = QuantScheme(8, 0, True, strategy="token", dynamic=True)
    layer = QuantLinear.from_quantized(qw, input_scheme=token).cuda()  # input quantization: the reference's
    assert select(layer, x).name == "torch"
    layer.set_input_scheme(None)
    assert select(layer, x).name == "triton-wna16"  # float16: tinygemm takes bf16 only
    assert select(layer, x.bfloat16()).name == "torch-int4pack"
    assert select(layer, torch.randn(32, 128, device="cuda", dtype=torch.bfloat16)).name == "triton-wna16"
