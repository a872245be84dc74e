"""AWQ GEMM checkpoints: layout vs an independent re-implementation of AutoAWQ's unpack, config, rules."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lowbit import formats
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats import awq
from lowbit.core.quantized import QuantizedWeight

from formats_util import SRC, assert_same_weight, make_model, needs_model, read_tensors, rtn_weights, synthetic, synthetic_model

pytestmark = needs_model


def reference_unpack(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[in, out]`` and zeros ``[G, out]`` as AutoAWQ's GEMM unpack reads them.

    Shift each word right by 0, 4, ..., 28, flatten, then undo the [0,2,4,6,1,3,5,7]
    interleave by gathering each block of eight with the reverse order [0,4,1,5,2,6,3,7].
    """
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)

    def unpack(x: torch.Tensor) -> torch.Tensor:
        vals = ((x[:, :, None] >> shifts[None, None, :]) & 0xF).reshape(x.shape[0], -1)
        reverse = torch.arange(vals.shape[1]).reshape(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
        return vals[:, reverse]

    return unpack(qweight), unpack(qzeros)


@pytest.mark.parametrize("group_size", [32, 64])
def test_round_trip_and_reference_unpack(tmp_path, group_size):
    scheme = QuantScheme(4, group_size, False)
    weights = rtn_weights(scheme, ("q_proj", "k_proj", "v_proj", "o_proj"))  # MLP: 172 channels, not 8k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = formats.save(make_model(weights), SRC, tmp_path / "awq", "awq")
    assert formats.detect_format(path) == "awq"
    back = formats.read(path)
    tensors = read_tensors(path)
    for name, qw in weights.items():
        assert_same_weight(back[name], qw, scale_dtype=torch.float16)
        m = name[: -len(".weight")]
        out_f, in_f = qw.codes.shape
        qweight, qzeros, scales = tensors[f"{m}.qweight"], tensors[f"{m}.qzeros"], tensors[f"{m}.scales"]
        assert qweight.dtype == torch.int32 and tuple(qweight.shape) == (in_f, out_f // 8)
        assert qzeros.dtype == torch.int32 and tuple(qzeros.shape) == (in_f // group_size, out_f // 8)
        assert scales.dtype == torch.float16 and tuple(scales.shape) == (in_f // group_size, out_f)
        codes, zeros = reference_unpack(qweight, qzeros)
        assert torch.equal(codes.t().long(), qw.codes.long())
        assert torch.equal(zeros.t().float(), qw.zero)
        dense = (codes.float() - zeros.float().repeat_interleave(group_size, 0)) * scales.float().repeat_interleave(group_size, 0)
        assert torch.equal(dense.t(), back[name].dequantize())
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    assert q == {
        "bits": 4,
        "group_size": group_size,
        # float MLPs, plus vLLM's fused name for the gate/up pair
        "modules_to_not_convert": [f"model.layers.{i}.mlp.{p}" for i in range(5)
                                   for p in ("down_proj", "gate_proj", "gate_up_proj", "up_proj")],
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
    }


def test_hand_computed_interleave(tmp_path):
    """codes[o, i] = o % 8 packs every qweight word to 0x75316420 (nibble k holds channel ORDER[k])."""
    weights = {}
    for name, qw in synthetic_model(QuantScheme(4, 32, False)).items():
        qw.codes = (torch.arange(qw.codes.shape[0]) % 8)[:, None].expand_as(qw.codes).to(torch.int32).contiguous()
        weights[name] = qw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = formats.save(make_model(weights), SRC, tmp_path / "a", "awq")
    t = read_tensors(path)
    assert bool((t["model.layers.0.self_attn.k_proj.qweight"] == 0x75316420).all())


def test_rules(tmp_path):
    attn = ("q_proj",)
    with pytest.raises(LowbitError, match="asymmetric"):
        formats.save(make_model(rtn_weights(QuantScheme(4, 32, True), attn)), SRC, tmp_path / "sym", "awq")
    with pytest.raises(LowbitError, match="4-bit"):
        formats.save(make_model(rtn_weights(QuantScheme(8, 32, False), attn)), SRC, tmp_path / "b8", "awq")
    with pytest.raises(LowbitError, match="grouped"):
        formats.save(make_model(rtn_weights(QuantScheme(4, -1, False), attn)), SRC, tmp_path / "ch", "awq")
    # a group size that does not divide the row (hand-built: the core refuses to make one)
    bad = synthetic(64, 64, QuantScheme(4, 32, False), 0)
    odd = {"model.layers.0.self_attn.q_proj.weight": QuantizedWeight(bad.codes, bad.scale[:, :1], bad.zero[:, :1], QuantScheme(4, 48, False))}
    with pytest.raises(LowbitError, match="does not divide"):
        formats.save(make_model(odd), SRC, tmp_path / "g48", "awq")
    ao = synthetic_model(QuantScheme(4, 32, False), g_idx=True, which=attn)
    with pytest.raises(LowbitError, match="act-order"):
        formats.save(make_model(ao), SRC, tmp_path / "ao", "awq")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_overwrite(tmp_path):
    weights = rtn_weights(QuantScheme(4, 32, False), ("q_proj",))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LowbitError, match="already exists"):
        formats.save(make_model(weights), SRC, out, "awq")
    assert (out / "keep.txt").read_text() == "mine"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        formats.save(make_model(weights), SRC, out, "awq", overwrite=True)
    assert not (out / "keep.txt").exists() and formats.detect_format(out) == "awq"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_deterministic_bytes(tmp_path):
    weights = rtn_weights(QuantScheme(4, 32, False), ("q_proj", "k_proj"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = formats.save(make_model(weights), SRC, tmp_path / "a", "awq")
        b = formats.save(make_model(dict(reversed(list(weights.items())))), SRC, tmp_path / "b", "awq")
    for f in ("model.safetensors", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes()


def test_marlin_eligibility():
    assert awq.marlin_issues({"a.weight": synthetic(128, 256, QuantScheme(4, 128, False), 0)}) == []
    issues = awq.marlin_issues({"a.weight": synthetic(96, 192, QuantScheme(4, 64, False), 0)})
    assert len(issues) == 1 and "out=96" in issues[0] and "in=192" in issues[0]
