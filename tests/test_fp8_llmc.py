"""lowbit's FP8 / W8A8 / NVFP4 / MXFP4 checkpoints against llm-compressor 0.14's, byte for byte.

The goldens (``tests/data/llmc/goldens.json``) were made by ``tests/reference/make_llmc_goldens.py``
in a virtualenv with llm-compressor 0.14.0.1, compressed-tensors 0.19.0 and transformers 5.17.0:
``oneshot`` with ``QuantizationModifier(scheme=PRESET, ignore=["lm_head"])`` on stories260K
(float32) and on a synthetic one-layer bf16 Llama rebuilt here from the same seed
(:func:`make_tiny_llama`), static schemes calibrated on the same token ids. They hold the
``quantization_config`` llm-compressor wrote and the dtype, shape and SHA-256 of every tensor.
Here lowbit quantizes the same model with RTN and the same preset, writes compressed-tensors, and
every tensor of its file must have the same bytes (codes, scales, global scales, the float
tensors) and its config groups must equal llm-compressor's. Calibrated input scales (static
schemes) are equal as well: both take them from the float model's activations (no quantization
propagated), the absolute maximum over every token / 448, and lowbit runs the attention as
llm-compressor's calibration does (eager; transformers' default SDPA rounds the attention outputs,
hence o_proj's and the later layers' inputs, a few ulps differently).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from paths import ROOT

sys.path.insert(0, str(ROOT / "tests" / "reference"))
from make_llmc_goldens import GOLDENS, calibration_ids, describe, make_tiny_llama  # noqa: E402

GOLD = json.loads(GOLDENS.read_text())
#: presets lowbit writes so far (the others' goldens wait for their format); calibrated input scales
#: (FP8's input_scale, NVFP4's input_global_scale) are equal too since lowbit calibrates static
#: activations with eager attention, as llm-compressor does (with SDPA: within 1 bf16 / 8 float32 ulps)
WRITTEN = {"FP8", "FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "NVFP4A16", "NVFP4", "MXFP4A16"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny", stories_dir)


def lowbit_checkpoint(model_dir: Path, preset_name: str, out: Path) -> Path:
    from lowbit.core.presets import preset
    from lowbit.formats import save
    from lowbit.models.calibration import CalibrationData
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    scheme = preset(preset_name).scheme
    assert scheme is not None
    ids = calibration_ids()
    calib = CalibrationData(ids, None, "llmc-goldens")
    qm = quantize_model(str(model_dir), method="rtn", recipe=Recipe(scheme=scheme), calib=calib,
                        format="compressed-tensors")
    return save(qm, model_dir, out)


CASES = sorted(GOLD["cases"])


@pytest.mark.parametrize("case", CASES)
def test_bytes_equal_llm_compressor(case: str, tiny_dir: Path, stories_dir: Path, tmp_path: Path) -> None:
    model, preset_name = case.split("/")
    if preset_name not in WRITTEN:
        pytest.skip(f"{preset_name} is not written yet")
    gold = GOLD["cases"][case]
    out = lowbit_checkpoint(tiny_dir if model == "tiny" else stories_dir, preset_name, tmp_path / "out")
    ours = describe(out / "model.safetensors")
    assert sorted(ours) == sorted(gold["tensors"])
    differ = {n: (ours[n][:2], gold["tensors"][n][:2]) for n in ours if ours[n] != gold["tensors"][n]}
    assert not differ, f"{len(differ)} tensors differ from llm-compressor's: {sorted(differ)[:8]}"
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["config_groups"] == gold["quantization_config"]["config_groups"]
    assert qconfig["format"] == gold["quantization_config"]["format"]
    assert qconfig["ignore"] == gold["quantization_config"]["ignore"]


@pytest.mark.skipif(importlib.util.find_spec("llmcompressor") is None, reason="llm-compressor is not installed")
def test_goldens_are_llm_compressors(tmp_path: Path, stories_dir: Path) -> None:
    """Where llm-compressor is importable (its venv), it still writes the golden bytes."""
    from make_llmc_goldens import run_case

    got = run_case(make_tiny_llama(tmp_path / "tiny", stories_dir), "FP8_BLOCK", tmp_path / "out")
    assert got["tensors"] == GOLD["cases"]["tiny/FP8_BLOCK"]["tensors"]


def test_tiny_model_is_the_goldens_model(tiny_dir: Path) -> None:
    """The synthetic model rebuilt here has the bytes the goldens were made from (its float tensors)."""
    gold = GOLD["cases"]["tiny/FP8_DYNAMIC"]["tensors"]
    ours = describe(tiny_dir / "model.safetensors")
    assert ours["model.embed_tokens.weight"] == gold["model.embed_tokens.weight"]
    assert torch.load is not None
