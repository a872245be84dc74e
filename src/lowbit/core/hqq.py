"""HQQ (half-quadratic quantization): zero points fitted by a proximal solver, no calibration data.

For one 2-D weight ``[out, in]`` cut into groups of ``group_size`` consecutive input columns (the
hqq library's ``axis=1``), the grid is ``q = clamp(round(w * s + z), 0, 2**bits - 1)`` with the
*inverse* scale ``s = (2**bits - 1) / (max - min)`` and ``z = -min * s`` (rounded first for 4
bits, as ``hqq_base_quant_config`` asks). Then, with ``s`` fixed, the solver alternates

* ``q = clamp(round(w * s + z))``, ``r = (q - z) / s`` and the error ``mean |w - r|``;
* ``e = shrink(w - r)`` with the generalised soft threshold of the lp norm (``p = 0.7``,
  ``beta = 10``): ``sign(x) * relu(|x| - |x|**(p - 1) / beta)``;
* ``z = mean over the group of (q - (w - e) * s)``,

for at most 20 iterations, stopping at the first iteration whose error is not below the best so
far. This is hqq 0.2.8's default solver (``optimize_weights_proximal_legacy``): its ``beta`` stays
at 10 (the ``kappa`` schedule belongs to the slower ``_v2`` solver), and the zero point it returns
is the one computed in the stopping iteration. The stored scale is ``1 / s`` and the zero point a
float, so ``w ~ (q - z) * (1 / s)``, :class:`~lowbit.core.quantized.QuantizedWeight`'s own formula.

The torch operations are the library's, in its order, in float32, so the codes, scales and zero
points are byte-identical to hqq's on CPU (``tests/test_hqq.py``, goldens made by
``tests/reference/make_hqq_goldens.py``). The one reduction over a whole tensor (the error, which
only decides when to stop) is computed as hqq computes it; on tensors over 32768 values torch may
split it across threads, so a run with another thread count can stop one iteration apart on a tie.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError

#: hqq 0.2.8's solver parameters (``optimize_weights_proximal_legacy``'s defaults).
LP_NORM = 0.7
BETA = 10.0
ITERS = 20


@dataclass(frozen=True)
class HQQResult:
    """Codes (uint8 ``[out, in]``), scale (``1 / s``) and float zero point (float32 ``[out, groups]``)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    iterations: int


def check(w: torch.Tensor, bits: int, group_size: int, where: str | None = None) -> None:
    """Raise :class:`LowbitError` (one line) for inputs the solver cannot take."""
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise LowbitError(where, f"hqq: bits must be an integer from 1 to 8, got {bits!r}")
    if w.dim() != 2:
        raise LowbitError(where, f"hqq: expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if group_size <= 0 or w.shape[1] % group_size:
        raise LowbitError(where, f"hqq: group size {group_size} does not divide the {w.shape[1]} input columns")
    if not bool(torch.isfinite(w).all()):
        raise LowbitError(where, "hqq: the weight has NaN or infinite values")


def _shrink(x: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    """The lp shrinkage ``sign(x) * max(|x| - |x|**(p-1) / beta, 0)`` (p = 1: soft threshold)."""
    out = torch.abs(x)
    if lp_norm == 1:
        out.sub_(1.0 / beta)
    else:
        out.sub_((1.0 / beta) * out.pow(lp_norm - 1))
    out.clamp_min_(0.0)
    return out.mul_(torch.sign(x))


def solve(w: torch.Tensor, bits: int, group_size: int = 64, *, optimize: bool = True,
          round_zero: bool | None = None, iters: int = ITERS, lp_norm: float = LP_NORM,
          beta: float = BETA, where: str | None = None) -> HQQResult:
    """HQQ-quantize ``w`` ``[out, in]`` in groups of ``group_size`` input columns (see the module doc).

    ``round_zero`` defaults to hqq's choice (``True`` for 4 bits only); ``optimize=False`` gives the
    plain min/max grid with a float zero point.
    """
    check(w, bits, group_size, where)
    if round_zero is None:
        round_zero = bits == 4
    rows, cols = w.shape
    wf = w.detach().float().reshape(-1, group_size)
    lo = wf.min(dim=1, keepdim=True)[0]
    hi = wf.max(dim=1, keepdim=True)[0]
    qmax = (1 << bits) - 1
    span = hi - lo
    s = qmax / span  # the inverse scale: quantize as w * s + z
    s = torch.where(span.abs() <= 1e-4, torch.full_like(s, 1.0), s)
    s = s.clamp(max=2e4)
    z = -lo * s
    if round_zero:
        z = torch.round(z)
    done = 0
    if optimize:
        z, done = _fit_zero(wf, s, z, qmax, iters, lp_norm, beta)
    q = torch.round(wf * s + z).clamp_(0, qmax)
    scale = 1.0 / s
    shape = (rows, cols // group_size)
    return HQQResult(q.to(torch.uint8).reshape(rows, cols), scale.reshape(shape).contiguous(),
                     z.reshape(shape).contiguous(), done)


def _fit_zero(wf: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int, iters: int, lp_norm: float,
              beta: float) -> tuple[torch.Tensor, int]:
    """The proximal iterations on the zero point, the scale fixed; returns (zero, iterations run)."""
    best = torch.tensor(torch.inf, dtype=torch.float32, device=wf.device)
    for i in range(iters):
        # hqq's operations in its order, written in place (the same float results, fewer temporaries)
        q = torch.mul(wf, s).add_(z).round_().clamp_(0, qmax)
        diff = torch.sub(wf, q.sub(z).div_(s))  # w - r
        err = diff.abs().mean().float()
        e = _shrink(diff, beta, lp_norm)
        z = torch.mean(q.sub_(torch.sub(wf, e, out=e).mul_(s)), dim=1, keepdim=True)  # mean(q - (w - e) * s)
        if err < best:
            best = err
        else:
            return z, i + 1
    return z, iters
