"""SmoothQuant: llm-compressor's scale formula, exact folding, auto strength, the composed methods."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lowbit.core import QuantScheme
from lowbit.errors import LowbitError
from lowbit.methods.smoothquant import (
    AUTO_GRID,
    MIN_SCALE,
    SmoothQuantHandler,
    parse_strength,
    smoothing_scales,
)
from lowbit.models import adapters
from lowbit.models.adapters import get_adapter, get_submodule
from lowbit.models.capture import capture_all_layer_args
from lowbit.models.layers import LayerContext, LayerInputs, LayerResult, run_layer

W8 = QuantScheme(8, -1, True)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _tiny(kind: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    cfg = {
        "llama": lambda: LlamaConfig(num_key_value_heads=2, **common),
        "gemma3": lambda: Gemma3TextConfig(num_key_value_heads=4, head_dim=8, sliding_window=8, **common),
    }[kind]()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial norms, and outlier channels in the embeddings
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if kind == "gemma3" else 1.0))
        model.get_input_embeddings().weight[:, :3] *= 20.0
    return model


class _Nothing:
    """An inner handler that leaves the layer as it is (to see the smoothing alone)."""

    propagate = "quantized"
    needs_inputs = False

    def process(self, ctx: LayerContext) -> LayerResult:
        return LayerResult()

    def fingerprint(self) -> dict:
        return {}

    def quantize_linear(self, *a, **k):  # noqa: ANN002, ANN003
        return None


def _ctx(model: torch.nn.Module, n: int = 2, L: int = 16) -> LayerContext:
    adapter = get_adapter(model.config)
    ids = torch.randint(0, model.config.vocab_size, (n, L), generator=torch.Generator().manual_seed(0))
    h, kws = capture_all_layer_args(adapter, model, ids, None)
    layer = get_submodule(model, adapter.layers)[0]
    return LayerContext(0, layer, adapter, model.config, LayerInputs([h], [kws[0]], [None]), torch.device("cpu"))


def test_scales_follow_llm_compressor_formula() -> None:
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w1 = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.5, 1.0, -1.0, 0.0]])
    w2 = torch.tensor([[-3.0, 0.5, 0.25, 0.0]])
    s = smoothing_scales(act, [w1, w2], 0.5)
    wmax = 2.0 * torch.tensor([3.0, 2.0, 1.0, 0.0])
    expect = act.sqrt() / wmax.sqrt()
    expect[3] = 9.0  # a zero weight column: the activation range itself
    expect[2] = MIN_SCALE  # a zero activation range: the minimum scale
    assert torch.equal(s, expect)
    assert torch.allclose(smoothing_scales(act, [w1, w2], 1.0)[:2], act[:2])


@pytest.mark.parametrize("value,expect", [("0.8", 0.8), ("auto", "auto"), (0.5, 0.5)])
def test_parse_strength(value, expect) -> None:
    assert parse_strength(value) == expect


@pytest.mark.parametrize("value", ["1.5", "-0.1", "strong"])
def test_parse_strength_refuses(value) -> None:
    with pytest.raises(LowbitError, match="--smoothing"):
        parse_strength(value)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("strength", [0.5, 0.85])
def test_smoothing_leaves_float_outputs_unchanged(kind: str, strength: float) -> None:
    model = _tiny(kind)
    ctx = _ctx(model)
    with torch.no_grad():
        before = run_layer(ctx.layer, ctx.inputs.hidden[0], ctx.inputs.kwargs[0])
        q_in = []
        hook = get_submodule(ctx.layer, "self_attn.q_proj").register_forward_pre_hook(lambda m, a: q_in.append(a[0]))
        run_layer(ctx.layer, ctx.inputs.hidden[0], ctx.inputs.kwargs[0])
        handler = SmoothQuantHandler(_Nothing(), W8, strength)
        changed, info = handler.smooth(ctx)
        after = run_layer(ctx.layer, ctx.inputs.hidden[0], ctx.inputs.kwargs[0])
        hook.remove()
    norm2 = "pre_feedforward_layernorm" if kind == "gemma3" else "post_attention_layernorm"
    assert changed == {"input_layernorm.weight", f"{norm2}.weight"}
    assert set(info.values()) == {strength}
    rel = (after - before).norm() / before.norm()
    assert rel < 1e-5, float(rel)
    # the linears now read x / s: the outlier channels are flatter
    x0, x1 = q_in[0].reshape(-1, 32), q_in[-1].reshape(-1, 32)
    spread = lambda x: float(x.abs().amax(0).max() / x.abs().amax(0).median())  # noqa: E731
    assert spread(x1) < spread(x0)
    s = handler.scales["model.layers.0.input_layernorm"]
    assert torch.allclose(x1, x0 / s, rtol=1e-4, atol=1e-6)


def test_auto_picks_the_smallest_layer_error() -> None:
    from lowbit.models.statistics import ChannelRange, observe

    model = _tiny("llama")
    ctx = _ctx(model)
    w_before = {n: get_submodule(ctx.layer, n).weight.clone() for n in ("self_attn.q_proj", "self_attn.v_proj")}
    handler = SmoothQuantHandler(_Nothing(), QuantScheme(4, -1, True), "auto", search_batches=None)
    sg = ctx.adapter.smooth_groups_for(ctx.layer)[0]
    with torch.no_grad():
        rng = observe(ctx, [sg.linears[0]], lambda c, d: ChannelRange(c, d))[sg.linears[0]]
        act = rng.max - rng.min  # type: ignore[attr-defined]
        errors = handler.errors(ctx, sg, act)
        chosen = handler._choose(ctx, sg, act)
    assert set(errors) == set(AUTO_GRID) and all(e > 0 for e in errors.values())
    assert errors[chosen] == min(errors.values()) and errors[chosen] <= errors[0.5]
    assert len(set(errors.values())) > 1  # the strength matters on outlier channels
    for n, w in w_before.items():  # the search leaves the weights as they were
        assert torch.equal(get_submodule(ctx.layer, n).weight, w)


def test_moe_families_smooth_attention_only() -> None:
    for a in (adapters.QWEN2_MOE, adapters.MIXTRAL):
        assert [sg.prev for sg in a.smooth_groups] == ["input_layernorm"]
    assert [sg.prev for sg in adapters.GEMMA3.smooth_groups] == ["input_layernorm", "pre_feedforward_layernorm"]


def test_pipeline_writes_smoothed_norms(stories_dir, tmp_path) -> None:
    from lowbit.formats import read_checkpoint, save
    from lowbit.models.calibration import CalibrationConfig
    from lowbit.pipeline import quantize_model

    calib = CalibrationConfig(path="pydoc", n_samples=4, seq_len=32)
    qm = quantize_model(stories_dir, "smoothquant+rtn", W8, calib=calib, smoothing=0.5)
    names = sorted(qm.float_overrides)
    assert "model.layers.0.input_layernorm.weight" in names and "model.layers.4.post_attention_layernorm.weight" in names
    assert qm.config["lowbit"]["layers"]["0"]["smoothquant"]["input_layernorm->q_proj,k_proj,v_proj"] == 0.5
    out = save(qm, stories_dir, tmp_path / "sq")
    _, floats, _ = read_checkpoint(out)
    assert torch.equal(floats["model.layers.0.input_layernorm.weight"], qm.float_overrides["model.layers.0.input_layernorm.weight"])
    from lowbit.models.checkpoint import Checkpoint

    src = Checkpoint(stories_dir).get("model.layers.0.input_layernorm.weight")
    assert not torch.equal(src, floats["model.layers.0.input_layernorm.weight"])


def test_architecture_without_mappings_refused_before_calibration(stories_dir, monkeypatch) -> None:
    from lowbit.pipeline import quantize_model

    monkeypatch.setitem(adapters.ADAPTERS, "llama", replace(adapters.LLAMA, smooth_groups=()))

    def no_calibration(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("calibration started")

    monkeypatch.setattr("lowbit.pipeline.load_calibration", no_calibration)
    with pytest.raises(LowbitError, match="no SmoothQuant mappings"):
        quantize_model(stories_dir, "smoothquant+gptq", W8)


def test_cli_smoothing_flag(stories_dir, tmp_path) -> None:
    from lowbit.cli import main

    assert main(["quantize", str(stories_dir), "-o", str(tmp_path / "x"), "--method", "rtn",
                 "--smoothing", "0.5", "--quiet"]) == 1
    assert main(["quantize", str(stories_dir), "-o", str(tmp_path / "y"), "--method", "smoothquant+rtn",
                 "--bits", "8", "--group-size", "-1", "--smoothing", "auto", "--calib", "pydoc",
                 "--samples", "4", "--seq-len", "32", "--quiet"]) == 0
    assert (tmp_path / "y" / "config.json").exists()
