"""Model sources: HF folders, GGUF files, demo names; lazy checkpoints; refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models import Checkpoint, load, resolve
from lowbit.models.gguf_source import unpermute_rotary


def test_hf_folder_matches_transformers(stories_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    ours = load(stories_dir)
    theirs = AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32).eval()
    ids = ours.tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.inference_mode():
        a = ours.model(ids).logits
        b = theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    out = ours.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Lily" in ours.tokenizer.decode(out[0]) or out.shape[1] == ids.shape[1] + 8


def test_checkpoint_is_lazy_and_complete(stories_dir: Path) -> None:
    ckpt = Checkpoint(stories_dir)
    assert "model.layers.0.mlp.down_proj.weight" in ckpt
    assert ckpt.shape("model.layers.0.mlp.down_proj.weight") == (64, 172)
    t = ckpt.get("model.embed_tokens.weight")
    assert t.shape == (512, 64)


def test_sharded_safetensors(stories_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    ckpt = Checkpoint(stories_dir)
    names = sorted(ckpt.keys())
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, part in shards.items():
        save_file({n: ckpt.get(n).contiguous() for n in part}, str(tmp_path / fname))
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for f in stories_dir.iterdir():
        if f.suffix in (".json", ".model") and f.name != "model.safetensors.index.json":
            shutil.copy(f, tmp_path / f.name)
    a, b = load(stories_dir), load(tmp_path)
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.inference_mode():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)


def test_pytorch_bin_loaded_safely(stories_dir: Path, tmp_path: Path) -> None:
    ckpt = Checkpoint(stories_dir)
    torch.save({n: ckpt.get(n) for n in ckpt.keys()}, tmp_path / "pytorch_model.bin")
    shutil.copy(stories_dir / "config.json", tmp_path / "config.json")
    assert set(Checkpoint(tmp_path).keys()) == set(ckpt.keys())


class Evil:
    def __reduce__(self):  # executed by a plain unpickler
        return (print, ("pwned",))


def test_pickle_needing_code_is_refused(tmp_path: Path) -> None:
    torch.save({"w": Evil()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(LowbitError, match="refused"):
        Checkpoint(tmp_path)


def test_truncated_safetensors(stories_dir: Path, tmp_path: Path) -> None:
    data = (stories_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copy(stories_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(LowbitError, match="truncated|corrupt"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(LowbitError, match="header length"):
        Checkpoint(tmp_path)


def test_missing_path_and_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="no such file"):
        resolve(tmp_path / "nope")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(LowbitError, match="GGUF"):
        resolve(junk)
    with pytest.raises(LowbitError, match="config.json"):
        resolve(tmp_path)


def test_unknown_architecture(stories_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(stories_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match="unsupported architecture 'gpt_neox'"):
        load(tmp_path / "m")


def test_nan_weights_refused(stories_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    ckpt = Checkpoint(stories_dir)
    tensors = {n: ckpt.get(n).clone() for n in ckpt.keys()}
    tensors["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")
    (tmp_path / "m").mkdir()
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories_dir / f, tmp_path / "m" / f)
    with pytest.raises(LowbitError, match="up_proj.weight has NaN"):
        load(tmp_path / "m")


def test_unpermute_inverts_llamacpp_permutation() -> None:
    n_head, head_dim, cols = 3, 8, 5
    w = torch.randn(n_head * head_dim, cols)
    # llama.cpp's converter: rows of each head reordered from (2, half) to (half, 2)
    permuted = w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(unpermute_rotary(permuted, n_head), w)


@pytest.mark.slow
def test_smollm2_gguf_loads_and_generates(smollm2_gguf: Path) -> None:
    m = load(smollm2_gguf)
    assert m.config.model_type == "llama" and m.config.num_hidden_layers == 30
    ids = m.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = m.model.generate(ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in m.tokenizer.decode(out[0])


@pytest.mark.slow
def test_gemma3_gguf_loads_and_generates(gemma3_gguf: Path) -> None:
    m = load(gemma3_gguf)
    assert m.config.model_type == "gemma3_text"
    ids = m.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = m.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "France" in m.tokenizer.decode(out[0][ids.shape[1]:]) or "Paris" in m.tokenizer.decode(out[0])
