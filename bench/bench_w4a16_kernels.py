"""W4A16 decode matmuls on CUDA: bf16 cuBLAS against lowbit's kernels and torch's int4 kernel.

Usage (a CUDA machine; prints a table and writes JSON lines)::

    python bench/bench_w4a16_kernels.py [--shapes 4096x4096,1024x4096,14336x4096,4096x14336]
        [--tokens 1,4,16,64] [--group 128] [--out results.jsonl]

Llama-3-8B's linear shapes (``out x in``). Every timing is a CUDA graph of ``L`` calls, each on
its own copy of the weight (``L`` copies hold more than 4x the GPU's L2 cache), replayed and
divided by ``L``: what a decode step pays per layer when every weight comes from HBM and the
launch cost is the graph's, as in a CUDA-graph decode loop. Rows:

* ``bf16``: ``F.linear`` on a bf16 weight (cuBLAS);
* ``int4pack``: ``torch._weight_int4pack_mm`` (tinygemm) on the same 4-bit codes;
* ``triton-wna16``: lowbit's tensor-core tile kernel;
* ``lowbit``: a QuantLinear layer as lowbit's runtime runs it (the kernel registry's choice,
  named in the last column; ``torch-int4pack`` up to 16 bf16 tokens).

(A Triton GEMV kernel was tried on 2026-12-08 and removed: at best 0.54x bf16 at 1 token after a
sweep of tile sizes, bench/results/w4a16_kernels_h100_sweep.txt.)

Each kernel's output is checked against the torch reference (dequantize, float32 matmul) on
the same input; the maximum relative error is printed beside its time.
"""

from __future__ import annotations

import argparse
import itertools
import json
from functools import partial

import torch
import torch.nn.functional as F
from cuda_timing import graph_time

from lowbit.core.scheme import QuantScheme
from lowbit.methods.rtn import rtn
from lowbit.runtime import QuantLinear
from lowbit.runtime.kernels import select
from lowbit.runtime.kernels.triton_w4a16 import wna16_linear


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


def layers_calls(layers: list, x: torch.Tensor) -> list:
    return [partial(layer, x) for layer in layers]


def measure(shape: str, m: int, group: int, dev: torch.device, dtype: torch.dtype, l2: int) -> dict:
    """One weight shape and token count: every kernel's time per call and its error."""
    n, k = (int(v) for v in shape.split("x"))
    torch.manual_seed(0)
    w = torch.randn(n, k, device=dev) * 0.02
    q = QuantLinear.from_quantized(rtn(w, QuantScheme(bits=4, group_size=group, symmetric=False))).to(dev)
    copies = max(4, -(-4 * l2 // (n * k // 2)))
    copies_bf16 = max(4, -(-4 * l2 // (n * k * 2)))
    wb = [q.dequantized_weight(dtype).clone() for _ in range(copies_bf16)]
    qw = [q.qweight.clone() for _ in range(copies)]
    x = torch.randn(m, k, device=dev, dtype=dtype)
    ref = F.linear(x.float(), q.dequantized_weight(torch.float32))

    def err(y: torch.Tensor) -> float:
        return float((y.float() - ref).abs().max() / ref.abs().max())

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
    layers = [QuantLinear.from_quantized(q.to_quantized()).to(dev) for _ in range(copies)]
    row["lowbit_kernel"] = select(layers[0], x).name
    with torch.inference_mode():
        row["lowbit_err"] = err(layers[0](x))
        row["lowbit_us"] = graph_time(layers_calls(layers, x)) * 1e6
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x4096,1024x4096,14336x4096,4096x14336")
    ap.add_argument("--tokens", default="1,4,16,64")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = []
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, L2 {l2 / 2**20:.0f} MiB, {sms} SMs")
    print(f"{'shape':>11} {'tok':>3} {'bf16 us':>8} {'int4pack':>15} {'triton-wna16':>15} {'lowbit':>15}  kernel")
    for shape, m in itertools.product(a.shapes.split(","), [int(t) for t in a.tokens.split(",")]):
        row = measure(shape, m, a.group, dev, dtype, l2)
        rows.append(row)
        if a.out:  # after every row: a run cut short keeps what it measured
            with open(a.out, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        cells = " ".join(f"{cell(row, key):>15}" for key in ("int4pack", "wna16", "lowbit"))
        print(f"{shape:>11} {m:>3} {row['bf16_us']:8.1f} {cells}  {row['lowbit_kernel']}  "
              f"err int4pack {row.get('int4pack_err', float('nan')):.1e} wna16 {row['wna16_err']:.1e} "
              f"lowbit {row['lowbit_err']:.1e}", flush=True)
        torch.cuda.empty_cache()
    print("ratios are bf16 time / kernel time (higher is faster); bandwidth limit for 4-bit g128 is about 3.8x")


if __name__ == "__main__":
    main()
