"""AWQ against GPTQ, seconds per decoder layer on the same calibration (issue 15, item 13).

Runs the streaming pipeline on SmolLM2-135M (the demo model) for the first ``--layers`` layers of
each method with ``--samples`` x ``--seq-len`` calibration tokens (WikiText-2 slice, or pydoc)
and times each layer handler's ``process`` (the method's own work, not the engine's float pass).
Prints one line per method and writes JSON to ``--out`` when given.

    python bench/bench_awq_speed.py --layers 3 --samples 8 --seq-len 128 [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time
from pathlib import Path

import torch

from lowbit.core import QuantScheme
from lowbit.methods.awq import AWQHandler
from lowbit.methods.gptq import GPTQHandler
from lowbit.models.calibration import CalibrationConfig
from lowbit.pipeline import quantize_model


def run(method: str, source: str, layers: int, samples: int, seq_len: int, calib: str | None,
        profile: bool) -> tuple[list[float], list[float]]:
    cls = AWQHandler if method == "awq" else GPTQHandler
    real = cls.process
    times: list[float] = []
    cpu: list[float] = []

    def timed(self, ctx):  # type: ignore[no-untyped-def]
        t0, c0 = time.perf_counter(), time.process_time()
        out = real(self, ctx)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        return out

    cls.process = timed  # type: ignore[method-assign]
    prof = cProfile.Profile() if profile else None
    try:
        if prof:
            prof.enable()
        quantize_model(source, method=method, scheme=QuantScheme(4, 64, method == "gptq"),
                       calib=CalibrationConfig(path=calib, n_samples=samples, seq_len=seq_len), stop_after=layers)
    except KeyboardInterrupt:
        pass
    finally:
        if prof:
            prof.disable()
        cls.process = real  # type: ignore[method-assign]
    if prof:
        pstats.Stats(prof).sort_stats(os.environ.get("SORT", "cumulative")).print_stats(30)
    return times, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calib", default=None)
    ap.add_argument("--methods", default="gptq,awq")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    result = {"model": a.model, "samples": a.samples, "seq_len": a.seq_len, "threads": torch.get_num_threads()}
    for m in a.methods.split(","):
        t, c = run(m, a.model, a.layers, a.samples, a.seq_len, a.calib, a.profile)
        result[m] = {"per_layer_s": [round(x, 3) for x in t], "mean_s": round(sum(t) / max(len(t), 1), 3),
                     "per_layer_cpu_s": [round(x, 3) for x in c], "mean_cpu_s": round(sum(c) / max(len(c), 1), 3)}
        print(f"{m}: {result[m]['mean_s']:.2f} s/layer wall, {result[m]['mean_cpu_s']:.2f} s/layer CPU "
              f"over {len(t)} layers {result[m]['per_layer_s']}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
