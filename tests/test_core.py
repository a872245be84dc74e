"""Property tests of the integer grids and bit packing."""

from __future__ import annotations

import pytest
import torch

from lowbit.core import QuantScheme, compute_qparams, dequantize, fake_quantize, pack, quantize, quantize_weight, unpack
from lowbit.core.affine import search_clip

SCHEMES = [QuantScheme(b, g, s) for b in (2, 3, 4, 8) for g in (-1, 0, 16, 64) for s in (True, False)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
def test_error_at_most_half_a_step(scheme: QuantScheme) -> None:
    torch.manual_seed(0)
    w = torch.randn(12, 128) * torch.logspace(-3, 1, 12)[:, None]
    q, scale, zero = quantize_weight(w, scheme)
    assert int(q.min()) >= 0 and int(q.max()) <= scheme.qmax
    err = (dequantize(q, scale, zero, scheme) - w).abs()
    step = scale.repeat_interleave(128 // scale.shape[1], dim=1) if scale.shape != (1, 1) else scale.expand_as(w)
    assert bool((err <= step / 2 * (1 + 1e-4) + 1e-12).all())


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
def test_representable_values_round_trip_exactly(scheme: QuantScheme) -> None:
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    q, scale, zero = quantize_weight(w, scheme)
    grid = dequantize(q, scale, zero, scheme)
    q2 = quantize(grid, scale, zero, scheme)
    assert torch.equal(q2, q)
    assert torch.equal(dequantize(q2, scale, zero, scheme), grid)


def test_group_must_divide_row() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(torch.randn(4, 172), QuantScheme(4, 32))


def test_bad_bits_refused() -> None:
    with pytest.raises(ValueError):
        QuantScheme(bits=0)
    with pytest.raises(ValueError):
        QuantScheme(bits=9)


def test_zero_rows_and_constant_rows() -> None:
    w = torch.zeros(3, 32)
    w[1] = 0.25
    for scheme in (QuantScheme(4, 16, True), QuantScheme(4, 16, False)):
        out = fake_quantize(w, scheme)
        assert torch.equal(out[0], w[0]) and torch.isfinite(out).all()
    # an asymmetric grid holds a constant row exactly; a symmetric one within half a step
    assert torch.allclose(fake_quantize(w, QuantScheme(4, 16, False)), w, atol=1e-7)
    assert (fake_quantize(w, QuantScheme(4, 16, True)) - w).abs().max() <= 0.25 / 7.5 / 2 + 1e-7


def test_mse_clip_never_worse_than_minmax() -> None:
    torch.manual_seed(2)
    w = torch.randn(16, 256)
    w[:, 7] *= 30  # outlier column
    for scheme in (QuantScheme(3, 64, True), QuantScheme(4, 64, False), QuantScheme(2, -1, False)):
        plain = (fake_quantize(w, scheme) - w).pow(2).sum()
        clipped = (fake_quantize(w, scheme, mse_clip=True) - w).pow(2).sum()
        assert clipped <= plain * (1 + 1e-6)
    factors = search_clip(w, QuantScheme(4, 64, True))
    assert factors.shape == (16, 4) and bool((factors <= 1).all())


def test_asymmetric_zero_point_integer_in_range() -> None:
    w = torch.rand(4, 32) + 0.5  # all positive
    scale, zero = compute_qparams(w, QuantScheme(4, 32, False))
    assert torch.equal(zero, zero.round()) and int(zero.min()) >= 0


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_pack_round_trip(bits: int, dtype: torch.dtype) -> None:
    n = 64 if bits != 3 or dtype == torch.int32 else 64
    q = torch.randint(0, 1 << bits, (5, n), generator=torch.Generator().manual_seed(bits))
    if (n * bits) % (32 if dtype == torch.int32 else 8):
        pytest.skip("does not fill whole words")
    packed = pack(q, bits, dtype=dtype)
    assert packed.dtype == dtype
    assert packed.shape == (5, n * bits // (32 if dtype == torch.int32 else 8))
    assert torch.equal(unpack(packed, bits, n), q)
    # packing along the first dimension too
    assert torch.equal(unpack(pack(q.T.contiguous(), bits, dim=0, dtype=dtype), bits, n, dim=0), q.T)


def test_pack_layout_low_bits_first() -> None:
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert int(pack(q, 4)[0, 0]) == 0x87654321 - (1 << 32)
    # 3-bit: 32 codes across 3 words, the 11th code straddles words 0 and 1
    q3 = torch.zeros(1, 32, dtype=torch.int64)
    q3[0, 10] = 0b111
    words = pack(q3, 3)
    assert int(words[0, 0]) & 0xFFFFFFFF == 0b11 << 30 and int(words[0, 1]) == 1


def test_pack_refuses_out_of_range() -> None:
    with pytest.raises(ValueError):
        pack(torch.tensor([[16, 0, 0, 0, 0, 0, 0, 0]]), 4)
    with pytest.raises(ValueError):
        pack(torch.zeros(1, 7, dtype=torch.int64), 4)


def test_deterministic() -> None:
    torch.manual_seed(3)
    w = torch.randn(32, 128)
    a = quantize_weight(w, QuantScheme(3, 32, False), mse_clip=True)
    b = quantize_weight(w.clone(), QuantScheme(3, 32, False), mse_clip=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
