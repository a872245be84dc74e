"""Write bitsandbytes' own outputs for small deterministic inputs to tests/data/bnb/ (the goldens).

Run in a virtualenv holding bitsandbytes 0.50 (CPU), transformers and accelerate, never in
lowbit's environment::

    python3 -m venv /work/venvs/bnb
    /work/venvs/bnb/bin/pip install -c constraints.txt bitsandbytes==0.50.0 transformers accelerate
    OMP_NUM_THREADS=1 /work/venvs/bnb/bin/python tests/reference/make_bnb_goldens.py [--shared ../shared]

Files written (all small):

* ``blocks.safetensors``: synthetic weights (Gaussian, outliers, zero blocks, values exactly on
  the codebooks' midpoints, odd shapes whose blocks span rows) in float32/float16/bfloat16 and
  ``quantize_4bit``'s packed bytes and absmax for NF4/FP4, several block sizes, double
  quantization on and off; ``dequantize_4bit``'s output for some.
* ``blockwise8.safetensors``: ``quantize_blockwise`` (8-bit dynamic map, blocks of 256) on the
  points of its 65,536-entry lookup grid, their neighbours and random vectors.
* ``int8.safetensors``: ``int8_vectorwise_quant`` (LLM.int8's ``CB`` and ``SCB``).
* ``stories.safetensors``: two stories260K weights and their NF4+DQ / FP4 / int8 encodings.
* ``checkpoints.json``: what transformers' ``save_pretrained`` writes for stories260K quantized
  on load (NF4 + double quantization, FP4 with blocks of 128 through ``bnb_4bit_...``, 8-bit): its
  ``quantization_config``, every tensor's dtype, shape and sha256, and the logits the loaded
  model gives for a fixed token sequence (``logits.safetensors``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as F
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "data" / "bnb"
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TOKENS = [1, 403, 261, 17, 290, 317, 45, 301, 259, 310, 272, 47, 11, 367, 280, 330]


def synthetic() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    gauss = torch.randn(24, 200, generator=g) * 0.02
    outliers = gauss.clone()
    outliers.view(-1)[torch.randint(0, gauss.numel(), (40,), generator=g)] *= 80.0
    zeros = torch.randn(24, 100, generator=g)
    zeros[3:9] = 0.0  # whole blocks of zeros, whatever the block size up to 512
    zeros[-1, -37:] = 0.0  # a zero short last block
    odd = torch.randn(7, 13, generator=g)  # 91 values: an odd count, one short block
    tiny = torch.randn(1, 33, generator=g) * 1e-3
    # values exactly on the midpoints between codes (absmax 1 per block): the ties
    nf4 = F.get_4bit_type("nf4", device="cpu")
    fp4 = F.get_4bit_type("fp4", device="cpu")
    mids = [((a + b) / 2).reshape(-1) for book in (nf4, fp4)
            for s in [book.sort().values] for a, b in [(s[:-1], s[1:])]]
    ties = torch.cat([torch.ones(1), mids[0], -torch.ones(1), mids[1], torch.zeros(2)])
    ties = torch.cat([ties, ties.flip(0)])[:64].reshape(2, 32)
    return {"gauss": gauss, "outliers": outliers, "zeros": zeros, "odd": odd, "tiny": tiny, "ties": ties}


def blocks() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    plan = {  # case -> block sizes
        "gauss": (32, 64, 256, 4096), "outliers": (64, 128), "zeros": (64, 512), "odd": (32, 64),
        "tiny": (64,), "ties": (32, 64),
    }
    for case, w in synthetic().items():
        for dname, dtype in DTYPES.items():
            x = w.to(dtype)
            out[f"{case}.{dname}.input"] = x
            for qt in ("nf4", "fp4"):
                for bs in plan[case]:
                    for dq in (0, 1):
                        if dq and dname != "f32" and case not in ("gauss", "zeros"):
                            continue
                        key = f"{case}.{dname}.{qt}.bs{bs}.dq{dq}"
                        packed, st = F.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=bool(dq))
                        out[f"{key}.packed"] = packed
                        out[f"{key}.absmax"] = st.absmax
                        if dq:
                            out[f"{key}.nested_absmax"] = st.state2.absmax
                            out[f"{key}.offset"] = st.offset.reshape(1)
                        if (case == "odd" or (case == "gauss" and dname == "f32")) and bs == 64:
                            out[f"{key}.dequant"] = F.dequantize_4bit(packed, st)
    # many double-quantized blocks: 64 x 200 / 32 = 400 absmax values, 2 nested blocks (the last short)
    big = torch.randn(64, 200, generator=torch.Generator().manual_seed(99)) * 0.05
    packed, st = F.quantize_4bit(big, blocksize=32, quant_type="nf4", compress_statistics=True)
    out["big.f32.input"] = big
    out["big.f32.nf4.bs32.dq1.packed"] = packed
    out["big.f32.nf4.bs32.dq1.absmax"] = st.absmax
    out["big.f32.nf4.bs32.dq1.nested_absmax"] = st.state2.absmax
    out["big.f32.nf4.bs32.dq1.offset"] = st.offset.reshape(1)
    return out


def blockwise8() -> dict[str, torch.Tensor]:
    # the 65,536 points of the lookup grid, in blocks of 256 that each hold a 1.0 (scale 1: the
    # points stay exact); the test rebuilds them (numpy float32) and checks their sha256
    i = np.arange(65536, dtype=np.float32)
    grid = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(65535)).astype(np.float32)
    blocks = np.concatenate([np.ones((256, 1), np.float32), grid.reshape(256, 256)[:, :255]], axis=1)
    rest = np.concatenate([np.ones(1, np.float32), grid.reshape(256, 256)[:, 255]])
    grid_in = torch.from_numpy(np.concatenate([blocks.reshape(-1), rest]))
    code = F.create_dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    near = torch.cat([mids, torch.nextafter(mids, torch.full_like(mids, 2.0)),
                      torch.nextafter(mids, torch.full_like(mids, -2.0))]).clamp(-1, 1)
    near = torch.cat([torch.ones(1), near])
    rand = torch.randn(5000, generator=torch.Generator().manual_seed(7)) * 3
    out = {"grid.sha256": torch.frombuffer(bytearray(hashlib.sha256(grid_in.numpy().tobytes()).digest()),
                                           dtype=torch.uint8)}
    for name, v in {"grid": grid_in, "near": near, "rand": rand}.items():
        q, st = F.quantize_blockwise(v, code=code, blocksize=256)
        if name != "grid":
            out[f"{name}.input"] = v
        out[f"{name}.codes"] = q
        out[f"{name}.absmax"] = st.absmax
    return out


def int8() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 72, generator=g) * 0.03
    w[5] = 0.0  # a zero row
    w[7, 3] = 4.0  # an outlier
    w[9] = torch.linspace(-1, 1, 72)  # halves: x * 127 lands on .5
    out = {}
    for dname, dtype in DTYPES.items():
        x = w.to(dtype)
        cb, scb, _ = F.int8_vectorwise_quant(x.to(torch.float16))
        out[f"{dname}.input"] = x
        out[f"{dname}.CB"] = cb
        out[f"{dname}.SCB"] = scb
    return out


def stories(shared: Path) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(str(shared / "models" / "stories260K" / "model.safetensors"), "pt") as f:
        for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.3.self_attn.q_proj.weight"):
            w = f.get_tensor(name)
            out[f"{name}.input"] = w
            p, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            out[f"{name}.nf4dq.packed"], out[f"{name}.nf4dq.absmax"] = p, st.absmax
            out[f"{name}.nf4dq.nested_absmax"], out[f"{name}.nf4dq.offset"] = st.state2.absmax, st.offset.reshape(1)
            p, st = F.quantize_4bit(w, blocksize=64, quant_type="fp4")
            out[f"{name}.fp4.packed"], out[f"{name}.fp4.absmax"] = p, st.absmax
            cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
            out[f"{name}.int8.CB"], out[f"{name}.int8.SCB"] = cb, scb
    return out


CHECKPOINTS = {
    "nf4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


def checkpoints(shared: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src = shared / "models" / "stories260K"
    record: dict = {}
    logits: dict[str, torch.Tensor] = {}
    ids = torch.tensor([TOKENS])
    for name, kwargs in CHECKPOINTS.items():
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(**kwargs),
                                                     device_map="cpu", dtype=torch.float32)
        with torch.no_grad():
            logits[name] = model(ids).logits[0].float().contiguous()
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            config = json.loads((Path(tmp) / "config.json").read_text())
            tensors = {}
            with safe_open(str(Path(tmp) / "model.safetensors"), "pt") as f:
                for k in sorted(f.keys()):
                    t = f.get_tensor(k)
                    entry = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                             "sha256": hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()}
                    if "quant_state" in k:
                        entry["json"] = bytes(t.tolist()).decode()
                    tensors[k] = entry
        record[name] = {"quantization_config": config["quantization_config"], "dtype": config.get("dtype"),
                        "tensors": tensors}
    record["tokens"] = TOKENS
    record["versions"] = {"bitsandbytes": bnb.__version__, "torch": torch.__version__,
                          "transformers": __import__("transformers").__version__}
    return record, logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2].parent / "shared")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"bitsandbytes": bnb.__version__, "torch": torch.__version__}
    save_file({k: v.contiguous() for k, v in blocks().items()}, str(OUT / "blocks.safetensors"), metadata=meta)
    save_file(blockwise8(), str(OUT / "blockwise8.safetensors"), metadata=meta)
    save_file(int8(), str(OUT / "int8.safetensors"), metadata=meta)
    save_file(stories(args.shared), str(OUT / "stories.safetensors"), metadata=meta)
    record, logits = checkpoints(args.shared)
    (OUT / "checkpoints.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    save_file(logits, str(OUT / "logits.safetensors"), metadata=meta)
    for p in sorted(OUT.iterdir()):
        print(f"{p.name}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
