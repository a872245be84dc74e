"""The measured costs mixed precision chooses from: per tensor, each candidate's bytes and predicted KL.

Shared by the GGUF route (:mod:`.gguf_auto`, llama.cpp's types) and the Hugging Face route
(:mod:`.hf_auto`, integer schemes in compressed-tensors); JSON, so one measurement serves many budgets.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitError
from .allocate import Item, allocate


@dataclass
class TensorCosts:
    name: str
    shape: tuple[int, ...]
    types: list[str]
    nbytes: list[int]
    kl: list[float]


@dataclass
class Table:
    """What :func:`choose` needs, measured once (JSON with :meth:`save` / :meth:`load`)."""

    model: str
    tensors: list[TensorCosts]
    fixed_bytes: int  # tensors llama.cpp leaves unquantized (norms...), in their source types
    n_weights: int  # every tensor's values (the bits-per-weight denominator)
    header_bytes: int  # metadata, tensor infos and worst-case alignment: the file beyond tensor bytes
    imatrix: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        from ..fileio import atomic_file

        with atomic_file(path, overwrite=True) as tmp:
            Path(tmp).write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Table:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            d["tensors"] = [TensorCosts(**{**t, "shape": tuple(t["shape"])}) for t in d["tensors"]]
            return cls(**d)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise LowbitError(path, f"not a sensitivity table of lowbit ({e})") from None

    def bpw(self, tensor_bytes: int) -> float:
        return 8.0 * (tensor_bytes + self.fixed_bytes) / self.n_weights


def parse_size(text: str | int | float, where: str = "--target-size") -> int:
    """Bytes of ``4GB``, ``3.5GiB``, ``800MB``, ``123456`` (decimal units; ``iB`` binary ones)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise LowbitError(where, f"{text!r} is not a size (e.g. 4GB, 3.5GiB, 800MB, 123456)")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def budget_bytes(table: Table, target_bpw: float | None = None, target_size: str | int | None = None) -> int:
    """Bytes the choosable tensors may take: from bits per weight (every tensor counted) or the file size."""
    if (target_bpw is None) == (target_size is None):
        raise LowbitError("--to auto", "give one budget: --target-bpw BITS or --target-size SIZE")
    if target_bpw is not None:
        where = "--target-bpw"
        total = int(np.floor(float(target_bpw) * table.n_weights / 8))
    else:
        where = "--target-size"
        total = parse_size(target_size if target_size is not None else "", where) - table.header_bytes
    budget = total - table.fixed_bytes
    low = sum(min(t.nbytes) for t in table.tensors)
    high = sum(max(t.nbytes) for t in table.tensors)
    if budget < low:
        smallest = sorted({t.types[int(np.argmin(t.nbytes))] for t in table.tensors})
        raise LowbitError(where, f"{target_bpw if target_bpw is not None else target_size} is below the smallest "
                          f"file: {table.bpw(low):.4f} bits per weight, {low + table.fixed_bytes + table.header_bytes} "
                          f"bytes ({'/'.join(smallest)} everywhere)")
    if budget > high:
        largest = sorted({t.types[int(np.argmax(t.nbytes))] for t in table.tensors})
        raise LowbitError(where, f"{target_bpw if target_bpw is not None else target_size} is above the largest "
                          f"file ({table.bpw(high):.4f} bits per weight, {'/'.join(largest)} everywhere): "
                          f"use --to {largest[-1]}")
    return budget


def choose_labels(table: Table, budget: int) -> dict[str, str]:
    """Tensor name -> candidate label: least summed predicted KL within ``budget`` bytes."""
    items = [Item(t.name, tuple(t.nbytes), tuple(t.kl)) for t in table.tensors]
    picks = allocate(items, budget)
    return {t.name: t.types[j] for t, j in zip(table.tensors, picks, strict=True)}


def summary(table: Table, chosen: Mapping[str, str]) -> dict[str, Any]:
    """Bits per weight, tensor bytes, predicted KL and the count of each candidate of a choice."""
    by = {t.name: t for t in table.tensors}
    nbytes = sum(by[n].nbytes[by[n].types.index(c)] for n, c in chosen.items())
    kl = sum(by[n].kl[by[n].types.index(c)] for n, c in chosen.items())
    return {"bits_per_weight": round(table.bpw(nbytes), 4), "tensor_bytes": nbytes + table.fixed_bytes,
            "predicted_kl": kl, "types": dict(sorted(Counter(chosen.values()).items()))}
