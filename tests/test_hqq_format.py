"""The hqq checkpoint format (formats/hqq.py): what transformers 4.57 + hqq 0.2.8 write, byte for byte.

Goldens: tests/data/hqq/transformers_b{2,3,4,8}.safetensors, made by
``tests/reference/make_hqq_goldens.py --transformers`` in the hqq venv (transformers 4.57.6, hqq 0.2.8,
torch 2.13.0 CPU): stories260K quantized by ``HqqConfig(nbits, group_size=64, skip_modules=["lm_head",
"down_proj"])`` in float32 and saved with ``save_pretrained``; layer 1's tensors are kept, with the
``quantization_config`` and (4 bits) transformers' logits of ids 1..32 (first 8 positions). lowbit's encoding of the same
weights must equal every tensor (dtype, shape, bytes). The live test loads a lowbit-written checkpoint
with transformers + hqq when both are importable (transformers < 5) and compares logits with lowbit's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from paths import STORIES
from safetensors import safe_open

from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats import FORMATS, detect_format, read_checkpoint
from lowbit.formats import hqq as fmt
from lowbit.methods.hqq import hqq

DATA = Path(__file__).parent / "data" / "hqq"
needs_model = pytest.mark.skipif(not (STORIES / "config.json").exists(), reason="stories260K not available")


def _source(name: str) -> torch.Tensor:
    with safe_open(str(STORIES / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


def _lowbit_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of stories260K with the checkpoint's weights as lowbit decodes them (reference dequantization)."""
    from transformers import AutoModelForCausalLM

    weights, floats, _ = read_checkpoint(folder)
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32)
    state = {**floats, **{n: qw.dequantize() for n, qw in weights.items()}}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing)
    with torch.no_grad():
        return model(ids).logits[0].float()


@needs_model
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_encoding_equals_transformers_save(bits):
    with safe_open(str(DATA / f"transformers_b{bits}.safetensors"), "pt") as f:
        golden = {k: f.get_tensor(k) for k in f.keys() if k != "logits"}
        qconfig = json.loads(f.metadata()["quantization_config"])
    modules = sorted({k.rsplit(".", 1)[0] for k in golden if k.endswith(".W_q")})
    assert len(modules) == 6  # q, k, v, o, gate, up (down_proj skipped)
    scheme = QuantScheme(bits, 64, False)
    for m in modules:
        ours = fmt.encode_weight(f"{m}.weight", hqq(_source(f"{m}.weight"), scheme), torch.float32)
        expect = {k[len(m) + 1:]: v for k, v in golden.items() if k.startswith(m + ".")}
        assert set(ours) == set(expect), m
        for k, v in expect.items():
            assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and torch.equal(ours[k], v), (m, k)
    assert qconfig["quant_config"]["weight_quant_params"] == fmt.weight_quant_params(scheme)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_pack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    n = 40 if bits in (1, 2, 4) else 37  # 3 bits: rows padded to a multiple of 10
    rows = torch.randint(0, 1 << bits, (n, 64), generator=g, dtype=torch.int32)
    packing = fmt.PACKING[bits]
    packed = fmt.pack(rows, packing)
    assert packed.dtype == (torch.int32 if bits == 3 else torch.uint8)
    assert packed.shape[0] == {1: 5, 2: 10, 3: 4, 4: 20}.get(bits, n)
    assert torch.equal(fmt.unpack(packed, packing, n), rows)


@needs_model
def test_checkpoint_round_trip_and_logits(tmp_path):
    """lowbit quantize --method hqq --format hqq: read back exactly; logits beside transformers'."""
    from lowbit import api
    from lowbit.recipe import Recipe

    scheme = QuantScheme(4, 64, False)
    out = api.quantize(STORIES, tmp_path / "hqq", method="hqq", format="hqq",
                       recipe=Recipe(scheme=scheme, overrides=((r"down_proj", None),)))
    assert detect_format(out) == "hqq"
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    with safe_open(str(DATA / "transformers_b4.safetensors"), "pt") as f:
        assert config == json.loads(f.metadata()["quantization_config"])  # skip_modules ["lm_head", "down_proj"]
    weights, floats, _ = read_checkpoint(out)
    name = "model.layers.3.mlp.up_proj.weight"
    expect = hqq(_source(name), scheme)
    assert torch.equal(weights[name].codes, expect.codes) and torch.equal(weights[name].zero, expect.zero)
    assert torch.equal(weights[name].scale, expect.scale)
    assert "model.layers.3.mlp.down_proj.weight" in floats
    with safe_open(str(DATA / "transformers_b4.safetensors"), "pt") as f:
        ref = f.get_tensor("logits")
    logits = _lowbit_logits(out, torch.arange(1, 33)[None])[: ref.shape[0]]
    assert torch.allclose(logits, ref, atol=1e-4, rtol=0), float((logits - ref).abs().max())


