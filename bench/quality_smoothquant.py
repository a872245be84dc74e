"""W8A8 with and without SmoothQuant (fixed strengths and auto), with and without the FP8 KV cache.

Each setting is quantized, written as a compressed-tensors checkpoint and evaluated the way vLLM
runs it (lowbit eval applies the int8 per-token activations and the FP8 KV cache the checkpoint
declares), against the float model's scores kept once. Rows are appended to
bench/results/quality_smoothquant.jsonl (a finished row is not redone) and the table is written to
bench/results/quality_smoothquant.md.

    OMP_NUM_THREADS=2 nice python bench/quality_smoothquant.py [--model smollm2-135m] [--chunks 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# label, method, options (smoothing strength / kv cache)
SETTINGS: list[tuple[str, str | None, dict]] = [  # cheapest first: the run can be cut short
    ("W8A8 RTN", "rtn", {}),
    ("W8A8 SmoothQuant 0.5 + RTN", "smoothquant+rtn", {"smoothing": 0.5}),
    ("W8A8 SmoothQuant auto + RTN", "smoothquant+rtn", {"smoothing": "auto"}),
    ("W8A8 SmoothQuant 0.8 + RTN", "smoothquant+rtn", {"smoothing": 0.8}),
    ("W8A8 RTN + FP8 KV", "rtn", {"kv_cache": "tensor"}),
    ("float weights + FP8 KV", "rtn", {"kv_cache": "tensor", "float": True}),
    ("W8A8 SmoothQuant auto + RTN + FP8 KV", "smoothquant+rtn", {"smoothing": "auto", "kv_cache": "tensor"}),
    ("W8A8 SmoothQuant 0.5 + GPTQ", "smoothquant+gptq", {"smoothing": 0.5}),
]


def main() -> None:
    import lowbit.api as lb
    from lowbit.api import EvalSettings, _eval_model, _text_tokens
    from lowbit.core.presets import preset
    from lowbit.eval import chunk_bos, folder_size
    from lowbit.eval.perplexity import reference_scores, score_against
    from lowbit.models import load
    from lowbit.recipe import Recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"))
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--skip", action="append", default=[], help="leave out settings whose label contains this")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    jsonl = RESULTS / "quality_smoothquant.jsonl"
    done = {}
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["setting"], r["chunks"])] = r
    settings = EvalSettings(text=args.text, ctx=args.ctx, max_chunks=args.chunks)
    ref = load(args.model)
    text_name, tokens = _text_tokens(ref.tokenizer, settings)
    bos = chunk_bos(ref.tokenizer, tokens)
    w8a8 = preset("W8A8").scheme
    with tempfile.TemporaryDirectory(prefix="lowbit-sq-bench-") as tmp:
        reference = reference_scores(ref.model, tokens, ctx=args.ctx, bos_id=bos, max_chunks=args.chunks, folder=tmp)
        del ref
        rows: list[dict] = [{"model": args.model, "setting": "float (reference)", "chunks": args.chunks, "ppl": float("nan")}]
        for label, method, opts in SETTINGS:
            if any(k in label for k in args.skip):
                continue
            key = (args.model, label, args.chunks)
            if key in done:
                rows.append(done[key])
                rows[0]["ppl"] = done[key].get("ppl_ref", rows[0]["ppl"])
                continue
            opts = dict(opts)
            recipe = Recipe(overrides=((".", None),)) if opts.pop("float", False) else Recipe(scheme=w8a8, group_fallback=True)
            out = Path(tmp) / label.replace(" ", "_").replace("+", "p")
            t0 = time.perf_counter()
            lb.quantize(args.model, out, method=method, recipe=recipe, calib="pydoc", samples=args.samples,
                        seq_len=args.seq_len, **opts)
            seconds = time.perf_counter() - t0
            model, _, _, numerics = _eval_model(out, settings, args.ctx // 2, "model")
            kl = score_against(reference, model, desc=label)
            rows[0]["ppl"] = kl.ppl_ref
            row = {"model": args.model, "setting": label, "chunks": args.chunks, "text": text_name, "ppl": kl.ppl,
                   "ppl_ref": kl.ppl_ref,
                   "kl_mean": kl.kl_mean, "kl_p99": kl.kl_p99, "top1": kl.top1_agreement, "quantize_s": seconds,
                   "bytes": folder_size(out).file_bytes, "numerics": numerics}
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
    lines = [f"# W8A8 / SmoothQuant / FP8 KV on {args.model}", "",
             f"WikiText-2 test, {args.chunks} chunks of {args.ctx} tokens (second halves scored), KL against the float "
             f"model; calibration pydoc {args.samples} x {args.seq_len}; activations and KV cache applied as declared.", "",
             "| setting | PPL | KL mean | KL p99 | top-1 | quantize s |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "kl_mean" not in r:
            lines.append(f"| {r['setting']} | {r['ppl']:.3f} | 0 | 0 | 100% | |")
            continue
        lines.append(f"| {r['setting']} | {r['ppl']:.3f} | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} | "
                     f"{100 * r['top1']:.2f}% | {r['quantize_s']:.0f} |")
    (RESULTS / "quality_smoothquant.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
