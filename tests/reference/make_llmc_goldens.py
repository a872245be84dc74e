"""Golden outputs of llm-compressor 0.14 (compressed-tensors 0.19) for FP8 / W8A8 / NVFP4 / MXFP4 RTN.

Run in the reference virtualenv (``/work/venvs/llmc``: ``pip install -c constraints.txt
"llmcompressor==0.14.*"``, which brings compressed-tensors 0.19.0 and transformers 5.17.0)::

    OMP_NUM_THREADS=1 /work/venvs/llmc/bin/python tests/reference/make_llmc_goldens.py

For two models, stories260K (float32, ``../shared/models/stories260K``) and a synthetic bf16
Llama whose widths are multiples of 128 (:func:`make_tiny_llama`, rebuilt bit for bit by the
tests from the same seed), it runs ``oneshot`` with ``QuantizationModifier(scheme=PRESET,
ignore=["lm_head"])`` (static schemes calibrated on :func:`calibration_ids`) and stores, in
``tests/data/llmc/goldens.json``, the ``quantization_config`` it wrote and the dtype, shape and
SHA-256 of every tensor of its checkpoint (the bytes themselves would be megabytes).
``tests/test_fp8_llmc.py`` quantizes the same models with lowbit and compares digests.

This module imports only torch, safetensors and the standard library at import time, so the
tests can use :func:`make_tiny_llama` and :func:`calibration_ids`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
GOLDENS = ROOT / "tests" / "data" / "llmc" / "goldens.json"
STORIES = ROOT.parent / "shared" / "models" / "stories260K"

#: (model, preset) pairs; block and group schemes need the synthetic model's widths.
CASES = [
    ("stories", "FP8_DYNAMIC"), ("stories", "FP8"), ("stories", "W8A8"),
    ("tiny", "FP8_DYNAMIC"), ("tiny", "FP8"), ("tiny", "FP8_BLOCK"), ("tiny", "W8A8"),
    ("tiny", "NVFP4A16"), ("tiny", "NVFP4"), ("tiny", "MXFP4A16"),
]
STATIC = {"FP8", "NVFP4"}

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
    "hidden_size": 256, "intermediate_size": 384, "num_hidden_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 512, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-05, "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
    "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
}


def make_tiny_llama(folder: Path, tokenizer_from: Path = STORIES) -> Path:
    """A one-layer bf16 Llama (hidden 256, intermediate 384) from a fixed seed, with stories260K's tokenizer.

    Weights are ``0.02 * randn`` (float32, rounded to bf16) with outliers (one column x8) and
    edge cases: a zero row in ``q_proj``, a zero 128x128 block in ``gate_proj`` and exact -0.0
    values in ``up_proj``.
    """
    c = TINY_CONFIG
    h, inter, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    p = "model.layers.0."
    t = {
        "model.embed_tokens.weight": rnd(c["vocab_size"], h),
        "lm_head.weight": rnd(c["vocab_size"], h),
        "model.norm.weight": torch.ones(h),
        p + "input_layernorm.weight": torch.ones(h),
        p + "post_attention_layernorm.weight": torch.ones(h),
        p + "self_attn.q_proj.weight": rnd(h, h),
        p + "self_attn.k_proj.weight": rnd(kv, h),
        p + "self_attn.v_proj.weight": rnd(kv, h),
        p + "self_attn.o_proj.weight": rnd(h, h),
        p + "mlp.gate_proj.weight": rnd(inter, h),
        p + "mlp.up_proj.weight": rnd(inter, h),
        p + "mlp.down_proj.weight": rnd(h, inter),
    }
    t[p + "self_attn.q_proj.weight"][5] = 0.0
    t[p + "self_attn.k_proj.weight"][:, 7] *= 8.0
    t[p + "mlp.gate_proj.weight"][128:256, 0:128] = 0.0
    t[p + "mlp.up_proj.weight"][3, ::5] = -0.0
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in t.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "tok512.model"):
        if (tokenizer_from / name).exists():
            shutil.copyfile(tokenizer_from / name, folder / name)
    return folder


def calibration_ids(n: int = 4, length: int = 64) -> torch.Tensor:
    """``[n, length]`` token ids from a fixed seed (ids 3..511: no special tokens)."""
    return torch.randint(3, 512, (n, length), generator=torch.Generator().manual_seed(99))


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (as safetensors stores them)."""
    raw = t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def describe(path: Path) -> dict[str, list]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "pt") as f:
        for k in sorted(f.keys()):
            t = f.get_tensor(k)
            out[k] = [str(t.dtype).replace("torch.", ""), list(t.shape), digest(t)]
            if t.numel() <= 4 and t.dtype.is_floating_point:  # small scales: their values too, to show a difference
                out[k].append([float(v) for v in t.float().flatten()])
    return out


def run_case(model_dir: Path, preset: str, out: Path) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    kw: dict = {}
    if preset in STATIC:
        ids = calibration_ids()
        kw = dict(dataset=Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}),
                  num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
    oneshot(model=model, processor=tok, recipe=QuantizationModifier(targets="Linear", scheme=preset, ignore=["lm_head"]),
            output_dir=str(out), **kw)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    return {"quantization_config": qconfig, "tensors": describe(out / "model.safetensors")}


def main() -> None:
    import llmcompressor  # noqa: F401 - fail early outside the reference venv

    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llmc_goldens")
    shutil.rmtree(work, ignore_errors=True)
    models = {"stories": work / "stories", "tiny": make_tiny_llama(work / "tiny")}
    shutil.copytree(STORIES, models["stories"])
    from importlib.metadata import version

    import compressed_tensors
    import transformers

    result: dict = {"versions": {"llmcompressor": version("llmcompressor"), "compressed-tensors": compressed_tensors.__version__,
                                 "transformers": transformers.__version__, "torch": torch.__version__},
                    "calibration_ids": calibration_ids().tolist(), "cases": {}}
    for model, preset in CASES:
        print(f"== {model} {preset}", flush=True)
        result["cases"][f"{model}/{preset}"] = run_case(models[model], preset, work / f"out_{model}_{preset}")
    GOLDENS.parent.mkdir(parents=True, exist_ok=True)
    GOLDENS.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDENS}")


if __name__ == "__main__":
    main()
