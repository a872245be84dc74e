"""Time lowbit's GGUF block quantizers against llama.cpp on SmolLM2-135M's weights.

For each type, both quantize the same float32 weights (SmolLM2's Q4_1 GGUF
dequantized by gguf-py) with the same thread count: llama.cpp through
``llama_model_quantize`` in pure mode (an F32 llama GGUF in, its tensors out), lowbit
through ``lowbit.gguf.quants.quantize`` per tensor. Where llama.cpp falls back to
another type for a tensor (rows not a multiple of 256), lowbit writes that type too.
Then the bytes of every tensor are compared.

    python bench/bench_gguf_quantize.py --threads 2 [--layers 6] [--types q4_k,q6_k] [--json out.json]

OMP_WAIT_POLICY defaults to PASSIVE here (torch's spinning OpenMP workers are very slow
on a machine shared with other jobs). llama.cpp's time includes reading and writing its GGUF files (small next to the
quantization itself); lowbit's is the sum of ``quantize`` calls on in-memory tensors.
The ``path`` column says whether lowbit ran its native C quantizers (``lowbit.gguf.native``,
built by ``pip install -e .``) or the torch code (``LOWBIT_NATIVE=0``, or no C compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# torch's OpenMP workers spin while waiting; on a shared machine that costs up to 10x
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import llamacpp_util as lu  # noqa: E402

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.gguf import native  # noqa: E402
from lowbit.gguf import quants as Q  # noqa: E402

DEFAULT_TYPES = ["Q4_0", "Q8_0", "Q4_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_NL"]


def load_weights(layers: int | None) -> dict[str, np.ndarray]:
    """SmolLM2's 2-D weights as float32; with ``layers``, token_embd plus the first N blocks only."""
    w = lu.smollm2_tensors()
    if layers is not None:
        w = {k: v for k, v in w.items() if not k.startswith("blk.") or int(k.split(".")[1]) < layers}
    return w


def bench_type(qtype: T, weights: dict[str, np.ndarray], threads: int, workdir: str, imatrix: dict | None) -> dict:
    src = Path(workdir) / "in.gguf"
    dst = Path(workdir) / f"out_{qtype.name}.gguf"
    t_llama = lu.run_llama_quantize(src, dst, qtype, imatrix, nthread=threads)
    ref = lu.read_gguf_tensors(dst)
    t_ours = 0.0
    match = 0
    mism_rows = 0
    total_rows = 0
    written = set()
    paths = set()
    for name, x in weights.items():
        wtype, rb = ref[name]
        written.add(wtype.name)
        paths.add("native" if native.supports(int(wtype)) else "torch")
        xt = torch.from_numpy(x)
        im = None if imatrix is None else torch.from_numpy(imatrix[name])
        t0 = time.perf_counter()
        got = Q.quantize(xt, wtype, im)
        t_ours += time.perf_counter() - t0
        got = got.numpy()
        bad = int((got != rb).any(axis=1).sum())
        match += bad == 0
        mism_rows += bad
        total_rows += rb.shape[0]
    dst.unlink()
    return {
        "type": qtype.name,
        "written_types": sorted(written),
        "path": "+".join(sorted(paths)),
        "tensors": len(weights),
        "elements": int(sum(v.size for v in weights.values())),
        "lowbit_s": t_ours,
        "llamacpp_s": t_llama,
        "ratio": t_ours / t_llama if t_llama > 0 else float("inf"),
        "tensors_bytes_equal": match,
        "rows_mismatched": mism_rows,
        "rows": total_rows,
        "imatrix": imatrix is not None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None, help="only token_embd and the first N transformer blocks")
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES))
    ap.add_argument("--imatrix", action="store_true", help="also pass a synthetic importance matrix to both")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)

    if not lu.available():
        print("needs llama-cpp-python", file=sys.stderr)
        return 2
    try:
        lu.smollm2_path()
    except LowbitError as e:
        print(f"needs the SmolLM2 GGUF: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    weights = load_weights(args.layers)
    imatrix = None
    if args.imatrix:
        rng = np.random.default_rng(0)
        imatrix = {k: np.exp(rng.standard_normal(v.shape[1])).astype(np.float32) for k, v in weights.items()}
    n_el = sum(v.size for v in weights.values())
    print(f"SmolLM2-135M: {len(weights)} tensors, {n_el / 1e6:.1f}M weights, threads={args.threads}, "
          f"torch {torch.__version__}, imatrix={'yes' if imatrix else 'no'}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        lu.write_llama_gguf(Path(tmp) / "in.gguf", weights, n_layer=30)
        hdr = f"{'type':8} {'written':16} {'path':6} {'lowbit s':>9} {'llama.cpp s':>11} {'ratio':>6}  bytes equal"
        print(hdr)
        print("-" * len(hdr))
        for name in args.types.split(","):  # warm-up, untimed: loads the native library, starts its threads
            Q.quantize(torch.ones(8, 256), Q.parse_qtype(name.strip()))
        for name in args.types.split(","):
            r = bench_type(Q.parse_qtype(name.strip()), weights, args.threads, tmp, imatrix)
            results.append(r)
            eq = f"{r['tensors_bytes_equal']}/{r['tensors']} tensors ({r['rows_mismatched']} of {r['rows']} rows differ)"
            print(f"{r['type']:8} {'+'.join(r['written_types']):16} {r['path']:6} {r['lowbit_s']:9.2f} {r['llamacpp_s']:11.2f} "
                  f"{r['ratio']:6.2f}  {eq}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "load_average": os.getloadavg(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
