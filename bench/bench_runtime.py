"""QuantLinear (dequantize-on-the-fly torch reference) vs float nn.Linear: CPU / CUDA matmul speed.

Usage::

    python bench/bench_runtime.py [--shapes 2048x2048,4096x4096] [--tokens 1,16] [--device cpu] [--threads 1] [--json]

For each weight shape and token count it times ``nn.Linear`` in float32 (bf16 on CUDA),
``QuantLinear`` at 4 bit g128 with the torch reference path (unpacking every call), on CUDA
also its Triton kernel, and ``QuantLinear`` with ``cache_weight=True`` (unpack once, then
a plain matmul), and the packed vs float bytes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lowbit.core.scheme import QuantScheme
from lowbit.methods.rtn import rtn
from lowbit.runtime import QuantLinear


def _time(fn, device: str, min_seconds: float = 0.5, max_iters: int = 200) -> float:
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while n < max_iters and (time.perf_counter() - t0 < min_seconds or n < 3):
        fn()
        n += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def bench(out_f: int, in_f: int, tokens: int, device: str, scheme: QuantScheme) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f) * 0.02
    dense = torch.nn.Linear(in_f, out_f, bias=False).to(device, dtype)
    with torch.no_grad():
        dense.weight.copy_(w)
    q = QuantLinear.from_quantized(rtn(w, scheme)).to(device)
    q.kernel = "torch"  # the reference path (qt: the best registered kernel)
    qt = QuantLinear.from_quantized(rtn(w, scheme)).to(device)
    qc = QuantLinear.from_quantized(rtn(w, scheme)).to(device)
    qc.cache_weight = True
    x = torch.randn(tokens, in_f, device=device, dtype=dtype)
    with torch.no_grad():
        t_dense = _time(lambda: dense(x), device)
        t_q = _time(lambda: q(x), device)
        t_qc = _time(lambda: qc(x), device)
        t_qt = _time(lambda: qt(x), device) if device == "cuda" else float("nan")
    packed = sum(b.numel() * b.element_size() for b in (q.qweight, q.scales, q.zeros))
    return {
        "shape": f"{out_f}x{in_f}", "tokens": tokens, "device": device, "scheme": scheme.describe(),
        "dense_ms": t_dense * 1e3, "quant_ms": t_q * 1e3, "quant_cached_ms": t_qc * 1e3,
        "quant_triton_ms": t_qt * 1e3,
        "slowdown": t_q / t_dense, "packed_bytes": packed, "float_bytes": w.numel() * torch.finfo(dtype).bits // 8,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="2048x2048,4096x4096")
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scheme = QuantScheme(args.bits, args.group, True)
    rows = []
    for shape in args.shapes.split(","):
        out_f, in_f = map(int, shape.split("x"))
        for tokens in map(int, args.tokens.split(",")):
            rows.append(bench(out_f, in_f, tokens, args.device, scheme))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"device {rows[0]['device']}, {rows[0]['scheme']}")
    print(f"{'shape':>11} {'tok':>4} {'dense ms':>9} {'torch ms':>9} {'triton ms':>9} {'cached ms':>9}  bytes packed/float")
    for r in rows:
        print(f"{r['shape']:>11} {r['tokens']:>4} {r['dense_ms']:9.4f} {r['quant_ms']:9.4f} {r['quant_triton_ms']:9.4f} "
              f"{r['quant_cached_ms']:9.4f}  {r['packed_bytes'] / r['float_bytes']:.3f}")


if __name__ == "__main__":
    main()
