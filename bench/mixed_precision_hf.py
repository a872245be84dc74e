"""``lowbit quantize --scheme auto`` (Hugging Face formats) beside uniform integer schemes of the same size.

Per model: uniform RTN checkpoints (compressed-tensors; ``--schemes`` as BITS:GROUP, asymmetric), then
``--scheme auto`` with each one's tensor bytes as ``--target-size`` (the sensitivity measured once,
Fisher on pydoc), all evaluated by ``lowbit eval`` against the float model on WikiText-2 test (KL, PPL,
top-1; lowbit's runtime: dequantized weights, float32 activations).

Run:  python bench/mixed_precision_hf.py --models stories --schemes 4:64 3:64 2:64 --chunks 8 --ctx 256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MODELS = {"stories": None, "smollm2": "smollm2-135m"}


def payload(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            for k in s.keys():
                t = s.get_tensor(k)
                n += t.numel() * t.element_size()
    return n


def main(argv: list[str] | None = None) -> None:
    from paths import STORIES, WIKITEXT

    from lowbit import api
    from lowbit.api import EvalSettings
    from lowbit.core import QuantScheme
    from lowbit.mix.hf_auto import measure, quantize_auto
    from lowbit.mix.sensitivity import FisherSettings
    from lowbit.recipe import Recipe

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["stories"], choices=list(MODELS))
    ap.add_argument("--schemes", nargs="+", default=["4:64", "3:64", "2:64"])
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--fisher-chunks", type=int, default=8)
    ap.add_argument("--work", default="/work/scratch/12/mixed_precision_hf")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mixed_precision_hf"))
    ap.add_argument("--from-jsonl", help="only write the table of these rows (no run)")
    a = ap.parse_args(argv)
    rows: list[dict] = []
    if a.from_jsonl:
        write([json.loads(x) for x in Path(a.from_jsonl).read_text().splitlines()], Path(a.out), argv)
        return
    settings = EvalSettings(text=WIKITEXT, ctx=a.ctx, max_chunks=a.chunks)
    for m in a.models:
        src = MODELS[m] or str(STORIES)
        work = Path(a.work) / m
        work.mkdir(parents=True, exist_ok=True)
        table = measure(src, FisherSettings(ctx=a.ctx, chunks=a.fisher_chunks))
        table.save(work / "sensitivity.json")
        for spec in a.schemes:
            bits, group = (int(x) for x in spec.split(":"))
            uni = work / f"uniform-w{bits}g{group}"
            if not uni.exists():
                api.quantize(src, uni, recipe=Recipe(scheme=QuantScheme(bits, group, False), group_fallback=True))
            size = payload(uni)
            auto = work / f"auto-at-w{bits}g{group}"
            rep: dict = {}
            quantize_auto(src, auto, target_size=size, table=table, overwrite=True, report=rep)
            for label, path in ((f"uniform int{bits} g{group} asym", uni), (f"--scheme auto at int{bits} g{group}'s size", auto)):
                ev = api.evaluate(path, src, settings)
                nb = payload(path)
                row = {"model": m, "file": label, "tensor_bytes": nb, "bpw": round(8 * nb / table.n_weights, 4),
                       "kl": ev["kl_mean"], "ppl": ev["ppl"], "ppl_ref": ev.get("ppl_ref"), "top1": ev.get("top1_agreement"),
                       "types": rep["auto"]["types"] if path == auto else None,
                       "predicted_kl": rep["auto"]["predicted_kl"] if path == auto else None,
                       "ctx": a.ctx, "chunks": a.chunks}
                rows.append(row)
                print(json.dumps(row), flush=True)
    write(rows, Path(a.out), argv)


def write(rows: list[dict], out: Path, argv: list[str] | None) -> None:
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["| model | file | tensor bytes | bpw | KL mean | PPL (ref) | top-1 | KL vs uniform | schemes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    base = None
    for r in rows:
        if r["file"].startswith("uniform"):
            base = r["kl"]
        rel = "" if r["file"].startswith("uniform") or not base else f"{100 * (r['kl'] / base - 1):+.1f}%"
        types = ", ".join(f"{k} {v}" for k, v in (r["types"] or {}).items())
        top1 = "" if r["top1"] is None else f"{100 * r['top1']:.2f}%"
        lines.append(f"| {r['model']} ({r['chunks']}x{r['ctx']}) | {r['file']} | {r['tensor_bytes']} | {r['bpw']:.3f} "
                     f"| {r['kl']:.5f} | {r['ppl']:.3f} ({r['ppl_ref']:.3f}) | {top1} | {rel} | {types} |")
    out.with_suffix(".md").write_text(
        "# --scheme auto (compressed-tensors, mixed int2/3/4/8 or float per linear) beside uniform RTN of the same size\n\n"
        "Sizes are the checkpoints' tensor bytes; measured by lowbit eval against the float model on WikiText-2 test "
        "(not the calibration text, pydoc).\n\n" + "\n".join(lines)
        + "\n\nCommand: `" + " ".join(["python", "bench/mixed_precision_hf.py", *(argv or sys.argv[1:])]) + "`\n",
        encoding="utf-8")


if __name__ == "__main__":
    main()
