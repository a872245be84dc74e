"""Quality of the FP8 / INT8 / FP4 presets (RTN, llm-compressor's rules) on WikiText-2.

For each model and preset: ``lowbit quantize --scheme PRESET`` (RTN; static schemes calibrated on
``--calib-samples`` x ``--calib-len`` tokens of pydoc text), written as compressed-tensors, then
``lowbit eval`` against the unquantized model: PPL, KL-divergence, top-1 agreement, bits per weight.
The row's ``numerics`` is what ``lowbit eval`` reports it measured (until activation quantization is
applied by the evaluation, the activations run in float32 and only the weights are quantized).
Rows go to ``--jsonl`` as they finish (a row already there for the same model, preset, method, text,
chunks and context is not measured again); the Markdown table to ``--out``. ``--text pydoc`` evaluates
on the Python pydoc set (:func:`lowbit.text.pydoc_text`; static schemes calibrate on its first samples
too) instead of WikiText-2; ``--method smoothquant+rtn --smoothing auto`` runs SmoothQuant first.

    OMP_NUM_THREADS=2 python bench/quality_fp8.py [--models smollm2-135m gemma3-270m] [--chunks 16]
        [--text pydoc] [--method smoothquant+rtn --smoothing auto]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lowbit.api as lb
from lowbit.core.presets import preset
from lowbit.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["FP8", "FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--batch-size", type=int, default=4, help="chunks per forward pass (1 for large vocabularies)")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--smoothing", default=None, help="SmoothQuant strength (a number or auto)")
    ap.add_argument("--jsonl", type=Path, default=ROOT / "bench" / "results" / "quality_fp8.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality_fp8.md")
    args = ap.parse_args()
    text_name = "pydoc" if args.text == "pydoc" else Path(args.text).name
    method = args.method + (f" {args.smoothing}" if args.smoothing is not None else "")
    with tempfile.TemporaryDirectory() as texts:
        text = args.text
        if text == "pydoc":
            from lowbit.text import pydoc_text

            text = str(Path(texts) / "pydoc.txt")
            Path(text).write_text(pydoc_text(), encoding="utf-8")
        measure(args, lb.EvalSettings(text=text, ctx=args.ctx, max_chunks=args.chunks,
                                                batch_size=args.batch_size), text_name, method)


def _key(r: dict) -> tuple:
    return (r["model"], r["preset"], r.get("method", "rtn"), r.get("text", "wiki.test.raw"), r["chunks"], r["ctx"])


def measure(args: argparse.Namespace, settings: lb.EvalSettings, text_name: str, method: str) -> None:
    rows = [json.loads(line) for line in args.jsonl.read_text().splitlines()] if args.jsonl.exists() else []
    done = {_key(r) for r in rows}
    options = {} if args.smoothing is None else {"smoothing": args.smoothing}
    for model in args.models:
        for name in args.presets:
            if (model, name, method, text_name, args.chunks, args.ctx) in done:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                out = lb.quantize(model, Path(tmp) / "q", method=args.method, recipe=Recipe(scheme=preset(name).scheme),
                                  calib="pydoc", samples=args.calib_samples, seq_len=args.calib_len, **options)
                seconds = time.perf_counter() - t0
                r = lb.evaluate(str(out), ref=model, settings=settings)
            row = {"model": model, "preset": name, "method": method, "text": text_name, "ppl": r["ppl"], "ref_ppl": r.get("ppl_ref"), "kl": r["kl_mean"],
                   "top1": r["top1_agreement"], "bpw": r["size"]["bpw_quantized"], "quantize_s": round(seconds, 1),
                   "numerics": r.get("numerics"), "chunks": args.chunks, "ctx": args.ctx}
            print(json.dumps(row), flush=True)
            rows.append(row)
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
    lines = ["# FP8 / INT8 / FP4 presets (llm-compressor's rules), lowbit's runtime", "",
             "Against the unquantized model on the text named (WikiText-2 test or the pydoc set), chunks x context "
             "tokens. bpw: bits per quantized weight in the file. `python bench/quality_fp8.py`. inputs: the input "
             "activation quantization `lowbit eval` applied (its numerics; see README: What eval measures). "
             "SmolLM2-135M and Gemma-3-270M are GGUF files (Q4_1, Q4_K_M) dequantized: their weights already sit on "
             "a 4-bit grid, which flatters every format here.", "",
             "| model | preset | method | text | chunks x ctx | bpw | PPL | ref PPL | KL | top-1 | inputs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r.get("text", "wiki.test.raw"), r["chunks"], r["ctx"])):
        ref = f"{r['ref_ppl']:.3f}" if r.get("ref_ppl") else "-"
        num = r.get("numerics") or ""
        inputs = num.split("input activations ", 1)[1].split(" on ")[0] if "input activations " in num else "float"
        lines.append(f"| {r['model']} | {r['preset']} | {r.get('method', 'rtn')} | {r.get('text', 'wiki.test.raw')} | "
                     f"{r['chunks']}x{r['ctx']} | {r['bpw']:.3f} | {r['ppl']:.3f} | {ref} | {r['kl']:.5f} | "
                     f"{r['top1']:.3f} | {inputs} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
