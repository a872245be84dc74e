"""``lowbit diagnose`` on stories260K: the layer made worse on purpose comes first and the advice names it
with the exact flag; NaN in a checkpoint is reported; a GGUF made without an importance matrix gets
``--tensor-type`` flags and the imatrix advice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lowbit import api
from lowbit.cli import main
from lowbit.core import QuantScheme
from lowbit.errors import LowbitError
from lowbit.eval.diagnose import DiagnoseSettings, diagnose
from lowbit.recipe import Recipe

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
pytestmark = pytest.mark.skipif(not STORIES.exists(), reason="stories260K not present")
FAST = DiagnoseSettings(ctx=64, max_chunks=2, per_tensor_layers=1)


@pytest.fixture(scope="module")
def layer2_at_2_bits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("diag") / "w8-layer2-2bit"
    base = QuantScheme(8, -1, True)
    api.quantize(STORIES, out, recipe=Recipe(scheme=base, overrides=((r"layers\.2\.", QuantScheme(2, -1, True)),)))
    return out


def test_the_damaged_layer_comes_first(layer2_at_2_bits: Path) -> None:
    r = diagnose(layer2_at_2_bits, STORIES, FAST)
    assert r["layers"][0]["layer"] == "2" and r["layers"][0]["kl"] > 5 * r["layers"][1]["kl"]
    assert all(t["name"].startswith("model.layers.2.") for t in r["worst_tensors"][:3])
    assert all("kl" in t for t in r["worst_tensors"][:7])  # every tensor of the worst layer measured alone
    assert r["kl_mean"] > 0 and not r["nan_in_logits"] and r["nonfinite_tensors"] == []
    assert any(r"--override 'layers\.2\." in a for a in r["advice"])


def test_nan_in_a_checkpoint_is_reported(layer2_at_2_bits: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "nan"
    shutil.copytree(layer2_at_2_bits, bad)
    f = next(bad.glob("*.safetensors"))
    tensors = load_file(f)
    key = next(k for k in tensors if "layers.0.mlp.down_proj" in k and "scale" in k)
    tensors[key][0] = float("nan")
    save_file(tensors, f, metadata={"format": "pt"})
    r = diagnose(bad, STORIES, FAST)
    assert r["nonfinite_tensors"] == [{"name": "model.layers.0.mlp.down_proj.weight", "nonfinite": 172}]
    assert r["advice"][0].startswith("NaN/Inf in the quantized weights (model.layers.0.mlp.down_proj.weight)")


def test_gguf_advice_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quiet", "diagnose", str(STORIES), "--scheme", "Q3_K_M", "--ctx", "64", "--chunks", "2",
                 "--per-tensor-layers", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["scheme"] == "Q3_K_M" and r["gguf"] == {"mix": "Q3_K_M", "imatrix": False}
    assert any("lowbit imatrix" in a for a in r["advice"])
    assert all("type" in t for t in r["worst_tensors"])  # the GGML type each tensor has in the file


def test_refusals() -> None:
    with pytest.raises(LowbitError, match="not a quantized model"):
        diagnose(STORIES, STORIES, FAST)
    with pytest.raises(LowbitError, match="--ref"):
        diagnose(STORIES, None, FAST)
