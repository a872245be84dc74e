"""The streaming engine on stories260K: same result as the whole model in memory; resume; errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from paths import STORIES
from lowbit.methods import METHODS
from lowbit.core import QuantScheme
from lowbit.errors import LowbitError
from lowbit.pipeline import make_handler, quantize_in_memory, quantize_model
from lowbit.models.calibration import CalibrationConfig, load_calibration


pytestmark = pytest.mark.skipif(not STORIES.exists(), reason="stories260K not available")

CALIB = CalibrationConfig(n_samples=6, seq_len=48, batch_size=3, seed=1)
SCHEME = QuantScheme(4, 4, False)  # 4 divides both 64 and 172


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(str(STORIES))


def _same(a, b) -> None:
    assert a.weights.keys() == b.weights.keys()
    for k in a.weights:
        qa, qb = a.weights[k], b.weights[k]
        assert torch.equal(qa.codes, qb.codes), k
        torch.testing.assert_close(qa.scale, qb.scale, rtol=0, atol=0)
        assert (qa.g_idx is None) == (qb.g_idx is None)
    assert a.float_overrides.keys() == b.float_overrides.keys()
    for k in a.float_overrides:
        torch.testing.assert_close(a.float_overrides[k], b.float_overrides[k], rtol=0, atol=0)


@pytest.mark.parametrize("method,act_order", [("gptq", True), ("awq", False)])
def test_streaming_matches_whole_model(method: str, act_order: bool) -> None:
    streamed = quantize_model(STORIES, method, SCHEME, CALIB, act_order=act_order)
    assert len(streamed.weights) == 5 * 7
    assert "model.embed_tokens.weight" not in streamed.weights and "lm_head.weight" not in streamed.weights
    model, tok = _load()
    data = load_calibration(tok, CALIB, METHODS.get(method).calibration_default)
    ref = quantize_in_memory(model, data, make_handler(method, SCHEME, act_order), batch_size=CALIB.batch_size)
    _same(streamed, ref)


def test_resume_after_interruption(tmp_path: Path) -> None:
    full = quantize_model(STORIES, "gptq", SCHEME, CALIB)
    wd = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        quantize_model(STORIES, "gptq", SCHEME, CALIB, workdir=wd, stop_after=2)
    man = json.loads((wd / "manifest.json").read_text())
    assert man["layers_done"] == 2 and (wd / "layer_001.safetensors").exists()
    resumed = quantize_model(STORIES, "gptq", SCHEME, CALIB, workdir=wd)
    assert resumed.config["lowbit"]["resumed_from_layer"] == 2
    _same(full, resumed)
    # A different request in the same workdir starts over instead of mixing results.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = quantize_model(STORIES, "gptq", QuantScheme(3, 4, False), CALIB, workdir=wd)
    assert other.config["lowbit"]["resumed_from_layer"] == 0


def test_gptq_model_beats_rtn_on_calibration_loss() -> None:
    """End to end: the GPTQ model's next-token loss on held-out text is below RTN's at 3 bits."""
    model, tok = _load()
    scheme = QuantScheme(3, -1, False)
    evalcfg = CalibrationConfig(n_samples=8, seq_len=64, seed=123)
    ids = load_calibration(tok, evalcfg).input_ids

    def loss_with(qm) -> float:
        m, _ = _load()
        sd = m.state_dict()
        for k, qw in qm.weights.items():
            sd[k] = qw.dequantize()
        m.load_state_dict(sd)
        with torch.no_grad():
            return float(m(input_ids=ids, labels=ids).loss)

    g = quantize_model(STORIES, "gptq", scheme, CalibrationConfig(n_samples=16, seq_len=64), act_order=True)
    r = quantize_model(STORIES, "rtn", scheme)
    assert loss_with(g) < loss_with(r)


def test_unknown_architecture_names_it() -> None:
    from transformers import GPT2Config

    from lowbit.models.adapters import get_adapter

    with pytest.raises(LowbitError, match="gpt2"):
        get_adapter(GPT2Config())


def _stories_with(folder: Path, name: str, index: tuple[int, ...], value: float) -> Path:
    """A copy of stories260K in ``folder`` with one weight value changed."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    for f in STORIES.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(STORIES / "model.safetensors"))
    sd[name][index] = value
    save_file(sd, str(folder / "model.safetensors"))
    return folder


def test_nan_weights_name_the_layer(tmp_path: Path) -> None:
    folder = _stories_with(tmp_path / "bad", "model.layers.2.mlp.up_proj.weight", (0, 0), float("nan"))
    with pytest.raises(LowbitError, match="layer 2.*up_proj"):
        quantize_model(folder, "gptq", SCHEME, CALIB)


