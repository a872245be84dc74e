"""lowbit eval runs a checkpoint's declared activation quantization (W8A8, FP8) and FP8 KV cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.core import QuantScheme
from lowbit.errors import LowbitError
from lowbit.eval.numerics import input_schemes, kv_scales
from lowbit.runtime.activations import fake_quantize_input


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 4)


INT8_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
FP8_STATIC = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}


def test_targets_and_ignore() -> None:
    net = _Net()
    qcfg = {"config_groups": {"group_0": {"targets": ["Linear"], "input_activations": INT8_TOKEN}}, "ignore": ["lm_head"]}
    schemes = input_schemes(net, qcfg)
    assert sorted(schemes) == ["a", "b"] and schemes["a"].granularity == "token" and schemes["a"].dynamic
    qcfg = {"config_groups": {"group_0": {"targets": ["re:^b$"], "input_activations": FP8_STATIC},
                              "group_1": {"targets": ["re:^a$"], "input_activations": None}}}
    schemes = input_schemes(net, qcfg)
    assert list(schemes) == ["b"] and schemes["b"].type == "float" and not schemes["b"].dynamic


def test_unsupported_activation_scheme_is_one_line_error() -> None:
    bad = {"config_groups": {"g": {"targets": ["Linear"], "input_activations": {**INT8_TOKEN, "strategy": "channel"}}}}
    with pytest.raises(LowbitError, match="config.json"):
        input_schemes(_Net(), bad)


def test_kv_scales_checked() -> None:
    t = {"model.layers.0.self_attn.k_scale": torch.tensor([0.1]), "model.layers.0.self_attn.v_scale": torch.tensor([0.2])}
    kv = {"kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}}
    assert list(kv_scales(t.get, list(t), kv)) == [0]
    assert kv_scales(t.get, list(t), {}) == {}
    with pytest.raises(LowbitError, match="static symmetric FP8"):
        kv_scales(t.get, list(t), {"kv_cache_scheme": {**kv["kv_cache_scheme"], "num_bits": 4}})
    with pytest.raises(LowbitError, match="without the other"):
        kv_scales(t.get, ["model.layers.0.self_attn.k_scale"], kv)
    with pytest.raises(LowbitError, match="finite and positive"):
        zero = {**t, "model.layers.0.self_attn.k_scale": torch.tensor([0.0])}
        kv_scales(zero.get, list(zero), kv)


@pytest.mark.parametrize("preset", ["W8A8", "FP8_DYNAMIC", "FP8"])
def test_eval_applies_declared_activations(stories_dir, wikitext, tmp_path, preset) -> None:
    """The evaluated logits are those of the dequantized model with each linear's input fake-quantized."""
    import lowbit.api as lb
    from lowbit.core.presets import preset as get_preset
    from lowbit.eval.numerics import apply
    from lowbit.models import load
    from lowbit.recipe import Recipe

    p = get_preset(preset)
    scheme = getattr(p, "scheme", None)
    if scheme is None or scheme.activations is None:
        pytest.skip(f"{preset}: no activation scheme in this build")
    out = lb.quantize(stories_dir, tmp_path / preset, recipe=Recipe(scheme=scheme, group_fallback=True),
                      calib="pydoc", samples=4, seq_len=32)  # static scales (FP8) from a little calibration
    loaded = load(out)
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        weights_only = loaded.model(ids).logits
        words = apply(loaded.model, out)
        applied = loaded.model(ids).logits
        # by hand: one linear's input fake-quantized is what its hook passes on
        lin = loaded.model.model.layers[2].mlp.down_proj
        seen = []
        h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        lin_in = []
        h2 = lin.register_forward_hook(lambda m, a, o: lin_in.append(a[0]))
        loaded.model(ids)
        h.remove()
        h2.remove()
    assert f"input activations {scheme.activations.describe()} on 35 linears" == words
    assert not torch.equal(applied, weights_only)
    from lowbit.models.checkpoint import Checkpoint

    scale = None if scheme.activations.dynamic else Checkpoint(out).get("model.layers.2.mlp.down_proj.input_scale").float()
    assert torch.equal(lin_in[0], fake_quantize_input(seen[0], scheme.activations, scale))
    res = lb.evaluate(out, ref=stories_dir, settings=lb.EvalSettings(text=wikitext, ctx=64, max_chunks=2))
    assert words in res["numerics"] and res["kl_mean"] > 0


def test_weight_only_checkpoint_numerics_unchanged(stories_dir, tmp_path) -> None:
    import lowbit.api as lb
    from lowbit.eval.numerics import apply
    from lowbit.models import load
    from lowbit.recipe import Recipe

    out = lb.quantize(stories_dir, tmp_path / "w4", recipe=Recipe(scheme=QuantScheme(4, 32, True), group_fallback=True))
    assert apply(load(out).model, out) == ""
