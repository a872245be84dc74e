"""The activation statistics every method shares, on real layer inputs of stories260K."""

from __future__ import annotations

import torch

from lowbit.models.statistics import ChannelRange, Hessian, Importance, Tokens


def test_statistics_equal_their_definitions_with_masks() -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    masks = [torch.rand(2, 5, generator=g) > 0.3 for _ in range(3)]
    rows = torch.cat([x[m] for x, m in zip(xs, masks)])
    h, imp, rng, tok = Hessian(8), Importance(8), ChannelRange(8), Tokens(8)
    for x, m in zip(xs, masks):
        for s in (h, imp, rng, tok):
            s.add(x, m)
    assert torch.allclose(h.H, 2 * rows.T @ rows / rows.shape[0], atol=1e-5) and h.n == rows.shape[0]
    assert imp.sum2 is not None and torch.allclose(imp.sum2, (rows.double() ** 2).sum(0)) and imp.count == rows.shape[0]
    assert torch.equal(rng.min, rows.amin(0)) and torch.equal(rng.max, rows.amax(0))
    assert torch.equal(rng.absmax, rows.abs().amax(0))
    joined = tok.tensor()
    assert joined is not None and torch.equal(joined, rows)


def test_non_finite_inputs_are_refused() -> None:
    import pytest

    from lowbit.errors import LowbitError

    x = torch.ones(4, 8)
    x[1, 2] = float("inf")
    for s in (Hessian(8), ChannelRange(8)):
        with pytest.raises(LowbitError, match="non-finite"):
            s.add(x)
