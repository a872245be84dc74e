"""The streaming engine on a tiny random qwen2_moe: per-expert Hessians, RTN fallback, coverage."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from paths import STORIES
from lowbit.methods import METHODS
from lowbit.core import QuantScheme
from lowbit.pipeline import make_handler, quantize_in_memory, quantize_model
from lowbit.models.calibration import CalibrationConfig, load_calibration


pytestmark = pytest.mark.skipif(not STORIES.exists(), reason="stories260K tokenizer not available")
SCHEME = QuantScheme(4, 16, False)
CALIB = CalibrationConfig(n_samples=4, seq_len=32, batch_size=2, seed=0)
N_EXPERTS = 8


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module", params=["qwen2_moe", "mixtral"])
def moe_dir(tmp_path_factory, request) -> Path:
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    if request.param == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            vocab_size=512, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts=N_EXPERTS, num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False,
        )
    else:
        cfg = MixtralConfig(
            vocab_size=512, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=N_EXPERTS, num_experts_per_tok=2, max_position_embeddings=128,
        )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "tok512.model"):
        if (STORIES / f).exists():
            shutil.copy(STORIES / f, d / f)
    return d


def test_moe_streaming_matches_in_memory(moe_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        streamed = quantize_model(moe_dir, "gptq", SCHEME, CALIB, min_expert_tokens=1)
    names = streamed.weights.keys()
    from safetensors import safe_open

    with safe_open(str(moe_dir / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    mixtral = "mixtral" in moe_dir.name
    block, projs = ("block_sparse_moe", ("w1", "w3", "w2")) if mixtral else ("mlp", ("gate_proj", "up_proj", "down_proj"))
    for e in range(N_EXPERTS):
        for p in projs:
            assert f"model.layers.1.{block}.experts.{e}.{p}.weight" in names
    assert names <= on_disk  # the checkpoint's own names
    if not mixtral:
        assert "model.layers.0.mlp.shared_expert.down_proj.weight" in names
    assert f"model.layers.0.{block}.gate.weight" not in names  # the router stays float
    info = streamed.config["lowbit"]["layers"]["0"]
    assert set(info["expert_tokens"]) >= {f"mlp.experts.{e}.{projs[0]}" for e in range(N_EXPERTS)}
    assert sum(info["expert_tokens"][f"mlp.experts.{e}.{projs[0]}"] for e in range(N_EXPERTS)) == 4 * 32 * 2
    model = AutoModelForCausalLM.from_pretrained(str(moe_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
    data = load_calibration(AutoTokenizer.from_pretrained(str(moe_dir)), CALIB, METHODS.get("gptq").calibration_default)
    ref = quantize_in_memory(model, data, make_handler("gptq", SCHEME, min_expert_tokens=1), batch_size=CALIB.batch_size)
    assert ref.weights.keys() == streamed.weights.keys()
    for k in names:
        assert torch.equal(ref.weights[k].codes, streamed.weights[k].codes), k


def test_rare_experts_fall_back_to_rtn(moe_dir: Path) -> None:
    with pytest.warns(UserWarning, match="RTN"):
        qm = quantize_model(moe_dir, "gptq", SCHEME, CALIB, min_expert_tokens=10_000)
    info = qm.config["lowbit"]["layers"]["1"]
    assert info["expert_coverage"] == 0.0 and len(info["rtn_fallback"]) == 3 * N_EXPERTS
    from lowbit.methods.rtn import rtn
    from lowbit.models import Checkpoint

    ck = Checkpoint(moe_dir)
    name = [k for k in qm.weights if "layers.1." in k and ".experts.3." in k and k.endswith(("down_proj.weight", "w2.weight"))][0]
    assert torch.equal(qm.weights[name].codes, rtn(ck.get(name), SCHEME).codes)


def test_moe_awq_runs_and_folds_router(moe_dir: Path) -> None:
    qm = quantize_model(moe_dir, "awq", SCHEME, CALIB)
    block = "block_sparse_moe" if "mixtral" in moe_dir.name else "mlp"
    assert f"model.layers.0.{block}.gate.weight" in qm.float_overrides  # router columns follow the scale
    assert "model.layers.0.post_attention_layernorm.weight" in qm.float_overrides
    assert len([k for k in qm.weights if ".experts." in k]) == 2 * 3 * N_EXPERTS


def test_moe_folding_is_exact(moe_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from lowbit.methods.awq import fold_scales
    from lowbit.models.adapters import get_adapter, get_submodule
    from lowbit.models.capture import capture_all_layer_args
    from lowbit.models.layers import run_layer

    model = AutoModelForCausalLM.from_pretrained(str(moe_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
    adapter = get_adapter(model.config)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    h, kws = capture_all_layer_args(adapter, model, ids, None)
    layer = get_submodule(model, adapter.layers)[0]
    with torch.no_grad():
        before = run_layer(layer, h, kws[0])
        groups = adapter.scale_groups_for(layer, model.config)
        assert any("mlp.gate" in sg.followers for sg in groups)
        assert any(sg.inspect == "mlp" for sg in groups)
        for sg in groups:
            n_in = get_submodule(layer, sg.prev).weight.shape[0]
            fold_scales(adapter, layer, sg, torch.rand(n_in, generator=torch.Generator().manual_seed(2)) + 0.5)
        after = run_layer(layer, h, kws[0])
    assert float((after - before).norm() / before.norm()) < 1e-5
