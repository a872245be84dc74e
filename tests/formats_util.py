"""Shared helpers for the checkpoint-format and runtime tests (tiny stories260K Llama)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from paths import STORIES
from lowbit.core.scheme import QuantScheme
from lowbit.core.quantized import QuantizedWeight
from lowbit.methods.rtn import rtn

SRC = STORIES
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")

needs_model = pytest.mark.skipif(not (SRC / "config.json").exists(), reason="stories260K test model not available")

try:  # the model-level result type, once lowbit.methods provides it
    from lowbit.core.quantized import QuantizedModel  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - fallback with the same fields

    @dataclass
    class QuantizedModel:  # type: ignore[no-redef]
        weights: dict[str, QuantizedWeight]
        float_overrides: dict[str, torch.Tensor] = field(default_factory=dict)
        config: dict = field(default_factory=dict)
        method: str = "rtn"


def make_model(weights: dict[str, QuantizedWeight], overrides: dict | None = None) -> "QuantizedModel":
    return QuantizedModel(weights=weights, float_overrides=overrides or {}, config={}, method="rtn")


_SOURCE: dict[str, torch.Tensor] = {}


def source_tensors() -> dict[str, torch.Tensor]:
    """The float tensors of stories260K (read once per session)."""
    if not _SOURCE:
        from lowbit.models.checkpoint import Checkpoint

        ck = Checkpoint(SRC)
        _SOURCE.update({n: ck.get(n) for n in ck.keys()})
    return _SOURCE


def rtn_weights(scheme: QuantScheme, which: tuple[str, ...] = ATTN + ("gate_proj", "up_proj", "down_proj")) -> dict[str, QuantizedWeight]:
    """RTN-quantized linear weights of stories260K whose module names end in ``which``."""
    return {
        n: rtn(t, scheme)
        for n, t in sorted(source_tensors().items())
        if n.endswith(".weight") and n.rsplit(".", 2)[-2] in which
    }


def synthetic(out_f: int, in_f: int, scheme: QuantScheme, seed: int, g_idx: bool = False, min_zero: int = 0) -> QuantizedWeight:
    """Random codes / scales / zero points of a given shape (zero points >= ``min_zero``)."""
    g = torch.Generator().manual_seed(seed)
    n_groups = scheme.n_groups(in_f) if scheme.group_size != 0 else 1
    rows = out_f if scheme.group_size != 0 else 1
    codes = torch.randint(0, scheme.qmax + 1, (out_f, in_f), generator=g, dtype=torch.int32)
    scale = torch.rand(rows, n_groups, generator=g) * 0.01 + 1e-3
    if scheme.symmetric:
        zero = torch.full_like(scale, float(scheme.mid))
    else:
        zero = torch.randint(min_zero, scheme.qmax + 1, (rows, n_groups), generator=g).float()
    gi = None
    if g_idx and n_groups > 1:
        gs = in_f // n_groups
        gi = (torch.randperm(in_f, generator=g) // gs).to(torch.int32)
    return QuantizedWeight(codes, scale, zero, scheme, gi)


def synthetic_model(scheme: QuantScheme, seed: int = 0, g_idx: bool = False, min_zero: int = 0,
                    which: tuple[str, ...] = ATTN) -> dict[str, QuantizedWeight]:
    """Synthetic weights shaped like stories260K's layers named in ``which``."""
    out = {}
    for i, (n, t) in enumerate(sorted(source_tensors().items())):
        if n.endswith(".weight") and n.rsplit(".", 2)[-2] in which:
            out[n] = synthetic(t.shape[0], t.shape[1], scheme, seed + i, g_idx, min_zero)
    return out


def assert_same_weight(a: QuantizedWeight, b: QuantizedWeight, scale_dtype: torch.dtype = torch.float32) -> None:
    """Codes, zeros, scheme and g_idx equal; scales equal after rounding to the stored dtype."""
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.zero.float(), b.zero.float())
    assert torch.equal(a.scale.to(scale_dtype).float(), b.scale.to(scale_dtype).float())
    assert a.scheme == b.scheme
    if a.g_idx is None or b.g_idx is None:
        assert a.g_idx is None and b.g_idx is None
    else:
        assert torch.equal(a.g_idx.to(torch.int64), b.g_idx.to(torch.int64))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))