def test_vllm_warning_and_partial_skips():
    enc = fmt.Encoder(["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj", "model.layers.0.mlp.down_proj"],
                      torch.float32)
    enc.add("model.layers.0.mlp.up_proj.weight", hqq(torch.randn(8, 64), QuantScheme(3, 64, False)))
    with pytest.warns(UserWarning, match="vLLM") as w:
        config = enc.config()
    assert "3-bit g64" in str(w[0].message) and "model.layers.1.mlp.up_proj" in str(w[0].message)
    assert config["skip_modules"] == ["lm_head", "down_proj", "model.layers.1.mlp.up_proj"]


def test_holds_rules():
    f = FORMATS.get("hqq")
    assert f.holds(QuantScheme(4, 64, False)) is None and f.holds(QuantScheme(3, -1, False)) is None
    assert "7" in f.holds(QuantScheme(7, 64, False))
    assert "asymmetric" in f.holds(QuantScheme(4, 64, True))
    assert "lm_head" in f.holds_tensor("lm_head.weight", QuantScheme(4, 64, False), (512, 64))
    assert "multiple of 2" in f.holds_tensor("a.weight", QuantScheme(4, 64, False), (3, 64))
    assert f.holds_tensor("a.weight", QuantScheme(3, 64, False), (3, 64)) is None


def test_bad_checkpoint_is_one_line():
    qw = hqq(torch.randn(8, 64), QuantScheme(4, 64, False))
    tensors = {f"m.{k}": v for k, v in fmt.encode_weight("m.weight", qw, torch.float32).items()}
    names = list(tensors)
    weights, used = fmt.decode(tensors.__getitem__, names, {})
    assert torch.equal(weights["m.weight"].codes, qw.codes) and used == set(names)
    for key, value, message in (("m.axis", torch.tensor(0, dtype=torch.int32), "axis 0"),
                                ("m.shape", torch.tensor([8, 48]), "does not divide"),
                                ("m.packing", fmt._text("2bit_u8"), "packing")):
        bad = {**tensors, key: value}
        with pytest.raises(LowbitError, match=message) as e:
            fmt.decode(bad.__getitem__, names, {})
        assert str(e.value).startswith("m:") and "\n" not in str(e.value)
    with pytest.raises(LowbitError, match="codes outside"):
        fmt.encode_weight("m.weight", QuantizedWeight(qw.codes + 16, qw.scale, qw.zero, qw.scheme), torch.float32)


@needs_model
def test_live_transformers_loads_our_file(tmp_path):
    pytest.importorskip("hqq")
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("transformers 5.x loads HQQ checkpoints with random weights (not supported)")
    from transformers import AutoModelForCausalLM

    from lowbit import api
    from lowbit.recipe import Recipe

    for bits in (4, 3):
        out = api.quantize(STORIES, tmp_path / f"b{bits}", method="hqq", format="hqq",
                           recipe=Recipe(scheme=QuantScheme(bits, 64, False), overrides=((r"down_proj", None),)))
        theirs = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", dtype=torch.float32)
        assert type(theirs.model.layers[0].self_attn.q_proj).__name__ == "HQQLinear"
        ids = torch.arange(1, 33)[None]
        with torch.no_grad():
            a = theirs(ids).logits[0].float()
        b = _lowbit_logits(out, ids)
        print(f"transformers {transformers.__version__} + hqq: {bits}-bit g64 max |logit difference| {float((a - b).abs().max()):.3g}")
        assert torch.allclose(a, b, atol=1e-4, rtol=0), float((a - b).abs().max())
