"""``lowbit quantize MODEL --scheme auto --target-size 4GB`` (or ``--target-bpw``): integer bits per tensor.

The Hugging Face route of mixed precision. Candidates per linear the default recipe quantizes:
int2, int3, int4 with zero points and int8 symmetric, in groups of 128 (64 or 32 where 128 does not
divide a row, per channel where none does), or float (kept). Each candidate's cost is its RTN error
weighted by the Fisher diagonal (:mod:`lowbit.mix.sensitivity`), its size the bytes compressed-tensors'
pack-quantized layout stores (packed codes, scales in the model's dtype, packed zero points, the
shape); tensors the recipe leaves float count at their float size. The choice
(:func:`lowbit.mix.table.choose_labels`) becomes one ``^module$`` override of the ordinary recipe per
tensor, so the ordinary pipeline writes it: a compressed-tensors checkpoint with one config group per
scheme, which vLLM and transformers load like any other.

Budgets: ``target_bpw`` = 8 x tensor bytes / weights of every tensor of the checkpoint;
``target_size`` = the bytes of the checkpoint's tensors (the safetensors' payload, headers, config
and tokenizer files aside).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..core.scheme import QuantScheme
from ..errors import LowbitError
from .table import Table, TensorCosts, budget_bytes, choose_labels, summary

__all__ = ["CANDIDATES", "measure", "quantize_auto", "recipe_for"]

#: label -> (bits, symmetric); the group size is chosen per tensor
CANDIDATES: dict[str, tuple[int, bool]] = {"int2": (2, False), "int3": (3, False), "int4": (4, False),
                                           "int8": (8, True)}
FLOAT = "float"


def group_for(cols: int) -> int:
    """The group size a tensor of ``cols`` inputs gets: 128, else 64 or 32 when they divide, else -1 (per channel)."""
    return next((g for g in (128, 64, 32) if cols % g == 0), -1)


def scheme_of(label: str, cols: int) -> QuantScheme | None:
    if label == FLOAT:
        return None
    bits, sym = CANDIDATES[label]
    return QuantScheme(bits, group_for(cols), sym)


def packed_bytes(rows: int, cols: int, scheme: QuantScheme | None, float_size: int) -> int:
    """Bytes compressed-tensors' pack-quantized layout stores for one weight (or its float bytes)."""
    if scheme is None:
        return rows * cols * float_size
    b = scheme.bits
    groups = 1 if scheme.group_size <= 0 else cols // scheme.group_size
    n = rows * -(-cols * b // 32) * 4 + rows * groups * float_size + 16  # codes, scales, weight_shape
    if not scheme.symmetric:
        n += -(-rows * b // 32) * 4 * groups  # zero points, packed along the rows
    return n


def measure(model: Any, settings: Any = None, recipe: Any = None) -> Table:
    """Bytes and predicted KL of every linear ``recipe`` (default: lowbit's) quantizes, in every candidate."""
    import torch

    from ..core.affine import fake_quantize
    from ..models import load
    from ..progress import bar
    from ..recipe import Recipe
    from .sensitivity import FisherSettings, calibration_chunks, fisher_diagonal, predicted_kl

    settings = settings or FisherSettings()
    recipe = recipe or Recipe()
    loaded = load(model)
    dtype = getattr(loaded.model.config, "dtype", None)
    float_size = torch.empty(0, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32).element_size()
    state = {n: p for n, p in loaded.model.named_parameters()}
    choosable = [n for n, p in state.items() if recipe.scheme_for(n, tuple(p.shape)) is not None]
    fixed = sum(p.numel() * float_size for n, p in state.items() if n not in choosable)
    n_weights = sum(p.numel() for p in state.values())
    fisher = fisher_diagonal(loaded.model, calibration_chunks(loaded.tokenizer, settings), settings.seed)
    rows_out: list[TensorCosts] = []
    with bar(len(choosable), "sensitivity: tensors in each candidate scheme", unit="tensor") as pbar:
        for name in choosable:
            w = state[name].detach().float()
            rows, cols = w.shape
            labels, sizes, kls = [], [], []
            for label in [*CANDIDATES, FLOAT]:
                scheme = scheme_of(label, cols)
                with torch.no_grad():
                    wq = w if scheme is None else fake_quantize(w, scheme)
                labels.append(label)
                sizes.append(packed_bytes(rows, cols, scheme, float_size))
                kls.append(0.0 if scheme is None else predicted_kl(fisher[name], w, wq))
            rows_out.append(TensorCosts(name, (rows, cols), labels, sizes, kls))
            pbar.update(1)
    return Table(model=str(model), tensors=rows_out, fixed_bytes=fixed, n_weights=n_weights, header_bytes=0,
                 settings={"text": str(settings.text or "pydoc"), "ctx": settings.ctx, "chunks": settings.chunks,
                           "seed": settings.seed, "route": "hf", "float_bytes": float_size})


def recipe_for(chosen: dict[str, str], shapes: dict[str, tuple[int, ...]], base: Any = None) -> Any:
    """The recipe writing ``chosen``: the most common scheme as the default, one ``^name$`` override a tensor."""
    from dataclasses import replace

    from ..recipe import Recipe

    base = base or Recipe()
    schemes = {n: scheme_of(c, shapes[n][-1]) for n, c in chosen.items()}
    counts = Counter(s for s in schemes.values() if s is not None)
    default = min(counts.items(), key=lambda kv: (-kv[1], kv[0].bits))[0] if counts else QuantScheme()
    overrides = tuple((f"^{re.escape(n)}$", s) for n, s in schemes.items())
    return replace(base, scheme=default, overrides=overrides + tuple(base.overrides))


def quantize_auto(model: Any, out: str | Path, *, target_bpw: float | None = None, target_size: str | int | None = None,
                  method: str = "rtn", format: str = "compressed-tensors",  # noqa: A002
                  table: Table | str | Path | None = None, settings: Any = None, overwrite: bool = False,
                  report: dict | None = None, **method_args: Any) -> Path:
    """Measure (or take ``table``), choose to the budget, quantize with ``method`` into ``format``."""
    from ..api import quantize
    from ..fileio import check_output_path

    check_output_path(out, overwrite)
    if isinstance(table, (str, Path)):
        table = Table.load(table)
    if table is None:
        table = measure(model, settings)
    elif table.settings.get("route") != "hf":
        raise LowbitError(out, "the sensitivity table was measured for GGUF types (--to auto), not --scheme auto")
    chosen = choose_labels(table, budget_bytes(table, target_bpw, target_size))
    shapes = {t.name: t.shape for t in table.tensors}
    path = quantize(model, out, method=method, recipe=recipe_for(chosen, shapes), format=format, overwrite=overwrite,
                    **method_args)
    if report is not None:
        report["auto"] = {**summary(table, chosen), "target_bpw": target_bpw, "target_size": target_size}
    return path


def quantize_auto_cached(model: Any, out: str | Path, *, sensitivity: str | Path | None = None,
                         calib: str | None = None, **kw: Any) -> Path:
    """:func:`quantize_auto` with the table read from ``sensitivity`` when it exists (else measured and written)."""
    from .sensitivity import FisherSettings

    table: Table | None = Table.load(sensitivity) if sensitivity is not None and Path(sensitivity).is_file() else None
    if table is None:
        from ..fileio import check_output_path

        check_output_path(out, kw.get("overwrite", False))
        table = measure(model, FisherSettings(text=calib))
        if sensitivity is not None:
            table.save(sensitivity)
    return quantize_auto(model, out, table=table, **kw)
