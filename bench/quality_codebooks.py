"""Quality of bitsandbytes' codebooks (NF4, NF4 + double quantization, FP4) beside RTN integer grids.

For each model: quantize (``--method bnb --format bitsandbytes``; RTN to compressed-tensors), then
``lowbit eval`` against the unquantized model on WikiText-2 test: PPL, KL-divergence, top-1
agreement, and the bits per quantized weight of the file (scales, absmax codes, quant maps and
quant-state JSON included). Rows go to ``--jsonl`` as they finish; the Markdown table to ``--out``.

    OMP_NUM_THREADS=2 python bench/quality_codebooks.py [--models stories260K smollm2-135m] [--chunks 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lowbit.api as lb
from lowbit.core.presets import preset
from lowbit.core.scheme import QuantScheme
from lowbit.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"stories260K": str(ROOT.parent / "shared" / "models" / "stories260K"), "smollm2-135m": "smollm2-135m"}
SETTINGS = {  # label -> (method, scheme, format)
    "NF4 (b64)": ("bnb", "NF4", "bitsandbytes"),
    "NF4 + DQ (b64)": ("bnb", "NF4_DQ", "bitsandbytes"),
    "FP4 (b64)": ("bnb", "FP4", "bitsandbytes"),
    "FP4 + DQ (b64)": ("bnb", "FP4_DQ", "bitsandbytes"),
    "int4 asym g64 (RTN)": ("rtn", QuantScheme(4, 64, False), "compressed-tensors"),
    "int4 sym g128 (RTN)": ("rtn", QuantScheme(4, 128, True), "compressed-tensors"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--jsonl", type=Path, default=ROOT / "bench" / "results" / "quality_codebooks.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality_codebooks.md")
    args = ap.parse_args()
    settings = lb.EvalSettings(text=args.text, ctx=args.ctx, max_chunks=args.chunks)
    rows = [json.loads(line) for line in args.jsonl.read_text().splitlines()] if args.jsonl.exists() else []
    done = {(r["model"], r["setting"]) for r in rows}
    for model in args.models:
        src = MODELS.get(model, model)
        for label, (method, scheme, fmt) in SETTINGS.items():
            if (model, label) in done:
                continue
            qs = preset(scheme).weights if isinstance(scheme, str) else scheme
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                out = lb.quantize(src, Path(tmp) / "q", method=method, format=fmt,
                                 recipe=Recipe(scheme=qs, group_fallback=method == "rtn"))  # 172 columns: per channel
                seconds = time.perf_counter() - t0
                r = lb.evaluate(str(out), ref=src, settings=settings)
            row = {"model": model, "setting": label, "method": method, "format": fmt, "ppl": r["ppl"],
                   "ref_ppl": r.get("ppl_ref"), "kl": r["kl_mean"], "top1": r["top1_agreement"],
                   "bpw": r["size"]["bpw_quantized"], "quantize_s": round(seconds, 1), "chunks": args.chunks,
                   "ctx": args.ctx}
            print(json.dumps(row), flush=True)
            rows.append(row)
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
    lines = ["# bitsandbytes codebooks beside RTN integer grids (lowbit's runtime, float32 activations)", "",
             f"WikiText-2 test, chunks of {args.ctx} tokens (second half of each scored), against the "
             "unquantized model. bpw: bits per quantized weight in the file (absmax or its 8-bit codes, nested "
             "absmax, quant maps, quant-state JSON; RTN: scales and zero points). `python bench/quality_codebooks.py`. "
             "SmolLM2-135M is the Q4_1 GGUF dequantized: its weights already sit on a 4-bit grid.", "",
             "| model | setting | format | bpw | PPL | ref PPL | KL | top-1 | chunks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = f"{r['ref_ppl']:.3f}" if r.get("ref_ppl") else "-"
        lines.append(f"| {r['model']} | {r['setting']} | {r['format']} | {r['bpw']:.3f} | {r['ppl']:.3f} | {ref} | "
                     f"{r['kl']:.4f} | {r['top1']:.3f} | {r['chunks']} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
