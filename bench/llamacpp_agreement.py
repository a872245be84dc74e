"""lowbit's numbers beside llama.cpp's own tools (issue 17): tokens, perplexity, KL-divergence, imatrix.

For each model (SmolLM2-135M and Gemma-3-270M from their demo GGUFs, stories260K from its HF
folder) an F32 GGUF is the reference and a GGUF mix of it (default Q4_K_M, written by lowbit,
byte-identical to llama-quantize) the quantized model; for each text (WikiText-2 test and
Python's pydoc topics) the script measures, on the same chunks (``--chunks`` of ``--ctx``):

* tokens: lowbit's token stream (what ``lowbit eval`` / ``lowbit imatrix`` use) against the one
  ``llama-perplexity`` stores in its KL base file, and whether the transformers tokenizer
  converted from the GGUF would give the same ids;
* PPL of the reference and of the quantized model, KL-divergence and top-1 agreement from
  ``llama-perplexity --kl-divergence`` (the binary), and from lowbit: its own runtime (float32
  activations), the same with ``--emulate llama.cpp``, and ``--runtime llama.cpp`` (llama.cpp's
  logits through llama-cpp-python, PPL/KL by lowbit's code); for the last also llama-perplexity's
  own KL formula applied to the same logits (its base log-probs stored as 16-bit integers, probabilities
  under e^-16 left out), which must equal the binary's number up to float summation;
* the importance matrix of the F32 GGUF from ``llama-imatrix`` (the binary) and ``lowbit imatrix``
  on ``--imatrix-chunks`` chunks (default 7: four chunks, then three, whose last micro-batch of
  6 rows llama-imatrix skips): counts, and the relative L2 difference per entry.

The llama.cpp binaries are built from the llama-cpp-python sdist's vendored llama.cpp
(``--llama-bin``: the folder holding ``llama-perplexity`` and ``llama-imatrix``):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \\
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build build -j2 --target llama-perplexity llama-imatrix    # ~1 h niced on 2 shared cores

Run:  python bench/llamacpp_agreement.py --llama-bin .../build/bin [--models smollm2 gemma3 stories]
      [--texts wikitext pydoc] [--chunks 8] [--imatrix-chunks 7] [--quant Q4_K_M] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MODELS = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m", "stories": None}


def _stories() -> Path:
    from paths import STORIES

    return STORIES


def _wikitext() -> Path:
    from paths import WIKITEXT

    return WIKITEXT


# --- llama.cpp's tools ------------------------------------------------------------------------------


def run_tool(cmd: list[str], log: Path, expect: str = "") -> str:
    """Run one of llama.cpp's tools; its output must contain ``expect``. The tools log through a
    thread that can lose the last lines at exit (about one run in three here, status 0), so a run
    missing them is repeated, up to 6 times."""
    for _ in range(6):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        log.write_text(" ".join(cmd) + "\n" + p.stdout + p.stderr)
        if p.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({p.returncode}), see {log}")
        if expect in p.stdout + p.stderr:
            return p.stdout + p.stderr + f"\n__seconds {time.perf_counter() - t0:.1f}\n"
    raise RuntimeError(f"{cmd[0]} stopped before {expect!r}, see {log}")


def _num(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    if not m:
        raise RuntimeError(f"no match for {pattern!r}")
    return float(m.group(1))


def llama_perplexity(bin_dir: Path, ref: Path, q: Path, text: Path, ctx: int, chunks: int, threads: int,
                     work: Path) -> dict:
    base = work / f"{text.stem}-base.kld"
    exe = str(bin_dir / "llama-perplexity")
    out_b = run_tool([exe, "-m", str(ref), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads),
                      "--kl-divergence-base", str(base)], work / f"{text.stem}-ppl-base.log", "Final estimate")
    out_q = run_tool([exe, "-m", str(q), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads),
                      "--kl-divergence-base", str(base), "--kl-divergence"], work / f"{text.stem}-ppl-kl.log",
                     "Same top p:")
    return {"ppl_ref": _num(r"Final estimate: PPL = ([0-9.]+)", out_b),
            "ppl": _num(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", out_q),
            "ppl_ref_kl_mode": _num(r"Mean PPL\(base\)\s*:\s*([0-9.]+)", out_q),
            "kl_mean": _num(r"Mean\s+KLD:\s*([0-9.]+)", out_q),
            "top1": _num(r"Same top p:\s*([0-9.]+)", out_q) / 100,
            "seconds": _num(r"__seconds ([0-9.]+)", out_b) + _num(r"__seconds ([0-9.]+)", out_q),
            "base_file": str(base)}


def read_kl_base(path: Path) -> tuple[int, int, int, np.ndarray, np.memmap]:
    """llama-perplexity's KL base file: (n_ctx, n_vocab, n_chunk, tokens, uint16 log-prob blocks)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    assert bytes(raw[:8]) == b"_logits_"
    n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(raw[8:20].tobytes(), dtype="<i4"))
    tokens = np.frombuffer(raw[20:20 + 4 * n_ctx * n_chunk].tobytes(), dtype="<i4")
    nv = 2 * ((n_vocab + 1) // 2) + 4
    per_chunk = (n_ctx - 1 - n_ctx // 2) * nv
    lp = np.frombuffer(raw, dtype="<u2", offset=20 + 4 * n_ctx * n_chunk, count=per_chunk * n_chunk)
    return n_ctx, n_vocab, n_chunk, tokens, lp.reshape(n_chunk, n_ctx - 1 - n_ctx // 2, nv)


class ToolKL:
    """Wraps a llama.cpp runner: passes its logits on to lowbit's evaluation and, on the side, applies
    llama-perplexity's own KL formula (perplexity.cpp, 16-bit base log-probs) to them."""

    def __init__(self, runner, base_file: Path) -> None:
        self.runner = runner
        self.n_ctx, self.n_vocab, _, self.tokens, self.base = read_kl_base(base_file)
        self.k = 0
        self.kl: list[float] = []
        self.same: list[bool] = []
        self.chunk_nll: list[float] = []

    def chunk_logits(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self.runner.chunk_logits(batch)
        first = self.n_ctx // 2
        for b in range(batch.shape[0]):
            lg = logits[b, first:self.n_ctx - 1].numpy().astype(np.float32)
            blk = self.base[self.k]
            self.k += 1
            head = blk[:, :4].copy().view(np.float32)
            scale, min_lp = head[:, 0:1], head[:, 1:2]
            p_log_base = scale * blk[:, 4:4 + self.n_vocab].astype(np.float32) + min_lp
            mx = lg.max(-1, keepdims=True)
            lse = np.log(np.exp((lg - mx).astype(np.float64)).sum(-1, keepdims=True)).astype(np.float32)
            keep = p_log_base > -16.0
            term = np.where(keep, np.exp(p_log_base) * (p_log_base - lg + (mx + lse)), 0.0)
            self.kl.extend(term.astype(np.float64).sum(-1).tolist())
            self.same.extend((lg.argmax(-1) == p_log_base.argmax(-1)).tolist())
        self.chunk_nll.extend(chunk_nll(logits[:, first:], batch, first))
        return logits


def chunk_nll(logits: torch.Tensor, batch: torch.Tensor, first: int) -> list[float]:
    """Each chunk's mean NLL over its scored tokens (the second half), as lowbit's evaluation scores them
    (``logits``: positions ``first..ctx-1``)."""
    from lowbit.eval.perplexity import _nll

    return _nll(logits, batch, first).double().reshape(batch.shape[0], -1).mean(-1).tolist()


class Recorder:
    """Passes a model's logits on to lowbit's evaluation, keeping each chunk's mean NLL (for paired gaps)."""

    def __init__(self, model, first: int) -> None:
        self.model, self.first = model, first
        self.chunk_nll: list[float] = []

    def chunk_logits(self, batch: torch.Tensor) -> torch.Tensor:
        from lowbit.eval.perplexity import _logits

        logits = _logits(self.model, batch, self.first)
        self.chunk_nll.extend(chunk_nll(logits, batch, self.first))
        return logits


def paired_gap(a: list[float], b: list[float]) -> dict:
    """PPL of ``a`` against ``b`` on the same chunks: the gap in percent and its standard error, from the
    per-chunk differences of mean NLL (chunks, not tokens, are the independent units: a rounding
    difference early in a chunk moves every later token of it)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
    return {"gap_pct": 100 * float(np.expm1(d.mean())), "se_pct": 100 * se, "chunks": int(d.size)}


# --- lowbit -----------------------------------------------------------------------------------------


def lowbit_eval(q: Path, ref: Path, text: Path, ctx: int, chunks: int, **kw) -> dict:
    import lowbit.api as lb

    t0 = time.perf_counter()
    r = lb.evaluate(str(q), str(ref), lb.EvalSettings(text=text, ctx=ctx, max_chunks=chunks, **kw))
    return {"ppl": r["ppl"], "ppl_ref": r["ppl_ref"], "kl_mean": r["kl_mean"], "top1": r["top1_agreement"],
            "n_tokens": r["n_tokens"], "numerics": r["numerics"], "seconds": time.perf_counter() - t0}


def lowbit_llamacpp_runtime(q: Path, ref: Path, text: Path, ctx: int, chunks: int, base_file: Path) -> dict:
    """``--runtime llama.cpp`` (lowbit's evaluation code on llama.cpp's logits, as api.evaluate runs it),
    with llama-perplexity's formula applied to the same logits on the side."""
    import lowbit.api as lb
    from lowbit.eval import chunk_bos, compare_models
    from lowbit.gguf.llamacpp import LlamaCppTokenizer, Runner, Vocab

    t0 = time.perf_counter()
    settings = lb.EvalSettings(text=text, ctx=ctx, max_chunks=chunks, runtime="llama.cpp")
    tok = LlamaCppTokenizer(None, Vocab(q))
    _, tokens = lb._text_tokens(tok, settings)
    with Runner(ref, ctx, ctx // 2) as rr, Runner(q, ctx, ctx // 2) as qr:
        side = ToolKL(qr, base_file)
        res = compare_models(rr, {"q": side}, tokens, ctx=ctx, batch_size=4, bos_id=chunk_bos(tok, tokens),
                             max_chunks=chunks)["q"]
    return {"ppl": res.ppl, "ppl_ref": res.ppl_ref, "kl_mean": res.kl_mean, "top1": res.top1_agreement,
            "n_tokens": res.n_tokens, "kl_tool_formula": float(np.mean(side.kl)),
            "top1_tool_formula": float(np.mean(side.same)), "chunk_nll": side.chunk_nll,
            "seconds": time.perf_counter() - t0}


def lowbit_emulated(q: Path, ref: Path, text: Path, ctx: int, chunks: int) -> dict:
    """``lowbit eval --emulate llama.cpp`` (api.evaluate's model loading, tokens and compare_models),
    keeping each chunk's mean NLL of the quantized model."""
    import lowbit.api as lb
    from lowbit.eval import chunk_bos, compare_models

    t0 = time.perf_counter()
    settings = lb.EvalSettings(text=text, ctx=ctx, max_chunks=chunks, emulate="llama.cpp")
    model, tok, _, numerics = lb._eval_model(str(q), settings, ctx // 2, "model")
    ref_model, _, _, _ = lb._eval_model(str(ref), settings, ctx // 2, "ref")
    _, tokens = lb._text_tokens(tok, settings)
    rec = Recorder(model, ctx // 2)
    res = compare_models(ref_model, {"q": rec}, tokens, ctx=ctx, batch_size=settings.batch_size,
                         bos_id=chunk_bos(tok, tokens), max_chunks=chunks)["q"]
    return {"ppl": res.ppl, "ppl_ref": res.ppl_ref, "kl_mean": res.kl_mean, "top1": res.top1_agreement,
            "n_tokens": res.n_tokens, "numerics": numerics, "chunk_nll": rec.chunk_nll,
            "seconds": time.perf_counter() - t0}


def llamacpp_ubatch(q: Path, text: Path, ctx: int, chunks: int, n_ubatch: int = 32) -> dict:
    """llama.cpp's runtime on the quantized model with micro-batches of ``n_ubatch`` tokens (under 64:
    its attention then takes F16 queries and accumulates in F16): how far llama.cpp moves from itself."""
    import lowbit.api as lb
    from lowbit.eval import chunk_bos, perplexity
    from lowbit.gguf.llamacpp import LlamaCppTokenizer, Runner, Vocab

    settings = lb.EvalSettings(text=text, ctx=ctx, max_chunks=chunks, runtime="llama.cpp")
    tok = LlamaCppTokenizer(None, Vocab(q))
    _, tokens = lb._text_tokens(tok, settings)
    with Runner(q, ctx, ctx // 2, n_ubatch=n_ubatch) as qr:
        rec = Recorder(qr, ctx // 2)
        res = perplexity(rec, tokens, ctx=ctx, batch_size=4, bos_id=chunk_bos(tok, tokens), max_chunks=chunks)
    return {"ppl": res.ppl, "n_ubatch": n_ubatch, "chunk_nll": rec.chunk_nll}


def token_check(gguf: Path, text: Path, ctx: int, chunks: int, base_file: Path) -> dict:
    """lowbit's token stream (the loader's tokenizer, lowbit.text.tokenize as lowbit eval runs it)
    against llama-perplexity's, and the converted transformers tokenizer against llama.cpp's."""
    import lowbit.api as lb
    from lowbit.gguf.llamacpp import Vocab
    from lowbit.models import resolve
    from lowbit.models.loader import load_tokenizer
    from lowbit.text import encode

    src = resolve(str(gguf))
    tok = load_tokenizer(src.hf_dir, src.gguf_path)
    _, ours = lb._text_tokens(tok, lb.EvalSettings(text=text, ctx=ctx, max_chunks=chunks))
    _, _, n_chunk, theirs, _ = read_kl_base(base_file)
    n = n_chunk * ctx
    body = text.read_text(encoding="utf-8")[:200_000]
    hf_same = encode(tok._hf, body) == Vocab(gguf).tokenize(body)
    return {"tokens_equal": bool(np.array_equal(ours[:n].numpy(), theirs[:n])), "tokens_compared": n,
            "transformers_tokenizer_equal": bool(hf_same)}


def imatrix_check(bin_dir: Path, gguf: Path, text: Path, ctx: int, chunks: int, threads: int, work: Path) -> dict:
    from lowbit.gguf.imatrix import compute_imatrix, load_imatrix, relative_difference

    ll_out, lb_out = work / f"{text.stem}-imatrix-llama.gguf", work / f"{text.stem}-imatrix-lowbit.gguf"
    t0 = time.perf_counter()
    run_tool([str(bin_dir / "llama-imatrix"), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks),
              "-t", str(threads), "--no-ppl", "-o", str(ll_out)], work / f"{text.stem}-imatrix.log")
    t1 = time.perf_counter()
    compute_imatrix(gguf, text, lb_out, ctx=ctx, chunks=chunks, overwrite=True)
    t2 = time.perf_counter()
    a, _ = load_imatrix(ll_out)
    b, _ = load_imatrix(lb_out)
    counts_equal = set(a.sums) == set(b.sums) and all(np.array_equal(a.counts[k], b.counts[k]) for k in a.sums)
    rd = relative_difference(b.values(), a.values())
    va, vb = a.values(), b.values()
    elem = np.concatenate([np.abs(vb[k] - va[k]) / np.maximum(np.abs(va[k]), 1e-30) for k in sorted(va)])
    worst = max(rd, key=lambda k: rd[k])
    return {"entries": len(a.sums), "counts_equal": bool(counts_equal),
            "count": float(next(iter(a.counts.values()))[0]), "chunk_count_equal": a.chunk_count == b.chunk_count,
            "rel_l2_median": float(np.median(list(rd.values()))), "rel_l2_max": rd[worst], "rel_l2_max_entry": worst,
            "elementwise_rel_p999": float(np.quantile(elem, 0.999)), "seconds_llama": t1 - t0, "seconds_lowbit": t2 - t1}


# --- the table --------------------------------------------------------------------------------------


def _pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.3f}%"


def table(rows: list[dict]) -> str:
    out = ["| model | text | tokens = llama.cpp | transformers tokenizer = llama.cpp | PPL ref: llama-perplexity | lowbit | emulated | runtime llama.cpp "
           "| PPL Q: llama-perplexity | lowbit | emulated | runtime llama.cpp "
           "| KL: llama-perplexity | lowbit | emulated | runtime llama.cpp | runtime llama.cpp, tool's formula "
           "| top-1: llama-perplexity | emulated | runtime llama.cpp "
           "| imatrix counts equal | imatrix rel. L2 median / max |",
           "|" + "---|" * 22]
    for r in rows:
        ll, lo, em, rt, im, tk = r["llama_perplexity"], r["lowbit"], r["emulated"], r["runtime_llamacpp"], r["imatrix"], r["tokens"]
        out.append(
            f"| {r['model']} ({r['quant']}) | {r['text']} | {'yes' if tk['tokens_equal'] else 'NO'} ({tk['tokens_compared']}) "
            f"| {'yes' if tk['transformers_tokenizer_equal'] else 'no'} "
            f"| {ll['ppl_ref']:.4f} | {_pct(lo['ppl_ref'], ll['ppl_ref'])} | {_pct(em['ppl_ref'], ll['ppl_ref'])} "
            f"| {_pct(rt['ppl_ref'], ll['ppl_ref'])} "
            f"| {ll['ppl']:.4f} | {_pct(lo['ppl'], ll['ppl'])} | {_pct(em['ppl'], ll['ppl'])} | {_pct(rt['ppl'], ll['ppl'])} "
            f"| {ll['kl_mean']:.6f} | {_pct(lo['kl_mean'], ll['kl_mean'])} | {_pct(em['kl_mean'], ll['kl_mean'])} "
            f"| {_pct(rt['kl_mean'], ll['kl_mean'])} | {_pct(rt['kl_tool_formula'], ll['kl_mean'])} "
            f"| {100 * ll['top1']:.2f}% | {100 * em['top1']:.2f}% | {100 * rt['top1']:.2f}% "
            f"| {'yes' if im['counts_equal'] and im['chunk_count_equal'] else 'NO'} ({im['count']:.0f}) "
            f"| {im['rel_l2_median']:.1e} / {im['rel_l2_max']:.1e} |")
    return "\n".join(out)


def paired_table(rows: list[dict]) -> str:
    """The quantized model's PPL, emulated against llama.cpp's runtime on the same chunks, beside llama.cpp
    against itself with 32-token micro-batches: gap and standard error (per-chunk differences)."""
    out = ["| model | text | chunks | emulated vs llama.cpp: PPL gap ± SE | within 0.1% | within 2 SE "
           "| llama.cpp -ub 32 vs llama.cpp: PPL gap ± SE |", "|" + "---|" * 7]
    for r in rows:
        if "paired" not in r:
            continue
        e, u = r["paired"]["emulated"], r["paired"]["llamacpp_ub32"]
        out.append(f"| {r['model']} ({r['quant']}) | {r['text']} | {e['chunks']} | {e['gap_pct']:+.3f}% ± {e['se_pct']:.3f}% "
                   f"| {'yes' if abs(e['gap_pct']) <= 0.1 else 'no'} | {'yes' if abs(e['gap_pct']) <= 2 * e['se_pct'] else 'no'} "
                   f"| {u['gap_pct']:+.3f}% ± {u['se_pct']:.3f}% |")
    return "\n".join(out)


def prepare(model: str, quant: str, work: Path) -> tuple[Path, Path]:
    from lowbit.gguf.convert import quantize_to_gguf

    work.mkdir(parents=True, exist_ok=True)
    src = MODELS[model] or str(_stories())
    f32, q = work / f"{model}-F32.gguf", work / f"{model}-{quant}.gguf"
    if not f32.exists():
        quantize_to_gguf(src, f32, "F32")
    if not q.exists():
        quantize_to_gguf(f32, q, quant)
    return f32, q


def texts(names: list[str], work: Path) -> dict[str, Path]:
    from lowbit.text import pydoc_text

    out = {}
    for n in names:
        if n == "wikitext":
            out[n] = _wikitext()
        elif n == "pydoc":
            p = work / "pydoc.txt"
            if not p.exists():
                p.write_text(pydoc_text(), encoding="utf-8")
            out[n] = p
        else:
            out[n] = Path(n)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bin", required=True, help="folder with llama-perplexity and llama-imatrix")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--texts", nargs="+", default=["wikitext", "pydoc"])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--imatrix-chunks", type=int, default=7)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/lowbit-llamacpp-agreement")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--previous", nargs="*", default=[],
                    help="output files of earlier runs: their rows (JSON lines) join the table")
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    os.environ.setdefault("LOWBIT_NO_PROGRESS", "1")
    torch.set_num_threads(a.threads)
    bin_dir, work = Path(a.llama_bin), Path(a.work)
    rows = [json.loads(line) for f in a.previous for line in Path(f).read_text().splitlines() if line.startswith("{")]
    for model in a.models:
        mw = work / model
        f32, q = prepare(model, a.quant, mw)
        for tname, text in texts(a.texts, work).items():
            tw = mw / tname
            tw.mkdir(parents=True, exist_ok=True)
            row: dict = {"model": model, "quant": a.quant, "text": tname, "ctx": a.ctx, "chunks": a.chunks,
                         "imatrix_chunks": a.imatrix_chunks}
            row["llama_perplexity"] = llama_perplexity(bin_dir, f32, q, text, a.ctx, a.chunks, a.threads, tw)
            base = Path(row["llama_perplexity"]["base_file"])
            row["tokens"] = token_check(f32, text, a.ctx, a.chunks, base)
            row["runtime_llamacpp"] = lowbit_llamacpp_runtime(q, f32, text, a.ctx, a.chunks, base)
            row["emulated"] = lowbit_emulated(q, f32, text, a.ctx, a.chunks)
            row["llamacpp_ub32"] = llamacpp_ubatch(q, text, a.ctx, a.chunks)
            rt_nll = row["runtime_llamacpp"]["chunk_nll"]
            row["paired"] = {"emulated": paired_gap(row["emulated"]["chunk_nll"], rt_nll),
                             "llamacpp_ub32": paired_gap(row["llamacpp_ub32"]["chunk_nll"], rt_nll)}
            row["lowbit"] = lowbit_eval(q, f32, text, a.ctx, a.chunks)
            row["imatrix"] = imatrix_check(bin_dir, f32, text, a.ctx, a.imatrix_chunks, a.threads, tw)
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    print()
    print(f"ctx {a.ctx}, {a.chunks} chunks (second half of each scored), imatrix on {a.imatrix_chunks} chunks of the "
          f"F32 GGUF; reference: the model's F32 GGUF; threads {a.threads}; llama.cpp from llama-cpp-python 0.3.36")
    print(table(rows))
    print()
    print(paired_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
