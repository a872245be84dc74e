"""``lowbit recommend``: which scheme for this model, this memory, this hardware and runtime.

The decision tree:

- GPU runtimes (vLLM, transformers on CUDA): FP8 (``FP8_DYNAMIC``) where the GPU computes in FP8
  (compute capability 8.9 and up: Ada, Hopper, Blackwell), else int8 weights (``W8A16``); 4-bit
  weights in groups of 128 (``W4A16``) calibrated with AWQ on Ampere and newer (8.0+: Marlin kernels),
  with GPTQ below; float16 when it fits and nothing needs to be saved.
- llama.cpp and Ollama, and every CPU or Apple target: GGUF K-quants, the largest that fits
  (``Q8_0``, ``Q6_K``, ``Q5_K_M``, ``Q4_K_M``, ``IQ4_XS``, ``Q3_K_M``, ``IQ3_M``, ``Q2_K``); under 4 bits
  an importance matrix is part of the command.
- The budget picks the bits: weights (parameters x the scheme's bits per weight) + the KV cache
  (2 x layers x KV heads x head size x context x 2 bytes, F16) + the runtime's overhead (0.3 GB, and on
  CUDA the 10% of the memory vLLM keeps back) must fit in ``memory``. A scheme that lowbit cannot write yet (its preset is not produced by any method or held
  by any format, read from the registries) is skipped with a note.

``measure``: the choice and its neighbours are quantized and their KL-divergence measured on a few
chunks of text (``lowbit compare``), so the expected size and quality are this model's, not typical
figures.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import LowbitError

#: GPU name -> CUDA compute capability
GPUS: dict[str, float] = {
    "b200": 10.0, "b100": 10.0, "gb200": 10.0, "rtx5090": 12.0, "h200": 9.0, "h100": 9.0, "gh200": 9.0,
    "l40s": 8.9, "l40": 8.9, "l4": 8.9, "rtx4090": 8.9, "rtx4080": 8.9, "rtx4070": 8.9, "rtx6000ada": 8.9,
    "a100": 8.0, "a800": 8.0, "a30": 8.0, "a10": 8.6, "a10g": 8.6, "a40": 8.6, "a6000": 8.6, "rtx3090": 8.6,
    "rtx3080": 8.6, "rtx3060": 8.6, "t4": 7.5, "rtx2080": 7.5, "v100": 7.0,
}
DEVICES = ("cpu", "cuda", "apple")
RUNTIMES = ("llama.cpp", "ollama", "vllm", "transformers")


@dataclass(frozen=True)
class Candidate:
    scheme: str  # a lowbit compare scheme name: a GGUF mix or PRESET[-METHOD]
    bpw: float  # typical bits per weight of the whole file (7B-class models for GGUF mixes)
    quality: str
    format: str


#: best first; the first that fits the budget (and lowbit can write) is the choice
GGUF_LADDER = (
    Candidate("Q8_0", 8.5, "near-lossless", "gguf"),
    Candidate("Q6_K", 6.56, "near-lossless", "gguf"),
    Candidate("Q5_K_M", 5.7, "very small loss", "gguf"),
    Candidate("Q4_K_M", 4.85, "small loss (the usual default)", "gguf"),
    Candidate("IQ4_XS", 4.3, "small loss, needs an importance matrix to be at its best", "gguf"),
    Candidate("Q3_K_M", 3.9, "noticeable loss; use an importance matrix", "gguf"),
    Candidate("IQ3_M", 3.7, "noticeable loss; importance matrix required", "gguf"),
    Candidate("Q2_K", 3.0, "large loss: a smaller model at 4 bits is often better", "gguf"),
)


def _gpu_ladder(cc: float, runtime: str) -> list[Candidate]:
    four = "W4A16-awq" if cc >= 8.0 else "W4A16-gptq"
    ladder = [Candidate("BF16", 16.0, "lossless (no quantization)", "float")]
    if cc >= 8.9:
        ladder.append(Candidate("FP8_DYNAMIC", 8.1, "near-lossless, FP8 matmuls", "compressed-tensors"))
    ladder.append(Candidate("W8A16", 8.1, "near-lossless", "compressed-tensors"))
    ladder.append(Candidate(four, 4.25, "small loss (calibrated)", "compressed-tensors"))
    return ladder


def parse_memory(text: str) -> int:
    """``8GB``, ``7.5GiB``, ``512MB``, ``16g``, ``1000B`` -> bytes (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", str(text).lower())
    if m is None or not (m.group(2) or m.group(4)):
        raise LowbitError("--memory", f"{text!r}: expected a size like 8GB, 7.5GiB or 512MB")
    power = "kmgt".index(m.group(2)) + 1 if m.group(2) else 0
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base**power)


@dataclass
class ModelShape:
    params: int
    layers: int
    kv_heads: int
    head_dim: int
    max_ctx: int | None


