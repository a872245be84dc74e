"""compressed-tensors pack-quantized: round trip, the library's own compress/decompress, transformers load."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lowbit import formats
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError

from formats_util import (
    SRC,
    assert_same_weight,
    make_model,
    needs_model,
    read_tensors,
    rtn_weights,
    source_tensors,
    synthetic_model,
)

ct = pytest.importorskip("compressed_tensors")
pytestmark = [needs_model, pytest.mark.filterwarnings("ignore:compressed-tensors checkpoint that vLLM cannot load")]

SCHEMES = {
    "w4_sym_channel": QuantScheme(4, -1, True),
    "w4_asym_g32": QuantScheme(4, 32, False),
    "w8_sym_channel": QuantScheme(8, -1, True),
    "w8_asym_g32": QuantScheme(8, 32, False),
}


def _weights(scheme: QuantScheme):
    # down_proj has 172 input columns: grouped schemes keep it in float (it lands in "ignore").
    which = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
    return rtn_weights(scheme, which if scheme.group_size > 0 else which + ("down_proj",))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One checkpoint per scheme, written once for the module."""
    root = tmp_path_factory.mktemp("ct")
    out = {}
    for key, scheme in SCHEMES.items():
        weights = _weights(scheme)
        path = formats.save(make_model(weights), SRC, root / key, "compressed-tensors")
        out[key] = (path, weights)
    return out


