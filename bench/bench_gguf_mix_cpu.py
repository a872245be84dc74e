"""End-to-end time of whole GGUF mixes on the CPU: lowbit's ``quantize_to_gguf`` vs llama.cpp.

Both start from the same F16 GGUF of SmolLM2-135M (written by lowbit's converter) and write a
complete GGUF file of the mix, with the same thread count (``torch.set_num_threads`` for lowbit,
``nthread`` for llama.cpp's ``llama_model_quantize``); file reading and writing are included on
both sides. lowbit's conversion of the source into its cached float folder happens once, untimed.
The tensor bytes of the two files are compared.

    python bench/bench_gguf_mix_cpu.py --threads 2 --mixes Q4_0,Q8_0,Q4_K_M,Q6_K,Q3_K_M,IQ4_XS
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("LOWBIT_NO_PROGRESS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import gguf_util  # noqa: E402

from lowbit.gguf.convert import quantize_to_gguf  # noqa: E402
from lowbit.models import resolve  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mixes", default="Q4_0,Q8_0,Q4_K_M,Q6_K,Q3_K_M,IQ4_XS")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--imatrix", default=None, help="an imatrix file for both sides (IQ1/IQ2 mixes need one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gguf_util.N_THREADS = args.threads
    with tempfile.TemporaryDirectory() as td:
        base = Path(td) / "base-F16.gguf"
        quantize_to_gguf(args.model, base, "F16")
        resolve(base)  # lowbit's float cache of the F16 file, untimed
        imat = None
        if args.imatrix:
            from lowbit.gguf.imatrix import load_imatrix_values

            imat = load_imatrix_values(args.imatrix)  # llama-quantize reads the file too: not timed on either side
        print(f"{args.model}: F16 GGUF -> mix, threads={args.threads}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"{'mix':8} {'lowbit s':>9} {'llama.cpp s':>12} {'ratio':>6}  tensor bytes")
        for mix in args.mixes.split(","):
            ours, theirs = Path(td) / f"lowbit-{mix}.gguf", Path(td) / f"llama-{mix}.gguf"
            t0 = time.perf_counter()
            gguf_util.llamacpp_quantize(base, theirs, mix, imatrix=imat)
            t_llama = time.perf_counter() - t0
            t0 = time.perf_counter()
            quantize_to_gguf(base, ours, mix, imatrix_path=args.imatrix)
            t_ours = time.perf_counter() - t0
            a, b = gguf_util.gguf_tensor_bytes(ours), gguf_util.gguf_tensor_bytes(theirs)
            same = sum(1 for k in b if k in a and a[k] == b[k])
            print(f"{mix:8} {t_ours:9.2f} {t_llama:12.2f} {t_ours / t_llama:6.2f}  {same}/{len(b)} equal", flush=True)
            ours.unlink()
            theirs.unlink()


if __name__ == "__main__":
    main()
