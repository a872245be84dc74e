"""Make tests/data/llmc_sq/: llm-compressor's SmoothQuant scales and FP8 KV-cache scales on stories260K.

Run in the reference virtualenv (llm-compressor 0.14, compressed-tensors 0.19, transformers 5.17;
with transformers 5.25 compressed-tensors' KV-cache observers silently see nothing)::

    python3 -m venv /work/venvs/llmc2
    /work/venvs/llmc2/bin/pip install -c constraints.txt "llmcompressor==0.14.*"
    /work/venvs/llmc2/bin/python tests/reference/make_llmc_sq_goldens.py [--model ../shared/models/stories260K]

Calibration: 8 sequences of 64 token ids drawn from ``torch.Generator().manual_seed(0)`` over the
vocabulary (stored in the goldens, so lowbit calibrates on the very same tokens), batch size 1,
no padding. Written (small):

* ``calib_ids.safetensors``: the token ids ``[8, 64]``;
* ``smoothquant.safetensors``: per smoothed norm (``model.layers.N.input_layernorm``...), the
  scales llm-compressor's ``SmoothQuantModifier(smoothing_strength=S)`` computed (after its
  1e-5 floor), for S = 0.5 and 0.8, under ``s{S}.<norm name>``;
* ``kv_tensor.safetensors`` / ``kv_head.safetensors``: ``model.layers.N.self_attn.k_scale`` and
  ``v_scale`` written by ``QuantizationModifier(kv_cache_scheme=FP8, strategy tensor / attn_head,
  observer static_minmax)`` (the true max over the calibration set; llm-compressor's default
  ``minmax`` observer is a moving average of per-batch ranges, constant 0.01), with
  ``kv_tensor_config.json`` / ``kv_head_config.json``: the ``quantization_config`` it wrote.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "data" / "llmc_sq"
N, L = 8, 64


def calib_ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (N, L), generator=torch.Generator().manual_seed(0))


def dataset(ids: torch.Tensor):  # noqa: ANN201
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def load(model_dir: Path):  # noqa: ANN201
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(model_dir)


def smoothquant_scales(model_dir: Path, ids: torch.Tensor, strength: float) -> dict[str, torch.Tensor]:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.transform.smoothquant import base as sq

    captured: dict[str, torch.Tensor] = {}
    original = sq.SmoothQuantModifier._calculate_smoothing_scales

    def capture(self, balance_layers, activation_scales):  # noqa: ANN001, ANN202
        scales = original(self, balance_layers, activation_scales)
        name = next(m.smooth_name for m in self.resolved_mappings_ if m.balance_layers == balance_layers)
        captured[name] = torch.maximum(scales, torch.tensor([sq.MINIMUM_SMOOTHING_SCALE])).clone()
        return scales

    sq.SmoothQuantModifier._calculate_smoothing_scales = capture
    try:
        model, tok = load(model_dir)
        oneshot(model=model, tokenizer=tok, dataset=dataset(ids), recipe=[sq.SmoothQuantModifier(smoothing_strength=strength)],
                num_calibration_samples=N, max_seq_length=L, pipeline="sequential")
    finally:
        sq.SmoothQuantModifier._calculate_smoothing_scales = original
    return captured


def kv_scales(model_dir: Path, ids: torch.Tensor, strategy: str, pipeline: str = "basic") -> tuple[dict[str, torch.Tensor], dict]:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model, tok = load(model_dir)
    kv = {"num_bits": 8, "type": "float", "strategy": strategy, "dynamic": False, "symmetric": True,
          "observer": "static_minmax"}
    oneshot(model=model, tokenizer=tok, dataset=dataset(ids), recipe=[QuantizationModifier(kv_cache_scheme=kv)],
            num_calibration_samples=N, max_seq_length=L, pipeline=pipeline)
    tmp = Path(tempfile.mkdtemp())
    try:
        model.save_pretrained(tmp, save_compressed=True)
        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(tmp.glob("*.safetensors")):
            tensors.update({k: v for k, v in load_file(f).items() if k.endswith(("k_scale", "v_scale"))})
        config = json.loads((tmp / "config.json").read_text())["quantization_config"]
    finally:
        shutil.rmtree(tmp)
    return tensors, config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(HERE.parents[2] / "shared" / "models" / "stories260K"))
    args = ap.parse_args()
    model_dir = Path(args.model)
    OUT.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ids = calib_ids(vocab)
    save_file({"input_ids": ids.contiguous()}, str(OUT / "calib_ids.safetensors"))
    sq: dict[str, torch.Tensor] = {}
    for strength in (0.5, 0.8):
        for name, s in smoothquant_scales(model_dir, ids, strength).items():
            sq[f"s{strength}.{name}"] = s.contiguous()
    save_file(sq, str(OUT / "smoothquant.safetensors"))
    for strategy, tag in (("tensor", "kv_tensor"), ("attn_head", "kv_head")):
        tensors, config = kv_scales(model_dir, ids, strategy)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / f"{tag}.safetensors"))
        (OUT / f"{tag}_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    print("wrote", sorted(p.name for p in OUT.iterdir()))


if __name__ == "__main__":
    main()
