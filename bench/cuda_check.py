"""Run the streaming engine on CUDA (stories260K) and compare with CPU results saved earlier.

    python bench/cuda_check.py save .benchdata/stories260K .benchdata/cpu_ref.safetensors   # here
    python bench/cuda_check.py check .benchdata/stories260K .benchdata/cpu_ref.safetensors  # on the GPU
"""

from __future__ import annotations

import json
import sys
import time

import torch
from safetensors.torch import load_file, save_file

from lowbit.core import QuantScheme
from lowbit.pipeline import quantize_model
from lowbit.models.calibration import CalibrationConfig

SCHEME = QuantScheme(4, 4, False)
CALIB = CalibrationConfig(n_samples=8, seq_len=64, batch_size=4)


def run(model: str, device: str) -> dict[str, torch.Tensor]:
    out = {}
    for method, ao in (("gptq", False), ("gptq", True), ("awq", False)):
        t0 = time.perf_counter()
        qm = quantize_model(model, method, SCHEME, CALIB, act_order=ao, device=device)
        print(method, ao, device, f"{time.perf_counter() - t0:.1f}s", flush=True)
        for k, qw in qm.weights.items():
            out[f"{method}{int(ao)}::{k}"] = qw.dequantize()
    return out


if __name__ == "__main__":
    mode, model, ref_path = sys.argv[1:4]
    torch.set_num_threads(1)
    if mode == "save":
        save_file(run(model, "cpu"), ref_path)
    else:
        ref = load_file(ref_path)
        got = run(model, "cuda")
        summary = {}
        for key in ("gptq0", "gptq1", "awq0"):
            num = sum(float((got[k] - ref[k]).pow(2).sum()) for k in ref if k.startswith(key))
            den = sum(float(ref[k].pow(2).sum()) for k in ref if k.startswith(key))
            same = sum(int((got[k] == ref[k]).sum()) for k in ref if k.startswith(key))
            tot = sum(ref[k].numel() for k in ref if k.startswith(key))
            summary[key] = {"rel_diff_cpu_vs_cuda": num / den, "identical_fraction": same / tot}
        print(json.dumps(summary, indent=1))
