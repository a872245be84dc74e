"""GPTQ with the W8A8 preset goes through the existing ``gptq`` method: int8 per-channel weights,
written as compressed-tensors ``int-quantized`` with llm-compressor's per-token dynamic
``input_activations`` (SmoothQuant before it is the ``smoothquant+gptq`` method)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from paths import ROOT

sys.path.insert(0, str(ROOT / "tests" / "reference"))
from make_llmc_goldens import calibration_ids  # noqa: E402


@pytest.mark.skipif(os.environ.get("LOWBIT_SLOW_TESTS") != "1", reason="GPTQ over 5 layers: LOWBIT_SLOW_TESTS=1 runs it")
def test_gptq_w8a8_writes_int_quantized(stories_dir: Path, tmp_path: Path) -> None:
    from lowbit.core.presets import preset
    from lowbit.formats import read_checkpoint, save
    from lowbit.models.calibration import CalibrationData
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    scheme = preset("W8A8").scheme
    assert scheme is not None
    qm = quantize_model(str(stories_dir), method="gptq", recipe=Recipe(scheme=scheme),
                        calib=CalibrationData(calibration_ids(), None, "test"), format="compressed-tensors")
    out = save(qm, stories_dir, tmp_path / "out")
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["format"] == "int-quantized"
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True
    weights, _, _ = read_checkpoint(out)
    qw = weights["model.layers.0.self_attn.q_proj.weight"]
    assert qw.scheme.activations is not None and qw.scheme.bits == 8
    w = qm.weights["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(qw.codes, w.codes.to(torch.int32))
