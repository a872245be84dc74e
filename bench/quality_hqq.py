"""HQQ quality beside RTN at the same grid: PPL, KL-divergence, top-1 and bits per weight on WikiText-2.

    python bench/quality_hqq.py [--model stories260K-path-or-demo-name] [--bits 4 3 2] [--groups 64 128] [--chunks 16]

Each setting is quantized with ``--method hqq`` (float zero points) and with
``--method rtn`` on the same asymmetric grid, written in the ``hqq`` format (same bytes per weight),
read back and evaluated against the float
model (``lowbit eval``'s numbers). Tensors whose rows the group size does not divide are quantized
per channel (``group_fallback``). Rows are appended to bench/results/quality_hqq.jsonl; the
Markdown table of the run is printed and written to bench/results/quality_hqq.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lowbit.api as lb
from lowbit.core.scheme import QuantScheme
from lowbit.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "stories260K"))
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--groups", type=int, nargs="+", default=[64])
    ap.add_argument("--methods", nargs="+", default=["hqq", "rtn"])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=256)
    args = ap.parse_args()
    settings = lb.EvalSettings(text=TEXT if TEXT.exists() else None, ctx=args.ctx, max_chunks=args.chunks)
    rows = []
    name = Path(args.model).name
    for bits in args.bits:
        for group in args.groups:
            for method in args.methods:
                recipe = Recipe(scheme=QuantScheme(bits, group, False), group_fallback=True)
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    out = lb.quantize(args.model, Path(tmp) / "q", method=method, recipe=recipe, format="hqq")
                    seconds = time.perf_counter() - t0
                    r = lb.evaluate(out, ref=args.model, settings=settings)
                row = {"model": name, "method": method, "bits": bits, "group": group, "quantize_s": round(seconds, 1),
                       "ppl": round(r["ppl"], 3), "ref_ppl": round(r["ppl_ref"], 3), "kl_mean": round(r["kl_mean"], 4),
                       "top1": round(r["top1_agreement"], 4), "bpw": round(r["size"]["bpw_quantized"], 3),
                       "chunks": args.chunks, "ctx": args.ctx}
                print(json.dumps(row), flush=True)
                rows.append(row)
    results = ROOT / "bench" / "results"
    with (results / "quality_hqq.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    lines = [f"# HQQ vs RTN (asymmetric, same grid) on {name}, WikiText-2 test, {args.chunks} chunks of {args.ctx}",
             "# command: python bench/quality_hqq.py --model ... (hqq format, same size for both)",
             "| method | bits | group | PPL | ref PPL | KL mean | top-1 | bits/weight (quantized) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['method']} | {r['bits']} | {r['group']} | {r['ppl']} | {r['ref_ppl']} | {r['kl_mean']} | "
              f"{r['top1']} | {r['bpw']} |" for r in rows]
    (results / f"quality_hqq_{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
