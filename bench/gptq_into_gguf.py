"""GPTQ-chosen Q4_0 codes vs llama.cpp's own Q4_0, both evaluated by llama.cpp.

Files (pure Q4_0, same tensor types, only the codes/scales of the decoder linears differ):

* ``F16``: the unquantized reference;
* ``Q4_0 (llama.cpp)``: ``quantize_to_gguf(..., "Q4_0", pure=True)`` (byte-identical to
  llama-quantize's Q4_0, see tests/test_gguf_convert.py);
* ``Q4_0 (lowbit RTN)`` / ``Q4_0 (GPTQ)``: ``quantize_model`` int4 sym g32 codes written by
  ``lowbit.gguf.from_quantized.quantized_to_gguf`` (calibration: Python's pydoc topics, never
  the evaluation text).

llama.cpp evaluates each on WikiText-2 test (``--chunks`` chunks of ``--ctx`` tokens,
llama-perplexity's convention: BOS first, second half of each chunk scored): perplexity and
mean KL divergence to F16.

Run:  python bench/gptq_into_gguf.py --model stories260K --chunks 8 --ctx 256

Results (2026-11-23, 2 CPU cores; int4 sym g32 codes; perplexity +- stderr, KLD vs F16):

stories260K, 8 x 256, pydoc calibration 32 x 256, token_embd Q4_0 in every file:
  F16 91.17 | Q4_0 llama.cpp 101.07 (0.231) | RTN 108.35 (0.286) | GPTQ 93.86 (0.201)
SmolLM2-135M (Q4_1 source), 4 x 512, selfgen calibration 16 x 256, --token-embedding-type f16:
  F16 22.75 | Q4_0 llama.cpp 27.16 (0.287) | RTN 31.96 (0.391) | GPTQ 31.62 (0.381)
  | GPTQ dequantized in torch (--check-lowbit) 31.48 (0.377): the file reproduces lowbit's model.
  lowbit's symmetric grid (scale = amax / 7.5) is coarser than Q4_0's d = max / -8, so on
  SmolLM2 llama.cpp's own Q4_0 wins; with pydoc calibration GPTQ was worse still (56.7).

``--qtype Q4_K`` (GPTQ's codes on llama.cpp's own Q4_K grid; bench/results/gptq_into_gguf.txt),
KLD vs F16, pydoc calibration 32 x 512, 4 x 512 evaluation:
  SmolLM2: llama.cpp 0.0911 | llama.cpp + imatrix 0.0679 | GPTQ 0.0917 (damp 0.1: 0.0914)
  Gemma-3: llama.cpp 0.0546 | llama.cpp + imatrix 0.0389 | GPTQ 0.0458
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from gguf_util import SMOL, STORIES, WIKI, LlamaRunner, chunks_of, score_chunk  # noqa: E402

MODELS = {"stories260K": STORIES, "smollm2": SMOL}


def evaluate(path: Path, chunks: list[list[int]], base_lp: list[np.ndarray] | None) -> tuple[dict, list[np.ndarray]]:
    nll, kl, lps = [], [], []
    with LlamaRunner(path, n_ctx=len(chunks[0])) as r:
        for i, c in enumerate(chunks):
            n, k, lp = score_chunk(r.logits(c), c, None if base_lp is None else base_lp[i])
            nll.append(n)
            lps.append(lp.astype(np.float32))
            if k is not None:
                kl.append(k)
    nll_a = np.concatenate(nll)
    ppl = float(np.exp(nll_a.mean()))
    out = {"ppl": ppl, "ppl_se": ppl * float(nll_a.std()) / np.sqrt(len(nll_a))}
    if kl:
        out["kld"] = float(np.concatenate(kl).mean())
    return out, lps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stories260K")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--calib-path", default=None, help="calibration text/JSONL (default: Python's pydoc topics)")
    ap.add_argument("--check-lowbit", action="store_true",
                    help="also evaluate the GPTQ model dequantized in torch (lowbit) on the same chunks")
    ap.add_argument("--token-embedding-type", default=None,
                    help="e.g. f16: keep token_embd (and a tied output) out of Q4_0 in every quantized file")
    ap.add_argument("--qtype", default="Q4_0", choices=["Q4_0", "Q4_K"],
                    help="Q4_K: GPTQ picks codes on llama.cpp's own Q4_K grid (int4 asym g32), compared with "
                         "llama.cpp's pure Q4_K file with and without an importance matrix from the calibration text")
    ap.add_argument("--damp", type=float, default=None, help="GPTQ dampening (default 0.01 of the mean diagonal)")
    ap.add_argument("--work", default="/tmp/lowbit-gptq-into-gguf")
    a = ap.parse_args(argv)

    from lowbit.core.scheme import QuantScheme
    from lowbit.gguf.convert import quantize_to_gguf
    from lowbit.gguf.from_quantized import quantized_to_gguf
    from lowbit.pipeline import quantize_model
    from lowbit.models.calibration import CalibrationConfig

    warnings.simplefilter("ignore")
    src = MODELS.get(a.model, a.model)
    work = Path(a.work) / Path(str(src)).stem
    work.mkdir(parents=True, exist_ok=True)
    scheme = QuantScheme(4, 32, a.qtype == "Q4_0")
    calib = CalibrationConfig(path=a.calib_path, n_samples=a.calib_samples, seq_len=a.calib_len)
    mix = "Q4_K_M" if a.qtype == "Q4_K" else a.qtype  # with pure=True: that one type wherever it fits
    tag = a.qtype.lower()

    files: dict[str, Path] = {"F16": quantize_to_gguf(src, work / "f16.gguf", "F16", overwrite=True)}
    files[f"{a.qtype} (llama.cpp)"] = quantize_to_gguf(src, work / f"{tag}-llamacpp.gguf", mix, pure=True, overwrite=True,
                                                       token_embedding_type=a.token_embedding_type)
    qms = {}
    if a.qtype == "Q4_K":
        from lowbit.gguf.imatrix import compute_imatrix

        text_path = Path(a.calib_path) if a.calib_path else work / "calib-pydoc.txt"
        if not a.calib_path:
            import pydoc_data.topics as topics

            text_path.write_text("\n".join(topics.topics.values()))
        imat = compute_imatrix(src, text_path, work / "imatrix.gguf", ctx=a.calib_len, chunks=a.calib_samples,
                               overwrite=True)
        files["Q4_K (llama.cpp, imatrix)"] = quantize_to_gguf(src, work / "q4_k-llamacpp-imat.gguf", mix, pure=True,
                                                              imatrix_path=imat, overwrite=True,
                                                              token_embedding_type=a.token_embedding_type)
    for method in ("rtn", "gptq") if a.qtype == "Q4_0" else ("gptq",):
        t = time.time()
        opts = {"grid": "Q4_K"} if a.qtype == "Q4_K" else {}
        if a.damp is not None and method == "gptq":
            opts["damp"] = a.damp
        qm = qms[method] = quantize_model(src, method, scheme, calib, **opts)
        files[f"{a.qtype} ({method.upper()})"] = quantized_to_gguf(src, qm, work / f"{tag}-{method}.gguf", a.qtype,
                                                                   overwrite=True,
                                                                   token_embedding_type=a.token_embedding_type)
        print(f"{method}: {len(qm.weights)} weights in {time.time() - t:.0f}s", flush=True)

    text = Path(WIKI).read_text(encoding="utf-8")
    with LlamaRunner(files["F16"], n_ctx=a.ctx) as r:
        chunks = chunks_of(r.tokenize(text, True), a.ctx, a.chunks, r.bos if r.add_bos else None)
    base_lp: list[np.ndarray] | None = None
    print(f"\n{a.model}: WikiText-2 test, {len(chunks)} chunks x {a.ctx} tokens, llama.cpp evaluation")
    print(f"{'file':<20} {'size KiB':>9} {'ppl':>10} {'+-':>7} {'KLD vs F16':>11}")
    for name, path in files.items():
        res, lps = evaluate(path, chunks, base_lp)
        if base_lp is None:
            base_lp = lps
        kld = f"{res['kld']:.5f}" if "kld" in res else "-"
        print(f"{name:<20} {path.stat().st_size / 1024:>9.0f} {res['ppl']:>10.4f} {res['ppl_se']:>7.4f} {kld:>11}",
              flush=True)
    if a.check_lowbit:
        res = lowbit_eval(src, qms["gptq"], chunks, base_lp)
        print(f"{'GPTQ (lowbit torch)':<20} {'-':>9} {res['ppl']:>10.4f} {res['ppl_se']:>7.4f} {res['kld']:>11.5f}")


def lowbit_eval(src, qm, chunks: list[list[int]], base_lp: list[np.ndarray] | None) -> dict:
    """The same scoring on lowbit's own dequantized model (float weights = codes x scales)."""
    import torch

    from lowbit.models import load

    model = load(src).model
    sd = model.state_dict()
    with torch.no_grad():
        for n, qw in qm.weights.items():
            sd[n].copy_(qw.dequantize())
        for n, t in qm.float_overrides.items():
            sd[n].copy_(t)
        nll, kl = [], []
        for i, c in enumerate(chunks):
            logits = model(torch.tensor([c])).logits[0].float().numpy()
            n_, k, _ = score_chunk(logits, c, None if base_lp is None else base_lp[i])
            nll.append(n_)
            kl.append(k)
    nll_a = np.concatenate(nll)
    ppl = float(np.exp(nll_a.mean()))
    return {"ppl": ppl, "ppl_se": ppl * float(nll_a.std()) / np.sqrt(len(nll_a)),
            "kld": float(np.concatenate(kl).mean()) if base_lp is not None else float("nan")}


if __name__ == "__main__":
    main()
