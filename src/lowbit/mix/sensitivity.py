"""How much each weight matters to the model's output distribution: the diagonal of the Fisher information.

For a small change ``d`` of the weights, the KL-divergence of the model's next-token distribution
from the reference's is about ``1/2 * d^T F d`` with ``F`` the Fisher information of the reference
model. :func:`fisher_diagonal` estimates its diagonal on calibration text, one forward and backward
pass per chunk: next tokens are *sampled from the model itself* (so that the expectation is the
Fisher's, not the empirical one's), and each weight's gradient over the whole chunk is squared. A
chunk's gradient sums every position's, so the estimate keeps how positions reinforce each other
(attention's values and outputs reach every later position: squaring per position instead
underestimates them about twice, measured on stories260K); tied weights (an embedding that is also
the output layer) get both uses at once. Each chunk's square is one noisy sample per weight; summed over
a tensor's weights (what the allocator uses) the noise averages out. Embedding rows of tokens the text
lacks (and no output layer reaches) get the mean row, a prior. Divided by the number of positions, the
sums are per token, so :func:`predicted_kl` of a quantized tensor is in nats per token, the unit of
``lowbit eval``'s and llama-perplexity's mean KL. The chunks and the sampling are seeded.

The sums over tensors assume that errors add; tests/test_mixed_precision.py checks single tensors against
:mod:`lowbit.eval.diagnose`'s one-tensor-at-a-time KL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..progress import bar


@dataclass
class FisherSettings:
    text: str | Path | None = None  # default: pydoc (never the evaluation text)
    ctx: int = 512
    chunks: int = 8
    seed: int = 0


def calibration_chunks(tokenizer: Any, settings: FisherSettings) -> torch.Tensor:
    """``[chunks, ctx]`` token windows of the calibration text (pydoc when none is given)."""
    from ..text import chunk_bos, make_chunks, pydoc_text, read_text, tokenize

    name = "pydoc" if settings.text in (None, "pydoc") else str(settings.text)
    text = pydoc_text() if name == "pydoc" else read_text(name)
    tokens = tokenize(tokenizer, text[: settings.ctx * settings.chunks * 12], where=name)
    return make_chunks(tokens, settings.ctx, chunk_bos(tokenizer, tokens), settings.chunks)


def fisher_diagonal(model: torch.nn.Module, chunks: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per weight name (``model.named_parameters``'s, tied weights once): the Fisher diagonal per token."""
    params = dict(model.named_parameters())
    emb_name = next(n for n, p in params.items() if p is model.get_input_embeddings().weight)
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items() if p.dim() == 2}
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    saved = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in sums)
    try:
        with bar(int(chunks.shape[0]), "sensitivity: Fisher information", unit="chunk") as pbar:
            for c in chunks:
                model.zero_grad(set_to_none=True)
                logits = model(input_ids=c.unsqueeze(0), use_cache=False).logits[0].float()
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen).squeeze(1)
                F.cross_entropy(logits, y, reduction="sum").backward()
                del logits
                with torch.no_grad():
                    for n, acc in sums.items():
                        g = params[n].grad
                        if g is not None:
                            acc.add_(g.float().square())
                pbar.update(1)
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(saved[n])
        model.train(was_training)
    emb = sums[emb_name]
    unseen = emb.sum(1) == 0
    if bool(unseen.any()):
        emb[unseen] = emb[~unseen].mean(0) if bool((~unseen).any()) else 0.0
    positions = int(chunks.numel())
    return {k: v / positions for k, v in sums.items()}


def predicted_kl(fisher: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    """``1/2 * sum(F * (wq - w)^2)``: the KL (nats per token) this tensor's error alone is expected to cost."""
    return 0.5 * float((fisher.double() * (wq.double() - w.double()).square()).sum())
