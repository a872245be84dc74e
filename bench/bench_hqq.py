"""HQQ quantization speed on CPU: lowbit's solver against the hqq library, same tensors, same run.

    python bench/bench_hqq.py [--hqq-python /work/venvs/hqq/bin/python] [--threads 1] [--bits 4] [--group 64]

For each Llama-shaped weight (seeded normal values) the script times ``lowbit.core.hqq.solve`` in this
process, then runs hqq 0.2.8's ``Quantizer.quantize`` (``hqq_base_quant_config`` parameters, CPU,
``bitpack=False``) on the same tensors in the reference venv (a child process; the tensors are passed
through a temporary safetensors file), checks that the codes, scales and zero points are equal, and
prints seconds, millions of weights per second and the ratio. Best of ``--repeat`` runs each.
Results go to bench/results/hqq_speed_cpu.json (and .md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowbit.core.hqq import solve

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"q_proj 2048x2048": (2048, 2048), "down_proj 2048x5632": (2048, 5632), "q_proj 4096x4096": (4096, 4096)}

CHILD = r"""
import json, sys, time, torch
from safetensors.torch import load_file, save_file
from hqq.core.quantize import Quantizer, hqq_base_quant_config
src, dst, bits, group, repeat, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
params = dict(hqq_base_quant_config(nbits=bits, group_size=group, axis=1)["weight_quant_params"])
params.pop("view_as_float")
out, times = {}, {}
for name, w in load_file(src).items():
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        codes, meta = Quantizer.quantize(w, bitpack=False, device="cpu", compute_dtype=torch.float32, **params)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    times[name] = best
    out[name + ".codes"] = codes.reshape(w.shape).to(torch.uint8).contiguous()
    out[name + ".scale"] = meta["scale"].reshape(w.shape[0], -1).contiguous()
    out[name + ".zero"] = meta["zero"].reshape(w.shape[0], -1).contiguous()
save_file(out, dst, metadata={"times": json.dumps(times)})
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hqq-python", default="/work/venvs/hqq/bin/python")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    tensors = {name.replace(" ", "_"): (torch.randn(*shape, generator=g) * 0.02).contiguous()
               for name, shape in SHAPES.items()}
    ours: dict[str, float] = {}
    results = {}
    for name, w in tensors.items():
        best = None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            r = solve(w, args.bits, args.group)
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        assert best is not None
        ours[name] = best
        results[name] = r
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
        save_file(tensors, str(src))
        subprocess.run([args.hqq_python, "-c", CHILD, str(src), str(dst), str(args.bits), str(args.group),
                        str(args.repeat), str(args.threads)], check=True)
        theirs = load_file(str(dst))
        from safetensors import safe_open

        with safe_open(str(dst), "pt") as f:
            times = json.loads(f.metadata()["times"])
    rows = []
    for name, w in tensors.items():
        r = results[name]
        equal = (torch.equal(r.codes, theirs[name + ".codes"]) and torch.equal(r.scale, theirs[name + ".scale"])
                 and torch.equal(r.zero, theirs[name + ".zero"]))
        n = w.numel() / 1e6
        rows.append({"tensor": name, "weights_M": round(n, 2), "lowbit_s": round(ours[name], 3),
                     "hqq_s": round(times[name], 3), "lowbit_Mw_per_s": round(n / ours[name], 1),
                     "hqq_Mw_per_s": round(n / times[name], 1), "speedup": round(times[name] / ours[name], 2),
                     "bytes_equal": equal})
    info = {"bits": args.bits, "group": args.group, "threads": args.threads, "repeat": args.repeat,
            "torch": torch.__version__, "rows": rows}
    out = ROOT / "bench" / "results" / f"hqq_speed_cpu_b{args.bits}g{args.group}_t{args.threads}"
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    lines = [f"# HQQ quantization on CPU ({args.threads} thread(s), {args.bits}-bit, group {args.group}): lowbit vs hqq 0.2.8",
             f"# command: python bench/bench_hqq.py --threads {args.threads} --bits {args.bits} --group {args.group}",
             "| tensor | Mweights | lowbit s | hqq s | lowbit Mw/s | hqq Mw/s | hqq/lowbit time | bytes equal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['tensor']} | {r['weights_M']} | {r['lowbit_s']} | {r['hqq_s']} | {r['lowbit_Mw_per_s']} | "
              f"{r['hqq_Mw_per_s']} | {r['speedup']} | {r['bytes_equal']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(r["bytes_equal"] for r in rows):
        sys.exit("codes, scales or zero points differ from hqq's")


if __name__ == "__main__":
    main()