def model_shape(model: Any) -> ModelShape:
    """Parameters (from the checkpoint's headers) and the attention shape (from config.json)."""
    from .models import Checkpoint, resolve
    from .models.loader import read_config

    src = resolve(model)
    cfg = read_config(src.hf_dir)
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
    ckpt = Checkpoint(src.hf_dir)
    params = sum(math.prod(ckpt.shape(n)) for n in ckpt.keys())
    heads = int(cfg.get("num_attention_heads") or 1)
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size", 0)) // max(1, heads))
    return ModelShape(params, int(cfg.get("num_hidden_layers") or 0), int(cfg.get("num_key_value_heads") or heads),
                      head_dim, cfg.get("max_position_embeddings"))


def _writable(scheme: str) -> str | None:
    """None when lowbit can make ``scheme``, else why not (from the registries)."""
    if scheme == "BF16":
        return None
    from .eval.compare import parse_scheme

    try:
        parse_scheme(scheme)
    except LowbitError as exc:
        return exc.problem
    return None


def _commands(model: str, c: Candidate, runtime: str) -> list[str]:
    stem = Path(str(model)).name.split(".gguf")[0] or "model"
    if c.format == "float":
        return [f"# no quantization needed: run {model} as it is"]
    if c.format == "gguf":
        out = f"{stem}-{c.scheme}.gguf"
        cmds = []
        imatrix = c.scheme.startswith(("IQ", "Q3", "Q2"))
        if imatrix:
            cmds.append(f"lowbit imatrix {model} --text calibration.txt -o {stem}-imatrix.gguf")
        cmds.append(f"lowbit quantize {model} --to {c.scheme}" + (f" --imatrix {stem}-imatrix.gguf" if imatrix else "")
                    + f" -o {out}")
        if runtime == "ollama":
            cmds += [f"printf 'FROM ./{out}\\n' > Modelfile", f"ollama create {stem.lower()}-{c.scheme.lower()} -f Modelfile"]
        elif runtime == "llama.cpp":
            cmds.append(f"llama-cli -m {out}")
        return cmds
    preset, _, method = c.scheme.partition("-")
    out = f"{stem}-{c.scheme.lower()}"
    cmd = f"lowbit quantize {model} --scheme {preset}" + (f" --method {method}" if method else "")
    if method in ("awq", "gptq"):
        cmd += " --calib calibration.txt"
    cmds = [cmd + f" --format compressed-tensors -o {out}"]
    if runtime == "vllm":
        cmds.append(f"vllm serve ./{out}")
    return cmds


