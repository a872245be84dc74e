"""``lowbit quantize MODEL --to auto --target-bpw 4.5``: llama.cpp's types chosen per tensor to a budget.

1. :func:`measure`: for every tensor llama.cpp quantizes and every candidate type whose blocks hold
   its rows, the file bytes and the KL that tensor alone would cost in that type: the tensor is
   encoded and decoded with lowbit's llama.cpp quantizers (with the importance matrix, when given,
   as the file will be) and its error weighted by the Fisher diagonal (:mod:`lowbit.mix.sensitivity`,
   measured on calibration text, pydoc by default). The result (:class:`Table`) is JSON, so one
   measurement serves many budgets.
2. :func:`choose`: one type per tensor minimizing the summed predicted KL with the file's tensor
   bytes within the budget (:mod:`lowbit.mix.allocate`: never over).
3. :func:`quantize_auto`: the chosen types become ``^name$=TYPE`` overrides of the ordinary GGUF
   writer (:func:`lowbit.gguf.convert.quantize_to_gguf`), the rules system of the named mixes
   (``--tensor-type``), so the file, its checks and its bytes are those of any other mix.

Budgets: ``target_bpw`` counts every tensor's bytes over every weight, as ``lowbit inspect`` and
:func:`lowbit.gguf.plan.bits_per_weight` do (a named mix's figure, e.g. Q4_K_M's, is the same-size
target); ``target_size`` is the whole file (metadata and alignment counted, conservatively).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ..errors import LowbitError
from ..gguf import mixes
from ..gguf.writer import PlannedTensor
from .table import Table, TensorCosts, budget_bytes, choose_labels, summary

__all__ = ["Table", "TensorCosts", "budget_bytes", "choose", "measure", "quantize_auto", "summary"]

#: candidate types (llama.cpp writes IMATRIX_TYPES only with an importance matrix)
TYPES: tuple[str, ...] = ("Q2_K", "Q3_K", "IQ3_S", "IQ4_XS", "IQ4_NL", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1",
                          "Q5_K", "Q6_K", "Q8_0", "F16")
IMATRIX_TYPES: tuple[str, ...] = ("IQ2_XS", "IQ2_S", "IQ3_XXS")
#: the named mix whose ``general.file_type`` a file gets, from its most common quantized type
_MIX_OF = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "IQ3_S": "IQ3_S",
           "IQ3_XXS": "IQ3_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_M"}
_ROWS_AT_ONCE = 1 << 22  # values encoded per step when measuring (bounds the memory of large embeddings)
_HEADER_SLACK = 1024  # bytes of metadata lowbit may add to the source's (quantization and imatrix keys)


def candidate_types(ncols: int, has_imatrix: bool, types: Sequence[str] | None = None) -> list[T]:
    """The candidate types whose blocks hold rows of ``ncols`` values (and this build encodes)."""
    from ..gguf.writer import can_quantize, native_can_quantize

    names = list(types) if types is not None else [*TYPES, *(IMATRIX_TYPES if has_imatrix else ())]
    out = []
    for n in names:
        t = mixes.parse_type(n)
        if ncols % GGML_QUANT_SIZES[t][0] == 0 and (native_can_quantize(t) or can_quantize(t)):
            if has_imatrix or not mixes.requires_imatrix("blk.0.any.weight", t, "Q4_K_M"):
                out.append(t)
    return out


def _header_bytes(src: Any, names: Sequence[str]) -> int:
    """Bytes of the file before and between the tensor data, from above: the source's metadata
    written as the writer writes it, tensor infos, 31 bytes of alignment a tensor, and slack."""
    from ..fileio import scratch
    from ..gguf.writer import write_gguf

    with scratch("lowbit-auto-") as tmp:
        path = Path(tmp) / "header.gguf"
        write_gguf(path, src.arch, list(src.kvs), [], lambda t: np.zeros(0))
        head = path.stat().st_size
    infos = sum(8 + len(n.encode()) + 4 + 8 * len(src.shapes[n]) + 4 + 8 + 31 for n in names)
    return head + infos + 32 + _HEADER_SLACK


def _encoded_error_kl(w: Any, fisher: Any, t: T, im: np.ndarray | None) -> float:
    """Predicted KL of ``w`` (a float tensor, rows = GGUF rows up to their order) encoded in ``t``."""
    import torch

    from ..gguf.writer import dequantize_bytes, quantize_array
    from .sensitivity import predicted_kl

    rows, cols = w.shape
    step = max(1, _ROWS_AT_ONCE // cols)
    total = 0.0
    for r0 in range(0, rows, step):
        x = w[r0 : r0 + step].numpy()
        xq = dequantize_bytes(np.asarray(quantize_array(x, t, im)), t, x.shape)
        total += predicted_kl(fisher[r0 : r0 + step], w[r0 : r0 + step], torch.from_numpy(np.array(xq)))
    return total


def measure(model: Any, imatrix: str | Path | None = None, types: Sequence[str] | None = None,
            settings: Any = None) -> Table:
    """Bytes and predicted KL of every quantizable tensor of ``model`` in every candidate type."""
    import torch

    from ..gguf.imatrix import load_imatrix
    from ..gguf.names import gguf_tensor_name
    from ..gguf.sources import open_source
    from ..models import load
    from ..progress import bar
    from .sensitivity import FisherSettings, calibration_chunks, fisher_diagonal

    settings = settings or FisherSettings()
    src = open_source(model)
    imat = load_imatrix(imatrix)[0].values() if imatrix is not None else None
    names = list(src.shapes)
    choosable = [n for n in names if mixes.allows_quantization(n, src.shapes[n])]
    fixed = sum(PlannedTensor(n, src.shapes[n], src.source_types.get(n) or T.F32).nbytes
                for n in names if n not in choosable)
    n_weights = sum(int(np.prod(src.shapes[n], dtype=np.int64)) for n in names)
    loaded = load(model)
    chunks = calibration_chunks(loaded.tokenizer, settings)
    fisher = fisher_diagonal(loaded.model, chunks, settings.seed)
    params = dict(loaded.model.named_parameters())
    hf_of = {gguf_tensor_name(n, src.arch): n for n in params}
    rows: list[TensorCosts] = []
    with bar(len(choosable), "sensitivity: tensors in each candidate type", unit="tensor") as pbar:
        for name in choosable:
            shape = tuple(int(d) for d in src.shapes[name])
            hf = hf_of.get(name)
            if hf is None or hf not in fisher or tuple(params[hf].shape) != shape:
                raise LowbitError(model, f"--to auto: tensor {name} has no weight of shape {shape} in the loaded model")
            w = params[hf].detach().float()
            im = imat.get(name) if imat is not None else None
            if im is not None and im.size != shape[-1]:
                im = None
            cands = candidate_types(shape[-1], imat is not None, types)
            if not cands:
                raise LowbitError(model, f"--to auto: no candidate type holds rows of {shape[-1]} values ({name})")
            with torch.no_grad():
                kls = [_encoded_error_kl(w, fisher[hf], t, im) for t in cands]
            rows.append(TensorCosts(name, shape, [t.name for t in cands],
                                    [PlannedTensor(name, shape, t).nbytes for t in cands], kls))
            pbar.update(1)
    return Table(model=str(model), tensors=rows, fixed_bytes=fixed, n_weights=n_weights,
                 header_bytes=_header_bytes(src, names), imatrix=None if imatrix is None else str(imatrix),
                 settings={"text": str(settings.text or "pydoc"), "ctx": settings.ctx, "chunks": int(chunks.shape[0]),
                           "seed": settings.seed, "route": "gguf"})


def choose(table: Table, budget: int) -> dict[str, T]:
    """GGUF name -> type of every choosable tensor: least summed predicted KL within ``budget`` bytes."""
    return {n: mixes.parse_type(c) for n, c in choose_labels(table, budget).items()}


def overrides(chosen: Mapping[str, T]) -> tuple[str, list[str]]:
    """The named mix (its ``general.file_type``) and the ``^name$=TYPE`` overrides writing ``chosen``."""
    counts = Counter(t.name for t in chosen.values() if t not in (T.F32, T.F16, T.BF16))
    common = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else "Q8_0"
    mix = _MIX_OF.get(common, common if common in mixes.DEFAULT_TYPE else "Q8_0")
    return mix, [f"^{re.escape(n)}$={t.name}" for n, t in chosen.items()]


def quantize_auto(model: Any, out: str | Path, *, target_bpw: float | None = None, target_size: str | int | None = None,
                  imatrix: str | Path | None = None, table: Table | str | Path | None = None,
                  settings: Any = None, overwrite: bool = False, report: dict | None = None) -> Path:
    """Measure (or take ``table``), choose to the budget, write the GGUF file; ``report`` gets the choice."""
    from ..fileio import check_output_path
    from ..gguf.convert import quantize_to_gguf

    check_output_path(out, overwrite)
    if isinstance(table, (str, Path)):
        table = Table.load(table)
    if table is None:
        table = measure(model, imatrix, settings=settings)
    budget = budget_bytes(table, target_bpw, target_size)
    chosen = choose(table, budget)
    mix, tensor_types = overrides(chosen)
    rep: dict[str, Any] = {}
    path = quantize_to_gguf(model, out, mix, imatrix_path=imatrix, tensor_types=tensor_types, overwrite=overwrite,
                            report=rep)
    info = summary(table, {n: t.name for n, t in chosen.items()})
    if report is not None:
        report.update(rep)
        report["auto"] = {**info, "budget_bytes": budget + table.fixed_bytes, "mix_file_type": mix,
                          "target_bpw": target_bpw, "target_size": target_size}
    return path


def quantize_auto_cached(model: Any, out: str | Path, *, target_bpw: float | None = None,
                         target_size: str | int | None = None, imatrix: str | Path | None = None,
                         sensitivity: str | Path | None = None, calib: str | None = None, overwrite: bool = False,
                         report: dict | None = None) -> Path:
    """:func:`quantize_auto` with the table read from ``sensitivity`` when that file exists (else
    measured on ``calib``, pydoc by default, and written there): one measurement, many budgets."""
    from .sensitivity import FisherSettings

    table: Table | None = None
    if sensitivity is not None and Path(sensitivity).is_file():
        table = Table.load(sensitivity)
        if table.settings.get("route", "gguf") != "gguf":
            raise LowbitError(sensitivity, "measured for --scheme auto (Hugging Face formats), not --to auto")
        if (table.imatrix is None) != (imatrix is None):
            raise LowbitError(sensitivity, "measured " + ("without" if table.imatrix is None else "with")
                              + " an importance matrix: measure again for this --imatrix setting")
    if table is None:
        from ..fileio import check_output_path

        check_output_path(out, overwrite)
        table = measure(model, imatrix, settings=FisherSettings(text=calib))
        if sensitivity is not None:
            table.save(sensitivity)
    return quantize_auto(model, out, target_bpw=target_bpw, target_size=target_size, imatrix=imatrix, table=table,
                         overwrite=overwrite, report=report)
