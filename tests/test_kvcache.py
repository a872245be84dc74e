"""FP8 KV cache: the rounding, the calibration on keys after RoPE, the files, the CLI.

The comparison of the scales with llm-compressor's is tests/test_kvcache_llmc.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lowbit.core import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats import kv_cache
from lowbit.models.statistics import KVRange
from lowbit.runtime import kvcache
from lowbit.runtime.activations import fake_quantize_input

FP8_TENSOR = QuantScheme(8, 0, True, type="float")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_fp8_qdq_is_the_static_fp8_grid() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 8, generator=g) * 3
    s = torch.tensor([0.01])
    q = kvcache.fp8_qdq(x, s)
    assert torch.equal(q, fake_quantize_input(x, FP8_TENSOR, s))  # the activation reference, same grid
    assert float(q.abs().max()) <= 448 * 0.01 + 1e-6  # clamped to the grid's range
    heads = torch.tensor([0.01, 0.02, 0.03, 0.04]).reshape(4, 1, 1)
    qh = kvcache.fp8_qdq(x, heads)
    for h in range(4):
        assert torch.equal(qh[:, h], fake_quantize_input(x[:, h], FP8_TENSOR, heads[h].reshape(1)))
    with pytest.raises(LowbitError, match="does not fit"):
        kvcache.fp8_qdq(x, torch.ones(3, 1, 1))


def test_scale_rule_in_model_dtype() -> None:
    amax = torch.tensor([448.0 * 3, 0.0, 1.7])
    s32 = kvcache.scale_from_amax(amax, torch.float32)
    assert s32[0] == 3.0 and s32[1] == torch.finfo(torch.float32).eps
    assert s32[2] == torch.tensor(1.7) / torch.tensor(448.0)
    sb = kvcache.scale_from_amax(amax, torch.bfloat16)
    assert sb.dtype == torch.bfloat16 and sb[2] == torch.tensor(1.7).to(torch.bfloat16) / torch.tensor(448.0, dtype=torch.bfloat16)


def test_kv_range_per_head_real_tokens_only() -> None:
    k = torch.zeros(2, 2, 3, 4)
    v = torch.zeros(2, 2, 3, 4)
    k[0, 1, 2, 0] = -5.0  # a real token
    k[1, 0, 2, 3] = 9.0  # a padding token: not counted
    v[0, 0, 0, 1] = 2.0
    mask = torch.tensor([[True, True, True], [True, True, False]])
    r = KVRange()
    r.add(k, v, mask)
    assert r.k.tolist() == [0.0, 5.0] and r.v.tolist() == [2.0, 0.0] and r.n == 5
    with pytest.raises(LowbitError, match="non-finite"):
        r.add(k * float("nan"), v)


def _tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_tap_sees_keys_after_rope_and_install_rounds_them() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    attn = model.model.layers[1].self_attn
    seen = []
    with torch.no_grad():
        ref = model(ids).logits
        with kvcache.kv_tap(model.config, {attn: lambda k, v: (seen.append((k, v)), (k, v))[1]}):
            same = model(ids).logits
        assert torch.equal(ref, same)  # the tap alone changes nothing
        # what the tap saw: layer 1's k_proj output after RoPE, [b, kv_heads, L, d], heads not repeated
        grab = {}
        h1 = model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, a, o: grab.setdefault("k", o))
        h2 = model.model.rotary_emb.register_forward_hook(lambda m, a, o: grab.setdefault("rope", o))
        model(ids)
        h1.remove()
        h2.remove()
        k = grab["k"].view(1, 12, 2, 8).transpose(1, 2)
        cos, sin = grab["rope"]
        k_rope = apply_rotary_pos_emb(k, k, cos, sin)[1]
        assert seen[0][0].shape == (1, 2, 12, 8) and torch.allclose(seen[0][0], k_rope, atol=1e-6)
        assert model.config._attn_implementation == "sdpa"
        changed = kvcache.install(model, {0: (torch.tensor([0.05]), torch.tensor([0.05])),
                                          1: (torch.full((2, 1, 1), 0.05), torch.full((2, 1, 1), 0.05))})
        quant = model(ids).logits
        assert len(changed) == 2 and not torch.equal(quant, ref)
        assert (quant - ref).abs().max() < 0.1 * ref.abs().max()
        kvcache.uninstall(changed)
        assert torch.equal(model(ids).logits, ref)
    with pytest.raises(LowbitError, match="does not have"):
        kvcache.install(model, {5: (torch.tensor([1.0]), torch.tensor([1.0]))})


def test_parse_and_formats() -> None:
    assert kv_cache.parse("fp8") == "tensor" and kv_cache.parse("fp8-head") == "head" and kv_cache.parse(None) is None
    with pytest.raises(LowbitError, match="unknown KV-cache scheme"):
        kv_cache.parse("int8")
    with pytest.raises(LowbitError, match="cannot hold KV-cache scales"):
        kv_cache.check_format("gptq")


@pytest.fixture(scope="module")
def calib():
    from lowbit.models.calibration import CalibrationData

    ids = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    return CalibrationData(ids, None, "test")


@pytest.mark.parametrize("strategy", ["tensor", "head"])
def test_float_checkpoint_with_fp8_kv(stories_dir, tmp_path, calib, strategy) -> None:
    from lowbit.formats import save
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    qm = quantize_model(stories_dir, "rtn", calib=calib, recipe=Recipe(overrides=((".", None),)), kv_cache=strategy)
    out = save(qm, stories_dir, tmp_path / "kv")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == kv_cache.float_config(strategy)
    tensors = load_file(str(out / "model.safetensors"))
    src = load_file(str(stories_dir / "model.safetensors"))
    assert all(torch.equal(tensors[n], t) for n, t in src.items())  # the weights stay as they were
    ks = tensors["model.layers.3.self_attn.k_scale"]
    assert ks.shape == ((1,) if strategy == "tensor" else (4, 1, 1)) and ks.dtype == torch.float32
    assert sorted(n for n in tensors if n not in src) == sorted(f"model.layers.{i}.self_attn.{kv}_scale"
                                                               for i in range(5) for kv in "kv")
    from lowbit.eval import folder_size

    assert folder_size(out).quantized_params == 0


def test_quantized_checkpoint_with_fp8_kv_and_eval(stories_dir, tmp_path, calib, wikitext) -> None:
    from lowbit.api import EvalSettings, evaluate
    from lowbit.formats import read_checkpoint, save
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    qm = quantize_model(stories_dir, "rtn", calib=calib, recipe=Recipe(scheme=QuantScheme(8, -1, True)), kv_cache="tensor")
    out = save(qm, stories_dir, tmp_path / "w8kv")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["kv_cache_scheme"] == kv_cache.scheme_args("tensor") and cfg["config_groups"]
    weights, floats, _ = read_checkpoint(out)
    assert len(weights) == 35 and "model.layers.0.self_attn.k_scale" in floats
    settings = EvalSettings(text=wikitext, ctx=64, max_chunks=2)
    res = evaluate(out, ref=stories_dir, settings=settings)
    assert "FP8 E4M3 KV cache (per tensor" in res["numerics"]
    plain = save(quantize_model(stories_dir, "rtn", recipe=Recipe(scheme=QuantScheme(8, -1, True))), stories_dir,
                 tmp_path / "w8")
    res_plain = evaluate(plain, ref=stories_dir, settings=settings)
    assert "KV cache" not in res_plain["numerics"] and res["kl_mean"] != res_plain["kl_mean"]


def test_cli_kv_cache(stories_dir, tmp_path) -> None:
    from lowbit.cli import main

    base = ["quantize", str(stories_dir), "--calib", "pydoc", "--samples", "2", "--seq-len", "32", "--quiet"]
    assert main([*base, "-o", str(tmp_path / "a"), "--kv-cache", "fp8-head", "--keep", ".*"]) == 0
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "dense" and cfg["kv_cache_scheme"]["strategy"] == "attn_head"
    assert main([*base, "-o", str(tmp_path / "b"), "--kv-cache", "fp8", "--format", "gptq", "--group-size", "-1"]) == 1
    assert not (tmp_path / "b").exists()
    assert main([*base, "-o", str(tmp_path / "c.gguf"), "--kv-cache", "fp8", "--to", "Q8_0"]) == 1
