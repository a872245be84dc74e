"""Quality of llama.cpp quantization mixes, written by lowbit and by llama.cpp itself.

For a model (SmolLM2-135M or Gemma-3-270M GGUF, or any source lowbit loads):

1. our F16 GGUF of the source is the unquantized reference ("base");
2. per mix (and optionally with an importance matrix computed by lowbit on *calibration*
   text: Python's pydoc topics, never the evaluation text), llama.cpp's quantizer writes its
   file from the F16 file, and lowbit writes its own from the same F16 file;
3. llama.cpp evaluates every file on WikiText-2 test (first ``--chunks`` chunks of ``--ctx``
   tokens, llama-perplexity's convention: BOS first, second half of each chunk scored) and we
   report file size, bits per weight, perplexity, mean KL divergence to the base model and
   whether lowbit's tensor data are byte-identical to llama.cpp's (the names of differing
   tensors are kept in the JSON as ``mismatched_tensors``).

Mixes that llama.cpp refuses without an importance matrix (IQ1/IQ2, Q2_K_S) give a row marked
"n/a (llama.cpp requires an imatrix)"; lowbit is asked too and should refuse likewise.
With ``--out``, the JSON is rewritten after every row and an existing file is resumed: rows
already there (same mix and imatrix setting) are kept and not run again.

Run:  python bench/gguf_quality.py --model smollm2 --mixes Q8_0,Q4_K_M --chunks 4
(the SmolLM2 GGUF is itself Q4_1, so "unquantized" means its dequantized weights in F16.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from gguf_util import (  # noqa: E402
    GEMMA,
    SMOL,
    WIKI,
    LlamaRunner,
    chunks_of,
    gguf_tensor_bytes,
    llamacpp_quantize,
    score_chunk,
)

MODELS = {"smollm2": SMOL, "gemma3": GEMMA}


def evaluate(path, chunks, base_lp=None):
    nll, kl = [], []
    lps = []
    with LlamaRunner(path, n_ctx=len(chunks[0])) as r:
        for i, c in enumerate(chunks):
            lg = r.logits(c)
            n, k, lp = score_chunk(lg, c, None if base_lp is None else base_lp[i])
            nll.append(n)
            if k is not None:
                kl.append(k)
            if base_lp is None:
                lps.append(lp.astype(np.float32))
    nll = np.concatenate(nll)
    out = {"ppl": float(np.exp(nll.mean())), "ppl_se": float(np.exp(nll.mean()) * nll.std() / np.sqrt(len(nll)))}
    if kl:
        kl = np.concatenate(kl)
        out["kld"] = float(kl.mean())
    return out, lps


def sampled_bytes_check(base, theirs, mix: str, imat: dict | None, n_rows: int) -> dict:
    """Compare lowbit with llama.cpp's file without writing a whole lowbit file.

    Every tensor's type must equal lowbit's plan for the mix, and lowbit's encoding of the first
    ``n_rows`` rows of each tensor (rows are encoded independently) must equal those rows'
    bytes in llama.cpp's file.  Used for the IQ1-IQ3 mixes, whose torch encoders are slow on a
    small CPU."""
    from lowbit.gguf.convert import plan_types
    from lowbit.gguf.reader import GGUFFile
    from lowbit.gguf.writer import quantize_array, row_bytes

    plan = plan_types(base, mix, has_imatrix=imat is not None)
    fb, ft = GGUFFile(base), GGUFFile(theirs)
    bad_types, bad_rows = [], []
    for t in ft.tensors:
        if plan.get(t.name) != t.type:
            bad_types.append(f"{t.name}: llama.cpp {t.type.name}, lowbit {getattr(plan.get(t.name), 'name', None)}")
            continue
        cols = t.ne[0]
        rows = min(n_rows, int(np.prod(t.ne[1:])))
        x = fb.array(t.name).reshape(-1, cols)[:rows]
        im = None
        if imat is not None and t.name in imat and imat[t.name].size == cols and t.type.name not in ("F32", "F16", "BF16"):
            im = imat[t.name]
        ours = np.ascontiguousarray(quantize_array(x, t.type, im)).view(np.uint8).reshape(-1)
        width = row_bytes(t.type, cols) if t.type.name not in ("F32", "F16", "BF16") else ours.size // rows
        if bytes(ours) != bytes(ft.data(t.name)[:rows * width]):
            bad_rows.append(t.name)
    return {"bytes_equal": not bad_types and not bad_rows, "bytes_check": f"types of all {len(ft.tensors)} tensors "
            f"+ first {n_rows} rows of each", "mismatched_types": bad_types, "mismatched_tensors": bad_rows}


def file_stats(path):
    from lowbit.gguf.reader import inspect_gguf

    info = inspect_gguf(path)
    return {"size_mib": Path(path).stat().st_size / 2**20, "bpw": info["bits_per_weight"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--mixes", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_K_S,Q4_0,Q3_K_M,Q2_K,IQ4_XS")
    ap.add_argument("--imatrix", choices=["no", "yes", "both"], default="both")
    ap.add_argument("--ours", default="all", help="mixes lowbit also writes ('all', 'none' or a list)")
    ap.add_argument("--eval-ours", default="none",
                    help="mixes whose lowbit file llama.cpp evaluates even when its tensor bytes equal llama.cpp's "
                         "('all', 'none' or a list); byte-identical files give identical results")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-chunks", type=int, default=8)
    ap.add_argument("--work", default="/tmp/lowbit-gguf-bench")
    ap.add_argument("--out", default=None, help="write results as JSON here (after every row; an existing file is resumed)")
    ap.add_argument("--sample-rows", type=int, default=0,
                    help="for the IQ1-IQ3 mixes (and Q2_K_S): check lowbit on the first N rows of every tensor "
                         "instead of writing its whole file (see sampled_bytes_check)")
    ap.add_argument("--ours-digests", default=None,
                    help="JSON from bench/gguf_digests.py: lowbit's files were made elsewhere (e.g. on a GPU); "
                         "compare their per-tensor SHA-256 instead of writing them here")
    a = ap.parse_args(argv)

    from lowbit.gguf.convert import quantize_to_gguf
    from lowbit.gguf.imatrix import compute_imatrix, load_imatrix_values

    warnings.simplefilter("ignore")
    src = MODELS.get(a.model, a.model)
    work = Path(a.work) / Path(str(src)).stem
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base-F16.gguf"
    if not base.exists():
        quantize_to_gguf(src, base, "F16")
    mixes = [m.strip().upper() for m in a.mixes.split(",") if m.strip()]
    if a.mixes.strip().lower() == "all":
        from lowbit.gguf.mixes import FLOAT_MIXES, MIXES

        mixes = [m for m in MIXES if m not in FLOAT_MIXES and not m.startswith("TQ")]
    ours_set = set(mixes) if a.ours == "all" else set() if a.ours == "none" else {m.upper() for m in a.ours.split(",")}

    imat_path = work / "imatrix.gguf"
    if a.imatrix != "no" and not imat_path.exists():
        import pydoc_data.topics as topics

        calib = work / "calib-pydoc-topics.txt"
        calib.write_text("\n".join(topics.topics.values()))
        t = time.time()
        compute_imatrix(src, calib, imat_path, ctx=a.ctx, chunks=a.calib_chunks)
        print(f"imatrix: {a.calib_chunks} chunks of {a.ctx} on pydoc topics in {time.time() - t:.0f}s", flush=True)
    imat_vals = load_imatrix_values(imat_path) if a.imatrix != "no" else None
    remote = {}
    if a.ours_digests:
        sys.path.insert(0, str(HERE))
        from gguf_digests import tensor_digests

        dg = json.loads(Path(a.ours_digests).read_text())
        if dg["base_digests"] != tensor_digests(base):
            raise SystemExit(f"{a.ours_digests} was made from another F16 base than {base}")
        remote = {(r["mix"], r["imatrix"]): r for r in dg["rows"]}
        remote_dev = dg.get("device_name", dg.get("device"))

    text = Path(WIKI).read_text(encoding="utf-8")
    with LlamaRunner(base, n_ctx=a.ctx) as r:
        toks = r.tokenize(text, True)
        chunks = chunks_of(toks, a.ctx, a.chunks, r.bos if r.add_bos else None)
    t = time.time()
    base_res, base_lp = evaluate(base, chunks)
    print(f"base F16: ppl {base_res['ppl']:.4f} ({time.time() - t:.0f}s)", flush=True)
    rows = [{"mix": "F16 (base)", "imatrix": False, **file_stats(base), "llama": base_res, "ours": base_res, "bytes_equal": True}]
    done = {}
    if a.out and Path(a.out).exists():
        for r in json.loads(Path(a.out).read_text()):
            if r["mix"] != "F16 (base)":
                done[(r["mix"], r["imatrix"])] = r
        print(f"resuming {a.out}: {len(done)} rows kept", flush=True)

    def save():
        if a.out:
            tmp = Path(str(a.out) + ".tmp")
            tmp.write_text(json.dumps(rows, indent=2))
            tmp.replace(a.out)

    variants = []
    for m in mixes:
        if a.imatrix in ("no", "both"):
            variants.append((m, False))
        if a.imatrix in ("yes", "both"):
            variants.append((m, True))
    for mix, use_im in variants:
        if (mix, use_im) in done:
            rows.append(done[(mix, use_im)])
            continue
        tag = f"{mix}{'-imat' if use_im else ''}"
        theirs = work / f"llama-{tag}.gguf"
        t0 = time.time()
        try:
            llamacpp_quantize(base, theirs, mix, imatrix=imat_vals if use_im else None)
        except RuntimeError as e:
            if use_im:
                raise
            # llama.cpp refuses IQ1/IQ2 (and Q2_K_S) tensors without an importance matrix
            row = {"mix": mix, "imatrix": False, "na": "llama.cpp requires an imatrix", "llama_error": str(e)}
            theirs.unlink(missing_ok=True)
            if (mix, False) in remote:
                row["lowbit_refused"] = "refused" in remote[(mix, False)]
                row["lowbit_error"] = remote[(mix, False)].get("refused")
            else:  # cheap: lowbit refuses while planning, before encoding anything
                try:
                    quantize_to_gguf(base, work / f"lowbit-{tag}.gguf", mix, overwrite=True)
                    row["lowbit_refused"] = False
                except Exception as e2:  # noqa: BLE001
                    row["lowbit_refused"] = True
                    row["lowbit_error"] = f"{type(e2).__name__}: {e2}"
            row["total_s"] = time.time() - t0
            rows.append(row)
            save()
            print(f"{tag:14s} n/a ({row['na']}); lowbit refused too: {row.get('lowbit_refused')}", flush=True)
            continue
        t1 = time.time()
        row = {"mix": mix, "imatrix": use_im, **file_stats(theirs), "llama_quantize_s": t1 - t0}
        row["llama"], _ = evaluate(theirs, chunks, base_lp)
        if (mix, use_im) in remote:
            r2 = remote[(mix, use_im)]
            B = tensor_digests(theirs)
            A = r2.get("digests", {})
            row["bytes_equal"] = A == B
            if not row["bytes_equal"]:
                row["mismatched_tensors"] = sorted(k for k in A.keys() | B.keys() if A.get(k) != B.get(k))
            row["lowbit_quantize_s"] = r2.get("seconds")
            row["lowbit_device"] = remote_dev
            row["ours_bpw"], row["ours_size_mib"] = r2.get("bpw"), r2.get("size_mib")
            row["ours"] = (dict(row["llama"], note=f"identical tensor bytes (SHA-256; lowbit file written on {remote_dev})")
                           if row["bytes_equal"] else {"note": "lowbit file made elsewhere; not evaluated"})
        elif mix in ours_set and a.sample_rows and (mix.startswith(("IQ1", "IQ2", "IQ3")) or mix == "Q2_K_S"):
            t2 = time.time()
            row.update(sampled_bytes_check(base, theirs, mix, imat_vals if use_im else None, a.sample_rows))
            row["lowbit_check_s"] = time.time() - t2
            row["ours"] = (dict(row["llama"], note="identical type map and sampled rows")
                           if row["bytes_equal"] else {"note": "differs from llama.cpp; not evaluated"})
        elif mix in ours_set:
            ours = work / f"lowbit-{tag}.gguf"
            t2 = time.time()
            quantize_to_gguf(base, ours, mix, imatrix_path=imat_path if use_im else None, overwrite=True)
            row["lowbit_quantize_s"] = time.time() - t2
            A, B = gguf_tensor_bytes(ours), gguf_tensor_bytes(theirs)
            row["bytes_equal"] = A.keys() == B.keys() and all(A[k] == B[k] for k in A)
            if not row["bytes_equal"]:
                row["mismatched_tensors"] = sorted(k for k in A.keys() | B.keys() if A.get(k) != B.get(k))
            row["ours_bpw"] = file_stats(ours)["bpw"]
            row["ours_size_mib"] = ours.stat().st_size / 2**20
            if a.eval_ours == "all" or mix in {m.upper() for m in a.eval_ours.split(",")} or not row["bytes_equal"]:
                row["ours"], _ = evaluate(ours, chunks, base_lp)
            else:
                row["ours"] = dict(row["llama"], note="identical tensor bytes")
        row["total_s"] = time.time() - t0
        rows.append(row)
        save()
        o = row.get("ours", {})
        print(f"{tag:14s} {row['size_mib']:7.1f} MiB {row['bpw']:5.2f} bpw  llama ppl {row['llama']['ppl']:.4f} "
              f"kld {row['llama'].get('kld', 0):.5f} | ours ppl {o.get('ppl', float('nan')):.4f} "
              f"kld {o.get('kld', float('nan')):.5f} bytes_equal={row.get('bytes_equal')}", flush=True)

    print()
    print(f"Model {a.model}: WikiText-2 test, {len(chunks)} x {a.ctx} tokens (second halves scored); "
          + (f"imatrix from pydoc topics ({a.calib_chunks} x {a.ctx})." if a.imatrix != "no" else "no imatrix."))
    print("| mix | imatrix | size MiB | bpw | PPL llama.cpp file | PPL lowbit file | KLD llama.cpp | KLD lowbit | tensor bytes equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "na" in r:
            print(f"| {r['mix']} | {'yes' if r['imatrix'] else 'no'} | n/a ({r['na']}) | | | | | | |")
            continue
        o = r.get("ours") or {}
        print(f"| {r['mix']} | {'yes' if r['imatrix'] else 'no'} | {r['size_mib']:.1f} | {r['bpw']:.3f} | "
              f"{r['llama']['ppl']:.4f} ± {r['llama']['ppl_se']:.3f} | "
              f"{o.get('ppl', float('nan')):.4f} | {r['llama'].get('kld', 0):.5f} | {o.get('kld', float('nan')):.5f} | "
              f"{r.get('bytes_equal', 'n/a')} |")
    save()


if __name__ == "__main__":
    main()
