"""The tinygemm kernel (runtime/kernels/torch_int4pack.py) against the torch reference on CUDA, and
its selection rules everywhere (it never runs on the CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.core.scheme import QuantScheme
from lowbit.methods.rtn import rtn
from lowbit.runtime import QuantLinear
from lowbit.runtime.kernels import KERNELS, select


def _layer(out_f: int, in_f: int, bits: int = 4, group: int = 128, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear.from_quantized(rtn(torch.randn(out_f, in_f) * 0.02, QuantScheme(bits, group, False)),
                                      bias=torch.randn(out_f) * 0.1)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_never_picked_off_cuda(device):
    layer = _layer(256, 512)
    k = KERNELS.get("torch-int4pack")
    assert not k.supports(layer, torch.device(device), (1, 512), torch.bfloat16)


def test_shape_rules():
    k = KERNELS.get("torch-int4pack")
    cuda = torch.device("cuda")
    assert k.supports(_layer(256, 512), cuda, (1, 512), torch.bfloat16)
    assert k.supports(_layer(256, 512), cuda, (2, 8, 512), torch.bfloat16)  # 16 tokens
    assert not k.supports(_layer(256, 512), cuda, (17, 512), torch.bfloat16)  # more: the tile kernel
    assert not k.supports(_layer(256, 512), cuda, (1, 512), torch.float16)  # tinygemm takes bf16
    assert not k.supports(_layer(256, 512, bits=8), cuda, (1, 512), torch.bfloat16)
    assert not k.supports(_layer(256, 320, group=64), cuda, (1, 320), torch.bfloat16)  # K not a multiple of 128
    assert not k.supports(_layer(256, 512, group=16), cuda, (1, 512), torch.bfloat16)  # groups tinygemm lacks
    assert not k.supports(_layer(252, 512), cuda, (1, 512), torch.bfloat16)  # N not a multiple of 8


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("out_f, in_f", [(264, 512), (1024, 4096)])
def test_matches_the_reference_on_cuda(group, m, out_f, in_f):
    layer = _layer(out_f, in_f, group=group, seed=m).cuda()
    x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16)
    assert select(layer, x).name == "torch-int4pack"
    y = layer(x)
    ref = F.linear(x.float(), layer.dequantized_weight(torch.float32), layer.bias)
    assert y.dtype == torch.bfloat16 and y.shape == (m, out_f)
    # bf16 scale and zero, bf16 output: about 1% of the largest output, never a layout error (that is ~100%)
    assert float((y.float() - ref).abs().max()) <= 2e-2 * float(ref.abs().max())
