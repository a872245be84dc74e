"""The streaming engine on stories260K: same result as the whole model in memory; resume; errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from lowbit.core import QuantScheme
from lowbit.errors import LowbitError
from lowbit.methods.api import make_handler, quantize_in_memory, quantize_model
from lowbit.models.calibration import CalibrationConfig, load_calibration

STORIES = Path("/work/shared/models/stories260K")
pytestmark = pytest.mark.skipif(not STORIES.exists(), reason="stories260K not available")

CALIB = CalibrationConfig(n_samples=6, seq_len=48, batch_size=3, seed=1)
SCHEME = QuantScheme(4, 4, False)  # 4 divides both 64 and 172


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend on a shared machine
    yield
    torch.set_num_threads(n)


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
    data = load_calibration(tok, CALIB, method)
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


def test_nan_weights_name_the_layer(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bad"
    folder.mkdir()
    for f in STORIES.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(STORIES / "model.safetensors"))
    sd["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(LowbitError, match="layer 2.*up_proj"):
        quantize_model(folder, "gptq", SCHEME, CALIB)
