"""AWQ: folding is exact, the searched scales beat RTN on the block objective."""

from __future__ import annotations

import pytest
import torch

from lowbit.core import QuantScheme
from lowbit.methods.awq import AWQHandler, candidate_scales, fold_scales, search_clip_for_output
from lowbit.methods.rtn import RTNHandler
from lowbit.models.adapters import get_adapter, get_submodule
from lowbit.models.capture import capture_all_layer_args
from lowbit.models.layers import LayerContext, LayerInputs, run_layer


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _tiny(kind: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    cfg = {
        "llama_mha": lambda: LlamaConfig(num_key_value_heads=4, **common),
        "llama_gqa": lambda: LlamaConfig(num_key_value_heads=2, **common),
        "qwen2": lambda: Qwen2Config(num_key_value_heads=4, **common),
        "qwen3": lambda: Qwen3Config(num_key_value_heads=4, head_dim=8, **common),
        "gemma3": lambda: Gemma3TextConfig(num_key_value_heads=4, head_dim=8, sliding_window=8, **common),
    }[kind]()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases so folding is really exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if "gemma" in kind else 1.0))
    return model


def _layer_inputs(model: torch.nn.Module, n: int = 2, L: int = 16) -> tuple[torch.nn.Module, LayerInputs]:
    adapter = get_adapter(model.config)
    ids = torch.randint(0, model.config.vocab_size, (n, L), generator=torch.Generator().manual_seed(0))
    h, kws = capture_all_layer_args(adapter, model, ids, None)
    return get_submodule(model, adapter.layers)[0], LayerInputs([h], [kws[0]], [None])


@pytest.mark.parametrize("kind", ["llama_mha", "llama_gqa", "qwen2", "qwen3", "gemma3"])
def test_folding_leaves_float_outputs_unchanged(kind: str) -> None:
    model = _tiny(kind)
    adapter = get_adapter(model.config)
    layer, inp = _layer_inputs(model)
    with torch.no_grad():
        before = run_layer(layer, inp.hidden[0], inp.kwargs[0])
        groups = adapter.scale_groups_for(layer, model.config)
        kinds = {sg.prev_kind for sg in groups}
        assert ("norm_plus_one" in kinds) == (kind == "gemma3")
        assert any(sg.prev == "self_attn.v_proj" for sg in groups) == (kind != "llama_gqa")
        g = torch.Generator().manual_seed(1)
        for sg in groups:
            n_in = get_submodule(layer, sg.linears[0]).weight.shape[1]
            fold_scales(adapter, layer, sg, torch.rand(n_in, generator=g) * 3 + 0.2)
        after = run_layer(layer, inp.hidden[0], inp.kwargs[0])
    rel = (after - before).norm() / before.norm()
    assert rel < 1e-5, float(rel)


def test_candidate_scales_normalised() -> None:
    x = torch.rand(64) + 0.01
    w = torch.rand(64) + 0.01
    for a in (0.0, 0.35, 0.95):
        for wm in (None, w):
            s = candidate_scales(x, wm, a)
            assert torch.isclose(s.max() * s.min(), torch.tensor(1.0), rtol=1e-4)
    assert torch.allclose(candidate_scales(x, None, 0.0), torch.ones(64))


def test_clip_search_reduces_output_error() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    w[:, 5] *= 8  # an outlier column
    x = torch.randn(256, 64, generator=g)
    scheme = QuantScheme(3, 16, False)
    from lowbit.methods.awq import fake_quant

    clip = search_clip_for_output(w, x, scheme)
    assert clip.shape == (32, 4) and float(clip.min()) >= 0.5 and float(clip.max()) <= 1.0
    err = lambda q: float(((x @ (w - q).t()) ** 2).sum())  # noqa: E731
    assert err(fake_quant(w, scheme, clip)) <= err(fake_quant(w, scheme))


@pytest.mark.parametrize("kind", ["llama_mha", "gemma3"])
@pytest.mark.parametrize("bits", [3, 4])
def test_awq_objective_below_rtn(kind: str, bits: int) -> None:
    model = _tiny(kind)
    adapter = get_adapter(model.config)
    layer, inp = _layer_inputs(model, n=4, L=32)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    scheme = QuantScheme(bits, 8, False)
    with torch.no_grad():
        ref = run_layer(layer, inp.hidden[0], inp.kwargs[0])
        res = AWQHandler(scheme).process(LayerContext(0, layer, adapter, model.config, inp, torch.device("cpu")))
        awq_out = run_layer(layer, inp.hidden[0], inp.kwargs[0])
        layer.load_state_dict(state)
        RTNHandler(scheme).process(LayerContext(0, layer, adapter, model.config, inp, torch.device("cpu")))
        rtn_out = run_layer(layer, inp.hidden[0], inp.kwargs[0])
    for info in res.info["awq"].values():
        assert info["awq_loss"] <= info["rtn_loss"]
    assert any(info["awq_loss"] < info["rtn_loss"] for info in res.info["awq"].values())
    assert float((awq_out - ref).pow(2).sum()) < float((rtn_out - ref).pow(2).sum())
    assert all(k.endswith(("norm.weight", "bias")) for k in res.float_overrides)
    assert len(res.weights) == 7
