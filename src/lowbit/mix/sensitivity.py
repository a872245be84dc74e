"""How much each weight matters to the model's output distribution: the diagonal of the Fisher information.

For a small change ``d`` of the weights, the KL-divergence of the model's next-token distribution
from the reference's is about ``1/2 * sum(F * d^2)`` with ``F`` the Fisher information of the
reference model. :func:`fisher_diagonal` estimates its diagonal on calibration text, one
forward and backward pass per chunk: next tokens are *sampled from the model itself* (so that
the expectation is the Fisher's, not the empirical one's), and for every linear the squared
output gradients are multiplied by the squared inputs, position by position (the
positions taken as independent, as an importance matrix takes them), which gives one value per
weight; embedding rows get their squared gradients at the positions of their tokens, plus the
mean row (a prior for tokens the text lacks). Divided by the number of positions, the sums are
per token, so :func:`predicted_kl` of a quantized tensor is in nats per token, the unit of
``lowbit eval``'s and llama-perplexity's mean KL. The chunks and the sampling are seeded.

The sums over tensors assume that errors add, which :mod:`lowbit.eval.diagnose`'s one-tensor-at-a-time
KL checks (``bench/mixed_precision.py`` compares both).
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
    ids_of = {id(p): n for n, p in params.items()}
    emb = model.get_input_embeddings()
    emb_name = ids_of[id(emb.weight)]
    scale = getattr(emb, "embed_scale", 1.0)
    scale = float(scale) if not isinstance(scale, torch.Tensor) else float(scale.float().reshape(-1)[0])
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and id(mod.weight) in ids_of:
            key = ids_of[id(mod.weight)]

            def fwd(m: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, key: str = key) -> None:
                x2 = args[0].detach().float().reshape(-1, args[0].shape[-1]).square()

                def back(g: torch.Tensor) -> None:
                    add = g.detach().float().reshape(-1, g.shape[-1]).square().T @ x2
                    sums[key] = sums[key] + add if key in sums else add
                out.register_hook(back)
            hooks.append(mod.register_forward_hook(fwd))
    gen = torch.Generator().manual_seed(seed)
    emb_rows = torch.zeros_like(emb.weight, dtype=torch.float32)
    positions = 0
    was_training = model.training
    model.eval()
    saved = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
    try:
        with bar(int(chunks.shape[0]), "sensitivity: Fisher information", unit="chunk") as pbar:
            for c in chunks:
                ids = c.unsqueeze(0)
                with torch.no_grad():
                    x0 = emb(ids)
                x0 = x0.detach().requires_grad_(True)
                logits = model(inputs_embeds=x0, use_cache=False).logits[0].float()
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen).squeeze(1)
                F.cross_entropy(logits, y, reduction="sum").backward()
                assert x0.grad is not None
                emb_rows.index_add_(0, ids[0], (x0.grad[0].float() * scale).square())
                positions += int(ids.shape[1])
                del logits, x0
                pbar.update(1)
    finally:
        for h in hooks:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(saved[n])
        model.train(was_training)
    emb_rows += emb_rows.mean(0, keepdim=True)
    sums[emb_name] = sums[emb_name] + emb_rows if emb_name in sums else emb_rows
    return {k: v / positions for k, v in sums.items()}


def predicted_kl(fisher: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    """``1/2 * sum(F * (wq - w)^2)``: the KL (nats per token) this tensor's error alone is expected to cost."""
    return 0.5 * float((fisher.double() * (wq.double() - w.double()).square()).sum())
