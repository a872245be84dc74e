"""The torchao checkpoint format (formats/torchao.py): what transformers + torchao write, byte for byte.

Goldens: tests/data/torchao/{int8_weight_only,int8_dynamic,int4_weight_only,float8_weight_only}.safetensors,
made by tests/reference/make_torchao_goldens.py in a venv with torchao 0.18.0 + transformers 5.25.0 +
torch 2.13.0 CPU: stories260K (float32) quantized with ``TorchAoConfig`` and saved by ``save_pretrained``;
layer 1's flattened tensors, their safetensors metadata entries, the quantization_config and the logits
of ids 1..32 (first 8 positions) are kept. lowbit's encoding of the same codes and scales equals every tensor (dtype, shape,
bytes) and every metadata string. lowbit's own RTN gives torchao's scales exactly and codes within one
step (torchao rounds ``w * (1 / s)``, lowbit ``w / s``). The live test loads a lowbit-written checkpoint
with transformers + torchao when torchao is importable and compares logits with lowbit's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from paths import STORIES
from safetensors import safe_open

from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats import FORMATS, detect_format, read_checkpoint
from lowbit.formats import torchao as ta
from lowbit.methods.rtn import rtn

DATA = Path(__file__).parent / "data" / "torchao"
needs_model = pytest.mark.skipif(not (STORIES / "config.json").exists(), reason="stories260K not available")
SCHEMES = {
    "int8_weight_only": QuantScheme(8, -1, True),
    "int8_dynamic": QuantScheme(8, -1, True, activations=QuantScheme(8, 0, True, strategy="token", dynamic=True)),
    "int4_weight_only": QuantScheme(4, 32, True),
    "float8_weight_only": QuantScheme(8, -1, True, type="float", float_format="e4m3"),
}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _golden(kind: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    with safe_open(str(DATA / f"{kind}.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, json.loads(f.metadata()["entries"]), json.loads(f.metadata()["quantization_config"])


@pytest.mark.parametrize("kind", sorted(SCHEMES))
def test_encoding_equals_transformers_save(kind):
    tensors, entries, qconfig = _golden(kind)
    names = [n for n in tensors if n != "logits"]
    weights, used = ta.decode(tensors.__getitem__, names, {"quantization_config": qconfig})
    assert len(weights) == 6 and all(qw.scheme == SCHEMES[kind] for qw in weights.values())
    for name, qw in weights.items():
        k, parts = ta.encode_weight(name, qw, torch.float32)
        module = name[: -len(".weight")]
        for p, t in parts.items():
            ref = tensors[f"{module}._weight_{p}"]
            assert t.dtype == ref.dtype and t.shape == ref.shape and torch.equal(_bytes(t), _bytes(ref)), (name, p)
        assert ta.tensor_entry(k, qw, torch.float32) == entries[name]
        assert ta.quant_type(k, qw.scheme) == qconfig["quant_type"]["default"]
    assert {n for n in names if "._weight_" in n} == used


@needs_model
@pytest.mark.parametrize("kind", ["int8_weight_only", "int4_weight_only", "float8_weight_only"])
def test_rtn_beside_torchao(kind):
    tensors, _, qconfig = _golden(kind)
    weights, _ = ta.decode(tensors.__getitem__, [n for n in tensors if n != "logits"], {"quantization_config": qconfig})
    with safe_open(str(STORIES / "model.safetensors"), "pt") as f:
        for name, theirs in weights.items():
            ours = rtn(f.get_tensor(name), SCHEMES[kind])
            assert torch.equal(ours.scale.float(), theirs.scale.float()), name
            if kind.startswith("float8"):
                assert torch.equal(ours.codes.float(), theirs.codes.float()), name
            else:
                assert int((ours.codes.long() - theirs.codes.long()).abs().max()) <= 1, name


@needs_model
def test_checkpoint_round_trip(tmp_path):
    from lowbit import api
    from lowbit.recipe import Recipe

    out = api.quantize(STORIES, tmp_path / "ao", method="rtn", format="torchao",
                       recipe=Recipe(scheme=QuantScheme(4, 32, True), overrides=((r"down_proj", None),)))
    assert detect_format(out) == "torchao"
    _, _, golden_config = _golden("int4_weight_only")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_type"] == golden_config["quant_type"]
    assert [m for m in config["modules_to_not_convert"] if m != "lm_head"] == \
        [m for m in golden_config["modules_to_not_convert"] if m != "lm_head"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        stored = set(f.keys())
    names = json.loads(meta["tensor_names"])  # what torchao's is_metadata_torchao asks of a file
    assert all(json.loads(meta[n])["_type"] in ("Tensor", "IntxUnpackedToInt8Tensor") for n in names)
    assert {n for n in stored if "._weight_" not in n} | {n for n in names if json.loads(meta[n])["_type"] != "Tensor"} \
        == set(names)
    weights, _, _ = read_checkpoint(out)
    with safe_open(str(STORIES / "model.safetensors"), "pt") as f:
        name = "model.layers.2.self_attn.v_proj.weight"
        expect = rtn(f.get_tensor(name), QuantScheme(4, 32, True))
    assert torch.equal(weights[name].codes, expect.codes.to(torch.int32))
    assert torch.equal(weights[name].dequantize(), expect.dequantize())


def test_holds_rules():
    f = FORMATS.get("torchao")
    for s in SCHEMES.values():
        assert f.holds(s) is None
    assert f.holds(QuantScheme(3, 64, False)) is None
    assert f.holds(QuantScheme(8, 0, True)) is not None  # per tensor
    assert f.holds(QuantScheme(8, 0, True, type="float")) is not None  # FP8 per tensor
    assert "one kind" in f.plan_issue({"a.weight": QuantScheme(8, -1, True), "b.weight": QuantScheme(4, 32, True)})


def test_bad_input_is_one_line():
    from lowbit.methods.hqq import hqq

    qw = hqq(torch.randn(8, 64), QuantScheme(4, 64, False))  # float zero points
    with pytest.raises(LowbitError, match="zero points are integers"):
        ta.encode_weight("m.weight", qw, torch.float32)
    with pytest.raises(LowbitError, match="not supported") as e:
        ta.decode({}.__getitem__, [], {"quantization_config": {"quant_method": "torchao", "quant_type": {
            "default": {"_type": "Int4WeightOnlyConfig", "_data": {}}}}})
    assert str(e.value).startswith("config.json:") and "\n" not in str(e.value)


def _lowbit_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    weights, floats, _ = read_checkpoint(folder)
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32)
    model.load_state_dict({**floats, **{n: qw.dequantize() for n, qw in weights.items()}}, strict=False)
    with torch.no_grad():
        return model(ids).logits[0].float()


@needs_model
@pytest.mark.parametrize("kind", sorted(SCHEMES))
def test_golden_logits_from_lowbit_decoding(tmp_path, kind):
    """transformers + torchao's logits (golden) beside lowbit's reading of the same codes (float32)."""
    from lowbit import api
    from lowbit.recipe import Recipe

    tensors, _, _ = _golden(kind)
    ids = torch.arange(1, 33)[None]

    out = api.quantize(STORIES, tmp_path / kind, method="rtn", format="torchao",
                       recipe=Recipe(scheme=SCHEMES[kind], overrides=((r"down_proj", None),)))
    ref = tensors["logits"]
    logits = _lowbit_logits(out, ids)[: ref.shape[0]]
    # RTN codes may sit one step from torchao's: logits agree loosely; the live test checks our file exactly
    assert (logits - ref).abs().max() < 0.2 * ref.abs().max()


@needs_model
@pytest.mark.parametrize("kind", sorted(SCHEMES))
def test_live_transformers_loads_our_file(tmp_path, kind):
    pytest.importorskip("torchao")
    from transformers import AutoModelForCausalLM

    from lowbit import api
    from lowbit.recipe import Recipe

    out = api.quantize(STORIES, tmp_path / kind, method="rtn", format="torchao",
                       recipe=Recipe(scheme=SCHEMES[kind], overrides=((r"down_proj", None),)))
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        a = theirs(ids).logits[0].float()
    b = _lowbit_logits(out, ids)
    print(f"torchao live {kind}: max |logit difference| {float((a - b).abs().max()):.3g}")
    tol = 0.05 if kind == "int8_dynamic" else 1e-4  # the dynamic kind also quantizes activations
    assert torch.allclose(a, b, atol=tol * float(b.abs().max()), rtol=0)