def test_inf_activations_name_the_layer_and_linear(tmp_path: Path) -> None:
    """A finite norm weight that overflows the MLP's inputs to Inf: GPTQ's Hessian refuses them, naming where."""
    folder = _stories_with(tmp_path / "bad-act", "model.layers.1.post_attention_layernorm.weight", (3,), 3e38)
    with pytest.raises(LowbitError, match=r"layer 1 .*(gate|up)_proj.*non-finite.*layer inputs"):
        quantize_model(folder, "gptq", SCHEME, CALIB)


def _tiny_folder(tmp_path: Path, kind: str) -> Path:
    import shutil

    from transformers import AutoModelForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    cfg = {
        "gemma3": lambda: Gemma3TextConfig(head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"], **common),
        "qwen3": lambda: Qwen3Config(head_dim=8, **common),
        "qwen2": lambda: Qwen2Config(**common),
    }[kind]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    folder = tmp_path / kind
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "tok512.model"):
        if (STORIES / f).exists():
            shutil.copy(STORIES / f, folder / f)
    return folder


@pytest.mark.parametrize("kind", ["gemma3", "qwen3", "qwen2"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_streaming_matches_whole_model_other_families(tmp_path: Path, kind: str, method: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _tiny_folder(tmp_path, kind)
    scheme = QuantScheme(4, 16, True)
    streamed = quantize_model(folder, method, scheme, CALIB)
    assert len(streamed.weights) == 2 * 7
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()
    data = load_calibration(AutoTokenizer.from_pretrained(str(folder)), CALIB, METHODS.get(method).calibration_default)
    ref = quantize_in_memory(model, data, make_handler(method, scheme), batch_size=CALIB.batch_size)
    _same(streamed, ref)


def test_padded_jsonl_calibration_streaming(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    p = tmp_path / "chat.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"Tell me about the cat number {i}." * (1 + i % 4)}]} for i in range(6)]
    p.write_text("\n".join(json.dumps(x) for x in lines))
    calib = CalibrationConfig(path=str(p), n_samples=6, seq_len=40, batch_size=3)
    data = load_calibration(AutoTokenizer.from_pretrained(str(STORIES)), calib, METHODS.get("gptq").calibration_default)
    assert data.attention_mask is not None and int(data.attention_mask.sum()) < 6 * 40
    streamed = quantize_model(STORIES, "gptq", SCHEME, calib)
    model, _ = _load()
    ref = quantize_in_memory(model, data, make_handler("gptq", SCHEME), batch_size=3)
    _same(streamed, ref)


def test_rules_select_schemes_and_float_layers() -> None:
    rules = {r"mlp\.down_proj": None, r"self_attn\.[qk]_proj": QuantScheme(8, -1, True)}
    qm = quantize_model(STORIES, "gptq", SCHEME, CALIB, rules=rules)
    assert not any("down_proj" in k for k in qm.weights)
    assert qm.weights["model.layers.0.self_attn.q_proj.weight"].scheme.bits == 8
    assert qm.weights["model.layers.0.self_attn.v_proj.weight"].scheme == SCHEME


def test_ready_calibration_ids_give_the_same_result_as_the_text_they_came_from() -> None:
    """``quantize_model`` takes CalibrationData (exact token ids) as well as a CalibrationConfig."""
    from transformers import AutoTokenizer

    from lowbit.models.calibration import CalibrationData

    data = load_calibration(AutoTokenizer.from_pretrained(str(STORIES)), CALIB, METHODS.get("gptq").calibration_default)
    from_text = quantize_model(STORIES, "gptq", SCHEME, CALIB)
    from_ids = quantize_model(STORIES, "gptq", SCHEME, CalibrationData(data.input_ids.clone(), None, "ids"))
    assert set(from_text.weights) == set(from_ids.weights)
    for name in from_text.weights:
        assert torch.equal(from_text.weights[name].codes, from_ids.weights[name].codes), name


def test_act_order_modes() -> None:
    from lowbit.methods.gptq import act_order_flags

    assert act_order_flags("static") == (True, True) and act_order_flags("dynamic") == (True, False)
    assert act_order_flags(True) == (True, False) and act_order_flags("off") == (False, False)
    assert make_handler("gptq", SCHEME).static_groups and make_handler("gptq", SCHEME).act_order
    with pytest.raises(LowbitError, match="act-order mode"):
        act_order_flags("sideways")
    with pytest.raises(LowbitError, match="GPTQ only"):
        make_handler("awq", SCHEME, act_order="static")
