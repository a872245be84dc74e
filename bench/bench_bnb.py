"""Quantization throughput on CPU: lowbit's bitsandbytes numerics against bitsandbytes 0.50 itself.

Same tensors (Llama-shaped, seeded Gaussian, float32 and bfloat16), same thread count, same
machine, one after the other: lowbit in this process, bitsandbytes in its own virtualenv
(``--bnb-python``, default ``/work/venvs/bnb/bin/python``) through a child process that times only
its quantize calls. The outputs of both are compared byte for byte (sha256) in the same run.

    OMP_NUM_THREADS=1 python bench/bench_bnb.py [--threads 1] [--repeats 3] [--out bench/results/bnb_speed.md]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHAPES = {"q_proj 4096x4096": (4096, 4096), "down_proj 4096x11008": (4096, 11008)}
CASES = ("nf4", "nf4_dq", "fp4", "int8")

CHILD = r"""
import hashlib, json, sys, time, torch
import bitsandbytes.functional as F
from safetensors.torch import load_file
torch.set_num_threads(int(sys.argv[2]))
tensors = load_file(sys.argv[1])
out = {}
def run(case, w):
    if case == "int8":
        cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        return [cb, scb]
    p, st = F.quantize_4bit(w, blocksize=64, quant_type=case[:3], compress_statistics=case.endswith("_dq"))
    return [p, st.absmax] + ([st.state2.absmax, st.offset.reshape(1)] if case.endswith("_dq") else [])
for name, w in tensors.items():
    for case in json.loads(sys.argv[4]):
        run(case, w)  # warm-up
        best = 1e9
        for _ in range(int(sys.argv[3])):
            t0 = time.perf_counter(); res = run(case, w); best = min(best, time.perf_counter() - t0)
        h = hashlib.sha256(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in res)).hexdigest()
        out[f"{name}|{case}"] = {"s": best, "sha256": h}