def recommend(model: Any, memory: str | int, device: str = "cpu", gpu: str | None = None, runtime: str | None = None,
              ctx: int = 4096, measure: bool = False, text: str | None = None, chunks: int = 4,
              workdir: str | Path | None = None) -> dict[str, Any]:
    """The scheme to use (see the module), its expected size and quality, and the commands that make it."""
    if device not in DEVICES:
        raise LowbitError("--device", f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    runtime = runtime or ("vllm" if device == "cuda" else "llama.cpp")
    if runtime not in RUNTIMES:
        raise LowbitError("--runtime", f"unknown runtime {runtime!r} (choose from {', '.join(RUNTIMES)})")
    if runtime == "vllm" and device != "cuda":
        raise LowbitError("--runtime", f"vLLM runs quantized checkpoints on CUDA GPUs; on {device} use llama.cpp or ollama")
    budget = parse_memory(memory) if isinstance(memory, str) else int(memory)
    cc = None
    if device == "cuda":
        key = (gpu or "a100").lower().replace(" ", "").replace("-", "").replace("nvidia", "").replace("geforce", "")
        if key not in GPUS:
            raise LowbitError("--gpu", f"unknown GPU {gpu!r} (known: {', '.join(GPUS)})")
        cc = GPUS[key]
    shape = model_shape(model)
    kv_bytes = 2 * shape.layers * shape.kv_heads * shape.head_dim * ctx * 2
    notes = []
    if shape.max_ctx and ctx > shape.max_ctx:
        notes.append(f"the model was trained for {shape.max_ctx} tokens of context; --ctx {ctx} sizes the cache beyond it")
    gguf = runtime in ("llama.cpp", "ollama") or (device in ("cpu", "apple") and runtime != "transformers")
    ladder = list(GGUF_LADDER) if gguf else _gpu_ladder(cc or 7.0, runtime)
    if device == "cpu" and runtime == "transformers":
        notes.append("transformers on the CPU runs dequantized weights: slow; llama.cpp runs GGUF K-quants natively")
    overhead = int(0.3e9 + (0.1 * budget if device == "cuda" else 0))  # runtime buffers, activations; vLLM keeps 10%
    rows = []
    for c in ladder:
        weights = int(shape.params * c.bpw / 8)
        total = weights + kv_bytes + overhead
        why_not = _writable(c.scheme)
        rows.append({**asdict(c), "weights_bytes": weights, "kv_cache_bytes": kv_bytes, "overhead_bytes": overhead,
                     "total_bytes": total, "fits": total <= budget, "lowbit_writes": why_not is None,
                     **({"not_writable": why_not} if why_not else {})})
    choice = next((r for r in rows if r["fits"] and r["lowbit_writes"]), None)
    skipped = [r["scheme"] for r in rows if r["fits"] and not r["lowbit_writes"]
               and (choice is None or rows.index(r) < rows.index(choice))]
    if skipped:
        notes.append(f"{', '.join(skipped)} would fit but lowbit does not write it yet (from the registries)")
    result: dict[str, Any] = {
        "model": str(model), "params": shape.params, "device": device, "gpu": gpu, "compute_capability": cc,
        "runtime": runtime, "memory_budget_bytes": budget, "ctx": ctx, "kv_cache_bytes": kv_bytes,
        "candidates": rows, "choice": choice, "notes": notes,
    }
    if choice is None:
        smallest = rows[-1]
        need = smallest["total_bytes"] / 1e9
        result["commands"] = []
        notes.append(f"nothing fits: the smallest, {smallest['scheme']}, needs {need:.2f} GB with a {ctx}-token KV cache; "
                     f"a shorter --ctx, more memory or a smaller model")
        return result
    result["commands"] = _commands(str(model), Candidate(choice["scheme"], choice["bpw"], choice["quality"],
                                                         choice["format"]), runtime)
    if measure and choice["format"] != "float":
        result["measured"] = _measure(model, rows, choice, text, chunks, workdir)
    return result


def _measure(model: Any, rows: list[dict[str, Any]], choice: dict[str, Any], text: str | None, chunks: int,
             workdir: str | Path | None) -> list[dict[str, Any]]:
    """The choice and its writable neighbours on the ladder, quantized and measured (``lowbit compare``)."""
    from .eval.compare import compare
    from .fileio import scratch

    i = rows.index(choice)
    pick = [r["scheme"] for r in rows[max(0, i - 1) : i + 2] if r["lowbit_writes"] and r["format"] != "float"]
    if workdir is not None:
        got = compare(str(model), pick, workdir, text=text, max_chunks=chunks, isolate=False)
    else:
        with scratch("lowbit-recommend-") as tmp:
            got = compare(str(model), pick, Path(tmp) / "report", text=text, max_chunks=chunks, isolate=False)
    keys = ("scheme", "bytes", "bpw", "ppl", "ppl_ref", "kl_mean", "kl_p99", "top1")
    return [{k: row[k] for k in keys} for row in got["rows"]]


def format_recommendation(r: dict[str, Any]) -> str:
    gb = 1e9
    head = f"model: {r['model']} ({r['params'] / 1e9:.2f} B parameters)   target: {r['device']}"
    if r["gpu"]:
        head += f" {r['gpu']} (compute capability {r['compute_capability']})"
    lines = [head + f", {r['runtime']}, {r['memory_budget_bytes'] / gb:.1f} GB, KV cache for {r['ctx']} tokens "
             f"{r['kv_cache_bytes'] / gb:.2f} GB", ""]
    lines.append(f"{'scheme':<14} {'bpw':>5} {'weights GB':>10} {'total GB':>9}  fits  note")
    for c in r["candidates"]:
        note = c["quality"] if c["lowbit_writes"] else "lowbit does not write it yet"
        mark = "<-" if r["choice"] is c else "  "
        lines.append(f"{c['scheme']:<14} {c['bpw']:>5.2f} {c['weights_bytes'] / gb:>10.2f} {c['total_bytes'] / gb:>9.2f}  "
                     f"{'yes ' if c['fits'] else 'no  '}  {mark} {note}")
    if r["choice"]:
        c = r["choice"]
        lines += ["", f"choice: {c['scheme']} ({c['format']}): about {c['total_bytes'] / gb:.2f} GB in use, {c['quality']}"]
        lines += ["", "commands:"] + [f"  {cmd}" for cmd in r["commands"]]
    for m in r.get("measured", []):
        lines.append(f"measured {m['scheme']}: {m['bytes'] / 1e6:.1f} MB, {m['bpw']:.2f} bpw, KL {m['kl_mean']:.4f}, "
                     f"top-1 {100 * m['top1']:.1f}%, PPL {m['ppl']:.2f} (reference {m['ppl_ref']:.2f})")
    lines += [f"note: {n}" for n in r["notes"]]
    lines.append("sizes: bits per weight are typical whole-file figures (GGUF mixes on 7B-class models); "
                 "--measure gives this model's")
    return "\n".join(lines)
