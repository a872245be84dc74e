"""What the method handlers share: the per-tensor scheme lookup, the float-keeping rule, row splits."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.recipe import Recipe

Rules = dict[str, "QuantScheme | None"] | Callable[[str], "QuantScheme | None"] | None


def scheme_lookup(default: QuantScheme, rules: Rules) -> Callable[[str], QuantScheme | None]:
    """Map a full HF weight name to its scheme (``None`` keeps it float).

    ``rules`` is ``None`` (every linear uses ``default``), a callable (the pipeline's
    :class:`~lowbit.recipe.Plan`), or a dict of regular expressions to a scheme or ``None``
    (first match wins), which is read as the overrides of a :class:`~lowbit.recipe.Recipe`
    over every linear: one rules system.
    """
    if rules is None:
        return lambda name: default
    if callable(rules):
        return rules
    return Recipe(scheme=default, include=(r".",), exclude=(), overrides=tuple(rules.items())).scheme_for


def rules_fingerprint(rules: Rules) -> Any:
    """What identifies ``rules`` in a run's request hash."""
    if rules is None or isinstance(rules, dict):
        return rules
    fp = getattr(rules, "fingerprint", None)
    return fp() if callable(fp) else getattr(rules, "__qualname__", repr(rules))


def keeps_float(scheme: QuantScheme | None, w: torch.Tensor, where: str) -> bool:
    """Whether a weight stays float: no scheme, or a group size not dividing its rows (warned)."""
    if scheme is None:
        return True
    if scheme.granularity == "group" and w.shape[1] % scheme.group_size != 0:
        warnings.warn(f"{where}: group size {scheme.group_size} does not divide {w.shape[1]}; left float", stacklevel=3)
        return True
    return False


def layer_weights(ctx: Any, lookup: Callable[[str], QuantScheme | None]) -> Iterator[tuple[str, torch.Tensor, str, QuantScheme]]:
    """The weights of ``ctx``'s layer to quantize, in the adapter's order: ``(name in the layer, weight,
    full HF name, scheme)``; those :func:`keeps_float` keeps are skipped."""
    from lowbit.models.adapters import get_weight
    from lowbit.models.layers import full_weight_name

    for group in ctx.adapter.sequential_for(ctx.layer):
        for name in group:
            w = get_weight(ctx.adapter, ctx.layer, name)
            full = full_weight_name(ctx.adapter, ctx.index, name)
            scheme = lookup(full)
            if keeps_float(scheme, w, full):
                continue
            assert scheme is not None
            yield name, w, full, scheme


def split_rows(qw: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    """Split a row-stacked result back into per-linear results (rows are independent)."""
    if len(rows) == 1:
        return [qw]
    if qw.scale.numel() == 1:  # one scale for the stack: each part keeps it
        out, r0 = [], 0
        for r in rows:
            out.append(QuantizedWeight(qw.codes[r0 : r0 + r].contiguous(), qw.scale.contiguous(),
                                       None if qw.zero is None else qw.zero.contiguous(), qw.scheme, qw.g_idx))
            r0 += r
        return out
    bounds = [0]
    for r in rows:
        bounds.append(bounds[-1] + r)
    return [qw.rows(a, b) for a, b in zip(bounds, bounds[1:])]