print(json.dumps(out))
"""


def lowbit_run(case: str, w: torch.Tensor) -> list[torch.Tensor]:
    from lowbit.core import codebook as cb

    if case == "int8":
        return list(cb.int8_rowwise(w))
    codes, absmax = cb.quantize_4bit(w, case[:3], 64)
    packed = cb.pack_nibbles(codes, case[:3])
    if case.endswith("_dq"):
        q, nested, offset = cb.double_quantize(absmax)
        return [packed, q, nested, offset.reshape(1)]
    return [packed, absmax]


CHECK = r"""
import hashlib, json, sys, tempfile, torch
from pathlib import Path
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
src, ours, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.float32)
out = {}
with tempfile.TemporaryDirectory() as tmp:
    m = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, device_map="cpu", dtype=torch.float32)
    m.save_pretrained(tmp)
    del m
    with safe_open(str(Path(tmp) / "model.safetensors"), "pt") as f:
        out["digests"] = {k: hashlib.sha256(f.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                          for k in f.keys()}
m = AutoModelForCausalLM.from_pretrained(ours, device_map="cpu")
with torch.no_grad():
    out["logits"] = m(torch.tensor([ids])).logits[0].float().tolist()
print(json.dumps(out))
"""


def check_checkpoint(src: str, bnb_python: str, out_md: Path) -> None:
    """lowbit's NF4+DQ checkpoint of ``src`` against transformers + bitsandbytes quantizing it on load."""
    from safetensors import safe_open

    import lowbit.api as lb
    from lowbit.core.presets import preset
    from lowbit.recipe import Recipe
    from lowbit.runtime.qlinear import load_quantized

    ids = list(range(1, 400, 13))
    with tempfile.TemporaryDirectory() as tmp:
        ours = lb.quantize(src, Path(tmp) / "nf4", method="bnb", recipe=Recipe(scheme=preset("NF4_DQ").weights),
                           format="bitsandbytes")
        env = {**os.environ, "PYTHONPATH": ""}
        child = subprocess.run([bnb_python, "-c", CHECK, src, str(ours), json.dumps(ids)], capture_output=True,
                               text=True, env=env, check=True)
        theirs = json.loads(child.stdout.strip().splitlines()[-1])
        with safe_open(str(ours / "model.safetensors"), "pt") as f:
            mine = {k: hashlib.sha256(f.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                    for k in f.keys()}
        model, _ = load_quantized(ours)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
    ref = torch.tensor(theirs["logits"])
    same = [k for k in mine if theirs["digests"].get(k) == mine[k]]
    text = (f"# NF4 + double quantization of {Path(src).name}: lowbit's bitsandbytes checkpoint against transformers + "
            f"bitsandbytes quantizing the same float model on load\n\n"
            f"`python bench/bench_bnb.py --check-checkpoint {src}`\n\n"
            f"- tensors: lowbit {len(mine)}, transformers {len(theirs['digests'])}, names equal: "
            f"{set(mine) == set(theirs['digests'])}; byte-identical (sha256): {len(same)} of {len(mine)}\n"
            f"- transformers + bitsandbytes loading lowbit's file, logits of {len(ids)} tokens beside lowbit's runtime: "
            f"bit-identical {torch.equal(logits, ref)}, max |diff| {float((logits - ref).abs().max()):.3g}, "
            f"top-1 agreement {float((logits.argmax(-1) == ref.argmax(-1)).float().mean()):.3f}\n")
    out_md.write_text(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-checkpoint", metavar="HF_FOLDER", help="compare a whole NF4+DQ checkpoint instead")
    ap.add_argument("--bnb-python", default=os.environ.get("LOWBIT_BNB_PYTHON", "/work/venvs/bnb/bin/python"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/bnb_speed.md"))
    args = ap.parse_args()
    if args.check_checkpoint:
        name = Path(args.check_checkpoint).name.split("-")[0].split(".")[0]
        check_checkpoint(args.check_checkpoint, args.bnb_python, args.out.parent / f"bnb_checkpoint_{name}.md")
        return
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for label, shape in SHAPES.items():
        w = torch.randn(shape, generator=g) * 0.02
        tensors[f"{label} f32"] = w
        tensors[f"{label} bf16"] = w.to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ""}
        child = subprocess.run([args.bnb_python, "-c", CHILD, str(path), str(args.threads), str(args.repeats),
                                json.dumps(CASES)], capture_output=True, text=True, env=env, check=True)
        theirs = json.loads(child.stdout.strip().splitlines()[-1])
        version = subprocess.run([args.bnb_python, "-c", "import bitsandbytes; print(bitsandbytes.__version__)"],
                                 capture_output=True, text=True, env=env).stdout.strip()
        tensors = load_file(str(path))
    rows = []
    for name, w in tensors.items():
        for case in CASES:
            lowbit_run(case, w)  # warm-up (lookup table, allocator)
            best = 1e9
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                res = lowbit_run(case, w)
                best = min(best, time.perf_counter() - t0)
            h = hashlib.sha256(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in res)).hexdigest()
            ref = theirs[f"{name}|{case}"]
            rows.append((name, case, w.numel(), best, ref["s"], h == ref["sha256"]))
    lines = [f"# bitsandbytes numerics: quantization time on CPU, lowbit vs bitsandbytes {version}",
             "",
             f"`python bench/bench_bnb.py --threads {args.threads} --repeats {args.repeats}` (best of {args.repeats}, "
             f"{args.threads} thread(s), torch {torch.__version__}, a shared busy 2-core machine; Gaussian weights). "
             "4-bit: blocksize 64; `_dq`: double quantization; int8: LLM.int8 rows. Bytes: sha256 of every output "
             "tensor of both, same run.",
             "",
             "| tensor | case | Mweights/s lowbit | Mweights/s bitsandbytes | time lowbit / bitsandbytes | bytes equal |",
             "|---|---|---|---|---|---|"]
    for name, case, n, ours, ref, same in rows:
        lines.append(f"| {name} | {case} | {n / ours / 1e6:.1f} | {n / ref / 1e6:.1f} | {ours / ref:.2f} | "
                     f"{'yes' if same else 'NO'} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    if not all(r[-1] for r in rows):
        sys.exit("bytes differ")


if __name__ == "__main__":
    main()
