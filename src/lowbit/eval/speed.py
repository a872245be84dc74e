"""End-to-end generation speed: prefill and decode tokens per second, and peak memory.

``lowbit bench MODEL [MODEL ...]`` measures each model as a user runs it: the prompt (``prompt``
tokens of a text) through the model once with a KV cache (prefill), then ``tokens`` greedy
decode steps, each one new token against the cache. Every model is measured in its own fresh
process (``spawn``), so its peak memory is its own (resident set size, and CUDA's peak
allocation on a GPU) and no model warms another's caches.

Runtimes:

* ``lowbit``: a quantized checkpoint through :func:`lowbit.runtime.qlinear.load_quantized`
  (packed codes, the kernel registry picks each layer's matmul), any other source (HF folder,
  GGUF file, demo name) as the float transformers model :func:`lowbit.models.load` makes;
* ``llama.cpp``: a GGUF file (or demo name) in llama.cpp's CPU runtime through llama-cpp-python.

The first model is the baseline: each row's ``x_decode`` / ``x_prefill`` are its speed over the
baseline's, measured in the same run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import LowbitError

__all__ = ["BenchSettings", "SpeedResult", "bench", "bench_one", "format_bench", "plot_bench"]

RUNTIMES = ("lowbit", "llama.cpp")


@dataclass
class BenchSettings:
    """What :func:`bench` measures: ``prompt`` tokens of prefill, then ``tokens`` decode steps,
    on ``device`` with ``threads`` CPU threads, under ``runtime``; ``warmup`` decode steps first
    (not timed) so that one-time costs (kernel compilation, allocation) stay out of the figures."""

    prompt: int = 512
    tokens: int = 128
    device: str = "cpu"
    runtime: str = "lowbit"
    threads: int | None = None
    warmup: int = 4
    text: str | None = None
    dtype: str | None = None  # float sources: float32 on the CPU, bfloat16 on a GPU unless given


@dataclass
class SpeedResult:
    """One model's figures. Rates are tokens per second; memory in MB (``peak_rss_mb``: the
    whole process; ``peak_gpu_mb``: CUDA's peak allocation, GPU runs only)."""

    model: str
    runtime: str
    device: str
    prompt_tokens: int
    decode_tokens: int
    prefill_s: float
    decode_s: float
    prefill_tok_s: float
    decode_tok_s: float
    load_s: float
    peak_rss_mb: float
    peak_gpu_mb: float | None
    generated: list[int]
    x_prefill: float | None = None
    x_decode: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prompt_ids(tokenize_fn: Any, settings: BenchSettings) -> list[int]:
    """``settings.prompt`` token ids of the benchmark's text (WikiText-2 or lowbit's default text)."""
    from ..text import default_text, read_text

    text = read_text(settings.text) if settings.text else default_text()[1]
    ids = list(tokenize_fn(text[: settings.prompt * 16]))
    if len(ids) < settings.prompt:
        raise LowbitError(settings.text, f"the text has {len(ids)} tokens, fewer than --prompt {settings.prompt}")
    return ids[: settings.prompt]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_lowbit(spec: str, settings: BenchSettings) -> dict[str, Any]:
    import torch

    from ..models.loader import load, resolve

    device = torch.device(settings.device)
    t0 = time.perf_counter()
    src = resolve(spec)
    if src.kind == "quantized":
        from ..runtime.qlinear import load_quantized

        model, tokenizer = load_quantized(src.hf_dir, device=device)
    else:
        dtype = getattr(torch, settings.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
        loaded = load(src, dtype=dtype, device=device)
        model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    load_s = time.perf_counter() - t0
    ids = _prompt_ids(lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], settings)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    import inspect

    # transformers 5.25 names the KV cache ``cache``; earlier versions ``past_key_values``
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def generate(prompt: list[int], steps: int) -> tuple[float, float, list[int]]:
        x = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            sync()
            t = time.perf_counter()
            out = model(input_ids=x, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            prefill = time.perf_counter() - t
            past, made = out[key], [int(nxt)]
            t = time.perf_counter()
            for _ in range(steps - 1):
                out = model(input_ids=nxt, use_cache=True, **{key: past})
                past = out[key]
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                made.append(int(nxt))  # the host reads each token, as generation does
            sync()
            return prefill, time.perf_counter() - t, made

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if settings.warmup:
        generate(ids[: min(16, len(ids))], settings.warmup + 1)
    prefill_s, decode_s, made = generate(ids, settings.tokens)
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"prefill_s": prefill_s, "decode_s": decode_s, "generated": made, "load_s": load_s, "peak_gpu_mb": gpu}


def _run_llamacpp(spec: str, settings: BenchSettings) -> dict[str, Any]:
    import numpy as np

    from ..api import _gguf_file
    from ..gguf.llamacpp import require

    if settings.device != "cpu":
        raise LowbitError(spec, "--runtime llama.cpp is measured on the CPU (llama-cpp-python's CPU build)")
    require("--runtime llama.cpp")
    from llama_cpp import Llama

    path = _gguf_file(spec, "--runtime llama.cpp")
    threads = settings.threads or os.cpu_count() or 1
    t0 = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=settings.prompt + settings.tokens + settings.warmup + 32,
                n_batch=min(512, settings.prompt), n_threads=threads, n_threads_batch=threads,
                n_gpu_layers=0, verbose=False)
    load_s = time.perf_counter() - t0
    ids = _prompt_ids(lambda t: llm.tokenize(t.encode(), add_bos=False, special=False), settings)
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:  # the batch's last token is the only one whose logits llama.cpp computes
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    def generate(prompt: list[int], steps: int) -> tuple[float, float, list[int]]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        nxt = last_argmax()
        prefill = time.perf_counter() - t
        made = [nxt]
        t = time.perf_counter()
        for _ in range(steps - 1):
            llm.eval([nxt])
            nxt = last_argmax()
            made.append(nxt)
        return prefill, time.perf_counter() - t, made

    if settings.warmup:
        generate(ids[: min(16, len(ids))], settings.warmup + 1)
    prefill_s, decode_s, made = generate(ids, settings.tokens)
    llm.close()
    return {"prefill_s": prefill_s, "decode_s": decode_s, "generated": made, "load_s": load_s, "peak_gpu_mb": None}


