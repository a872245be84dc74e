"""The bnb method and the bitsandbytes format against what transformers + bitsandbytes 0.50 write and compute.

Goldens (tests/data/bnb/checkpoints.json, logits.safetensors) were made by
``tests/reference/make_bnb_goldens.py``: stories260K quantized on load by transformers 5.25 with
bitsandbytes 0.50.0 on CPU (NF4 + double quantization, FP4, 8-bit), saved with ``save_pretrained``
(every tensor's dtype, shape and sha256 recorded) and run on a fixed token sequence (logits).
lowbit's checkpoints must hold the same bytes; lowbit's runtime must give the same 4-bit logits.
``test_live_transformers_loads_lowbit_checkpoints`` runs transformers + bitsandbytes on lowbit's
files when a Python with bitsandbytes is at hand (this one, or ``LOWBIT_BNB_PYTHON``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from formats_util import SRC, make_model, needs_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowbit import api, formats
from lowbit.cli import main
from lowbit.core.presets import preset
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.methods.bnb import bnb_quantize
from lowbit.recipe import Recipe

pytestmark = needs_model

DATA = Path(__file__).parent / "data" / "bnb"
GOLDEN = json.loads((DATA / "checkpoints.json").read_text())
VARIANTS = {"nf4_dq": "NF4_DQ", "fp4": "FP4", "int8": "LLM_INT8"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bnb")
    out = {}
    for variant, name in VARIANTS.items():
        scheme = preset(name).weights
        assert scheme is not None
        out[variant] = api.quantize(SRC, root / variant, method="bnb", recipe=Recipe(scheme=scheme),
                                    format="bitsandbytes")
    return out


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_bytes_equal_transformers(outputs: dict[str, Path], variant: str) -> None:
    golden = GOLDEN[variant]
    config = json.loads((outputs[variant] / "config.json").read_text())
    assert config["quantization_config"] == golden["quantization_config"]
    with safe_open(str(outputs[variant] / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(golden["tensors"])
        for k, e in golden["tensors"].items():
            t = f.get_tensor(k)
            assert (str(t.dtype).replace("torch.", ""), list(t.shape), digest(t)) == \
                (e["dtype"], e["shape"], e["sha256"]), k


def test_runtime_logits_equal_bitsandbytes(outputs: dict[str, Path]) -> None:
    """4-bit: bit-identical (both dequantize to float32, then F.linear); 8-bit: bitsandbytes also
    rounds the activations to int8 (lowbit's runtime keeps them float), so only close."""
    from lowbit.runtime.qlinear import load_quantized

    golden = load_file(str(DATA / "logits.safetensors"))
    ids = torch.tensor([GOLDEN["tokens"]])
    for variant, path in outputs.items():
        model, _ = load_quantized(path)
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        if variant == "int8":
            assert float((logits - golden[variant]).abs().max()) < 0.05 * float(golden[variant].abs().max())
            assert torch.equal(logits.argmax(-1), golden[variant].argmax(-1))
        else:
            assert torch.equal(logits, golden[variant]), variant


def test_read_back_and_write_again(outputs: dict[str, Path], tmp_path: Path) -> None:
    from lowbit.models.checkpoint import Checkpoint

    ck = Checkpoint(SRC)
    for variant, path in outputs.items():
        assert formats.detect_format(path) == "bitsandbytes"
        weights, floats, _ = formats.read_checkpoint(path)
        assert len(weights) == 35 and "lm_head.weight" not in weights
        assert not any("absmax" in n or "quant" in n or n.endswith(".SCB") for n in floats)
        name = "model.layers.2.mlp.down_proj.weight"
        scheme = preset(VARIANTS[variant]).weights
        assert scheme is not None
        direct = bnb_quantize(ck.get(name), scheme)
        assert torch.equal(weights[name].dequantize(), direct.dequantize()), variant
        again = formats.save(make_model(weights), SRC, tmp_path / variant, "bitsandbytes")
        assert (again / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


def test_vllm_prequantized_loader_rules(outputs: dict[str, Path]) -> None:
    """What vLLM's BitsAndBytesModelLoader needs of a pre-quantized checkpoint (read from its source)."""
    qs_keys = {"absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state", "quant_type", "blocksize",
               "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"}
    for variant, path in outputs.items():
        q = json.loads((path / "config.json").read_text())["quantization_config"]
        assert q["quant_method"] == "bitsandbytes" and q["load_in_8bit"] == (variant == "int8")
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            names = set(f.keys())
            for n in names:
                if variant == "int8" or not any(s in n.split(".")[-1] for s in ("absmax", "quant_map", "bitsandbytes")):
                    continue
                # every 4-bit state tensor belongs to a weight that has a packed quant_state
                wname = n.split(".weight.")[0] + ".weight"
                assert f"{wname}.quant_state.bitsandbytes__{variant[:3]}" in names, n
            for n in names:
                if ".quant_state.bitsandbytes__" in n:
                    wname = n.split(".quant_state.")[0]
                    state = json.loads(bytes(f.get_tensor(n).tolist()))
                    assert set(state) <= qs_keys
                    packed = f.get_tensor(wname)
                    # vLLM's qweight parameter: [in * out / pack_factor, 1] uint8, pack_factor 2
                    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (state["shape"][0] * state["shape"][1] // 2, 1)
                if n.endswith(".SCB"):
                    assert f.get_tensor(n[:-4] + ".weight").dtype == torch.int8


def test_cli_block_size_and_keep(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "nf4-b128"
    code = main(["--quiet", "quantize", str(SRC), "--method", "bnb", "--scheme", "NF4", "--group-size", "128",
                 "--keep", r"layers\.0\.", "--format", "bitsandbytes", "-o", str(out), "--json"])
    capsys.readouterr()
    assert code == 0
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["bnb_4bit_quant_type"] == "nf4" and not q["bnb_4bit_use_double_quant"]
    skip = q["llm_int8_skip_modules"]
    assert "lm_head" in skip and "model.layers.0.mlp.down_proj" in skip and "model.layers.0.self_attn.qkv_proj" in skip
    weights = formats.read(out)
    assert {qw.scheme.group_size for qw in weights.values()} == {128} and len(weights) == 28
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        state = json.loads(bytes(f.get_tensor("model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__nf4").tolist()))
    assert state == {"quant_type": "nf4", "blocksize": 128, "dtype": "float32", "shape": [64, 172]}


# ----------------------------------------------------------------------------- bad input


def _corrupt(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _state(tensors: dict[str, torch.Tensor], key: str, text: str) -> None:
    tensors[key] = torch.tensor(list(text.encode()), dtype=torch.uint8)


def test_corrupt_checkpoints_are_one_line_errors(outputs: dict[str, Path], tmp_path: Path) -> None:
    w = "model.layers.1.self_attn.q_proj.weight"
    qs = f"{w}.quant_state.bitsandbytes__nf4"
    good = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 64], "nested_blocksize": 256,
            "nested_dtype": "float32", "nested_offset": 0.1}
    cases = {
        "not valid JSON": lambda t: _state(t, qs, '{"quant_type": "nf4", "blocksize": '),
        "must be a JSON object": lambda t: _state(t, qs, "[1, 2]"),
        "lacks shape": lambda t: _state(t, qs, json.dumps({k: v for k, v in good.items() if k != "shape"})),
        "blocksize 48": lambda t: _state(t, qs, json.dumps({**good, "blocksize": 48})),
        "unknown quant type 'int4'": lambda t: (t.__setitem__(f"{w}.quant_state.bitsandbytes__int4",
                                                              torch.tensor(list(json.dumps({**good, "quant_type": "int4"})
                                                                                .encode()), dtype=torch.uint8)),
                                                t.pop(qs)),
        "expected uint8 holding": lambda t: _state(t, qs, json.dumps({**good, "shape": [64, 65]})),
        "absmax": lambda t: t.__setitem__(f"{w}.absmax", t[f"{w}.absmax"][:-1].clone()),
        "nested_absmax tensor": lambda t: t.pop(f"{w}.nested_absmax"),
    }
    for i, (message, edit) in enumerate(cases.items()):
        bad = _corrupt(outputs["nf4_dq"], tmp_path / f"bad{i}", edit)
        with pytest.raises(LowbitError) as exc:
            formats.read_checkpoint(bad)
        text = str(exc.value)
        assert message in text and "\n" not in text and w in text, (message, text)
    bad = _corrupt(outputs["int8"], tmp_path / "bad-scb", lambda t: t.__setitem__(
        "model.layers.0.mlp.up_proj.SCB", t["model.layers.0.mlp.up_proj.SCB"][:5].clone()))
    with pytest.raises(LowbitError, match=r"model\.layers\.0\.mlp\.up_proj\.SCB: 5 values for 172 rows"):
        formats.read_checkpoint(bad)


def test_plans_refused_before_work(tmp_path: Path) -> None:
    nf4 = preset("NF4").weights
    assert nf4 is not None
    with pytest.raises(LowbitError, match="bitsandbytes has NF4/FP4"):  # the method cannot produce int4 groups
        api.quantize(SRC, tmp_path / "a", method="bnb", recipe=Recipe(scheme=QuantScheme(4, -1)), format="bitsandbytes")
    with pytest.raises(LowbitError, match="bitsandbytes format cannot hold"):  # the format cannot hold int4 groups
        api.quantize(SRC, tmp_path / "b", recipe=Recipe(scheme=QuantScheme(4, -1)), format="bitsandbytes")
    with pytest.raises(LowbitError, match="blocksize 48 is not supported"):
        api.quantize(SRC, tmp_path / "c", method="bnb", recipe=Recipe(scheme=QuantScheme(
            4, 48, True, type="codebook", codebook="nf4", strategy="flat")), format="bitsandbytes")
    fp4 = preset("FP4").weights
    with pytest.raises(LowbitError, match="one quant type, block size and double-quantization setting"):
        api.quantize(SRC, tmp_path / "d", method="bnb", recipe=Recipe(scheme=nf4, overrides=((r"mlp", fp4),)),
                     format="bitsandbytes")
    with pytest.raises(LowbitError, match="compressed-tensors has no layout for nf4"):
        api.quantize(SRC, tmp_path / "e", method="bnb", recipe=Recipe(scheme=nf4), format="compressed-tensors")
    assert not any(tmp_path.iterdir())
    w = torch.randn(8, 64)
    w[2, 5] = float("nan")
    with pytest.raises(LowbitError, match="w: 1 weight value"):
        bnb_quantize(w, nf4, where="w")


# -------------------------------------------------------------------------- live reference


def _reference_python() -> str | None:
    if os.environ.get("LOWBIT_BNB_PYTHON"):
        return os.environ["LOWBIT_BNB_PYTHON"]
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return None
    return sys.executable


LIVE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
out = {}
for variant, path in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    kinds = sorted({type(m).__name__ for m in model.modules() if "bit" in type(m).__name__.lower()})
    assert kinds, variant
    with torch.no_grad():
        out[variant] = model(torch.tensor([json.loads(sys.argv[2])])).logits[0].float().contiguous()
save_file(out, sys.argv[3])
"""


def test_live_transformers_loads_lowbit_checkpoints(outputs: dict[str, Path], tmp_path: Path) -> None:
    python = _reference_python()
    if python is None:
        pytest.skip("no Python with bitsandbytes (set LOWBIT_BNB_PYTHON)")
    from lowbit.runtime.qlinear import load_quantized

    result = tmp_path / "logits.safetensors"
    paths = {k: str(v) for k, v in outputs.items()}
    subprocess.run([python, "-c", LIVE, json.dumps(paths), json.dumps(GOLDEN["tokens"]), str(result)], check=True,
                   capture_output=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    theirs = load_file(str(result))
    for variant, path in outputs.items():
        model, _ = load_quantized(path)
        with torch.no_grad():
            ours = model(torch.tensor([GOLDEN["tokens"]])).logits[0].float()
        if variant == "int8":
            assert torch.equal(ours.argmax(-1), theirs[variant].argmax(-1))
        else:
            assert torch.equal(ours, theirs[variant]), variant
