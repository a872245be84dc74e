"""W4A16 decode matmuls on CUDA: bf16 cuBLAS against lowbit's kernels and torch's int4 kernel.

Usage (a CUDA machine; prints a table and writes JSON lines)::

    python bench/bench_w4a16_kernels.py [--shapes 4096x4096,1024x4096,14336x4096,4096x14336]
        [--tokens 1,4,16] [--group 128] [--sweep] [--out results.jsonl]

Llama-3-8B's linear shapes (``out x in``). Every timing is a CUDA graph of ``L`` calls, each on
its own copy of the weight (``L`` copies hold more than 4x the GPU's L2 cache), replayed and
divided by ``L``: what a decode step pays per layer when every weight comes from HBM and the
launch cost is the graph's, as in a CUDA-graph decode loop. Rows:

* ``bf16``: ``F.linear`` on a bf16 weight (cuBLAS);
* ``int4pack``: ``torch._weight_int4pack_mm`` (tinygemm) on the same 4-bit codes;
* ``triton-wna16``: lowbit's tensor-core tile kernel;
* ``triton-gemv``: lowbit's GEMV kernel with its own tile choice, and with ``--sweep`` the best
  of a grid of tile sizes (the table then shows the chosen and the best configuration).

Each kernel's output is checked against the torch reference (dequantize, float32 matmul) on
the same input; the maximum relative error is printed beside its time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from functools import partial

import torch
import torch.nn.functional as F

from lowbit.core.scheme import QuantScheme
from lowbit.methods.rtn import rtn
from lowbit.runtime import QuantLinear
from lowbit.runtime.kernels.triton_gemv import GemvConfig, config, gemv_linear, prepared
from lowbit.runtime.kernels.triton_w4a16 import wna16_linear


def graph_time(calls: list, reps: int = 20) -> float:
    """Seconds per call: one CUDA graph holding ``calls`` in sequence, replayed ``reps`` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:  # warm-up (compiles Triton kernels, allocates)
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (reps * len(calls))


