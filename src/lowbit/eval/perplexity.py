"""Perplexity and KL-divergence the llama.cpp way, batched on CPU or GPU.

The token stream is cut into ``ctx``-token chunks; each chunk's first token is replaced by BOS
when the model uses one, and by default only the second half of each chunk is scored (every
scored token then has at least ``ctx/2`` tokens of context), as llama.cpp's perplexity tool does.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed as dist
from ..progress import bar
from ..text import make_chunks


@dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float
    nll_mean: float
    n_tokens: int
    n_chunks: int
    ctx: int
    seconds: float
    tokens_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class KLResult:
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    ppl_ref: float
    ppl: float
    ppl_ratio: float
    ln_ppl_ratio: float
    n_tokens: int
    seconds: float
    tokens_per_s: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _first_scored(ctx: int, score_all: bool) -> int:
    return 0 if score_all else ctx // 2


@torch.inference_mode()
def _logits(model: torch.nn.Module, batch: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Logits ``[b, ctx - first, vocab]`` of positions ``first..ctx-1`` of a batch of chunks: a torch
    model's forward (the output layer runs on those positions only, as llama.cpp's tools ask for
    them: half the output matmul and half the memory when the second half is scored), or a runtime
    outside torch that gives them itself (``chunk_logits``: :class:`lowbit.gguf.llamacpp.Runner`)."""
    if hasattr(model, "chunk_logits"):
        out = model.chunk_logits(batch)
        return out[:, first:] if out.shape[1] == batch.shape[1] else out
    device = next(model.parameters()).device
    return model(input_ids=batch.to(device), use_cache=False, logits_to_keep=batch.shape[1] - first).logits.float()


def _nll(logits: torch.Tensor, batch: torch.Tensor, first: int) -> torch.Tensor:
    """Negative log-likelihood of tokens ``first+1 .. ctx-1`` given their prefixes, flat, from the
    logits of positions ``first..ctx-1`` (:func:`_logits`); one chunk at a time, so the
    log-softmax needs one chunk's vocab-wide buffer, not the batch's."""
    out = []
    for j in range(logits.shape[0]):
        lp = F.log_softmax(logits[j, :-1], dim=-1)
        target = batch[j, first + 1 :].to(lp.device)
        out.append(-lp.gather(-1, target[:, None]).squeeze(-1).cpu())
        del lp
    return torch.cat(out)


def _summarize(nll: torch.Tensor) -> tuple[float, float, float]:
    mean = float(nll.double().mean())
    std = float(nll.double().std()) if nll.numel() > 1 else 0.0
    stderr = std / math.sqrt(max(1, nll.numel()))
    ppl = math.exp(mean)
    return ppl, ppl * stderr, mean


def perplexity(model: torch.nn.Module, tokens: torch.Tensor, ctx: int = 512, batch_size: int = 4,
               bos_id: int | None = None, score_all: bool = False, max_chunks: int | None = None,
               desc: str = "perplexity") -> PerplexityResult:
    """Perplexity of ``model`` over ``tokens`` (1-D ids)."""
    chunks = make_chunks(tokens, ctx, bos_id, max_chunks)
    first = _first_scored(ctx, score_all)
    nlls: list[torch.Tensor] = []
    start = time.perf_counter()
    mine = dist.mine(range(0, chunks.shape[0], batch_size))  # several processes: batches round-robin
    with bar(sum(min(batch_size, chunks.shape[0] - i) for i in mine), desc, unit="chunk") as pbar:
        for i in mine:
            batch = chunks[i : i + batch_size]
            nlls.append(_nll(_logits(model, batch, first), batch, first))
            pbar.update(batch.shape[0])
    nlls = dist.interleave(dist.gather(nlls))  # the one-process order: the same sums
    seconds = time.perf_counter() - start
    nll = torch.cat(nlls)
    ppl, err, mean = _summarize(nll)
    n_eval = chunks.numel()
    return PerplexityResult(ppl, err, mean, nll.numel(), chunks.shape[0], ctx, seconds, n_eval / seconds)


def kl_divergence(ref: torch.nn.Module, model: torch.nn.Module, tokens: torch.Tensor, ctx: int = 512,
                  batch_size: int = 4, bos_id: int | None = None, score_all: bool = False,
                  max_chunks: int | None = None, desc: str = "kl-divergence") -> KLResult:
    """KL(ref || model) per scored token, top-1 agreement and both perplexities."""
    return compare_models(ref, {"model": model}, tokens, ctx, batch_size, bos_id, score_all, max_chunks, desc)["model"]


