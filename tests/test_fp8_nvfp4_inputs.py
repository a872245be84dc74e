"""NVFP4 input activations (W4A4) in evaluation: compressed-tensors' rounding, applied by lowbit eval.

An NVFP4 checkpoint's linears quantize their inputs at run time: per group of 16 an E4M3 scale
``E4M3(global * amax / 6)`` under the layer's static ``input_global_scale``, the values rounded to
E2M1. :func:`lowbit.runtime.activations.fake_quantize_input` computes it in float32 and equals
compressed-tensors' own ``fake_quantize`` there bit for bit (compressed-tensors is a test
dependency); ``lowbit eval`` applies it (``numerics`` says so). QuantLinear has no slot for the
global scale: lowbit's runtime keeps running NVFP4 layers with float inputs (weight-only), as before.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lowbit.core.fp4 import nvfp4_global_scale
from lowbit.core.presets import preset
from lowbit.runtime.activations import declared_inputs, fake_quantize_input, nvfp4_inputs

NVFP4_IN = preset("NVFP4").input_activations


def test_nvfp4_inputs_equal_compressed_tensors() -> None:
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    from lowbit.formats.compressed_tensors import full_args

    assert NVFP4_IN is not None and nvfp4_inputs(NVFP4_IN)
    args = QuantizationArgs(**full_args(NVFP4_IN, False))
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e-3, 300.0):
        x = torch.randn(9, 128, generator=g) * scale
        x[0] = 0.0  # an all-zero token: every group's scale 0 -> 0.125
        x[1, :16] = torch.tensor([6.0, -6.0, 0.25, -0.25, 0.75, 2.5, 5.0, -0.0] * 2) * scale  # ties
        gs = nvfp4_global_scale(x.abs().amax() * 0.5)  # a calibrated scale below this batch's range: clamps
        s, z = compute_dynamic_scales_and_zp(x, args, torch.nn.Module(), global_scale=gs)
        ref = fake_quantize(x, s, z, args, global_scale=gs)
        assert torch.equal(fake_quantize_input(x, NVFP4_IN, gs), ref), (ct.__version__, scale)


def test_nvfp4_inputs_need_the_global_scale() -> None:
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="input_global_scale"):
        fake_quantize_input(torch.randn(2, 32), NVFP4_IN)
    with pytest.raises(LowbitError, match="does not divide"):
        fake_quantize_input(torch.randn(2, 40), NVFP4_IN, torch.tensor([1.0]))


def test_eval_applies_nvfp4_inputs(stories_dir: Path, tmp_path: Path, wikitext: Path) -> None:
    import lowbit.api as lb
    from lowbit.formats import read_checkpoint
    from lowbit.recipe import Recipe

    sys.path.insert(0, str(Path(__file__).parent / "reference"))
    from make_llmc_goldens import make_tiny_llama

    tiny = make_tiny_llama(tmp_path / "tiny", stories_dir)
    settings = lb.EvalSettings(text=wikitext, ctx=32, max_chunks=2)
    res = {}
    for name in ("NVFP4", "NVFP4A16"):
        out = lb.quantize(tiny, tmp_path / name, recipe=Recipe(scheme=preset(name).scheme), calib="pydoc", samples=2,
                          seq_len=32)
        res[name] = lb.evaluate(out, ref=tiny, settings=settings)
    assert "input activations float4 e2m1 g16 dynamic-local scale:e4m3 on 7 linears" in res["NVFP4"]["numerics"]
    assert "input activations" not in res["NVFP4A16"]["numerics"]
    assert res["NVFP4"]["kl_mean"] > res["NVFP4A16"]["kl_mean"]  # the same weights, plus 4-bit inputs
    weights, _, _ = read_checkpoint(tmp_path / "NVFP4")
    assert all(declared_inputs(qw) == (None, None) for qw in weights.values())  # the runtime: weight-only