def int4pack(q: QuantLinear, dtype: torch.dtype, high_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """tinygemm's operands from a QuantLinear: packed codes and ``[K/g, N, 2]`` (scale, zero) with
    its rule ``w = (q - 8) * scale + zero``, so ``zero = (8 - z) * s``."""
    codes = q.codes().to(torch.int32)
    lo, hi = codes[:, 0::2], codes[:, 1::2]
    packed = ((lo << 4) | hi) if high_first else ((hi << 4) | lo)
    w = torch._convert_weight_to_int4pack(packed.to(torch.uint8).contiguous(), 8)
    s = q.scales.float()
    z = (8 - q.zeros.float()) * s
    sz = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return w, sz


def cell(row: dict, key: str) -> str:
    v = row.get(key + "_us")
    return f"{v:6.1f} ({row['bf16_us'] / v:4.2f}x)" if v else "-"


def measure(shape: str, m: int, group: int, sweep: bool, dev: torch.device, dtype: torch.dtype, l2: int,
            sms: int) -> dict:
    """One weight shape and token count: every kernel's time per call and its error."""
    n, k = (int(v) for v in shape.split("x"))
    torch.manual_seed(0)
    w = torch.randn(n, k, device=dev) * 0.02
    q = QuantLinear.from_quantized(rtn(w, QuantScheme(bits=4, group_size=group, symmetric=False))).to(dev)
    copies = max(4, -(-4 * l2 // (n * k // 2)))
    copies_bf16 = max(4, -(-4 * l2 // (n * k * 2)))
    wb = [q.dequantized_weight(dtype).clone() for _ in range(copies_bf16)]
    qw = [q.qweight.clone() for _ in range(copies)]
    sb = prepared(q)
    sbs = [sb.clone() for _ in range(copies)]
    x = torch.randn(m, k, device=dev, dtype=dtype)
    ref = F.linear(x.float(), q.dequantized_weight(torch.float32))

    def err(y: torch.Tensor) -> float:
        return float((y.float() - ref).abs().max() / ref.abs().max())

    def gemv_time(c: GemvConfig, reps: int = 20) -> float:
        return graph_time([partial(gemv_linear, x, qw[i], sbs[i], 4, cfg=c) for i in range(copies)], reps)

    row: dict = {"shape": shape, "tokens": m, "group": group, "device": torch.cuda.get_device_name(dev)}
    row["bf16_us"] = graph_time([partial(F.linear, x, wb[i]) for i in range(copies_bf16)]) * 1e6
    try:
        best = None
        for high_first in (True, False):
            wp, sz = int4pack(q, dtype, high_first)
            e = err(torch._weight_int4pack_mm(x, wp, group, sz))
            if best is None or e < best[0]:
                best = (e, wp, sz, high_first)
        assert best is not None
        e, wp, sz, high_first = best
        wps = [wp.clone() for _ in range(copies)]
        row["int4pack_us"] = graph_time([partial(torch._weight_int4pack_mm, x, wps[i], group, sz)
                                         for i in range(copies)]) * 1e6
        row["int4pack_err"], row["int4pack_high_nibble_first"] = e, high_first
    except (RuntimeError, AttributeError) as ex:
        row["int4pack_error"] = str(ex).splitlines()[0][:120]
    row["wna16_err"] = err(wna16_linear(x, q.qweight, q.scales, q.zeros, q.g_idx, 4, contiguous=True))
    row["wna16_us"] = graph_time([partial(wna16_linear, x, qw[i], q.scales, q.zeros, q.g_idx, 4, contiguous=True)
                                  for i in range(copies)]) * 1e6
    cfg = config(m, n, k, group, 4, sms)
    assert cfg is not None
    row["gemv_config"] = str(cfg)
    row["gemv_err"] = err(gemv_linear(x, q.qweight, sb, 4, cfg=cfg))
    row["gemv_us"] = gemv_time(cfg) * 1e6
    if sweep:
        results = []
        for bn, bk, sk, nw in itertools.product((16, 32, 64), (64, 128), (1, 2, 4, 8), (4, 8)):
            c = GemvConfig(bn, bk, sk, nw, 3)
            if k % (sk * bk) or group % bk:
                continue
            try:
                results.append((gemv_time(c, 10), c))
            except Exception as ex:  # noqa: BLE001 - a tile that does not compile is skipped
                print("  skip", c, str(ex).splitlines()[0][:80])
        t, c = min(results, key=lambda r: r[0])
        for ns in (2, 4):  # stages for the best tile
            c2 = GemvConfig(c.block_n, c.block_k, c.split_k, c.num_warps, ns)
            t2 = gemv_time(c2, 10)
            if t2 < t:
                t, c = t2, c2
        row["gemv_best_us"], row["gemv_best_config"] = t * 1e6, str(c)
        row["gemv_best_err"] = err(gemv_linear(x, q.qweight, sb, 4, cfg=c))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x4096,1024x4096,14336x4096,4096x14336")
    ap.add_argument("--tokens", default="1,4,16")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = []
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, L2 {l2 / 2**20:.0f} MiB, {sms} SMs")
    print(f"{'shape':>11} {'tok':>3} {'bf16 us':>8} {'int4pack':>15} {'triton-wna16':>15} {'triton-gemv':>15} "
          f"{'gemv best':>15}  config")
    for shape, m in itertools.product(a.shapes.split(","), [int(t) for t in a.tokens.split(",")]):
        row = measure(shape, m, a.group, a.sweep, dev, dtype, l2, sms)
        rows.append(row)
        cells = " ".join(f"{cell(row, key):>15}" for key in ("int4pack", "wna16", "gemv", "gemv_best"))
        print(f"{shape:>11} {m:>3} {row['bf16_us']:8.1f} {cells}  {row.get('gemv_best_config', row['gemv_config'])}  "
              f"err int4pack {row.get('int4pack_err', float('nan')):.1e} wna16 {row['wna16_err']:.1e} "
              f"gemv {row['gemv_err']:.1e}", flush=True)
        torch.cuda.empty_cache()
    print("ratios are bf16 time / kernel time (higher is faster); bandwidth limit for 4-bit g128 is about 3.8x")
    if a.out:
        with open(a.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
