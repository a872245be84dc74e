"""FP8 KV-cache scales and config against llm-compressor 0.14 on stories260K, same calibration tokens.

Goldens: tests/data/llmc_sq/kv_{tensor,head}.safetensors and kv_*_config.json, made by
tests/reference/make_llmc_sq_goldens.py (llm-compressor 0.14, compressed-tensors 0.19,
transformers 5.17; ``QuantizationModifier(kv_cache_scheme=FP8 tensor / attn_head, observer
static_minmax)`` on 8 x 64 seeded token ids). The ``quantization_config`` and every layer's scales are
byte-identical. Layers after the first matched only once lowbit calibrated with eager attention, as
llm-compressor does (``calibration_forward_context`` -> ``use_eager_attention``): with transformers'
default SDPA the attention outputs, hence the later layers' inputs, keys and values, differed by a
few float32 ulps (measured before: up to 4 ulps, 5e-7 relative, on layers 1-4). A second test reruns
llm-compressor live when it is importable (never in CI).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

DATA = Path(__file__).parent / "data" / "llmc_sq"


def lowbit_kv(model_dir: Path, ids: torch.Tensor, strategy: str, out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from lowbit.formats import save
    from lowbit.models.calibration import CalibrationData
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    qm = quantize_model(model_dir, "rtn", calib=CalibrationData(ids, None, "golden"), recipe=Recipe(overrides=((".", None),)),
                        kv_cache=strategy)
    save(qm, model_dir, out)
    tensors = {k: v for k, v in load_file(str(out / "model.safetensors")).items() if k.endswith(("k_scale", "v_scale"))}
    return tensors, json.loads((out / "config.json").read_text())["quantization_config"]


def _compare(ours: dict[str, torch.Tensor], gold: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(gold) and len(ours) == 10
    for name, g in gold.items():
        assert ours[name].shape == g.shape and ours[name].dtype == g.dtype, name
        assert torch.equal(ours[name], g), (name, float(((ours[name] - g).abs() / g).max()))


@pytest.mark.parametrize("strategy,tag", [("tensor", "kv_tensor"), ("head", "kv_head")])
def test_kv_scales_and_config_equal_llm_compressor(stories_dir, tmp_path, strategy, tag, one_thread) -> None:
    ids = load_file(str(DATA / "calib_ids.safetensors"))["input_ids"]
    ours, config = lowbit_kv(stories_dir, ids, strategy, tmp_path / tag)
    _compare(ours, load_file(str(DATA / f"{tag}.safetensors")))
    assert config == json.loads((DATA / f"{tag}_config.json").read_text())


def test_kv_scales_equal_llm_compressor_live(stories_dir, tmp_path, one_thread) -> None:
    pytest.importorskip("llmcompressor")
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "reference"))
    from make_llmc_sq_goldens import calib_ids, kv_scales

    ids = calib_ids(512)
    ref, ref_config = kv_scales(stories_dir, ids, "attn_head")
    ours, config = lowbit_kv(stories_dir, ids, "head", tmp_path / "live")
    _compare(ours, ref)
    assert config == ref_config
