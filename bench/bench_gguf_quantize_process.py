"""GGUF quantization as a user runs it: the whole ``lowbit quantize`` process against the whole
``llama-quantize`` process, same input file, same type, same thread count; bytes compared.

The time is wall-clock from process start to exit (lowbit's includes importing torch), the best
of ``--repeat`` runs each; ``ratio`` = lowbit / llama-quantize. ``llama-quantize`` is built from the
llama-cpp-python sdist's vendored llama.cpp (see bench/llamacpp_agreement.py for the commands;
``cmake --build build --target llama-quantize``).

    python bench/bench_gguf_quantize_process.py --llama-bin .../build/bin [--model smollm2-135m]
        [--types Q4_0 Q8_0 Q4_K_M Q6_K IQ4_XS] [--threads 2] [--repeat 2] [--imatrix auto|FILE]

``--imatrix auto`` first runs ``llama-imatrix`` on the F16 file (``--imatrix-chunks`` chunks of 512
tokens of wikitext-2's test text, once, kept in the work folder); both quantizers then read that
same file, so the bytes stay comparable. ``LOWBIT_PYTHONPATH`` (a ``src`` folder) runs another
lowbit checkout (a ``git worktree`` of an earlier commit: the "before" numbers).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

DEFAULT_TYPES = ["Q4_0", "Q8_0", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS"]


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall-clock seconds and peak RSS (MB) of one whole process.

    The peak comes from GNU time (``/usr/bin/time -f %M``), which forks from its own small
    process: a child forked from this Python process would carry this process's high-water
    mark across its ``exec`` (Linux keeps the larger of the two), so ``wait4``'s figure would be
    at least this process's size."""
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        full = [gnu_time, "-f", "%M", "-o", rss.name, *cmd] if gnu_time else cmd
        t0 = time.perf_counter()
        p = subprocess.run(full, capture_output=True, text=True, env=env)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        text = rss.read().strip().splitlines()
    return dt, (float(text[-1]) / 1024 if gnu_time and text else float("nan"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bin", required=True, help="folder with llama-quantize")
    ap.add_argument("--model", default="smollm2-135m", help="a source lowbit reads; written once as an F16 GGUF")
    ap.add_argument("--types", nargs="+", default=DEFAULT_TYPES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", default="/tmp/lowbit-quantize-process")
    ap.add_argument("--imatrix", default=None, help="'auto' (made by llama-imatrix) or an imatrix file for both")
    ap.add_argument("--imatrix-chunks", type=int, default=8)
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"
                                          / "wikitext-2-raw" / "wiki.test.raw"))
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "model-F16.gguf"
    if not f16.exists():
        from lowbit.gguf.convert import quantize_to_gguf

        quantize_to_gguf(a.model, f16, "F16")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from gguf_util import gguf_tensor_bytes

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "LOWBIT_THREADS": str(a.threads)}
    if os.environ.get("LOWBIT_PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["LOWBIT_PYTHONPATH"]
    imatrix: list[str] = []
    if a.imatrix == "auto":
        im = work / f"imatrix-{a.imatrix_chunks}.gguf"
        if not im.exists():
            subprocess.run([str(Path(a.llama_bin) / "llama-imatrix"), "-m", str(f16), "-f", a.text, "-o", str(im),
                            "--chunks", str(a.imatrix_chunks), "-t", str(a.threads), "-c", "512"],
                           check=True, capture_output=True)
        imatrix = ["--imatrix", str(im)]
    elif a.imatrix:
        imatrix = ["--imatrix", a.imatrix]
    load = os.getloadavg()[0]
    print(f"{a.model} as F16 GGUF ({f16.stat().st_size / 1e6:.0f} MB), threads {a.threads}, best of {a.repeat}, "
          f"load average {load:.1f} on {os.cpu_count()} CPUs, imatrix {imatrix[1] if imatrix else 'none'}, "
          f"lowbit from {env.get('PYTHONPATH') or 'the installed checkout'}")
    print(f"{'type':8s} {'lowbit s':>9s} {'llama s':>8s} {'ratio':>6s} {'lowbit MB':>10s} {'llama MB':>9s}  bytes equal")
    for t in a.types:
        ours, theirs = work / f"lowbit-{t}.gguf", work / f"llama-{t}.gguf"
        lb = [sys.executable, "-m", "lowbit.cli", "--quiet", "quantize", str(f16), "--to", t, "-o", str(ours), "--overwrite",
              *imatrix]
        ll = [str(Path(a.llama_bin) / "llama-quantize"), *imatrix, str(f16), str(theirs), t, str(a.threads)]
        runs_lb, runs_ll = [], []
        for _ in range(a.repeat):  # alternated, so that both see the same load
            runs_lb.append(timed(lb, env))
            runs_ll.append(timed(ll, env))
        (t_lb, m_lb), (t_ll, m_ll) = min(runs_lb), min(runs_ll)
        x, y = gguf_tensor_bytes(ours), gguf_tensor_bytes(theirs)
        same = sum(x[k] == y.get(k) for k in x)
        print(f"{t:8s} {t_lb:9.2f} {t_ll:8.2f} {t_lb / t_ll:6.2f} {m_lb:10.0f} {m_ll:9.0f}  {same}/{len(y)} tensors",
              flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
