"""QuantLinear numerics and load_quantized on checkpoints of every format."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lowbit import formats
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
