"""QuantLinear numerics and load_quantized on checkpoints of every format."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lowbit import formats
from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.runtime import QuantLinear, load_quantized

from formats_util import SRC, make_model, needs_model, rtn_weights, synthetic


@pytest.mark.parametrize(
    "scheme, g_idx",
    [
        (QuantScheme(4, 32, True), False),
        (QuantScheme(4, 32, False), True),
        (QuantScheme(3, -1, False), False),
        (QuantScheme(2, 16, True), False),
        (QuantScheme(8, 0, False), False),
        (QuantScheme(5, 12, False), False),
    ],
)
def test_quantlinear_matches_dequantized_linear(scheme, g_idx):
    qw = synthetic(24, 96, scheme, seed=scheme.bits, g_idx=g_idx)
    bias = torch.randn(24)
    layer = QuantLinear.from_quantized(qw, bias)
    x = torch.randn(3, 5, 96)
    assert torch.equal(layer(x), F.linear(x, qw.dequantize(), bias))
    back = layer.to_quantized()
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert torch.equal(back.codes, qw.codes)
    assert (back.g_idx is not None) == g_idx
    layer.cache_weight = True
    y1 = layer(x.half()).float()
    assert layer._cached is not None and torch.allclose(y1, layer(x.half()).float())
    layer.float()  # moves clear the cache
    assert layer._cached is None


def test_quantlinear_bf16_input():
    qw = synthetic(16, 64, QuantScheme(4, 32, True), seed=1)
    layer = QuantLinear.from_quantized(qw)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x, qw.dequantize(torch.bfloat16)))


@needs_model
@pytest.mark.parametrize(
    "fmt, scheme, which",
    [
        ("compressed-tensors", QuantScheme(4, 32, False), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")),
        ("gptq", QuantScheme(4, 32, True), ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("awq", QuantScheme(4, 32, False), ("q_proj", "k_proj", "v_proj", "o_proj")),
    ],
)
def test_load_quantized_equals_float_model_with_dequantized_weights(tmp_path, fmt, scheme, which):
    from transformers import AutoModelForCausalLM

    weights = rtn_weights(scheme, which)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = formats.save(make_model(weights), SRC, tmp_path / fmt, fmt)
    model, tok = load_quantized(path)
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_quant == len(weights)
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings stay tied

    ref = AutoModelForCausalLM.from_pretrained(SRC)
    stored = formats.read(path)
    with torch.no_grad():
        for name, qw in stored.items():
            ref.get_submodule(name[: -len(".weight")]).weight.copy_(qw.dequantize())
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


@needs_model
def test_load_quantized_refuses_float_folder():
    with pytest.raises(LowbitError, match="not a quantized checkpoint"):
        load_quantized(SRC)


# ----------------------------------------------------------------------------- kernels


def _kernels():
    from lowbit.runtime.kernels import KERNELS

    return list(KERNELS.items())


def test_kernel_registry_has_the_reference_and_triton():
    names = [n for n, _ in _kernels()]
    assert "torch" in names and "triton-wna16" in names


@pytest.mark.parametrize(
    "scheme, g_idx",
    [(QuantScheme(4, 32, True), False), (QuantScheme(4, 32, False), True), (QuantScheme(2, 16, True), False),
     (QuantScheme(8, -1, True), False), (QuantScheme(3, -1, False), False)],
)
def test_every_cpu_kernel_equals_the_reference(scheme, g_idx):
    qw = synthetic(24, 96, scheme, seed=scheme.bits + 7, g_idx=g_idx)
    bias = torch.randn(24)
    x = torch.randn(2, 3, 96)
    ref = F.linear(x, qw.dequantize(), bias)
    ran = []
    for name, kernel in _kernels():
        layer = QuantLinear.from_quantized(qw, bias)
        if not kernel.supports(layer, x.device, tuple(x.shape), x.dtype):
            continue
        layer.kernel = name
        assert torch.equal(layer(x), ref), name
        ran.append(name)
    assert "torch" in ran


def test_kernel_choice_and_forcing(monkeypatch):
    from lowbit.runtime.kernels import select

    qw = synthetic(16, 64, QuantScheme(4, 32, True), seed=3)
    layer = QuantLinear.from_quantized(qw)
    x = torch.randn(2, 64)
    assert select(layer, x).name == "torch"  # the only kernel that runs on the CPU
    layer.kernel = "triton-wna16"
    with pytest.raises(LowbitError, match="cannot run"):
        layer(x)
    layer.kernel = "no-such-kernel"
    with pytest.raises(LowbitError, match="unknown kernel"):
        layer(x)
    layer.kernel = None
    monkeypatch.setenv("LOWBIT_KERNEL", "torch")
    assert select(layer, x).name == "torch"
    monkeypatch.setenv("LOWBIT_KERNEL", "bogus")
    with pytest.raises(LowbitError, match="LOWBIT_KERNEL"):
        layer(x)


def _nvfp4_like(out_f: int, in_f: int, seed: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    scheme = QuantScheme(4, 16, True, type="float", scale_format="e4m3")
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    scale = (torch.rand(out_f, in_f // 16, generator=g) + 0.5).to(torch.float8_e4m3fn).float()
    return QuantizedWeight(codes, scale, None, scheme, global_scale=torch.tensor(3.0))


def _fp8_channel(out_f: int, in_f: int, seed: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    scheme = QuantScheme(8, -1, True, type="float")
    codes = (torch.randn(out_f, in_f, generator=g) * 50).to(torch.float8_e4m3fn)
    return QuantizedWeight(codes, torch.rand(out_f, 1, generator=g) * 0.01, None, scheme)


def _nf4_like(out_f: int, in_f: int, seed: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    scheme = QuantScheme(4, 32, True, type="codebook", codebook="nf4")
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    book = torch.linspace(-1, 1, 16)
    return QuantizedWeight(codes, torch.rand(out_f, in_f // 32, generator=g), None, scheme, codebook=book)


def _int_block(out_f: int, in_f: int, seed: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    scheme = QuantScheme(8, 0, True, strategy="block", block=(16, 32))
    codes = torch.randint(0, 256, (out_f, in_f), generator=g, dtype=torch.int32)
    scale = torch.rand(-(-out_f // 16), -(-in_f // 32), generator=g) * 0.01
    return QuantizedWeight(codes, scale, torch.full_like(scale, 128.0), scheme)


@pytest.mark.parametrize("make", [_nvfp4_like, _fp8_channel, _nf4_like, _int_block])
def test_reference_kernel_runs_any_quantized_weight(make):
    qw = make(40, 64, seed=5)
    bias = torch.randn(40)
    layer = QuantLinear.from_quantized(qw, bias)
    assert not layer.packed
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), F.linear(x, qw.dequantize(), bias))
    assert torch.equal(layer.to_quantized().dequantize(), qw.dequantize())
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- input activations


def test_fake_quantize_input_by_hand():
    from lowbit.runtime.activations import fake_quantize_input

    int8_token = QuantScheme(8, 0, True, strategy="token", dynamic=True)
    x = torch.tensor([[1.27, -0.5, 0.333, 0.004], [-0.2, 0.05, 0.0, 0.1]])
    # row 0: scale 1.27 / 127 = 0.01 -> codes 127, -50, 33, 0; row 1: scale 0.2 / 127
    s1 = 0.2 / 127
    want = torch.tensor([[1.27, -0.5, 0.33, 0.0], [-0.2, 32 * s1, 0.0, 64 * s1]])
    assert torch.allclose(fake_quantize_input(x, int8_token), want, atol=1e-6)

    static = QuantScheme(8, 0, True)  # per tensor, static: the stored input_scale
    x = torch.tensor([0.34, -20.0, 0.06, 12.7])
    want = torch.tensor([0.3, -12.8, 0.1, 12.7])  # codes 3, clamp(-200) = -128, 1, 127
    assert torch.allclose(fake_quantize_input(x, static, torch.tensor([0.1])), want, atol=1e-6)

    asym = QuantScheme(8, 0, False, strategy="token", dynamic=True)
    x = torch.tensor([[-1.0, 0.004, 1.55]])  # range [-1, 1.55]: scale 0.01, zero 100
    assert torch.allclose(fake_quantize_input(x, asym), torch.tensor([[-1.0, 0.0, 1.55]]), atol=1e-6)

    group = QuantScheme(8, 2, True, strategy="group", dynamic=True)
    x = torch.tensor([[1.27, 0.5, -0.2, 0.05]])
    assert torch.allclose(fake_quantize_input(x, group), torch.tensor([[1.27, 0.5, -0.2, 32 * s1]]), atol=1e-6)

    fp8 = QuantScheme(8, 0, True, type="float", strategy="token", dynamic=True)
    x = torch.tensor([[1.0, 3.0, -0.3]])
    # scale 3 / 448: x / s = 149.3, 448, -44.8 -> E4M3 144 (steps of 16 in [128, 256)), 448, -44 (steps of 4)
    want = torch.tensor([[144 * 3 / 448, 3.0, -44 * 3 / 448]])
    assert torch.allclose(fake_quantize_input(x, fp8), want, atol=1e-6)

    zeros = torch.zeros(2, 4)
    assert torch.equal(fake_quantize_input(zeros, int8_token), zeros)
    half = fake_quantize_input(torch.tensor([[1.27, -0.5]], dtype=torch.float16), int8_token)
    assert half.dtype == torch.float16


def test_quantlinear_quantizes_its_input():
    qw = synthetic(8, 4, QuantScheme(8, -1, True), seed=2)
    bias = torch.randn(8)
    x = torch.tensor([[1.27, -0.5, 0.333, 0.004]])
    x_q = torch.tensor([[1.27, -0.5, 0.33, 0.0]])  # as computed by hand above
    token = QuantScheme(8, 0, True, strategy="token", dynamic=True)
    layer = QuantLinear.from_quantized(qw, bias, input_scheme=token)
    assert torch.allclose(layer(x), F.linear(x_q, qw.dequantize(), bias), atol=1e-5)
    assert not torch.allclose(layer(x), F.linear(x, qw.dequantize(), bias), atol=1e-5)

    static = QuantScheme(8, 0, True)
    layer = QuantLinear.from_quantized(qw, bias, input_scheme=static, input_scale=0.1)
    assert "input_scale" in layer.state_dict() and float(layer.input_scale) == pytest.approx(0.1)
    x = torch.tensor([[0.34, -20.0, 0.06, 12.7]])
    want = F.linear(torch.tensor([[0.3, -12.8, 0.1, 12.7]]), qw.dequantize(), bias)
    assert torch.allclose(layer(x), want, atol=1e-4)
    assert "input=int8" in repr(layer)

    layer.set_input_scheme(None)  # back to float inputs
    assert torch.equal(layer(x), F.linear(x, qw.dequantize(), bias)) and layer.input_scale is None


def test_unsupported_input_schemes_are_refused_when_built():
    qw = synthetic(8, 32, QuantScheme(4, 16, True), seed=2)
    with pytest.raises(LowbitError, match="static scheme needs input_scale"):
        QuantLinear.from_quantized(qw, input_scheme=QuantScheme(8, 0, True))
    with pytest.raises(LowbitError, match="not supported"):
        QuantLinear.from_quantized(qw, input_scheme=QuantScheme(4, 16, True, type="float", scale_format="e4m3",
                                                                dynamic="local"))
    with pytest.raises(LowbitError, match="per tensor"):
        QuantLinear.from_quantized(qw, input_scheme=QuantScheme(8, -1, True), input_scale=1.0)
    with pytest.raises(LowbitError, match="positive"):
        QuantLinear.from_quantized(qw, input_scheme=QuantScheme(8, 0, True), input_scale=0.0)
