"""Make tests/data/torchao/<kind>.safetensors: what transformers + torchao write with TorchAoConfig.

Run in the reference venv (torchao 0.18.0, transformers 5.25.0, torch 2.13.0 CPU; transformers 4.57
writes safetensors only for the float8 configs)::

    python3 -m venv /work/venvs/torchao
    /work/venvs/torchao/bin/pip install -c constraints.txt torch "torchao==0.18.*" "transformers==5.25.0" accelerate
    /work/venvs/torchao/bin/python tests/reference/make_torchao_goldens.py

For each kind, stories260K (float32) is loaded with ``TorchAoConfig(quant_type=CONFIG,
modules_to_not_convert=["lm_head", "model.layers.{0-4}.mlp.down_proj"])`` on CPU and saved with
``save_pretrained``. Kept: every tensor of layer 1 but the float down_proj (flattened ``_weight_qdata`` / ``_weight_scale`` /
``_weight_zero_point`` and the float ones), the file's metadata entries of those tensors (the
metadata key ``entries``, a JSON object), the ``quantization_config`` (metadata key
``quantization_config``) and the logits of ids 1..32 at the first 8 positions (``logits``). ``tests/test_torchao.py`` checks
that lowbit writes the same tensors and metadata from the same codes and scales.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torchao.quantization import (
    Float8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    PerGroup,
)
from transformers import AutoModelForCausalLM, TorchAoConfig

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "torchao"
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
SKIP = ["lm_head"] + [f"model.layers.{i}.mlp.down_proj" for i in range(5)]


def kinds() -> dict[str, object]:
    return {
        "int8_weight_only": Int8WeightOnlyConfig(),
        "int8_dynamic": Int8DynamicActivationInt8WeightConfig(),
        "int4_weight_only": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
        "float8_weight_only": Float8WeightOnlyConfig(),
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    ids = torch.arange(1, 33)[None]
    for kind, cfg in kinds().items():
        model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32,
                                                     quantization_config=TorchAoConfig(cfg, modules_to_not_convert=SKIP))
        with torch.no_grad():
            logits = model(ids).logits[0].float().contiguous()
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            qconfig = json.loads((Path(tmp) / "config.json").read_text())["quantization_config"]
            with safe_open(str(Path(tmp) / "model.safetensors"), "pt") as f:
                meta = f.metadata()
                kept = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.layers.1.") and "down_proj" not in k}
        entries = {k: v for k, v in meta.items() if k.startswith("model.layers.1.")}
        entries["tensor_names"] = meta["tensor_names"]
        entries["format"] = meta.get("format")
        kept["logits"] = logits[:8].contiguous()  # the first 8 positions (size)
        path = OUT / f"{kind}.safetensors"
        save_file(kept, str(path), metadata={"entries": json.dumps(entries), "quantization_config": json.dumps(qconfig)})
        print(f"wrote {path} ({path.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