@pytest.mark.parametrize("key", list(SCHEMES))
def test_round_trip_and_layout(written, key):
    path, weights = written[key]
    scheme = SCHEMES[key]
    assert formats.detect_format(path) == "compressed-tensors"
    back = formats.read(path)
    assert sorted(back) == sorted(weights)
    for name, qw in weights.items():
        assert_same_weight(back[name], qw)

    tensors = read_tensors(path)
    for name, qw in weights.items():
        m = name[: -len(".weight")]
        out_f, in_f = qw.codes.shape
        g = qw.scale.shape[1]
        assert tensors[f"{m}.weight_packed"].dtype == torch.int32
        assert tuple(tensors[f"{m}.weight_packed"].shape) == (out_f, -(-in_f * scheme.bits // 32))
        assert tensors[f"{m}.weight_scale"].dtype == torch.float32  # the model's dtype
        assert tuple(tensors[f"{m}.weight_scale"].shape) == (out_f, g)
        assert tensors[f"{m}.weight_shape"].dtype == torch.int64
        assert tensors[f"{m}.weight_shape"].tolist() == [out_f, in_f]
        assert f"{m}.weight" not in tensors and f"{m}.weight_g_idx" not in tensors
        if scheme.symmetric:
            assert f"{m}.weight_zero_point" not in tensors
        else:
            zp = tensors[f"{m}.weight_zero_point"]
            assert zp.dtype == torch.int32 and tuple(zp.shape) == (-(-out_f * scheme.bits // 32), g)
    # float tensors copied bit-exactly from the source; the tied lm_head stays absent.
    src = source_tensors()
    for name, t in src.items():
        if name not in weights:
            assert torch.equal(tensors[name], t), name
    assert "lm_head.weight" not in tensors

    config = json.loads((path / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed"
    (group,) = q["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized"
    w = group["weights"]
    assert (w["num_bits"], w["symmetric"], w["type"]) == (scheme.bits, scheme.symmetric, "int")
    assert w["strategy"] == ("group" if scheme.group_size > 0 else "channel")
    assert w["group_size"] == (scheme.group_size if scheme.group_size > 0 else None)
    expected_ignore = ["lm_head"] + ([f"model.layers.{i}.mlp.down_proj" for i in range(5)] if scheme.group_size > 0 else [])
    assert q["ignore"] == expected_ignore
    for f in ("tokenizer.json", "tokenizer_config.json", "tok512.model", "generation_config.json"):
        assert (path / f).read_bytes() == (SRC / f).read_bytes()


@pytest.mark.parametrize("key", ["w4_asym_g32", "w8_sym_channel"])
def test_library_compress_and_decompress_agree(written, key):
    """compressed-tensors compresses the same model to byte-identical tensors, and decompresses ours to our values."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoModelForCausalLM

    path, weights = written[key]
    qconfig = QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
    model = AutoModelForCausalLM.from_pretrained(SRC)
    apply_quantization_config(model, qconfig)
    for name, qw in weights.items():
        m = model.get_submodule(name[: -len(".weight")])
        m.weight.data = qw.dequantize()
        m.weight_scale.data = qw.scale.to(m.weight_scale.dtype)
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data = (qw.zero - qw.scheme.mid).to(m.weight_zero_point.dtype)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(model)
    theirs = model.state_dict()
    ours = read_tensors(path)
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: save_pretrained drops it too
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype and t.shape == theirs[name].shape, name
        assert torch.equal(t, theirs[name]), name

    # decompress the library's view of *our* file: equal to our dequantization
    compressor.decompress_model(model)
    back = formats.read(path)
    for name in weights:
        assert torch.equal(model.get_submodule(name[: -len(".weight")]).weight, back[name].dequantize()), name


def test_library_decompressor_on_mixed_schemes(tmp_path):
    """Two config groups (int8 attention, int4 MLP) with regex targets; per-module decompress matches."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    weights = rtn_weights(QuantScheme(8, -1, False), ("q_proj", "k_proj", "v_proj", "o_proj"))
    weights.update(rtn_weights(QuantScheme(4, -1, True), ("gate_proj", "up_proj", "down_proj")))
    path = formats.save(make_model(weights), SRC, tmp_path / "mixed", "compressed-tensors")
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    assert len(q["config_groups"]) == 2 and q["ignore"] == ["lm_head"]
    qconfig = QuantizationConfig.model_validate(q)
    tensors = read_tensors(path)
    back = formats.read(path)
    from compressed_tensors.utils.match import match_name

    for name, qw in weights.items():
        m = name[: -len(".weight")]
        (scheme,) = [s for s in qconfig.config_groups.values() if any(match_name(m, t) for t in s.targets)]
        assert (scheme.weights.num_bits, scheme.weights.symmetric) == (qw.scheme.bits, qw.scheme.symmetric)
        local = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(m + ".weight_")}
        dense = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert torch.equal(dense, qw.dequantize()), name
        assert_same_weight(back[name], qw)


def test_transformers_loads_and_generates_like_lowbit_runtime(written):
    """transformers (via compressed-tensors) and lowbit's QuantLinear give the same greedy text."""
    from transformers import AutoModelForCausalLM

    from lowbit.runtime import load_quantized

    path, _ = written["w4_sym_channel"]
    ours, tok = load_quantized(path)
    ref = AutoModelForCausalLM.from_pretrained(path)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
        a = ours.generate(ids, max_new_tokens=16, do_sample=False)
        b = ref.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(a, b)
    assert tok.decode(a[0]) == tok.decode(b[0])


def test_act_order_writes_g_idx(tmp_path):
    weights = synthetic_model(QuantScheme(4, 32, True), g_idx=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = formats.save(make_model(weights), SRC, tmp_path / "ao", "compressed-tensors")
    assert any("actorder" in str(w.message) for w in caught)
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    (group,) = q["config_groups"].values()
    assert group["weights"]["actorder"] == "group"
    tensors = read_tensors(path)
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    back = formats.read(path)
    for name, qw in weights.items():
        m = name[: -len(".weight")]
        g = tensors[f"{m}.weight_g_idx"]
        assert g.dtype == torch.int32 and torch.equal(g, qw.g_idx)
        # library unpack (signed) + g_idx gather gives our dequantized weight
        signed = unpack_from_int32(tensors[f"{m}.weight_packed"], 4, torch.Size(qw.codes.shape)).float()
        dense = signed * tensors[f"{m}.weight_scale"][:, g.long()]
        assert torch.equal(dense, qw.dequantize())
        assert_same_weight(back[name], qw)


def test_existing_output_is_refused_and_untouched(written):
    path, weights = written["w4_sym_channel"]
    before = sorted(p.name for p in path.iterdir())
    with pytest.raises(LowbitError, match="already exists"):
        formats.save(make_model(weights), SRC, path, "compressed-tensors")
    assert sorted(p.name for p in path.iterdir()) == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_bad_inputs(tmp_path):
    weights = rtn_weights(QuantScheme(4, -1, True), ("q_proj",))
    with pytest.raises(LowbitError, match="unknown format"):
        formats.save(make_model(weights), SRC, tmp_path / "x", "exl2")
    bad = dict(weights)
    name = next(iter(bad))
    bad[name].codes[0, 0] = 99
    with pytest.raises(LowbitError, match="codes outside"):
        formats.save(make_model(bad), SRC, tmp_path / "y", "compressed-tensors")
    with pytest.raises(LowbitError, match="not a quantized checkpoint"):
        formats.read(SRC)
    assert formats.detect_format(SRC) is None
    assert list(tmp_path.iterdir()) == []


def test_quantized_lm_head_and_shards(tmp_path, monkeypatch):
    """A quantized (untied) lm_head and a sharded checkpoint load in transformers and lowbit alike."""
    from transformers import AutoModelForCausalLM

    from lowbit.formats import _common
    from lowbit.methods.rtn import rtn
    from lowbit.runtime import QuantLinear, load_quantized

    weights = rtn_weights(QuantScheme(8, -1, True), ("q_proj",))
    weights["lm_head.weight"] = rtn(source_tensors()["model.embed_tokens.weight"], QuantScheme(8, -1, True))
    monkeypatch.setattr(_common, "MAX_SHARD_BYTES", 64 * 1024)
    path = formats.save(make_model(weights), SRC, tmp_path / "lm", "compressed-tensors")
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "lm_head" not in config["quantization_config"]["ignore"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (path / "model.safetensors").exists()
    back = formats.read(path)
    assert_same_weight(back["lm_head.weight"], weights["lm_head.weight"])
    ours, tok = load_quantized(path)
    assert isinstance(ours.lm_head, QuantLinear)
    ref = AutoModelForCausalLM.from_pretrained(path)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_vllm_shape_warning():
    from lowbit.formats.compressed_tensors import vllm_issues

    weights = rtn_weights(QuantScheme(4, -1, False), ("q_proj", "down_proj", "gate_proj"))
    issues = dict(i.split(": ", 1) for i in vllm_issues(weights))
    assert "in=172" in issues["model.layers.0.mlp.down_proj"]
    assert "out=172" in issues["model.layers.0.mlp.gate_proj"]
    assert "model.layers.0.self_attn.q_proj" not in issues