def bench_one(spec: str, settings: BenchSettings) -> SpeedResult:
    """Measure one model in this process (see :func:`bench` for a fresh process per model)."""
    if settings.runtime not in RUNTIMES:
        raise LowbitError("--runtime", f"unknown runtime {settings.runtime!r} (choose from {', '.join(RUNTIMES)})")
    if settings.prompt < 1 or settings.tokens < 2:
        raise LowbitError("--prompt/--tokens", "need at least 1 prompt token and 2 generated tokens")
    import torch

    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        run = _run_llamacpp if settings.runtime == "llama.cpp" else _run_lowbit
        r = run(spec, settings)
    finally:  # the caller's thread count back (results elsewhere, GPTQ's sums, depend on it)
        torch.set_num_threads(threads)
    steps = settings.tokens - 1  # the first token comes out of the prefill
    return SpeedResult(model=str(spec), runtime=settings.runtime, device=settings.device,
                       prompt_tokens=settings.prompt, decode_tokens=steps, prefill_s=r["prefill_s"],
                       decode_s=r["decode_s"], prefill_tok_s=settings.prompt / r["prefill_s"],
                       decode_tok_s=steps / r["decode_s"], load_s=r["load_s"], peak_rss_mb=_peak_rss_mb(),
                       peak_gpu_mb=r["peak_gpu_mb"], generated=r["generated"])


def _child(spec: str, settings: BenchSettings, conn: Any) -> None:
    import warnings

    warnings.simplefilter("ignore", FutureWarning)  # libraries' notes on their own APIs, not the user's
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        conn.send(("ok", bench_one(spec, settings)))
    except LowbitError as e:
        conn.send(("error", str(e)))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it as one line
        conn.send(("error", f"{spec}: {type(e).__name__}: {e}"))
    finally:
        conn.close()


def bench(models: list[str], settings: BenchSettings | None = None, fresh_process: bool = True) -> list[SpeedResult]:
    """Measure each of ``models`` (each in a fresh process unless ``fresh_process`` is false);
    the first is the baseline of the ``x_prefill`` / ``x_decode`` ratios."""
    settings = settings or BenchSettings()
    if not models:
        raise LowbitError("bench", "no model to measure")
    from ..progress import track

    results: list[SpeedResult] = []
    ctx = mp.get_context("spawn")
    for spec in track(models, "bench", unit="model"):
        if not fresh_process:
            results.append(bench_one(spec, settings))
            continue
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(spec, settings, child), daemon=True)
        p.start()
        child.close()
        try:
            status, payload = parent.recv()
        except EOFError:
            p.join()
            raise LowbitError(spec, f"the benchmark process died (exit code {p.exitcode})") from None
        p.join()
        if status != "ok":
            raise LowbitError(None, payload)
        results.append(payload)
    base = results[0]
    for r in results:
        r.x_prefill = r.prefill_tok_s / base.prefill_tok_s
        r.x_decode = r.decode_tok_s / base.decode_tok_s
    return results


def format_bench(results: list[SpeedResult]) -> str:
    """A plain-text table of :func:`bench`'s results (ratios against the first row)."""
    head = f"{'model':40s} {'runtime':9s} {'prefill tok/s':>13s} {'x':>5s} {'decode tok/s':>12s} {'x':>5s} {'peak RSS MB':>11s}"
    lines = [head]
    for r in results:
        gpu = f"  GPU {r.peak_gpu_mb:.0f} MB" if r.peak_gpu_mb is not None else ""
        name = r.model if len(r.model) <= 40 else "..." + r.model[-37:]
        lines.append(f"{name:40s} {r.runtime:9s} {r.prefill_tok_s:13.1f} {r.x_prefill or 0:5.2f} "
                     f"{r.decode_tok_s:12.1f} {r.x_decode or 0:5.2f} {r.peak_rss_mb:11.0f}{gpu}")
    return "\n".join(lines)


def plot_bench(results: list[SpeedResult], path: str | Path) -> Path:
    """Bars of decode and prefill tokens per second and of peak memory, one group per model."""
    from .report import _figure, _save

    plt = _figure()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [Path(r.model).name or r.model for r in results]
    for ax, key, title in ((axes[0], "decode_tok_s", "decode tokens/s"), (axes[1], "prefill_tok_s", "prefill tokens/s"),
                           (axes[2], "peak_rss_mb", "peak RSS (MB)")):
        vals = [getattr(r, key) for r in results]
        ax.bar(range(len(vals)), vals, color=["#888888"] + ["#3b75af"] * (len(vals) - 1))
        ax.set_xticks(range(len(vals)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    r0 = results[0]
    fig.suptitle(f"{r0.runtime} on {r0.device}: {r0.prompt_tokens}-token prompt, {r0.decode_tokens + 1} generated "
                 "(first bar: baseline)", fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path))
