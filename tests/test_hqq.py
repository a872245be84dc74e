"""HQQ (lowbit.core.hqq, methods/hqq.py): equal to the hqq library 0.2.8 byte for byte on CPU.

Goldens: tests/data/hqq/solver.safetensors, made by tests/reference/make_hqq_goldens.py in a venv
with hqq 0.2.8 + transformers 4.57 + torch 2.13.0 CPU (hqq's ``Quantizer.quantize`` with
``hqq_base_quant_config``'s weight parameters, ``bitpack=False``). Synthetic tensors (an outlier, a
constant group, a nearly constant group, a loud row) at 1/2/3/4/8 bits, groups 64/128, and
stories260K tensors at 2/3/4/8 bits, groups 64/128: codes, scales and zero points compared with
``torch.equal`` (bytes). A second test runs hqq live when it is importable (skipped otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from paths import STORIES
from safetensors import safe_open

from lowbit.core.hqq import solve
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.methods import METHODS
from lowbit.methods.hqq import hqq

GOLDEN = Path(__file__).parent / "data" / "hqq" / "solver.safetensors"


def _cases() -> list[tuple[str, dict]]:
    with safe_open(str(GOLDEN), "pt") as f:
        return sorted(json.loads(f.metadata()["cases"]).items())


@pytest.mark.parametrize("case", [c for c, _ in _cases()])
def test_solver_equals_hqq_goldens(case):
    spec = dict(_cases())[case]
    with safe_open(str(GOLDEN), "pt") as f:
        w = f.get_tensor(f"input.{spec['input']}")
        r = solve(w, spec["bits"], spec["group_size"])
        assert torch.equal(r.codes, f.get_tensor(f"{case}.codes"))
        assert torch.equal(r.scale, f.get_tensor(f"{case}.scale"))
        assert torch.equal(r.zero, f.get_tensor(f"{case}.zero"))


def test_method_result_dequantizes_as_hqq():
    with safe_open(str(GOLDEN), "pt") as f:
        w = f.get_tensor("input.synthetic")
        qw = hqq(w, QuantScheme(4, 64, False))
        codes, scale, zero = (f.get_tensor(f"synthetic_b4_g64.{k}") for k in ("codes", "scale", "zero"))
    assert torch.equal(qw.codes, codes.to(torch.int32)) and torch.equal(qw.zero, zero)
    # hqq's dequantization: (W_q - zero) * scale on the [-1, group] view
    ref = ((codes.float().reshape(-1, 64) - zero.reshape(-1, 1)) * scale.reshape(-1, 1)).reshape(w.shape)
    assert torch.equal(qw.dequantize(), ref)
    err = (qw.dequantize() - w).abs().mean()
    assert err < 0.01


def test_integer_zero_points_fit_integer_formats():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    qw = hqq(w, QuantScheme(4, 64, False), integer_zero=True)
    assert torch.equal(qw.zero, torch.round(qw.zero)) and 0 <= float(qw.zero.min()) and float(qw.zero.max()) <= 15
    assert (qw.dequantize() - w).abs().mean() < 0.01
    # float zero points fit no worse than their rounding
    assert (hqq(w, QuantScheme(4, 64, False)).dequantize() - w).abs().mean() <= (qw.dequantize() - w).abs().mean()


@pytest.mark.parametrize(("bits", "group", "message"), [
    (0, 64, "bits must be an integer from 1 to 8"),
    (9, 64, "bits must be an integer from 1 to 8"),
    (4, 48, "group size 48 does not divide the 128 input columns"),
])
def test_bad_input_is_one_line(bits, group, message):
    with pytest.raises(LowbitError, match=message) as e:
        solve(torch.zeros(4, 128), bits, group, where="w")
    assert "\n" not in str(e.value) and str(e.value).startswith("w:")


def test_nan_weights_are_refused():
    w = torch.zeros(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(LowbitError, match="NaN or infinite"):
        hqq(w, QuantScheme(4, 64, False), where="model.layers.0.q_proj.weight")


def test_method_supports():
    m = METHODS.get("hqq")
    assert m.supports(QuantScheme(4, 64, False)) is None
    assert m.supports(QuantScheme(3, -1, False)) is None
    assert "asymmetric" in m.supports(QuantScheme(4, 64, True))
    assert "per tensor" in m.supports(QuantScheme(4, 0, False))
    assert m.supports(QuantScheme(8, 64, type="float")) is not None


def test_cli_defaults_to_an_asymmetric_grid():
    from lowbit.cli import _recipe, build_parser

    args = build_parser().parse_args(["quantize", "m", "--method", "hqq", "--bits", "3", "--group-size", "64", "-o", "x"])
    assert _recipe(args).scheme == QuantScheme(3, 64, False)
    args = build_parser().parse_args(["quantize", "m", "--bits", "3", "-o", "x"])
    assert _recipe(args).scheme.symmetric  # other methods keep the symmetric default


def test_live_against_hqq():
    pytest.importorskip("hqq")
    from hqq.core.quantize import Quantizer, hqq_base_quant_config

    g = torch.Generator().manual_seed(5)
    for bits, group in ((4, 64), (3, 128), (2, 64)):
        w = torch.randn(64, 256, generator=g) * 0.03
        params = dict(hqq_base_quant_config(nbits=bits, group_size=group, axis=1)["weight_quant_params"])
        params.pop("view_as_float")
        codes, meta = Quantizer.quantize(w, bitpack=False, device="cpu", compute_dtype=torch.float32, **params)
        r = solve(w, bits, group)
        assert torch.equal(r.codes, codes.reshape(w.shape).to(torch.uint8))
        assert torch.equal(r.scale.reshape(-1, 1), meta["scale"])
        assert torch.equal(r.zero.reshape(-1, 1), meta["zero"])


@pytest.mark.skipif(not (STORIES / "config.json").exists(), reason="stories260K not available")
@pytest.mark.parametrize("fmt", ["compressed-tensors", "lowbit"])
def test_pipeline_hqq_into_formats(tmp_path, fmt):
    """--method hqq --format compressed-tensors (integer zero points) and lowbit (float ones), read back."""
    from lowbit import api
    from lowbit.formats import read_checkpoint
    from lowbit.models.checkpoint import Checkpoint
    from lowbit.recipe import Recipe

    scheme = QuantScheme(4, 64, False)
    out = api.quantize(STORIES, tmp_path / "out", method="hqq", format=fmt,
                       recipe=Recipe(scheme=scheme, overrides=((r"down_proj", None),)))
    weights, _, _ = read_checkpoint(out)
    src = Checkpoint(STORIES)
    name = "model.layers.1.self_attn.o_proj.weight"
    expect = hqq(src.get(name), scheme, integer_zero=fmt != "lowbit")
    got = weights[name]
    assert torch.equal(got.codes.to(torch.int32), expect.codes)
    if fmt == "lowbit":
        assert torch.equal(got.zero, expect.zero) and torch.equal(got.scale, expect.scale)
    else:
        assert torch.equal(got.zero.float(), expect.zero)
        assert torch.allclose(got.dequantize(), expect.dequantize(), atol=1e-6)
