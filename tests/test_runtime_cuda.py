"""QuantLinear's Triton CUDA kernel against the torch reference (skipped without CUDA + Triton)."""

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
    layer.use_triton = False
    assert torch.allclose(layer(x).float(), ref, atol=2e-2 * ref.abs().max().item())
