"""Quality of codebooks and calibration-free grids: bitsandbytes NF4/FP4, HQQ, SqueezeLLM lookup tables, beside RTN.

For each model and setting: quantize (bnb to ``bitsandbytes``, HQQ to ``hqq``, SqueezeLLM to ``squeezellm``,
RTN to compressed-tensors; stories260K's HQQ and SqueezeLLM rows go to the ``lowbit`` container, its
172-column down_proj fitting neither), then ``lowbit eval`` against the unquantized model on WikiText-2
test: PPL, KL-divergence, top-1 agreement, and the bits per quantized weight of the file (scales, zero
points, absmax codes, quant maps, lookup tables, sparse outliers included; ``bpw_packed``: SqueezeLLM's
packed layout computed from the shapes, for stories260K whose container stores codes as bytes).
SqueezeLLM's Fisher pass calibrates on pydoc (``--sq-samples`` sequences of 512), once per model
(``--fisher-dir``). Rows go to ``--jsonl`` as they finish; the Markdown table to ``--out``.

    OMP_NUM_THREADS=2 python bench/quality_codebooks.py [--models stories260K smollm2-135m gemma3-270m]
        [--chunks 8] [--settings "SqueezeLLM 4 dense" "HQQ 3 g64" ...]
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
from lowbit.models.cache import cache_dir
from lowbit.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"stories260K": str(ROOT.parent / "shared" / "models" / "stories260K"), "smollm2-135m": "smollm2-135m",
          "gemma3-270m": "gemma3-270m"}
SETTINGS = {  # label -> (method, scheme, format[, handler options])
    "NF4 (b64)": ("bnb", "NF4", "bitsandbytes"),
    "NF4 + DQ (b64)": ("bnb", "NF4_DQ", "bitsandbytes"),
    "FP4 (b64)": ("bnb", "FP4", "bitsandbytes"),
    "FP4 + DQ (b64)": ("bnb", "FP4_DQ", "bitsandbytes"),
    "int4 asym g64 (RTN)": ("rtn", QuantScheme(4, 64, False), "compressed-tensors"),
    "int4 sym g128 (RTN)": ("rtn", QuantScheme(4, 128, True), "compressed-tensors"),
    # issue 11 items 2-3: group 128 and 3 bits, RTN and HQQ beside SqueezeLLM's lookup tables
    "NF4 (b128)": ("bnb", QuantScheme(4, 128, True, type="codebook", codebook="nf4", strategy="flat"), "bitsandbytes"),
    "int4 asym g128 (RTN)": ("rtn", QuantScheme(4, 128, False), "compressed-tensors"),
    "int3 asym g64 (RTN)": ("rtn", QuantScheme(3, 64, False), "compressed-tensors"),
    "int3 asym g128 (RTN)": ("rtn", QuantScheme(3, 128, False), "compressed-tensors"),
    "int4 asym per-channel (RTN)": ("rtn", QuantScheme(4, -1, False), "compressed-tensors"),
    "int3 asym per-channel (RTN)": ("rtn", QuantScheme(3, -1, False), "compressed-tensors"),
    "HQQ 4 g64": ("hqq", QuantScheme(4, 64, False), "hqq"),
    "HQQ 4 g128": ("hqq", QuantScheme(4, 128, False), "hqq"),
    "HQQ 3 g64": ("hqq", QuantScheme(3, 64, False), "hqq"),
    "HQQ 3 g128": ("hqq", QuantScheme(3, 128, False), "hqq"),
    "SqueezeLLM 4 dense": ("squeezellm", "LUT4", "squeezellm", {}),
    "SqueezeLLM 3 dense": ("squeezellm", "LUT3", "squeezellm", {}),
    "SqueezeLLM 4 D+S 0.45+0.05%": ("squeezellm", "LUT4", "squeezellm", {"outliers": 0.0045, "sensitive": 0.0005}),
    "SqueezeLLM 3 D+S 0.45+0.05%": ("squeezellm", "LUT3", "squeezellm", {"outliers": 0.0045, "sensitive": 0.0005}),
    "LUT4 unweighted k-means": ("squeezellm", "LUT4", "squeezellm", {"weighting": "none"}),
    "LUT3 unweighted k-means": ("squeezellm", "LUT3", "squeezellm", {"weighting": "none"}),
}
#: SqueezeLLM's Fisher pass: calibration sequences (pydoc, lowbit's default text) x tokens
SQ_CALIB = {"samples": 16, "seq_len": 512}


def packed_lut_bpw(src: str, bits: int, options: dict) -> float:
    """Bits per quantized weight of SqueezeLLM's layout for every decoder linear of ``src``: packed codes,
    a float32 table of ``2**bits`` per row, and 64 bits (int32 column + float32 value) per outlier plus
    the row pointers (for stories260K, held in the lowbit container whose uint8 codes inflate the file)."""
    from lowbit.models import Checkpoint, resolve

    ckpt = Checkpoint(resolve(src).hf_dir)
    frac = options.get("outliers", 0.0) + options.get("sensitive", 0.0)
    n = total = 0.0
    for name in ckpt.keys():
        if ".layers." in name and name.endswith("proj.weight"):
            out_f, in_f = ckpt.shape(name)
            n += out_f * in_f
            total += out_f * in_f * (bits + 64 * frac) + out_f * ((32 << bits) + 32 * bool(frac))
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--settings", nargs="+", default=None, help="labels to run (default: all)")
    ap.add_argument("--sq-samples", type=int, default=SQ_CALIB["samples"], help="SqueezeLLM's Fisher pass: sequences of 512")
    ap.add_argument("--fisher-dir", type=Path, default=cache_dir() / "fisher", help="kept Fisher diagonals, one folder a model")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--jsonl", type=Path, default=ROOT / "bench" / "results" / "quality_codebooks.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality_codebooks.md")
    args = ap.parse_args()
    settings = lb.EvalSettings(text=args.text, ctx=args.ctx, max_chunks=args.chunks)
    rows = [json.loads(line) for line in args.jsonl.read_text().splitlines()] if args.jsonl.exists() else []
    done = {(r["model"], r["setting"], r["chunks"]) for r in rows}
    for model in args.models:
        src = MODELS.get(model, model)
        for label, (method, scheme, fmt, *opts) in SETTINGS.items():
            if (model, label, args.chunks) in done or (args.settings and label not in args.settings):
                continue
            qs = preset(scheme).weights if isinstance(scheme, str) else scheme
            options = dict(opts[0]) if opts else {}
            if method == "squeezellm":  # one Fisher pass per model, kept for its other settings
                options.update(SQ_CALIB, samples=args.sq_samples, fisher_dir=str(args.fisher_dir / model))
            if model == "stories260K" and method in ("squeezellm", "hqq"):
                fmt = "lowbit"  # down_proj's 172 columns: no whole 32-column SqueezeLLM words, no hqq groups
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                out = lb.quantize(src, Path(tmp) / "q", method=method, format=fmt,  # 172 columns: per channel
                                 recipe=Recipe(scheme=qs, group_fallback=method in ("rtn", "hqq")), **options)
                seconds = time.perf_counter() - t0
                r = lb.evaluate(str(out), ref=src, settings=settings)
            if method == "squeezellm":  # codes packed at `bits`, the fp32 table per row, CSR outliers at 64 bits each
                assert qs is not None
                row_extra = {"bpw_packed": packed_lut_bpw(src, qs.bits, options)}
            else:
                row_extra = {}
            if method == "squeezellm":
                row_extra["fisher_calib"] = f"pydoc {options['samples']}x{options['seq_len']}"
            row = {"model": model, "setting": label, "method": method, "format": fmt, "ppl": r["ppl"], **row_extra,
                   "ref_ppl": r.get("ppl_ref"), "kl": r["kl_mean"], "top1": r["top1_agreement"],
                   "bpw": r["size"]["bpw_quantized"], "quantize_s": round(seconds, 1), "chunks": args.chunks,
                   "ctx": args.ctx}
            print(json.dumps(row), flush=True)
            rows.append(row)
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
    lines = ["# Codebooks (NF4/FP4, SqueezeLLM lookup tables) and HQQ beside RTN integer grids (lowbit's runtime, "
             "float32 activations)", "",
             f"WikiText-2 test, chunks of {args.ctx} tokens (second half of each scored), against the "
             "unquantized model. bpw: bits per quantized weight in the file (absmax or its 8-bit codes, nested "
             "absmax, quant maps, quant-state JSON; RTN and HQQ: scales and zero points; SqueezeLLM: packed codes, "
             "float32 tables, CSR outliers); in brackets SqueezeLLM's packed layout where the file is the lowbit "
             "container (stories260K). `python bench/quality_codebooks.py`. stories260K's rows are 64 wide, so its "
             "g64, g128 and per-channel grids coincide and a 16-entry float32 table per row costs 8 bits per weight. "
             "SmolLM2-135M and Gemma-3-270M are Q4_1 / Q4_K_M GGUFs dequantized: their weights already sit on 4-bit "
             "grids of 32-value blocks, which grouped grids follow and per-row tables do not.", "",
             "| model | setting | format | bpw | PPL | ref PPL | KL | top-1 | chunks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = f"{r['ref_ppl']:.3f}" if r.get("ref_ppl") else "-"
        bpw = f"{r['bpw']:.3f}" + (f" ({r['bpw_packed']:.3f})" if r.get("bpw_packed") and r["format"] == "lowbit" else "")
        lines.append(f"| {r['model']} | {r['setting']} | {r['format']} | {bpw} | {r['ppl']:.3f} | {ref} | "
                     f"{r['kl']:.4f} | {r['top1']:.3f} | {r['chunks']} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