def compare_models(ref: torch.nn.Module, models: dict[str, torch.nn.Module], tokens: torch.Tensor, ctx: int = 512,
                   batch_size: int = 4, bos_id: int | None = None, score_all: bool = False,
                   max_chunks: int | None = None, desc: str = "kl-divergence") -> dict[str, KLResult]:
    """:func:`kl_divergence` of several models against one reference, running the reference once."""
    chunks = make_chunks(tokens, ctx, bos_id, max_chunks)
    first = _first_scored(ctx, score_all)
    stats: dict[str, dict[str, list[torch.Tensor]]] = {k: {"kl": [], "same": [], "nll": []} for k in models}
    nll_ref: list[torch.Tensor] = []
    seconds = dict.fromkeys(models, 0.0)
    mine = dist.mine(range(0, chunks.shape[0], batch_size))  # several processes: batches round-robin
    with bar(sum(min(batch_size, chunks.shape[0] - i) for i in mine), desc, unit="chunk") as pbar:
        for i in mine:
            batch = chunks[i : i + batch_size]
            logits_ref = _logits(ref, batch, first)
            logits: dict[str, torch.Tensor] = {}
            for key, model in models.items():
                t0 = time.perf_counter()
                logits[key] = _logits(model, batch, first).to(logits_ref.device)
                seconds[key] += time.perf_counter() - t0
            for j in range(batch.shape[0]):  # one chunk at a time: a few vocab-wide buffers, not per batch
                lp_ref = F.log_softmax(logits_ref[j, :-1], dim=-1)
                p_ref = lp_ref.exp()
                top_ref = lp_ref.argmax(-1)
                target = batch[j, first + 1 :].to(lp_ref.device)[..., None]
                nll_ref.append(-lp_ref.gather(-1, target).reshape(-1).cpu())
                for key in models:
                    _accumulate(stats[key], lp_ref, p_ref, top_ref, F.log_softmax(logits[key][j, :-1], dim=-1), target)
                del lp_ref, p_ref
            del logits_ref, logits
            pbar.update(batch.shape[0])
    if dist.size() > 1:  # every rank's batches back in the one-process order
        nll_ref = dist.interleave(dist.gather(nll_ref))
        for st in stats.values():
            for name in st:
                st[name] = dist.interleave(dist.gather(st[name]))
        seconds = {k: max(dist.gather(v)) for k, v in seconds.items()}
    nll = torch.cat(nll_ref)
    return {key: _kl_result(st, nll, chunks.numel(), seconds[key]) for key, st in stats.items()}


def _accumulate(st: dict[str, list[torch.Tensor]], lp_ref: torch.Tensor, p_ref: torch.Tensor, top_ref: torch.Tensor,
                lp_q: torch.Tensor, target: torch.Tensor) -> None:
    """One batch's per-token KL(ref || q), top-1 agreement and q's NLL, appended to ``st``."""
    st["kl"].append((p_ref * (lp_ref - lp_q)).sum(-1).reshape(-1).cpu())
    st["same"].append((top_ref == lp_q.argmax(-1)).reshape(-1).cpu())
    st["nll"].append(-lp_q.gather(-1, target).reshape(-1).cpu())


def _kl_result(st: dict[str, list[torch.Tensor]], nll_ref: torch.Tensor, n_eval: int, seconds: float) -> KLResult:
    ppl_ref, _, mean_ref = _summarize(nll_ref)
    kl = torch.cat(st["kl"]).double().clamp_min(0)
    ppl_q, _, mean_q = _summarize(torch.cat(st["nll"]))
    return KLResult(
        kl_mean=float(kl.mean()),
        kl_median=float(kl.median()),
        kl_p99=float(torch.quantile(kl.float(), 0.99)),
        kl_max=float(kl.max()),
        top1_agreement=float(torch.cat(st["same"]).float().mean()),
        ppl_ref=ppl_ref,
        ppl=ppl_q,
        ppl_ratio=ppl_q / ppl_ref,
        ln_ppl_ratio=mean_q - mean_ref,
        n_tokens=kl.numel(),
        seconds=seconds,
        tokens_per_s=n_eval / max(seconds, 1e-9),
    )


