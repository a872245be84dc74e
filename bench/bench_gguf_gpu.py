"""GPU check and timing of lowbit's GGUF block quantizers.

Part A (``--check``): for every type lowbit writes, with and without an importance
matrix, quantize the same tensors on CUDA and on the CPU and compare the bytes
(synthetic 1100x4096 Gaussian rows with outlier columns and zero rows, plus SmolLM2
weights if ``--real path.npz`` is given).

Part B (``--time``): F16 -> Q4_K and Q6_K on Llama-3-8B shapes with random weights made
on the GPU (32 layers of q,k,v,o 4096x4096 / 1024x4096, gate/up 14336x4096, down
4096x14336, plus the 128256x4096 embedding), every tensor in one type (an upper bound).
Only ``quantize`` is timed (synchronized), CUDA-graph captures included.
If the projected time exceeds ``--budget`` seconds per type, the remaining layers are
extrapolated from the measured ones, and the output says so.

Part C (``--mix Q4_K_M``): the whole model (embedding, 32 layers, untied output) in the
mix's own per-tensor types, as :func:`lowbit.gguf.mixes.tensor_types` chooses them for
Llama-3-8B's hyper-parameters (32 heads, 8 KV heads). Timed per tensor as in part B; the
first 64 rows of one tensor of each type are also quantized on the CPU and compared.

    python bench/bench_gguf_gpu.py --check --time --mix Q4_K_M [--real shared.npz] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lowbit.gguf import quants as Q  # noqa: E402

WRITTEN = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
           "TQ1_0", "TQ2_0", "Q1_0", "MXFP4", "NVFP4", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ1_S"}

LLAMA3_8B_LAYER = [
    ("attn_q", 4096, 4096),
    ("attn_k", 1024, 4096),
    ("attn_v", 1024, 4096),
    ("attn_output", 4096, 4096),
    ("ffn_gate", 14336, 4096),
    ("ffn_up", 14336, 4096),
    ("ffn_down", 4096, 14336),
]


def synthetic(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 0.02
    x[:, torch.randperm(cols, generator=g)[:16]] *= 30.0
    x[3] = 0.0
    x[5, :512] = 0.0
    return x


def check(real: dict[str, np.ndarray], log) -> list[dict]:
    """CUDA bytes == CPU bytes for every written type, plain and with an importance matrix."""
    # 1100 rows: above the CUDA-graph threshold, and a zero-padded last chunk
    cases = {"synthetic_1100x4096": synthetic(1100, 4096, 0)}
    cases.update({k: torch.from_numpy(v) for k, v in real.items()})
    out = []
    for name in WRITTEN:
        qt = Q.parse_qtype(name)
        bs = Q.block_size(qt)[0]
        for with_im in (True,) if name in NEEDS_IMATRIX else (False, True):
            rows_bad = rows = 0
            t_cpu = t_gpu = 0.0
            for cname, x in cases.items():
                if x.shape[1] % bs:
                    continue
                im = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(1)) + 0.01 if with_im else None
                t0 = time.perf_counter()
                a = Q.quantize(x, qt, im)
                t_cpu += time.perf_counter() - t0
                xc = x.cuda()
                imc = None if im is None else im.cuda()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                b = Q.quantize(xc, qt, imc)
                torch.cuda.synchronize()
                t_gpu += time.perf_counter() - t0
                bad = (a != b.cpu()).any(dim=1)
                rows_bad += int(bad.sum())
                rows += a.shape[0]
            r = {"type": name, "imatrix": with_im, "rows": rows, "rows_mismatched": rows_bad,
                 "cpu_s": round(t_cpu, 3), "gpu_s": round(t_gpu, 3)}
            out.append(r)
            log(f"check {name:7} imatrix={with_im!s:5} rows={rows:5} mismatched_rows={rows_bad} "
                f"cpu={t_cpu:.2f}s gpu={t_gpu:.2f}s")
    return out


def llama3_tensors():
    yield "token_embd", 128256, 4096
    for i in range(32):
        for n, r, c in LLAMA3_8B_LAYER:
            yield f"blk.{i}.{n}", r, c


def time_type(name: str, budget: float, log) -> dict:
    qt = Q.parse_qtype(name)
    g = torch.Generator(device="cuda").manual_seed(0)
    elapsed = 0.0
    done_el = 0
    total_el = sum(r * c for _, r, c in llama3_tensors())
    n_done = 0
    wall0 = time.perf_counter()
    for tname, r, c in llama3_tensors():
        w = (torch.randn(r, c, generator=g, device="cuda", dtype=torch.float16) * 0.02)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        q = Q.quantize(w, qt)
        torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        assert q.shape == (r, c // 256 * Q.block_size(qt)[1])
        del w, q
        done_el += r * c
        n_done += 1
        if n_done in (1, 8) or n_done % 56 == 1:
            log(f"  {name} {tname}: {done_el / 1e9:.2f}G elements in {elapsed:.2f}s")
        if time.perf_counter() - wall0 > budget and done_el < total_el:
            break
    extrapolated = done_el < total_el
    est = elapsed * total_el / done_el
    r = {"type": name, "elements": total_el, "elements_timed": done_el, "seconds_timed": round(elapsed, 3),
         "seconds_total": round(est, 3), "extrapolated": extrapolated,
         "throughput_Gelem_s": round(done_el / elapsed / 1e9, 3),
         "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    log(f"time {name}: {est:.2f}s for {total_el / 1e9:.2f}G elements"
        f"{' (extrapolated from %.2fG timed)' % (done_el / 1e9) if extrapolated else ''}, "
        f"{r['throughput_Gelem_s']} Gelem/s, peak {r['peak_mem_GiB']} GiB")
    return r


def time_mix(mix: str, log) -> dict:
    """F16 -> ``mix`` for the whole Llama-3-8B-shaped model, each tensor in the mix's type."""
    from lowbit.gguf.mixes import ModelHParams, tensor_types

    shapes = {f"{n}.weight": (r, c) for n, r, c in llama3_tensors()}
    shapes["output.weight"] = (128256, 4096)
    types = tensor_types(shapes, ModelHParams("llama", 32, 32, 8), mix)
    g = torch.Generator(device="cuda").manual_seed(0)
    per_type: dict[str, list[float]] = {}
    checked: dict[str, int] = {}
    torch.cuda.reset_peak_memory_stats()
    elapsed = 0.0
    for i, (name, qt) in enumerate(types.items()):
        r, c = shapes[name]
        w = torch.randn(r, c, generator=g, device="cuda", dtype=torch.float16) * 0.02
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        q = Q.quantize(w, qt)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        elapsed += dt
        acc = per_type.setdefault(qt.name, [0.0, 0.0])
        acc[0] += dt
        acc[1] += r * c
        if qt.name not in checked:
            checked[qt.name] = int((Q.quantize(w[:64].float().cpu(), qt) != q[:64].cpu()).any(dim=1).sum())
        if i in (0, 8) or i % 56 == 1 or i == len(types) - 1:
            log(f"  {mix} {name} ({qt.name}): {elapsed:.2f}s so far")
        del w, q
    total_el = sum(r * c for r, c in shapes.values())
    r = {"mix": mix, "elements": total_el, "seconds": round(elapsed, 3),
         "per_type": {k: {"seconds": round(v[0], 3), "elements": int(v[1])} for k, v in per_type.items()},
         "cpu_check_rows_mismatched": checked,
         "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    log(f"mix {mix}: {elapsed:.2f}s for {total_el / 1e9:.2f}G elements; per type "
        + ", ".join(f"{k} {v[0]:.2f}s/{v[1] / 1e9:.2f}G" for k, v in per_type.items())
        + f"; CPU check mismatched rows (64 per type) {checked}; peak {r['peak_mem_GiB']} GiB")
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--types", default="Q4_K,Q6_K")
    ap.add_argument("--mix", default=None, help="time this mix (e.g. Q4_K_M) on the whole Llama-3-8B-shaped model")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of wall time per timed type")
    ap.add_argument("--real", default=None, help="npz of float32 [rows, cols] weights for the check")
    ap.add_argument("--eager-check", action="store_true", help="repeat a few checks with CUDA graphs off")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table for one 4096x14336 tensor per type")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, cpu threads {torch.get_num_threads()}")
    res: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    if args.check:
        real = dict(np.load(args.real)) if args.real else {}
        res["check"] = check(real, log)
    if args.profile:
        for name in args.types.split(","):
            w = torch.randn(4096, 14336, device="cuda", dtype=torch.float16) * 0.02
            Q.quantize(w, name)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                Q.quantize(w, name)
                torch.cuda.synchronize()
            log(f"profile {name} (4096x14336):")
            log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=40))
            del w
    if args.eager_check:
        import os

        os.environ["LOWBIT_CUDA_GRAPHS"] = "0"
        log("eager (no CUDA graphs) re-check of Q4_K/Q6_K/IQ4_XS:")
        real = dict(np.load(args.real)) if args.real else {}
        global WRITTEN
        WRITTEN = ["Q4_K", "Q6_K", "IQ4_XS"]
        res["check_eager"] = check(real, log)
        os.environ["LOWBIT_CUDA_GRAPHS"] = "1"
    if args.time:
        # warm-up (kernels, allocator) on a small tensor, not timed
        for name in args.types.split(","):
            Q.quantize(torch.randn(256, 4096, device="cuda", dtype=torch.float16), name)
        torch.cuda.synchronize()
        res["time"] = [time_type(n, args.budget, log) for n in args.types.split(",")]
        tot = sum(r["seconds_total"] for r in res["time"])
        log(f"total F16 -> {'+'.join(args.types.split(','))} on Llama-3-8B shapes: {tot:.2f}s")
    if args.mix:
        Q.quantize(torch.randn(256, 4096, device="cuda", dtype=torch.float16), "Q4_K")  # warm-up
        res["mix"] = time_mix(args.mix, log)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
