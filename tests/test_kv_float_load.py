"""Float checkpoints with an FP8 KV cache load through lowbit's normal path; GGUF refuses KV scales.

A compressed-tensors ``dense`` checkpoint with ``kv_cache_scheme`` (``--kv-cache fp8 --keep '.*'``)
holds the float weights unchanged plus ``self_attn.k_scale`` / ``v_scale``: ``resolve`` gives it as a
float model (kind ``hf``), ``load`` fills it (the scales are not parameters), eval installs its FP8
cache, and ``generate`` / ``bench`` run it.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def calib():
    from lowbit.models.calibration import CalibrationData

    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    return CalibrationData(ids, None, "test")


@pytest.fixture(scope="module")
def float_kv(stories_dir, tmp_path_factory):
    import lowbit.api as lb
    from lowbit.recipe import Recipe

    return lb.quantize(stories_dir, tmp_path_factory.mktemp("kv") / "float-kv", recipe=Recipe(overrides=((".", None),)),
                       calib="pydoc", samples=2, seq_len=32, kv_cache="tensor")


@pytest.mark.parametrize("method, to, fmt", [("rtn", "Q8_0", None), ("rtn", "Q4_K_M", "gguf"), ("gptq", "Q4_0", "gguf")])
def test_api_refuses_kv_cache_into_gguf(stories_dir, tmp_path, calib, method, to, fmt):
    import lowbit.api as lb

    out = tmp_path / "x.gguf"
    with pytest.raises(LowbitError, match="GGUF files hold no KV-cache scales") as info:
        lb.quantize(stories_dir, out, method=method, to=to, format=fmt, calib=calib, kv_cache="tensor")
    assert str(info.value).count("\n") == 0 and str(out) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_float_kv_checkpoint_resolves_and_loads_as_a_float_model(float_kv, stories_dir):
    from lowbit.models.loader import load, resolve

    src = resolve(float_kv)
    assert src.kind == "hf" and src.quantization_config["kv_cache_scheme"]["type"] == "float"
    assert resolve(stories_dir).kind == "hf"
    loaded = load(float_kv)
    ref = load(stories_dir)
    ids = torch.tensor([[1, 400, 20, 30, 55, 7, 90]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, ref.model(ids).logits)  # the weights are the float ones
    assert not any("k_scale" in n for n, _ in loaded.model.named_parameters())


def test_float_kv_checkpoint_still_refuses_foreign_tensors(float_kv, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from lowbit.models.loader import load

    bad = tmp_path / "bad"
    shutil.copytree(float_kv, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(LowbitError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        load(bad)


def test_float_kv_checkpoint_in_eval_generate_and_bench(float_kv, stories_dir, wikitext):
    from lowbit.api import EvalSettings, evaluate
    from lowbit.eval.speed import BenchSettings, _run_lowbit

    res = evaluate(float_kv, ref=stories_dir, settings=EvalSettings(text=wikitext, ctx=64, max_chunks=1))
    assert "FP8 E4M3 KV cache (per tensor" in res["numerics"] and res["kl_mean"] > 0
    from lowbit.eval.generate import generate

    out = _run_lowbit(str(float_kv), BenchSettings(prompt=8, tokens=4, warmup=1))
    assert out
    gen = generate(float_kv, stories_dir, ["Once upon a time"], max_new_tokens=4)
    assert gen["summary"]["prompts"] == 1
