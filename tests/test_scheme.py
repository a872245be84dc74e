"""The one scheme description, the presets, and the one result type's reference dequantization."""

from __future__ import annotations

import pytest
import torch

from lowbit.core.presets import PRESETS, preset
from lowbit.core.quantized import E2M1_VALUES, QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError


def test_positional_form_and_derived_strategy() -> None:
    assert QuantScheme(4, 64, False).granularity == "group"
    assert QuantScheme(8, -1).granularity == "channel"
    assert QuantScheme(8, 0).granularity == "tensor"
    assert QuantScheme(8, 0, strategy="token", dynamic=True).granularity == "token"
    assert QuantScheme(4, 64, False).describe() == "int4 asym g64"


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 9}, "between 1 and 8"),
    ({"type": "posit"}, "unknown type"),
    ({"bits": 6, "type": "float"}, "no float format"),
    ({"bits": 8, "type": "float", "float_format": "e2m1"}, "no float format"),
    ({"strategy": "block"}, "block=\\(rows, columns\\)"),
    ({"block": (128, 128)}, "block strategy only"),
    ({"scale_format": "e3m4"}, "unknown scale format"),
    ({"type": "codebook"}, "codebook name"),
    ({"dynamic": "sometimes"}, "dynamic must be"),
])
def test_bad_schemes_are_one_line_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(LowbitError, match=match):
        QuantScheme(**kwargs)


def test_float_formats_by_bits() -> None:
    assert QuantScheme(8, -1, type="float").float_format == "e4m3"
    assert QuantScheme(8, -1, type="float", float_format="e5m2").float_spec.max == 57344.0
    assert QuantScheme(4, 16, type="float").float_spec.max == 6.0


@pytest.mark.parametrize("name", [n for n, _ in PRESETS.items()])
def test_every_scheme_round_trips_through_its_dict(name: str) -> None:
    p = preset(name)
    for s in (p.weights, p.input_activations, p.kv_cache):
        if s is not None:
            assert QuantScheme.from_dict(s.to_dict()) == s
    assert QuantScheme.from_dict([4, 64, False]) == QuantScheme(4, 64, False)  # the old result-file form


def test_presets_match_compressed_tensors_names() -> None:
    fp8 = preset("fp8_dynamic")
    assert fp8.weights.to_quantization_args()["strategy"] == "channel"
    assert fp8.input_activations.to_quantization_args()["strategy"] == "token"
    assert fp8.input_activations.to_quantization_args()["dynamic"] is True
    nv = preset("NVFP4").weights.to_quantization_args()
    assert nv["strategy"] == "tensor_group" and nv["group_size"] == 16 and nv["type"] == "float"
    assert preset("W4A16").weights == QuantScheme(4, 128, True)
    with pytest.raises(LowbitError, match="W4A16"):
        preset("W5A16")


def test_dequantize_int_float_codebook_block() -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (4, 8), generator=g)
    scale = torch.rand(4, 2, generator=g) + 0.5
    zero = torch.full((4, 2), 8.0)
    qw = QuantizedWeight(codes, scale, zero, QuantScheme(4, 4, True))
    expect = (codes.float() - 8.0) * scale.repeat_interleave(4, 1)
    assert torch.equal(qw.dequantize(), expect)

    fp4 = QuantizedWeight(codes.to(torch.uint8), scale, None, QuantScheme(4, 4, type="float", scale_format="e4m3"),
                          global_scale=torch.tensor(2.0))
    table = torch.tensor(E2M1_VALUES)
    assert torch.equal(fp4.dequantize(), table[codes] * scale.repeat_interleave(4, 1) / 2.0)

    book = torch.linspace(-1, 1, 16)
    cb = QuantizedWeight(codes, scale, None, QuantScheme(4, 4, type="codebook", codebook="nf4"), codebook=book)
    assert torch.equal(cb.dequantize(), book[codes] * scale.repeat_interleave(4, 1))

    w8 = torch.randn(5, 6, generator=g).to(torch.float8_e4m3fn)
    blk = QuantizedWeight(w8, torch.tensor([[2.0, 3.0], [4.0, 5.0]]), None,
                          QuantScheme(8, 0, type="float", strategy="block", block=(4, 4)))
    s = torch.tensor([[2.0] * 4 + [3.0] * 2] * 4 + [[4.0] * 4 + [5.0] * 2])
    assert torch.equal(blk.dequantize(), w8.float() * s)


def test_result_tensors_round_trip_every_field() -> None:
    codes = torch.randint(0, 16, (4, 8))
    qw = QuantizedWeight(codes, torch.rand(4, 1), None, QuantScheme(4, -1, type="codebook", codebook="learned"),
                         codebook=torch.randn(4, 16), extra={"absmax_codes": torch.arange(3)})
    back = QuantizedWeight.from_tensors(qw.tensors("p."), qw.scheme, "p.")
    assert torch.equal(back.dequantize(), qw.dequantize()) and torch.equal(back.extra["absmax_codes"], torch.arange(3))
    with pytest.raises(LowbitError, match="zero points"):
        QuantizedWeight(codes, torch.rand(4, 1), None, QuantScheme(4, -1))
