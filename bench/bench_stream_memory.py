"""Peak host memory of a whole GPTQ run (quantize + save) against the number of decoder layers.

SmolLM2-135M (30 layers) and copies of it cut to fewer layers (same config otherwise, the
first N layers' tensors) are quantized with GPTQ W4 g64 sym on the CPU through
``quantize_model`` and written as a GPTQ checkpoint with ``formats.save``, each run in a fresh
child process. The child samples its resident set every 20 ms: VmRSS (what ``ru_maxrss``
also reports), split into RssAnon (the process's own memory) and RssFile (mapped file pages,
e.g. the checkpoint being read). A flat peak beyond the fixed part (Python + torch +
transformers, the embedding used for the calibration pass, the calibration activations,
one output shard) shows that finished layers are not kept in memory. The writer holds one
output shard; it is 8 MiB here (``--max-shard-mb``; ``formats.save`` defaults to 2 GiB) so
that on a model this small the shard does not grow with the layer count.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_stream_memory.py            # 8, 16, 30 layers
    python bench/bench_stream_memory.py --layers 4 30 --samples 8 --seq-len 128

Writes ``bench/results/stream_memory_cpu.txt`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIELDS = ("VmRSS", "RssAnon", "RssFile")


def _status_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in FIELDS:
                out[key] = int(line.split()[1]) / 1024
    return out


class PeakSampler:
    """Peak VmRSS / RssAnon / RssFile per named phase, sampled every 20 ms in a thread."""

    def __init__(self) -> None:
        self.phase = "start"
        self.peaks: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        now = _status_mb()
        peak = self.peaks.setdefault(self.phase, dict.fromkeys(FIELDS, 0.0))
        for k in FIELDS:
            peak[k] = max(peak[k], now.get(k, 0.0))

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.sample()

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def child(args: argparse.Namespace) -> None:
    """One run in this process; prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    with PeakSampler() as peaks:
        import transformers  # noqa: F401  (imports before the baseline)

        from lowbit import formats
        from lowbit.core import QuantScheme
        from lowbit.pipeline import quantize_model
        from lowbit.methods import METHODS
        from lowbit.models.calibration import CalibrationConfig, load_calibration
        from lowbit.models.loader import load_tokenizer

        calib = CalibrationConfig(n_samples=args.samples, seq_len=args.seq_len, batch_size=4, seed=0)
        peaks.enter("calib")  # building the calibration tokens alone (quantize_model does it again)
        load_calibration(load_tokenizer(Path(args.model)), calib, METHODS.get("gptq").calibration_default)
        peaks.enter("quantize")
        t0 = time.perf_counter()
        qm = quantize_model(args.model, "gptq", QuantScheme(4, 64, True), calib)
        t_quant = time.perf_counter() - t0
        peaks.enter("save")
        t0 = time.perf_counter()
        formats.save(qm, args.model, args.save_to, "gptq", max_shard_bytes=args.max_shard_mb * 2**20)
        t_save = time.perf_counter() - t0
        peaks.enter("end")
    n_layers = qm.config["num_hidden_layers"]
    print(json.dumps({
        "layers": n_layers, "engine_s": qm.config["lowbit"]["seconds"], "quantize_s": t_quant, "save_s": t_save,
        "s_per_layer": qm.config["lowbit"]["seconds"] / n_layers, "peaks_mb": peaks.peaks,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "output_mb": sum(f.stat().st_size for f in Path(args.save_to).iterdir()) / 2**20,
    }))


def truncated_copy(src: Path, dst: Path, n_layers: int) -> Path:
    """``src`` with only its first ``n_layers`` decoder layers (config and tensors)."""
    from safetensors.torch import save_file

    from lowbit.models import Checkpoint

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = n_layers
    for key in ("layer_types",):
        if isinstance(config.get(key), list):
            config[key] = config[key][:n_layers]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    ckpt = Checkpoint(src)
    keep = [n for n in ckpt.keys() if not n.startswith("model.layers.") or int(n.split(".")[2]) < n_layers]
    save_file({n: ckpt.get(n) for n in keep}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, nargs="+", default=[8, 16, 30])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-shard-mb", type=int, default=8,
                   help="output shard size: the writer holds one shard (formats.save defaults to 2 GiB)")
    p.add_argument("--out", default=str(HERE / "results" / "stream_memory_cpu.txt"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--save-to", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    from lowbit.models import resolve

    src = resolve(args.model).hf_dir
    full = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "LOWBIT_NO_PROGRESS": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-mem-") as tmp:
        for n in args.layers:
            model = src if n >= full else truncated_copy(src, Path(tmp) / f"l{n}", n)
            cmd = [sys.executable, __file__, "--child", "--model", str(model), "--save-to", str(Path(tmp) / f"out{n}"),
                   "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--threads", str(args.threads),
                   "--max-shard-mb", str(args.max_shard_mb)]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if res.returncode:
                sys.exit(f"child failed ({n} layers):\n{res.stderr[-3000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)

    lines = [
        f"GPTQ W4 g64 sym, {args.model} cut to N decoder layers, CPU ({args.threads} thread), "
        f"calibration {args.samples} x {args.seq_len}, then formats.save(gptq, max_shard_bytes={args.max_shard_mb} MiB).",
        "Peak resident memory of a fresh child process per row, sampled every 20 ms (MiB):",
        "  base = importing torch/transformers/lowbit; calib = building the calibration tokens (default text);",
        "  quantize = quantize_model; save = formats.save;",
        "  RSS = VmRSS (= ru_maxrss), anon = RssAnon (own memory), file = RssFile (mapped checkpoint pages).",
        "",
        f"{'layers':>6} {'base RSS':>9} {'calib RSS':>10} {'quant RSS':>10} {'quant anon':>11} {'quant file':>11} {'save RSS':>9} "
        f"{'save anon':>10} {'ru_maxrss':>10} {'s/layer':>8} {'save s':>7} {'out MB':>7}",
    ]
    for r in rows:
        pk = r["peaks_mb"]
        lines.append(
            f"{r['layers']:>6} {pk['start']['VmRSS']:>9.0f} {pk['calib']['VmRSS']:>10.0f} {pk['quantize']['VmRSS']:>10.0f} {pk['quantize']['RssAnon']:>11.0f} "
            f"{pk['quantize']['RssFile']:>11.0f} {pk['save']['VmRSS']:>9.0f} {pk['save']['RssAnon']:>10.0f} "
            f"{r['ru_maxrss_mb']:>10.0f} {r['s_per_layer']:>8.2f} {r['save_s']:>7.1f} {r['output_mb']:>7.1f}")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        slope = (b["ru_maxrss_mb"] - a["ru_maxrss_mb"]) / (b["layers"] - a["layers"])
        lines.append("")
        lines.append(f"peak growth per extra layer: {slope:+.2f} MiB (one layer's float32 linear weights: "
                     f"{_layer_mb(src):.1f} MiB)")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


def _layer_mb(src: Path) -> float:
    from lowbit.models import Checkpoint

    ckpt = Checkpoint(src)
    n = 0
    for name in ckpt.keys():
        if name.startswith("model.layers.0."):
            size = 1
            for d in ckpt.shape(name):
                size *= d
            n += size
    return n * 4 / 2**20


if __name__ == "__main__":
    main()
