"""Models bigger than memory: peak resident memory and time of RTN and GPTQ on Llama-3-8B shapes.

``make`` writes a Llama-shaped checkpoint of random BF16 weights (seeded; one safetensors shard
per decoder layer, generated one tensor at a time in row chunks, so never whole in memory) with
SmolLM2's tokenizer files (its vocabulary padded to 128256 in GGUF). ``run`` quantizes it in a
fresh child process per job, sampling VmRSS / RssAnon / RssFile every 20 ms, and checks the peak
against the bound "one decoder layer (float32, as the engine holds it) + calibration activations +
2 GB". A job on the first ``--first-layers`` layers uses a view of the same shards (symlinks, the
config cut to those layers); whole-model time is then extrapolated per layer and said so.

    nice -n 10 env OMP_NUM_THREADS=1 python bench/bench_big_model.py make --dir /work/big/l8b
    nice -n 10 env OMP_NUM_THREADS=1 python bench/bench_big_model.py run --dir /work/big/l8b \\
        --jobs rtn-gguf rtn-ct gptq --first-layers 2
    python bench/bench_big_model.py make --dir /work/big/l70b --shape 70b --layers 2   # first 2 layers only

Rows are appended (as JSON lines) to ``bench/results/big_model_cpu.jsonl``; the table is
``bench/results/big_model_cpu.md`` (written by hand from those rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHAPES = {  # Llama-3 8B and 70B (config.json of meta-llama/Meta-Llama-3-*)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}
VOCAB = 128256
GB = 2**30


def _config(shape: str, layers: int | None) -> dict:
    cfg = dict(SHAPES[shape])
    full = cfg["num_hidden_layers"]
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, **cfg,
            "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"], "hidden_act": "silu",
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
            "attention_bias": False, "mlp_bias": False, "lowbit_bench": {"shape": shape, "full_layers": full}}


def _layer_shapes(cfg: dict, i: int) -> dict[str, tuple[int, ...]]:
    h, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)}


def _random(shape: tuple[int, ...], gen, std: float):
    """A BF16 tensor of N(0, std^2) values (norm weights: 1 + small noise), made 64 Mi values at a time."""
    import torch

    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    step = 64 * 2**20
    for s in range(0, flat.numel(), step):
        n = min(step, flat.numel() - s)
        chunk = torch.randn(n, generator=gen, dtype=torch.float32).mul_(std)
        if len(shape) == 1:
            chunk.add_(1.0)
        flat[s : s + n] = chunk.to(torch.bfloat16)
        del chunk
    return out


def _write_shard(path: Path, shapes: dict[str, tuple[int, ...]], gen, std: float) -> dict[str, str]:
    from safetensors.torch import save_file

    tensors = {n: _random(s, gen, std) for n, s in shapes.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return dict.fromkeys(tensors, path.name)


def make(args: argparse.Namespace) -> None:
    import torch

    from lowbit.models import resolve

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _config(args.shape, args.layers)
    gen = torch.Generator().manual_seed(args.seed)
    h = cfg["hidden_size"]
    t0 = time.perf_counter()
    wmap: dict[str, str] = {}
    wmap |= _write_shard(out / "embed.safetensors", {"model.embed_tokens.weight": (VOCAB, h)}, gen, 0.02)
    for i in range(cfg["num_hidden_layers"]):
        wmap |= _write_shard(out / f"layer-{i:03d}.safetensors", _layer_shapes(cfg, i), gen, 0.02)
        print(f"layer {i} written ({time.perf_counter() - t0:.0f} s)", flush=True)
    wmap |= _write_shard(out / "head.safetensors", {"model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)}, gen, 0.02)
    total = sum((out / f).stat().st_size for f in set(wmap.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": dict(sorted(wmap.items()))}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = resolve("smollm2-135m").hf_dir
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok / name).exists():
            shutil.copy(tok / name, out / name)
    print(json.dumps({"made": str(out), "bytes": total, "seconds": time.perf_counter() - t0}), flush=True)


def first_layers_view(src: Path, dst: Path, k: int) -> Path:
    """``src`` cut to its first ``k`` decoder layers: the config changed, shards linked, not copied."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = k
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    keep = {n: f for n, f in index["weight_map"].items() if not n.startswith("model.layers.") or int(n.split(".")[2]) < k}
    for f in set(keep.values()):
        os.symlink(src / f, dst / f)
    index["weight_map"] = keep
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, dst / f.name)
    return dst


