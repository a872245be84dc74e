"""GPTQ v1 checkpoints: layout vs an independent re-implementation of the published unpack, configs, rules."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lowbit import formats
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats import gptq

from formats_util import SRC, assert_same_weight, make_model, needs_model, read_tensors, rtn_weights, synthetic, synthetic_model

pytestmark = needs_model


def reference_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[in, out]`` and zeros ``[G, out]`` the way AutoGPTQ / vLLM's torch path reads v1 files.

    Written from the published algorithm: per-word right shifts by multiples of ``bits``
    (2/4/8), or for 3 bits the 3-word / 32-value pattern whose values 10 and 21 straddle
    words; then the stored zero point plus one.
    """
    mask = (1 << bits) - 1
    if bits in (2, 4, 8):
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32)
        w = (qweight[:, None, :] >> shifts[None, :, None]) & mask  # [in/per, per, out]
        w = w.reshape(-1, qweight.shape[1])
        z = (qzeros[:, :, None] >> shifts[None, None, :]) & mask  # [G, out/per, per]
        z = z.reshape(qzeros.shape[0], -1)
        return w, z + 1
    assert bits == 3

    def three(words: torch.Tensor) -> torch.Tensor:
        # words [..., 3] -> 32 values [..., 32]
        w0, w1, w2 = (words[..., i].to(torch.int64) & 0xFFFFFFFF for i in range(3))
        vals = []
        for j in range(10):
            vals.append((w0 >> (3 * j)) & 7)
        vals.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
        for j in range(10):
            vals.append((w1 >> (1 + 3 * j)) & 7)
        vals.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
        for j in range(10):
            vals.append((w2 >> (2 + 3 * j)) & 7)
        return torch.stack(vals, dim=-1)

    n_in_words, out_f = qweight.shape
    w = three(qweight.reshape(n_in_words // 3, 3, out_f).permute(0, 2, 1))  # [in/32, out, 32]
    w = w.permute(0, 2, 1).reshape(-1, out_f)
    g, zw = qzeros.shape
    z = three(qzeros.reshape(g, zw // 3, 3)).reshape(g, -1)
    return w, z + 1


@pytest.mark.parametrize(
    "scheme, act_order",
    [
        (QuantScheme(4, 32, True), False),
        (QuantScheme(4, 32, True), True),
        (QuantScheme(4, -1, False), False),
        (QuantScheme(3, -1, True), False),
        (QuantScheme(3, 32, False), True),
        (QuantScheme(2, 32, False), False),
        (QuantScheme(8, 32, True), True),
        (QuantScheme(8, -1, False), False),
    ],
    ids=lambda v: v.describe().replace(" ", "_") if isinstance(v, QuantScheme) else ("actorder" if v else "static"),
)
def test_round_trip_and_reference_unpack(tmp_path, scheme, act_order):
    weights = synthetic_model(scheme, seed=scheme.bits, g_idx=act_order, min_zero=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stories260K is too small for marlin
        path = formats.save(make_model(weights), SRC, tmp_path / "gptq", "gptq")
    assert formats.detect_format(path) == "gptq"
    back = formats.read(path)
    tensors = read_tensors(path)
    for name, qw in weights.items():
        assert_same_weight(back[name], qw, scale_dtype=torch.float16)
        m = name[: -len(".weight")]
        out_f, in_f = qw.codes.shape
        n_groups = qw.scale.shape[1]
        qweight, qzeros = tensors[f"{m}.qweight"], tensors[f"{m}.qzeros"]
        scales, g_idx = tensors[f"{m}.scales"], tensors[f"{m}.g_idx"]
        assert qweight.dtype == torch.int32 and tuple(qweight.shape) == (in_f * scheme.bits // 32, out_f)
        assert qzeros.dtype == torch.int32 and tuple(qzeros.shape) == (n_groups, out_f * scheme.bits // 32)
        assert scales.dtype == torch.float16 and tuple(scales.shape) == (n_groups, out_f)
        assert g_idx.dtype == torch.int32 and tuple(g_idx.shape) == (in_f,)
        expected_gidx = qw.g_idx if qw.g_idx is not None else (
            torch.arange(in_f) // scheme.group_size if scheme.group_size > 0 else torch.zeros(in_f)
        )
        assert torch.equal(g_idx.long(), expected_gidx.long())
        codes, zeros = reference_unpack(qweight, qzeros, scheme.bits)
        assert torch.equal(codes.t().long(), qw.codes.long())
        assert torch.equal(zeros.t().float(), qw.zero)
        # dequantize as the reference does: scales[g_idx] * (w - zeros[g_idx]) in [in, out]
        gi = g_idx.long()
        dense = scales.float()[gi] * (codes.float() - zeros.float()[gi])
        ours = back[name].dequantize()
        assert torch.equal(dense.t(), ours)


def test_hand_computed_words(tmp_path):
    """codes[o, i] = i % 8 at 4 bits packs every qweight word to 0x76543210; symmetric zeros to 0x77777777."""
    scheme = QuantScheme(4, 32, True)
    weights = {}
    for name, qw in synthetic_model(scheme).items():
        qw.codes = (torch.arange(qw.codes.shape[1]) % 8).expand_as(qw.codes).to(torch.int32).contiguous()
        weights[name] = qw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = formats.save(make_model(weights), SRC, tmp_path / "g", "gptq")
    t = read_tensors(path)
    qweight = t["model.layers.0.self_attn.q_proj.qweight"]
    assert bool((qweight == 0x76543210).all())
    assert bool((t["model.layers.0.self_attn.q_proj.qzeros"] == 0x77777777).all())


def test_configs(tmp_path):
    scheme = QuantScheme(4, 32, True)
    weights = synthetic_model(scheme, g_idx=True)
    weights.update(synthetic_model(QuantScheme(8, 32, True), which=("o_proj",), seed=5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = formats.save(make_model(weights), SRC, tmp_path / "g", "gptq")
    assert any("gptq_marlin" in str(w.message) for w in caught)
    config = json.loads((path / "config.json").read_text())
    q = config["quantization_config"]
    assert json.loads((path / "quantize_config.json").read_text()) == q
    assert q["quant_method"] == "gptq" and q["checkpoint_format"] == "gptq"
    assert (q["bits"], q["group_size"], q["sym"], q["desc_act"], q["lm_head"]) == (4, 32, True, True, False)
    dyn = q["dynamic"]
    assert dyn[r"+:^model\.layers\.0\.self_attn\.o_proj$"] == {"bits": 8, "desc_act": False}
    assert dyn[r"-:^model\.layers\.3\.mlp\.down_proj$"] == {}
    assert dyn[r"-:^model\.layers\.3\.mlp\.gate_up_proj$"] == {}  # vLLM's fused gate/up layer
    assert r"+:^model\.layers\.3\.self_attn\.qkv_proj$" not in dyn  # q/k/v share the base scheme
    assert q["modules_in_block_to_quantize"] == [["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]]
    back = formats.read(path)
    assert back["model.layers.2.self_attn.o_proj.weight"].scheme == QuantScheme(8, 32, True)
    assert back["model.layers.2.self_attn.q_proj.weight"].g_idx is not None
    assert back["model.layers.2.self_attn.o_proj.weight"].g_idx is None


def test_marlin_eligibility():
    ok = {"a.weight": synthetic(128, 256, QuantScheme(4, 128, True), 0)}
    assert gptq.marlin_issues(ok) == []
    ok_ao = {"a.weight": synthetic(64, 128, QuantScheme(8, 32, True), 0, g_idx=True)}
    assert gptq.marlin_issues(ok_ao) == []
    bad = {
        "asym.weight": synthetic(128, 256, QuantScheme(4, 128, False), 0),
        "bits.weight": synthetic(128, 256, QuantScheme(3, 128, True), 0),
        "group.weight": synthetic(128, 256, QuantScheme(4, 256, True), 0),
        "shape.weight": synthetic(96, 192, QuantScheme(4, 64, True), 0),
    }
    issues = dict(i.split(": ", 1) for i in gptq.marlin_issues(bad))
    assert "asymmetric" in issues["asym"]
    assert "3-bit" in issues["bits"]
    assert "group size 256" in issues["group"]
    assert "out=96" in issues["shape"] and "in=192" in issues["shape"]


def test_rejections_leave_nothing(tmp_path):
    zero0 = synthetic_model(QuantScheme(4, 32, False), min_zero=0, seed=3)
    name = next(iter(zero0))
    zero0[name].zero[0, 0] = 0
    with pytest.raises(LowbitError, match="zero point"):
        formats.save(make_model(zero0), SRC, tmp_path / "a", "gptq")
    gate = rtn_weights(QuantScheme(4, -1, True), ("gate_proj",))  # 172 outputs: not whole int32 words
    with pytest.raises(LowbitError, match="out\\*bits divisible by 32"):
        formats.save(make_model(gate), SRC, tmp_path / "b", "gptq")
    down = rtn_weights(QuantScheme(4, -1, True), ("down_proj",))  # 172 inputs
    with pytest.raises(LowbitError, match="in\\*bits divisible by 32"):
        formats.save(make_model(down), SRC, tmp_path / "c", "gptq")
    assert list(tmp_path.iterdir()) == []


def test_per_tensor_is_stored_per_channel(tmp_path):
    weights = synthetic_model(QuantScheme(4, 0, True), which=("q_proj",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = formats.save(make_model(weights), SRC, tmp_path / "t", "gptq")
    back = formats.read(path)
    for name, qw in weights.items():
        assert back[name].scheme == QuantScheme(4, -1, True)
        qw.scale = qw.scale.half().float()  # GPTQ stores float16 scales
        assert torch.equal(back[name].dequantize(), qw.dequantize())


def test_shared_g_idx_tensor(tmp_path):
    """GPTQ shares one act-order permutation among q/k/v: tensors sharing storage must still save."""
    weights = synthetic_model(QuantScheme(4, 32, True), g_idx=True, which=("q_proj", "k_proj"))
    shared = next(iter(weights.values())).g_idx
    for qw in weights.values():
        qw.g_idx = shared
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fmt in ("gptq", "compressed-tensors"):
            path = formats.save(make_model(weights), SRC, tmp_path / fmt, fmt)
            for name, qw in formats.read(path).items():
                assert torch.equal(qw.g_idx, shared)


def test_dynamic_override_names_vllm_fused_layer(tmp_path):
    weights = synthetic_model(QuantScheme(4, 32, True))
    for p in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{p}.weight"
        qw = weights[name]
        weights[name] = synthetic(qw.codes.shape[0], qw.codes.shape[1], QuantScheme(8, 32, True), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = formats.save(make_model(weights), SRC, tmp_path / "g", "gptq")
    dyn = json.loads((path / "config.json").read_text())["quantization_config"]["dynamic"]
    assert dyn[r"+:^model\.layers\.0\.self_attn\.qkv_proj$"] == {"bits": 8}
    assert dyn[r"+:^model\.layers\.0\.self_attn\.q_proj$"] == {"bits": 8}
    assert formats.read(path)["model.layers.0.self_attn.k_proj.weight"].scheme.bits == 8
