"""GPU check of lowbit's codebook paths (issue 11): HQQ's solver and SqueezeLLM's lookup tables on CUDA.

Needs only torch and lowbit (no hqq, no vLLM). Deterministic inputs (seeded Gaussian weights with
1% heavy-tailed values). Three parts, one JSON line each result, then a summary:

1. **HQQ solver** (``lowbit.core.hqq.solve``, 4-bit g64 and 3-bit g128) on 4096x4096 and
   14336x4096: CUDA against the CPU (share of equal codes, largest scale / zero / dequantized
   differences), CUDA time (median of 3 after a warm-up) and CPU time, time per weight, and the
   extrapolation to Llama-3-8B's 6.98e9 linear weights.
2. **SqueezeLLM k-means** (``lowbit.core.lut.weighted_kmeans``, 4 bits, random Fisher weights) on
   the first 1024 rows of a 4096x4096 weight, CUDA against CPU (codes equal, tables), and the CUDA
   time of the whole 4096x4096 weight.
3. **LUT kernel** (``lowbit.runtime.kernels.lut``) against the torch reference kernel on CUDA,
   float16 inputs of 1 and 2048 tokens, dense and dense-and-sparse (0.5% outliers): largest
   difference and time, beside a float16 ``F.linear`` of the dense weight.

    python bench/bench_codebooks_gpu.py --out bench/results/codebooks_gpu_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.core.hqq import solve
from lowbit.core.lut import weighted_kmeans
from lowbit.core.presets import preset
from lowbit.methods.squeezellm import lut_quantize
from lowbit.runtime.qlinear import QuantLinear

LLAMA3_8B_LINEAR_WEIGHTS = 6.98e9
ROWS: list[dict[str, Any]] = []
DEV = "cuda"  # --device cpu --small: a smoke test of this script without a GPU


def weight(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    heavy = torch.rand(out_f, in_f, generator=g) < 0.01
    return torch.where(heavy, w * 6, w)


def timed(fn: Callable[[], Any], device: str, repeat: int = 3) -> tuple[Any, float]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def emit(row: dict[str, Any]) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def hqq_part(shapes: list[tuple[int, int]]) -> None:
    for out_f, in_f in shapes:
        w = weight(out_f, in_f)
        for bits, group in ((4, 64), (3, 128)):
            t0 = time.perf_counter()
            cpu = solve(w, bits, group)
            cpu_s = time.perf_counter() - t0
            wc = w.to(DEV)
            gpu, gpu_s = timed(lambda wc=wc, bits=bits, group=group: solve(wc, bits, group), DEV)
            deq_c = (cpu.codes.float().reshape(-1, group) - cpu.zero.reshape(-1, 1)) * cpu.scale.reshape(-1, 1)
            deq_g = ((gpu.codes.float().reshape(-1, group) - gpu.zero.reshape(-1, 1)) * gpu.scale.reshape(-1, 1)).cpu()
            emit({"part": "hqq", "shape": [out_f, in_f], "bits": bits, "group": group,
                  "codes_equal": float((gpu.codes.cpu() == cpu.codes).float().mean()),
                  "scale_max_diff": float((gpu.scale.cpu() - cpu.scale).abs().max()),
                  "zero_max_diff": float((gpu.zero.cpu() - cpu.zero).abs().max()),
                  "dequant_max_diff": float((deq_g - deq_c).abs().max()),
                  "iterations_cpu": cpu.iterations, "iterations_gpu": gpu.iterations,
                  "cpu_s": round(cpu_s, 3), "cuda_s": round(gpu_s, 4),
                  "cuda_ns_per_weight": round(gpu_s / w.numel() * 1e9, 4),
                  "llama3_8b_cuda_s_extrapolated": round(gpu_s / w.numel() * LLAMA3_8B_LINEAR_WEIGHTS, 1),
                  "cpu_threads": torch.get_num_threads()})
            del wc, gpu
            if DEV == "cuda":
                torch.cuda.empty_cache()


def kmeans_part(n: int = 4096) -> None:
    w = weight(n, n, seed=1)
    g = torch.Generator().manual_seed(2)
    f = torch.rand(n, n, generator=g) ** 4
    sub = slice(0, min(1024, n))
    t0 = time.perf_counter()
    lut_c, codes_c = weighted_kmeans(w[sub], f[sub], 4)
    cpu_s = time.perf_counter() - t0
    lut_g, codes_g = weighted_kmeans(w[sub].to(DEV), f[sub].to(DEV), 4)
    (_, _), full_s = timed(lambda: weighted_kmeans(w.to(DEV), f.to(DEV), 4), DEV, repeat=2)
    emit({"part": "kmeans", "rows_compared": 1024, "bits": 4,
          "codes_equal": float((codes_g.cpu() == codes_c).float().mean()),
          "lut_max_diff": float((lut_g.cpu() - lut_c).abs().max()),
          "cpu_s_1024_rows": round(cpu_s, 3), f"cuda_s_{n}x{n}": round(full_s, 3),
          "cuda_ns_per_weight": round(full_s / w.numel() * 1e9, 3)})


def kernel_part(n: int = 4096) -> None:
    w = weight(n, n, seed=3)
    scheme = preset("LUT4").weights
    assert scheme is not None
    for outliers in (0.0, 0.005):
        qw = lut_quantize(w.to(DEV), scheme, None, outliers=outliers)
        layer = QuantLinear.from_quantized(qw.to("cpu")).to(DEV)
        dense = qw.dequantize(torch.float16).to(DEV)
        for tokens in (1, 2048):
            x = (torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens)) * 0.5).half().to(DEV)
            layer.kernel = "torch"
            ref, ref_s = timed(lambda layer=layer, x=x: layer(x), DEV, repeat=10)
            layer.kernel = "lut"
            out, lut_s = timed(lambda layer=layer, x=x: layer(x), DEV, repeat=10)
            _, dense_s = timed(lambda x=x, dense=dense: F.linear(x, dense), DEV, repeat=10)
            emit({"part": "lut_kernel", "shape": [n, n], "outliers": outliers, "tokens": tokens,
                  "max_abs_diff_vs_reference": float((out.float() - ref.float()).abs().max()),
                  "equal": bool(torch.equal(out, ref)), "lut_ms": round(lut_s * 1e3, 4),
                  "reference_ms": round(ref_s * 1e3, 4), "fp16_dense_ms": round(dense_s * 1e3, 4)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["hqq", "kmeans", "kernel"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="256-wide shapes (smoke test)")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}), flush=True)
    n = 256 if args.small else 4096
    if "hqq" not in args.skip:
        hqq_part([(n, n), (n * 7 // 2, n)])
    if "kmeans" not in args.skip:
        kmeans_part(n)
    if "kernel" not in args.skip:
        kernel_part(n)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": name, "rows": ROWS}, indent=1) + "\n")


if __name__ == "__main__":
    main()
