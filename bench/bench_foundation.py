"""Foundation benchmark: RTN throughput, evaluation speed, and perplexity beside llama.cpp's.

For the same float model (the demo model dequantized, written as an F32 GGUF) and the same
text, it prints lowbit's perplexity and llama.cpp's (via llama-cpp-python), their ratio, and
whether both tokenized the text identically. Usage::

    python bench/bench_foundation.py [--model smollm2-135m] [--chunks 8] [--ctx 512] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lowbit.core.scheme import QuantScheme
from lowbit.eval import chunk_bos, default_text, perplexity, read_text, tokenize
from lowbit.methods.rtn import rtn
from lowbit.models import Checkpoint, load, resolve
from lowbit.recipe import Recipe


def rtn_throughput(source: str, scheme: QuantScheme) -> dict:
    src = resolve(source)
    ckpt = Checkpoint(src.hf_dir)
    plan = Recipe(scheme=scheme).plan({n: ckpt.shape(n) for n in ckpt.keys()})
    weights = {n: ckpt.get(n).float() for n in plan}
    n_weights = sum(w.numel() for w in weights.values())
    t0 = time.perf_counter()
    for name, w in weights.items():
        rtn(w, plan[name])
    seconds = time.perf_counter() - t0
    return {"scheme": scheme.describe(), "weights": n_weights, "seconds": seconds, "weights_per_s": n_weights / seconds}


def llamacpp_perplexity(gguf_path: Path, text: str, ctx: int, chunks: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                n_threads=threads, verbose=False)
    add_bos = llm._model.add_bos_token() if hasattr(llm._model, "add_bos_token") else False
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=bool(add_bos), special=False)
    n = min(chunks, len(tokens) // ctx)
    first = ctx // 2
    nll: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        chunk = tokens[i * ctx:(i + 1) * ctx]
        if add_bos:
            chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:ctx], dtype=np.float64)
        lp = logits[first:-1] - np.log(np.exp(logits[first:-1] - logits[first:-1].max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits[first:-1].max(-1, keepdims=True)
        nll += list(-lp[np.arange(ctx - 1 - first), chunk[first + 1:]])
    seconds = time.perf_counter() - t0
    return {"ppl": math.exp(float(np.mean(nll))), "n_tokens": len(nll), "seconds": seconds,
            "tokens_per_s": n * ctx / seconds, "tokens": tokens[: n * ctx], "add_bos": bool(add_bos)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default=None)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {"model": args.model, "threads": args.threads, "ctx": args.ctx, "chunks": args.chunks}

    out["rtn"] = [rtn_throughput(args.model, s) for s in (QuantScheme(4, 64, True), QuantScheme(3, 64, False))]

    name, text = (str(args.text), read_text(args.text)) if args.text else default_text()
    text = text[: args.ctx * args.chunks * 12]
    out["text"] = name
    model = load(args.model)
    tokens = tokenize(model.tokenizer, text)
    bos = chunk_bos(model.tokenizer, tokens)
    ours = perplexity(model.model, tokens, ctx=args.ctx, bos_id=bos, max_chunks=args.chunks)
    out["lowbit"] = ours.as_dict()

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        out["llama_cpp"] = "llama-cpp-python not installed"
    else:
        from lowbit.gguf.convert import convert_to_gguf

        with tempfile.TemporaryDirectory() as tmp:
            f32 = convert_to_gguf(args.model, Path(tmp) / "model-f32.gguf", "F32")
            ref = llamacpp_perplexity(f32, text, args.ctx, args.chunks, args.threads)
        ref_tokens = ref.pop("tokens")
        out["llama_cpp"] = ref
        out["same_token_stream"] = ref_tokens == tokens[: len(ref_tokens)].tolist()
        out["ppl_ratio_lowbit_over_llamacpp"] = ours.ppl / ref["ppl"]
        out["eval_speed_ratio_lowbit_over_llamacpp"] = ours.tokens_per_s / ref["tokens_per_s"]

    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"model {args.model}, text {name}, ctx {args.ctx}, chunks {args.chunks}, threads {args.threads}")
    for r in out["rtn"]:
        print(f"RTN {r['scheme']:<18} {r['weights'] / 1e6:7.1f} M weights in {r['seconds']:6.2f} s = {r['weights_per_s'] / 1e6:7.1f} M weights/s")
    print(f"lowbit    perplexity {ours.ppl:9.4f}  ({ours.n_tokens} tokens scored, eval {ours.tokens_per_s:7.1f} tok/s)")
    if isinstance(out["llama_cpp"], dict):
        r = out["llama_cpp"]
        print(f"llama.cpp perplexity {r['ppl']:9.4f}  ({r['n_tokens']} tokens scored, eval {r['tokens_per_s']:7.1f} tok/s)")
        print(f"same token stream: {out['same_token_stream']}")
        print(f"ratio lowbit/llama.cpp: perplexity {out['ppl_ratio_lowbit_over_llamacpp']:.5f}, "
              f"eval speed {out['eval_speed_ratio_lowbit_over_llamacpp']:.3f}")
    else:
        print(f"llama.cpp: {out['llama_cpp']}")


if __name__ == "__main__":
    main()
