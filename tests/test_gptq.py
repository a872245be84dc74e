"""GPTQ on a fixed layer with fixed inputs: better than RTN, deterministic, robust to dead columns."""

from __future__ import annotations

import pytest
import torch

from lowbit.core import QuantScheme
from lowbit.methods.gptq import HessianAccumulator, gptq_quantize
from lowbit.methods.rtn import rtn


def _layer(seed: int = 0, out_f: int = 48, in_f: int = 128, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    mix = torch.randn(in_f, in_f, generator=g) * 0.3
    X = torch.randn(n, in_f, generator=g) @ mix + torch.randn(in_f, generator=g)
    return W, X


def _hessian(X: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(X.shape[1])
    for chunk in X.split(100):
        acc.add(chunk)
    return acc.H


def _out_err(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor) -> float:
    return float(((X @ W.t() - X @ Q.t()) ** 2).sum())


def test_running_hessian_matches_batch() -> None:
    _, X = _layer()
    torch.testing.assert_close(_hessian(X), 2.0 / X.shape[0] * X.t() @ X, rtol=1e-4, atol=1e-3)


def test_hessian_mask_drops_padding() -> None:
    _, X = _layer()
    x = X[:20].reshape(2, 10, -1)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    acc = HessianAccumulator(X.shape[1])
    acc.add(x, mask)
    kept = torch.cat([x[0], x[1, :6]])
    torch.testing.assert_close(acc.H, 2.0 / 16 * kept.t() @ kept, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_beats_rtn(bits: int, group_size: int, act_order: bool, symmetric: bool) -> None:
    W, X = _layer()
    H = _hessian(X)
    scheme = QuantScheme(bits, group_size, symmetric)
    q = gptq_quantize(W, H, scheme, act_order=act_order, block_size=64)
    assert q.codes.dtype == torch.int32 and q.codes.shape == W.shape
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= scheme.qmax
    assert _out_err(W, q.dequantize(), X) < 0.9 * _out_err(W, rtn(W, scheme).dequantize(), X)


def test_static_groups_and_g_idx() -> None:
    W, X = _layer()
    H = _hessian(X)
    scheme = QuantScheme(4, 32, False)
    dyn = gptq_quantize(W, H, scheme, act_order=True)
    assert dyn.g_idx is not None and dyn.g_idx.dtype == torch.int32
    assert torch.bincount(dyn.g_idx.long()).tolist() == [32] * 4
    stat = gptq_quantize(W, H, scheme, act_order=True, static_groups=True)
    assert stat.g_idx is None and stat.scale.shape == (48, 4)
    rtn_err = _out_err(W, rtn(W, scheme).dequantize(), X)
    assert _out_err(W, stat.dequantize(), X) < rtn_err


def test_per_tensor_and_8bit() -> None:
    W, X = _layer()
    H = _hessian(X)
    for scheme in (QuantScheme(4, 0, True), QuantScheme(8, 64, False)):
        q = gptq_quantize(W, H, scheme)
        assert _out_err(W, q.dequantize(), X) < _out_err(W, rtn(W, scheme).dequantize(), X)


def test_deterministic() -> None:
    W, X = _layer()
    H = _hessian(X)
    scheme = QuantScheme(3, 32, False)
    a = gptq_quantize(W, H, scheme, act_order=True)
    b = gptq_quantize(W.clone(), H.clone(), scheme, act_order=True)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.g_idx, b.g_idx)


def test_dead_columns_and_singular_hessian() -> None:
    W, X = _layer()
    X = X.clone()
    X[:, [3, 17, 90]] = 0.0  # dead inputs: zero rows/columns in H
    X[:, 40] = X[:, 41]  # duplicated input: H is singular
    H = _hessian(X)
    scheme = QuantScheme(4, 32, False)
    q, stats = gptq_quantize(W, H, scheme, act_order=True, return_stats=True)
    assert stats.dead_columns == 3
    assert torch.isfinite(q.dequantize()).all()
    assert _out_err(W, q.dequantize(), X) < _out_err(W, rtn(W, scheme).dequantize(), X)


def test_dampening_escalates_on_indefinite_hessian() -> None:
    W, X = _layer()
    H = _hessian(X)
    H = H - 0.5 * torch.diag(H).mean() * torch.eye(H.shape[0])  # not positive definite
    q, stats = gptq_quantize(W, H, QuantScheme(4, 32, False), return_stats=True)
    assert stats.damp > 0.01 * float(torch.diag(H).mean())
    assert torch.isfinite(q.dequantize()).all()


def test_bad_group_size_raises() -> None:
    W, X = _layer()
    with pytest.raises(ValueError):
        gptq_quantize(W, _hessian(X), QuantScheme(4, 100, False))