@dataclass
class ReferenceScores:
    """A reference model's log-probabilities at every scored position, computed once (see
    :func:`reference_scores`), so that models can be compared with it one at a time without the
    reference in memory. Per chunk, in memory or (``folder`` given) one raw float32 file each."""

    chunks: torch.Tensor
    first: int
    batch_size: int
    nll: torch.Tensor
    vocab: int = 0
    batches: list[torch.Tensor | Path] = field(default_factory=list)

    def log_probs(self, k: int) -> torch.Tensor:
        """Chunk ``k``'s log-probabilities ``[positions, vocab]``, a fresh tensor the caller may overwrite."""
        b = self.batches[k]
        if isinstance(b, Path):
            import numpy as np

            return torch.from_numpy(np.fromfile(b, dtype=np.float32)).reshape(-1, self.vocab)
        return b.clone()


def reference_scores(ref: torch.nn.Module, tokens: torch.Tensor, ctx: int = 512, batch_size: int = 4,
                     bos_id: int | None = None, score_all: bool = False, max_chunks: int | None = None,
                     folder: str | Path | None = None, desc: str = "reference") -> ReferenceScores:
    """Run ``ref`` once over the chunks of ``tokens`` and keep its log-probabilities (on disk under
    ``folder`` when given: ``chunks x ctx/2 x vocab`` float32 can be large); :func:`score_against`
    then gives the same numbers as :func:`compare_models`, one model at a time."""
    chunks = make_chunks(tokens, ctx, bos_id, max_chunks)
    first = _first_scored(ctx, score_all)
    out = ReferenceScores(chunks, first, batch_size, torch.empty(0))
    nll_ref: list[torch.Tensor] = []
    with bar(chunks.shape[0], desc, unit="chunk") as pbar:
        for i in range(0, chunks.shape[0], batch_size):
            batch = chunks[i : i + batch_size]
            logits = _logits(ref, batch, first)  # the batch runs as compare_models runs it: the same logits
            for j in range(batch.shape[0]):  # then one chunk at a time (softmax is per position)
                lp_ref = F.log_softmax(logits[j, :-1], dim=-1)
                target = batch[j, first + 1 :].to(lp_ref.device)[..., None]
                nll_ref.append(-lp_ref.gather(-1, target).reshape(-1).cpu())
                out.vocab = lp_ref.shape[-1]
                if folder is not None:  # written as it is in memory: no serialised copy
                    path = Path(folder) / f"reference-{i + j:05d}.f32"
                    lp_ref.cpu().contiguous().numpy().tofile(path)
                    out.batches.append(path)
                else:
                    out.batches.append(lp_ref.cpu())
                del lp_ref
            del logits
            pbar.update(batch.shape[0])
    out.nll = torch.cat(nll_ref)
    return out


def score_against(reference: ReferenceScores, model: torch.nn.Module, desc: str = "kl-divergence") -> KLResult:
    """KL(ref || model), top-1 agreement and both perplexities against scores kept by :func:`reference_scores`.

    The same numbers as :func:`compare_models` (the model runs the same batches; the per-position
    operations are the same on the same values), in less memory: after each batch's logits the
    comparison goes one chunk at a time, the reference's log-probabilities are read per chunk and
    ``p_ref * (lp_ref - lp_q)`` reuses buffers (multiplication commutes exactly).
    """
    st: dict[str, list[torch.Tensor]] = {"kl": [], "same": [], "nll": []}
    chunks, first, seconds = reference.chunks, reference.first, 0.0
    with bar(chunks.shape[0], desc, unit="chunk") as pbar:
        for i in range(0, chunks.shape[0], reference.batch_size):
            batch = chunks[i : i + reference.batch_size]
            t0 = time.perf_counter()
            logits = _logits(model, batch, first)
            seconds += time.perf_counter() - t0
            for j in range(batch.shape[0]):
                lp_q = F.log_softmax(logits[j, :-1], dim=-1)
                lp_ref = reference.log_probs(i + j).to(lp_q.device)
                target = batch[j, first + 1 :].to(lp_q.device)[..., None]
                st["same"].append((lp_ref.argmax(-1) == lp_q.argmax(-1)).reshape(-1).cpu())
                st["nll"].append(-lp_q.gather(-1, target).reshape(-1).cpu())
                diff = lp_ref - lp_q
                del lp_q
                st["kl"].append(diff.mul_(lp_ref.exp_()).sum(-1).reshape(-1).cpu())  # p_ref * (lp_ref - lp_q)
                del lp_ref, diff
            del logits
            pbar.update(batch.shape[0])
    return _kl_result(st, reference.nll, chunks.numel(), seconds)
