"""How close is lowbit's importance matrix to llama.cpp's?

llama-cpp-python ships no llama-imatrix, so llama.cpp's values are collected the way
llama-imatrix collects them: an eval callback on every MUL_MAT whose weight is a ``blk.*``
tensor, summing the squares of the F32 activations (src1) and counting their rows.  Both sides
see the same token chunks (llama.cpp's tokenization, BOS first).  llama.cpp runs our F32 GGUF
of the model, lowbit runs the transformers model loaded from the same source.

Run:  python bench/imatrix_agreement.py --model smollm2 --chunks 2
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gguf_util import GEMMA, SMOL, STORIES, WIKI, LlamaRunner, chunks_of  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--work", default="/tmp/lowbit-gguf-bench")
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    from lowbit.gguf.convert import quantize_to_gguf
    from lowbit.gguf.imatrix import _gguf_arch, collect, relative_difference
    from lowbit.models import load

    src = {"smollm2": SMOL, "gemma3": GEMMA, "stories": STORIES}.get(a.model, a.model)
    work = Path(a.work) / Path(str(src)).stem
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "base-F32.gguf"
    if not f32.exists():
        quantize_to_gguf(src, f32, "F32")
    text = Path(WIKI).read_text(encoding="utf-8")[:200000]
    t = time.time()
    with LlamaRunner(f32, n_ctx=a.ctx, collect_imatrix=True) as r:
        toks = r.tokenize(text, True)
        chunks = chunks_of(toks, a.ctx, a.chunks, r.bos if r.add_bos else None)
        for c in chunks:
            r.logits(c)
        theirs = {k: v[0] / v[1] for k, v in r.stats.items()}
        counts = {k: v[1] for k, v in r.stats.items()}
    t_ll = time.time() - t
    lm = load(src)
    t = time.time()
    im = collect(src, chunks, _gguf_arch(lm.config))
    t_ours = time.time() - t
    ours = im.values()
    rd = relative_difference(ours, theirs)
    same_counts = all(int(im.counts[k][0]) == counts[k] for k in theirs if k in im.counts)
    vals = np.array(list(rd.values()))
    print(f"model {a.model}: {len(chunks)} chunks x {a.ctx} tokens; entries ours {len(ours)}, llama.cpp {len(theirs)}, "
          f"common {len(rd)}; counts equal: {same_counts}")
    print(f"relative L2 difference per entry: median {np.median(vals):.2e}, mean {vals.mean():.2e}, max {vals.max():.2e}")
    for k, v in sorted(rd.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {k}: {v:.2e}")
    print(f"time: llama.cpp {t_ll:.0f}s, lowbit {t_ours:.0f}s")


if __name__ == "__main__":
    main()
