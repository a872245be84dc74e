"""CPU and CUDA agree: the same codes, scales and packed words; evaluation within float noise.

Skipped without a GPU (CI has none); run on the device machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.core import QuantScheme, pack, quantize_weight, unpack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SCHEMES = [QuantScheme(b, g, s) for b in (2, 3, 4, 8) for g in (-1, 0, 32, 128) for s in (True, False)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
def test_rtn_identical_on_cuda(scheme: QuantScheme) -> None:
    g = torch.Generator().manual_seed(scheme.bits * 100 + scheme.group_size)
    w = torch.randn(256, 512, generator=g) * torch.logspace(-4, 2, 256)[:, None]
    w[3] = 0
    w[:, 17] *= 40
    cpu = quantize_weight(w, scheme)
    gpu = quantize_weight(w.cuda(), scheme)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
    q = cpu[0]
    assert torch.equal(pack(q, scheme.bits).cpu(), pack(q.cuda(), scheme.bits).cpu())
    assert torch.equal(unpack(pack(q.cuda(), scheme.bits), scheme.bits, q.shape[1]).cpu(), q)


@pytest.mark.parametrize("scheme", [QuantScheme(3, 64, False), QuantScheme(4, -1, True)], ids=str)
def test_mse_clip_identical_on_cuda(scheme: QuantScheme) -> None:
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(7))
    cpu = quantize_weight(w, scheme, mse_clip=True)
    gpu = quantize_weight(w.cuda(), scheme, mse_clip=True)
    same = (cpu[0] == gpu[0].cpu()).float().mean().item()
    assert same > 0.999  # error sums may round differently, changing a rare near-tie


def test_perplexity_cuda_matches_cpu(stories_dir: Path, wikitext: Path) -> None:
    from lowbit.eval import perplexity, read_text, tokenize
    from lowbit.models import load

    cpu = load(stories_dir)
    gpu = load(stories_dir, device="cuda")
    toks = tokenize(cpu.tokenizer, read_text(wikitext)[:20000])
    a = perplexity(cpu.model, toks, ctx=128, bos_id=1, max_chunks=4).ppl
    b = perplexity(gpu.model, toks, ctx=128, bos_id=1, max_chunks=4).ppl
    assert a == pytest.approx(b, rel=1e-4)