def child(args: argparse.Namespace) -> None:
    """One job in this process; prints a JSON line."""
    import resource

    import torch
    from bench_stream_memory import PeakSampler

    torch.set_num_threads(args.threads)
    with PeakSampler() as peaks:
        import transformers  # noqa: F401  (imported before the measured phase)

        from lowbit import api
        from lowbit.core.presets import preset
        from lowbit.recipe import Recipe

        peaks.enter("run")
        t0 = time.perf_counter()
        out = Path(args.out)
        if args.job == "rtn-gguf":
            api.quantize(args.model, out, to="Q4_K_M")
        elif args.job == "rtn-ct":
            w = preset("W4A16").weights
            api.quantize(args.model, out, recipe=Recipe(scheme=w), format="compressed-tensors")
        elif args.job == "gptq":
            w = preset("W4A16").weights
            api.quantize(args.model, out, method="gptq", recipe=Recipe(scheme=w), format="compressed-tensors",
                         calib="pydoc", samples=args.samples, seq_len=args.seq_len)
        else:
            raise SystemExit(f"unknown job {args.job}")
        seconds = time.perf_counter() - t0
        peaks.enter("end")
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"job": args.job, "seconds": seconds, "cpu_s": use.ru_utime + use.ru_stime,
                      "peaks_mb": peaks.peaks, "output_bytes": size,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bound_mb(cfg: dict, samples: int, seq_len: int, calibrated: bool) -> dict[str, float]:
    """The bound's parts (MiB): one decoder layer in float32, the calibration activations, 2 GB."""
    layer = sum(_numel(s) for s in _layer_shapes(cfg, 0).values()) * 4 / 2**20
    acts = samples * seq_len * cfg["hidden_size"] * 4 * 3 / 2**20 if calibrated else 0.0  # hidden in/out + one linear input
    return {"layer_mb": layer, "activations_mb": acts, "total_mb": layer + acts + 2048}


def _numel(s: tuple[int, ...]) -> int:
    n = 1
    for d in s:
        n *= d
    return n


def run(args: argparse.Namespace) -> None:
    src = Path(args.dir)
    cfg = json.loads((src / "config.json").read_text())
    full = cfg.get("lowbit_bench", {}).get("full_layers", cfg["num_hidden_layers"])
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "LOWBIT_NO_PROGRESS": "1"}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = Path(args.results)
    for job in args.jobs:
        k = args.first_layers if (job == "gptq" or args.all_first) and args.first_layers else cfg["num_hidden_layers"]
        model = src if k >= cfg["num_hidden_layers"] else first_layers_view(src, work / f"view{k}", k)
        out = work / ("out.gguf" if job == "rtn-gguf" else "out")
        cmd = [sys.executable, __file__, "child", "--job", job, "--model", str(model), "--out", str(out),
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        if res.returncode:
            print(f"{job} failed:\n{res.stderr[-4000:]}", flush=True)
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        b = bound_mb(cfg, args.samples, args.seq_len, job == "gptq")
        peak = row["peaks_mb"]["run"]
        row.update({"model": cfg.get("lowbit_bench", {}).get("shape", "?"), "layers_run": k, "full_layers": full,
                    "wall_s": wall, "bound": b, "within_bound": peak["VmRSS"] <= b["total_mb"],
                    "whole_model_s_extrapolated": row["seconds"] * full / k if k < full else None,
                    "whole_model_cpu_s_extrapolated": row["cpu_s"] * full / k if k < full else None,
                    "threads": args.threads, "samples": args.samples, "seq_len": args.seq_len})
        print(json.dumps(row), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--dir", required=True)
    m.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    m.add_argument("--layers", type=int, default=None, help="write only the first N decoder layers")
    m.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--dir", required=True)
    r.add_argument("--jobs", nargs="+", default=["rtn-gguf", "rtn-ct", "gptq"])
    r.add_argument("--first-layers", type=int, default=None, help="GPTQ (or every job with --all-first) on the first N layers")
    r.add_argument("--all-first", action="store_true")
    r.add_argument("--samples", type=int, default=4)
    r.add_argument("--seq-len", type=int, default=128)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--work", default="/work/big/work")
    r.add_argument("--results", default=str(HERE / "results" / "big_model_cpu.jsonl"))
    c = sub.add_parser("child")
    for a in ("--job", "--model", "--out"):
        c.add_argument(a, required=True)
    c.add_argument("--samples", type=int, default=4)
    c.add_argument("--seq-len", type=int, default=128)
    c.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    {"make": make, "run": run, "child": child}[args.cmd](args)


if __name__ == "__main__":
    main()
