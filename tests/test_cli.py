"""The command line: results, one-line errors, exit codes, no partial outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lowbit.cli import EXIT_INPUT, EXIT_OK, EXIT_USAGE, main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["--quiet", *argv])
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code)
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial" in p.name]


def test_quantize_inspect_eval_round_trip(capsys, stories_dir: Path, wikitext: Path, tmp_path: Path) -> None:
    out = tmp_path / "q4"
    code, stdout, err = run(capsys, "quantize", str(stories_dir), "--bits", "4", "--group-size", "32",
                            "--override", "down_proj=group:-1", "-o", str(out), "--json")
    assert code == EXIT_OK, err
    res = json.loads(stdout)
    assert res["format"] == "compressed-tensors" and 4.0 < res["size"]["bpw_quantized"] < 6.5
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"

    code, stdout, _ = run(capsys, "inspect", str(out), "--json")
    info = json.loads(stdout)
    assert code == EXIT_OK and info["format"] == "compressed-tensors" and info["architecture"] == "llama"

    code, stdout, err = run(capsys, "eval", str(out), "--ref", str(stories_dir), "--text", str(wikitext),
                            "--ctx", "128", "--chunks", "2", "--json")
    assert code == EXIT_OK, err
    ev = json.loads(stdout)
    assert 0 < ev["kl_mean"] < 1.0 and 0.5 < ev["top1_agreement"] <= 1.0 and ev["ppl"] > 1


def test_quantized_output_matches_in_memory_rtn(capsys, stories_dir: Path, tmp_path: Path) -> None:
    """Loading our file back gives exactly the weights RTN chose."""
    from lowbit.core import QuantScheme
    from lowbit.methods.rtn import rtn
    from lowbit.models import Checkpoint, load

    out = tmp_path / "q8"
    assert run(capsys, "quantize", str(stories_dir), "--bits", "8", "--group-size", "-1", "--asym", "-o", str(out))[0] == 0
    back = load(out).model.state_dict()
    ckpt = Checkpoint(stories_dir)
    name = "model.layers.2.self_attn.q_proj.weight"
    expected = rtn(ckpt.get(name), QuantScheme(8, -1, False)).dequantize()
    assert torch.allclose(back[name], expected, atol=1e-6)
    assert torch.equal(back["model.embed_tokens.weight"], ckpt.get("model.embed_tokens.weight"))


def test_deterministic_bytes(capsys, stories_dir: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert run(capsys, "quantize", str(stories_dir), "--bits", "4", "--group-size", "-1", "--mse-clip",
                   "-o", str(tmp_path / name))[0] == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_group_that_does_not_divide(capsys, stories_dir: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, "quantize", str(stories_dir), "--group-size", "32", "-o", str(tmp_path / "x"))
    assert code == EXIT_INPUT
    assert "down_proj" in err and "172" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and leftovers(tmp_path) == []


def test_missing_model(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert code == EXIT_INPUT and "no such file" in err and str(tmp_path / "nope") in err


def test_not_a_gguf(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    code, _, err = run(capsys, "inspect", str(bad))
    assert code == EXIT_INPUT and "model.gguf" in err


def test_corrupt_safetensors(capsys, stories_dir: Path, tmp_path: Path) -> None:
    m = tmp_path / "m"
    shutil.copytree(stories_dir, m)
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[:-1000])
    code, _, err = run(capsys, "quantize", str(m), "--group-size", "-1", "-o", str(tmp_path / "o"))
    assert code == EXIT_INPUT and "model.safetensors" in err and ("truncated" in err or "corrupt" in err)
    assert not (tmp_path / "o").exists()


def test_nan_weights(capsys, stories_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    m = tmp_path / "m"
    shutil.copytree(stories_dir, m)
    t = load_file(str(m / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("inf")
    save_file(t, str(m / "model.safetensors"))
    code, _, err = run(capsys, "quantize", str(m), "--group-size", "-1", "-o", str(tmp_path / "o"))
    assert code == EXIT_INPUT and "q_proj.weight has NaN or Inf" in err
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_existing_output_is_kept(capsys, stories_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "quantize", str(stories_dir), "--group-size", "-1", "-o", str(out))
    assert code == EXIT_INPUT and "already exists" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_unwritable_output(capsys, stories_dir: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, "quantize", str(stories_dir), "--group-size", "-1", "-o", str(tmp_path / "no" / "such" / "dir"))
    assert code == EXIT_INPUT and "does not exist" in err


def test_bad_bits_and_usage(capsys, stories_dir: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, "quantize", str(stories_dir), "--bits", "9", "-o", str(tmp_path / "o"))
    assert code == EXIT_INPUT and "bits" in err
    code, _, _ = run(capsys, "quantize", str(stories_dir))  # no -o
    assert code == EXIT_USAGE


def test_bad_override(capsys, stories_dir: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, "quantize", str(stories_dir), "--override", "down_proj=bits:x", "-o", str(tmp_path / "o"))
    assert code == EXIT_INPUT and "override" in err


def test_keep_and_override_rules(capsys, stories_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    code, _, err = run(capsys, "quantize", str(stories_dir), "--group-size", "-1", "--keep", r"layers\.0\.",
                       "--override", "down_proj=bits:8", "-o", str(out))
    assert code == EXIT_OK, err
    from lowbit.formats import read

    weights = read(out)
    assert not any(".layers.0." in n for n in weights)
    assert weights["model.layers.1.mlp.down_proj.weight"].scheme.bits == 8
    assert weights["model.layers.1.mlp.up_proj.weight"].scheme.bits == 4


def test_group_fallback_per_channel(capsys, stories_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fb"
    code, _, err = run(capsys, "quantize", str(stories_dir), "--group-size", "32", "--group-fallback", "-o", str(out))
    assert code == EXIT_OK, err
    from lowbit.formats import read

    weights = read(out)
    assert weights["model.layers.0.mlp.down_proj.weight"].scheme.group_size == -1
    assert weights["model.layers.0.mlp.up_proj.weight"].scheme.group_size == 32


def test_demo_on_a_small_model(stories_dir: Path, wikitext: Path, tmp_path: Path) -> None:
    from lowbit.api import EvalSettings, demo, format_table
    from lowbit.eval.report import plot_demo

    res = demo(str(stories_dir), EvalSettings(text=wikitext, ctx=64, max_chunks=2))
    rows = {r["setting"]: r for r in res["rows"]}
    assert rows["float32 (reference)"]["kl_mean"] == 0.0
    assert rows["int8 g64 sym"]["kl_mean"] < rows["int4 g64 sym"]["kl_mean"]
    assert rows["int8 g64 sym"]["bytes"] > rows["int4 g64 sym"]["bytes"]
    assert "int4 per-channel sym" in format_table(res["rows"])
    png = plot_demo(res, tmp_path / "demo.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hub_source_offline_is_a_clear_error(monkeypatch) -> None:
    from lowbit.errors import LowbitError
    from lowbit.models import resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LowbitError, match="hf:someone/some-model"):
        resolve("hf:someone/some-model")
    with pytest.raises(LowbitError, match="ORG/NAME"):
        resolve("hf:nonsense")


def test_gptq_into_gguf_from_the_cli(capsys, stories_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gptq.gguf"
    code, stdout, err = run(capsys, "quantize", str(stories_dir), "--method", "gptq", "--bits", "4", "--group-size", "32",
                            "--group-fallback", "--samples", "4", "--seq-len", "64", "--format", "gguf", "--to", "Q4_0",
                            "-o", str(out), "--json", "--quiet")
    assert code == EXIT_OK, err
    code, stdout, _ = run(capsys, "inspect", str(out), "--json")
    info = json.loads(stdout)
    assert info["file_type"] == "Q4_0" and info["per_type"]["Q4_0"]["n_tensors"] > 20
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False)
    text = llm("Once upon a time", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert len(text.split()) >= 3
