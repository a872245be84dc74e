"""Make tests/data/hqq/solver.safetensors: the hqq library's own quantization of small tensors.

Run in the reference venv (hqq 0.2.8, transformers 4.57, torch 2.13.0 CPU)::

    python3 -m venv /work/venvs/hqq
    /work/venvs/hqq/bin/pip install -c constraints.txt torch hqq==0.2.8 "transformers==4.57.*"
    /work/venvs/hqq/bin/python tests/reference/make_hqq_goldens.py
    /work/venvs/hqq/bin/python tests/reference/make_hqq_goldens.py --transformers

Each case calls ``hqq.core.quantize.Quantizer.quantize`` on CPU with the weight parameters
``hqq_base_quant_config`` gives (channel-wise, optimize, ``round_zero`` for 4 bits, axis 1) and
``bitpack=False`` so the codes come back unpacked. Stored: ``input.<name>`` (the float32 inputs),
per case ``<case>.codes`` (uint8 ``[out, in]``), ``<case>.scale`` / ``<case>.zero`` (float32
``[out, in / group]``, the scale already inverted as hqq stores it). The inputs are stored too, so
the test does not depend on torch's random generator; the metadata ``cases`` maps each case to
its input, bits and group size. ``tests/test_hqq.py`` compares lowbit's
solver with these bytes for bytes. With ``--transformers`` it writes the checkpoint goldens of
``tests/test_hqq_format.py`` instead (see :func:`transformers_files`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from hqq.core.quantize import Quantizer, hqq_base_quant_config
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "hqq" / "solver.safetensors"
STORIES = ROOT.parent / "shared" / "models" / "stories260K" / "model.safetensors"


def synthetic() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    w = torch.randn(48, 256, generator=g) * 0.02
    w[3, 10] = 0.5  # an outlier
    w[5, 64:128] = 0.0  # a constant group (scale 1 path)
    w[7, :64] = 1e-6 * torch.arange(64)  # a nearly constant group
    w[9] *= 30.0  # a loud row
    return w.contiguous()


def inputs() -> dict[str, torch.Tensor]:
    with safe_open(str(STORIES), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight").float()
        gate = f.get_tensor("model.layers.2.mlp.gate_proj.weight").float()
    # stories260K's rows are 64 long: group 128 on the same values seen as [out/2, 128]
    return {"synthetic": synthetic(), "stories_q": q.contiguous(), "stories_gate": gate.contiguous(),
            "stories_gate128": gate.reshape(-1, 128).clone()}


def cases() -> dict[str, tuple[str, int, int]]:
    """``case -> (input, bits, group_size)``."""
    out: dict[str, tuple[str, int, int]] = {}
    for bits in (1, 2, 3, 4, 8):
        for group in (64, 128):
            out[f"synthetic_b{bits}_g{group}"] = ("synthetic", bits, group)
    for bits in (2, 3, 4, 8):
        out[f"stories_q_b{bits}_g64"] = ("stories_q", bits, 64)
        out[f"stories_gate_b{bits}_g64"] = ("stories_gate", bits, 64)
        out[f"stories_gate_b{bits}_g128"] = ("stories_gate128", bits, 128)
    return out


def hqq_quantize(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    params = dict(hqq_base_quant_config(nbits=bits, group_size=group, axis=1)["weight_quant_params"])
    params.pop("view_as_float")
    codes, meta = Quantizer.quantize(w, bitpack=False, device="cpu", compute_dtype=torch.float32, **params)
    rows, cols = w.shape
    shape = (rows, cols // group)
    return (codes.reshape(rows, cols).to(torch.uint8), meta["scale"].reshape(shape).float(),
            meta["zero"].reshape(shape).float())


def transformers_files() -> None:
    """tests/data/hqq/transformers_b<bits>.safetensors: what transformers 4.57 + hqq write for stories260K.

    ``AutoModelForCausalLM.from_pretrained(stories260K, quantization_config=HqqConfig(nbits, 64,
    skip_modules=["lm_head", "down_proj"]))`` on CPU in float32, ``save_pretrained``; kept: every
    tensor of layer 1 but the float down_proj (the HQQLinear state dicts and the float ones), the ``quantization_config``
    (metadata ``quantization_config``) and, at 4 bits, the logits of ids 1..32 at the first 8 positions (``logits``).
    """
    import tempfile

    from transformers import AutoModelForCausalLM, HqqConfig

    for bits in (2, 3, 4, 8):
        cfg = HqqConfig(nbits=bits, group_size=64, skip_modules=["lm_head", "down_proj"])
        model = AutoModelForCausalLM.from_pretrained(str(STORIES.parent), quantization_config=cfg, device_map="cpu",
                                                     dtype=torch.float32)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            qconfig = json.loads((Path(tmp) / "config.json").read_text())["quantization_config"]
            with safe_open(str(Path(tmp) / "model.safetensors"), "pt") as f:
                kept = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.layers.1.") and "down_proj" not in k}
        if bits == 4:
            with torch.no_grad():
                kept["logits"] = model(torch.arange(1, 33)[None]).logits[0, :8].float().contiguous()
        out = OUT.parent / f"transformers_b{bits}.safetensors"
        save_file(kept, str(out), metadata={"quantization_config": json.dumps(qconfig, sort_keys=True)})
        print(f"wrote {out} ({out.stat().st_size} bytes)", file=sys.stderr)


def main() -> None:
    if "--transformers" in sys.argv:
        transformers_files()
        return
    tensors: dict[str, torch.Tensor] = {}
    index = {}
    ins = inputs()
    for key, w in ins.items():
        tensors[f"input.{key}"] = w
    for name, (key, bits, group) in cases().items():
        codes, scale, zero = hqq_quantize(ins[key], bits, group)
        tensors[f"{name}.codes"] = codes.contiguous()
        tensors[f"{name}.scale"] = scale.contiguous()
        tensors[f"{name}.zero"] = zero.contiguous()
        index[name] = {"input": key, "bits": bits, "group_size": group}
    import hqq

    meta = {"cases": json.dumps(index), "hqq": hqq.__version__, "torch": torch.__version__,
            "threads": str(torch.get_num_threads())}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=meta)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(index)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
