"""Bounded memory: finished layers live on disk, checkpoints are written shard by shard."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowbit import formats
from lowbit.core import QuantScheme
from lowbit.pipeline import quantize_model
from lowbit.core.quantized import QuantizedModel, QuantizedWeight
from lowbit.models.store import StoredTensors, StoredWeights
from lowbit.models.calibration import CalibrationConfig

CALIB = CalibrationConfig(n_samples=6, seq_len=48, batch_size=3, seed=1)
ATTN_ONLY = {r"\.mlp\.": None}  # 172-wide MLP rows fit neither the GPTQ nor the AWQ packing


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _live_weights() -> int:
    gc.collect()
    return sum(type(o) is QuantizedWeight for o in gc.get_objects())


def test_results_live_on_disk_not_in_memory(stories_dir: Path) -> None:
    before = _live_weights()
    qm = quantize_model(stories_dir, "awq", QuantScheme(4, 4, False), CALIB)
    assert _live_weights() == before  # no layer's QuantizedWeight (codes) is held after the run
    assert isinstance(qm.weights, StoredWeights) and isinstance(qm.float_overrides, StoredTensors)
    assert len(qm.weights) == 5 * 7 and len(qm.float_overrides) > 0
    folder = qm.weights._keep_alive.path  # type: ignore[attr-defined]
    assert sorted(p.name for p in folder.glob("layer_*.safetensors")) == [f"layer_{i:03d}.safetensors" for i in range(5)]
    with safe_open(str(folder / "layer_000.safetensors"), framework="pt") as f:
        assert f.get_tensor("q::self_attn.q_proj::codes").dtype == torch.uint8  # compact on disk
    qw = qm.weights["model.layers.3.mlp.down_proj.weight"]
    assert qw.codes.dtype == torch.int32 and qw.codes.shape == (64, 172)
    assert int(qw.codes.max()) <= 15
    del qm, qw
    gc.collect()
    assert not folder.exists()  # the temporary folder goes with the result


def test_rtn_results_live_on_disk(stories_dir: Path, tmp_path: Path) -> None:
    from lowbit.api import quantize_model
    from lowbit.methods.rtn import rtn
    from lowbit.models import Checkpoint
    from lowbit.recipe import Recipe

    qm = quantize_model(stories_dir, "rtn", Recipe(scheme=QuantScheme(4, 4, True)))
    assert isinstance(qm.weights, StoredWeights)
    name = "model.layers.1.self_attn.k_proj.weight"
    ref = rtn(Checkpoint(stories_dir).get(name).float(), QuantScheme(4, 4, True))
    assert torch.equal(qm.weights[name].codes, ref.codes) and torch.equal(qm.weights[name].scale, ref.scale)


def _dequantized(path: Path) -> dict[str, torch.Tensor]:
    weights, floats, _ = formats.read_checkpoint(path)
    return {**{k: qw.dequantize() for k, qw in weights.items()}, **floats}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt,method,scheme", [
    ("compressed-tensors", "gptq", QuantScheme(4, 4, True)),
    ("gptq", "gptq", QuantScheme(4, 4, True)),
    ("awq", "awq", QuantScheme(4, 4, False)),
])
def test_sharded_checkpoint_reads_back_like_one_file(stories_dir: Path, tmp_path: Path, fmt: str, method: str,
                                                      scheme: QuantScheme) -> None:
    from lowbit.runtime import load_quantized

    qm = quantize_model(stories_dir, method, scheme, CALIB, rules=ATTN_ONLY)
    one = formats.save(qm, stories_dir, tmp_path / "one", fmt)
    sharded = formats.save(qm, stories_dir, tmp_path / "sharded", fmt, max_shard_bytes=64 * 1024)
    assert (one / "model.safetensors").exists() and not (one / "model.safetensors.index.json").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(sharded)) == sorted(files + [p.name for p in one.iterdir() if p.name != "model.safetensors"]
                                                 + ["model.safetensors.index.json"])
    total = 0
    for f in files:
        with safe_open(str(sharded / f), framework="pt") as h:
            total += sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys())
    assert index["metadata"]["total_size"] == total == (one / "model.safetensors").stat().st_size - _header_bytes(one)
    a, b = _dequantized(one), _dequantized(sharded)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.tensor([[1, 400, 50, 7, 300]])
    with torch.no_grad():
        la = load_quantized(one)[0](ids).logits
        lb = load_quantized(sharded)[0](ids).logits
    assert torch.equal(la, lb)
    if fmt == "compressed-tensors":  # the format transformers loads here (see test_formats_compressed_tensors)
        from transformers import AutoModelForCausalLM

        with torch.no_grad():
            ref = AutoModelForCausalLM.from_pretrained(sharded)(ids).logits
        assert torch.allclose(ref, la, atol=1e-5, rtol=0)


def _header_bytes(folder: Path) -> int:
    raw = (folder / "model.safetensors").read_bytes()[:8]
    return 8 + int.from_bytes(raw, "little")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_same_bytes_whatever_the_storage(stories_dir: Path, tmp_path: Path) -> None:
    """A result read lazily from disk writes the same checkpoint bytes as the same result held in memory."""
    qm = quantize_model(stories_dir, "awq", QuantScheme(4, 4, False), CALIB, rules=ATTN_ONLY)
    in_memory = QuantizedModel(dict(qm.weights), dict(qm.float_overrides), qm.config, qm.method)
    a = formats.save(qm, stories_dir, tmp_path / "lazy", "awq", max_shard_bytes=32 * 1024)
    b = formats.save(in_memory, stories_dir, tmp_path / "dict", "awq", max_shard_bytes=32 * 1024)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
