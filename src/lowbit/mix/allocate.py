"""Choose one option per item (a type per tensor) minimizing the summed cost under a byte budget.

The multiple-choice knapsack, solved by dynamic programming over the budget cut into at most
``resolution`` units: each option's extra bytes (over its item's smallest option) are rounded *up*
to whole units, so a choice the program accepts is never over the budget in real bytes; the bytes
the rounding left unused are then spent greedily (the upgrade of best cost saved per byte that
still fits, repeated). Pure numpy, deterministic: ties keep the cheaper (earlier) option.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import LowbitError

DEFAULT_RESOLUTION = 200_000


@dataclass(frozen=True)
class Item:
    """One thing to choose for: its options' sizes in bytes and costs (lower is better)."""

    name: str
    sizes: tuple[int, ...]
    costs: tuple[float, ...]


def smallest_total(items: Sequence[Item]) -> int:
    return sum(min(it.sizes) for it in items)


def largest_total(items: Sequence[Item]) -> int:
    return sum(max(it.sizes) for it in items)


def allocate(items: Sequence[Item], budget: int, resolution: int = DEFAULT_RESOLUTION,
             where: str = "--target") -> list[int]:
    """Index of the chosen option of each item: the summed size is at most ``budget`` bytes and the
    summed cost minimal up to the budget's rounding to ``resolution`` units (then filled greedily)."""
    for it in items:
        if not it.sizes or len(it.sizes) != len(it.costs):
            raise LowbitError(where, f"item {it.name} has no options (or sizes and costs differ)")
        if not all(np.isfinite(it.costs)):
            raise LowbitError(where, f"item {it.name} has a NaN or infinite cost")
    base = smallest_total(items)
    if budget < base:
        raise LowbitError(where, f"budget of {budget} bytes is below the smallest choice ({base} bytes)")
    lows = []  # each item's smallest option (the cheapest of equal sizes)
    for it in items:
        smin = min(it.sizes)
        lows.append(min((j for j, s in enumerate(it.sizes) if s == smin), key=lambda j: (it.costs[j], j)))
    spare = budget - base
    if spare == 0 or not items:
        return lows
    quantum = max(1, -(-spare // resolution))
    cap = spare // quantum
    inf = np.inf
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    picks = np.zeros((len(items), cap + 1), dtype=np.int16)
    for i, it in enumerate(items):
        smin = it.sizes[lows[i]]
        new = np.full(cap + 1, inf)
        choice = np.zeros(cap + 1, dtype=np.int16)
        for j, (s, c) in enumerate(zip(it.sizes, it.costs, strict=True)):
            units = -(-(s - smin) // quantum)
            if units > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[units:] = best[: cap + 1 - units] + c
            better = cand < new
            new[better] = cand[better]
            choice[better] = j
        best, picks[i] = new, choice
    k = int(np.argmin(best))  # the first minimum: the fewest units among equal costs
    chosen = [0] * len(items)
    for i in range(len(items) - 1, -1, -1):
        j = int(picks[i, k])
        chosen[i] = j
        k -= -(-(items[i].sizes[j] - items[i].sizes[lows[i]]) // quantum)
    return _fill(items, chosen, budget)


def _fill(items: Sequence[Item], chosen: list[int], budget: int) -> list[int]:
    """Spend the bytes left: repeatedly take the upgrade saving the most cost per byte that fits."""
    used = sum(it.sizes[j] for it, j in zip(items, chosen, strict=True))
    while True:
        left = budget - used
        best: tuple[float, int, int] | None = None
        for i, it in enumerate(items):
            cur = chosen[i]
            for j, (s, c) in enumerate(zip(it.sizes, it.costs, strict=True)):
                extra, gain = s - it.sizes[cur], it.costs[cur] - c
                if gain <= 0 or extra > left:
                    continue
                rate = gain / max(extra, 1)
                if best is None or rate > best[0]:
                    best = (rate, i, j)
        if best is None:
            return chosen
        _, i, j = best
        used += items[i].sizes[j] - items[i].sizes[chosen[i]]
        chosen[i] = j
