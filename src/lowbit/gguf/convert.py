"""Any model lowbit loads -> a GGUF file llama.cpp loads and runs (the writing step).

:func:`quantize_to_gguf` opens the source (:mod:`lowbit.gguf.sources`: a GGUF file, whose
metadata and names are copied, or a Hugging Face folder, mapped to llama.cpp's names, layout
and metadata), types every tensor (:mod:`lowbit.gguf.plan`), checks the plan and the
importance matrix, then streams the file to disk one tensor at a time, each encoded by
:func:`lowbit.gguf.writer.quantize_array`. Re-quantizing an already-quantized file works but
warns (quality is lost twice); a tensor whose target type equals its type in the source is
copied byte for byte, as llama.cpp's quantizer does.

Output types: ``F32``, ``F16``, ``BF16`` (1-D and norm tensors stay F32) or any llama.cpp mix
(``Q8_0``, ``Q4_K_M``, ...), typed per tensor by :mod:`lowbit.gguf.mixes` and encoded by
:mod:`lowbit.gguf.quants` (optionally with an importance matrix).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from ..errors import LowbitError
from ..fileio import atomic_file, check_output_path
from ..progress import track
from . import mixes
from .imatrix import load_imatrix
from .plan import bits_per_weight, check_encodable, check_imatrix, fallback_report, plan_source, plan_types
from .sources import Source, open_source
from .writer import KV, PlannedTensor, quantize_array, write_gguf

__all__ = ["quantize_to_gguf", "convert_to_gguf", "plan_types"]


def quantize_to_gguf(source, out_path, mix: str, imatrix_path=None, pure: bool = False,
                     output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                     tensor_types: list[str] | tuple[str, ...] = (), overwrite: bool = False,
                     values: Callable[[str, Source], np.ndarray | None] | None = None,
                     encoded: Callable[[PlannedTensor, Source], np.ndarray | None] | None = None,
                     device: str | None = None, report: dict | None = None) -> Path:
    """Write ``source`` as a GGUF file of ``mix`` at ``out_path``; returns the path.

    ``source``: anything ``lowbit.models.resolve`` accepts (HF folder, GGUF file, ...), or an
    opened :class:`~lowbit.gguf.sources.Source` (:mod:`lowbit.gguf.fastpath` opens one without torch).
    ``mix``: ``F32``, ``F16``, ``BF16``, ``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``,
    ``Q2_K``, ``Q3_K_S/M/L``, ``Q4_K_S/M``, ``Q5_K_S/M``, ``Q6_K``, ``IQ4_NL``, ``IQ4_XS``
    (IQ1-IQ3 mixes when ``lowbit.gguf.quants`` can encode them).  ``imatrix_path``: a
    llama.cpp imatrix file (GGUF or legacy .dat).  ``pure``: one type for every quantized
    tensor.  ``output_tensor_type``/``token_embedding_type``: type names (``q8_0``) for
    output.weight/token_embd.weight.  ``tensor_types``: ``PATTERN=TYPE`` overrides, PATTERN a
    regex searched in the GGUF tensor name (first match wins), as ``llama-quantize
    --tensor-type``.  The file is written atomically; an existing one needs ``overwrite``.
    ``device``: where the block encoders run (``"cuda"``; default the CPU); same bytes.
    Tensors whose rows the mix's type cannot hold fall back to another type, as in llama.cpp: one
    warning per fallback class; ``report`` (a dict, filled when given) gets ``fallbacks`` (one
    ``{from, to, tensors, row_lengths}`` per class) and the file's real ``bits_per_weight``.

    Hooks (used by :mod:`lowbit.gguf.from_quantized`): ``values(name, src)`` may return float32
    values (GGUF layout) replacing the source's for tensor ``name``; ``encoded(planned, src)``
    may return the finished data of a tensor (uint8 ``[rows, bytes_per_row]`` of its planned
    type).  Either returns ``None`` to leave a tensor to the normal path.
    """
    out = check_output_path(out_path, overwrite)
    src = source if isinstance(source, Source) else open_source(source)
    mixname = mixes.normalize_mix(mix)
    im_file, imat = None, None
    if imatrix_path is not None:
        im_file = load_imatrix(imatrix_path)[0]
        imat = im_file.values()
    fallbacks: dict[str, tuple[T, T]] = {}
    types = plan_source(src, mixname, pure, output_tensor_type, token_embedding_type, tensor_types, imat is not None,
                        fallbacks)
    check_encodable(types, src, mixname, out, imat is not None)
    classes = fallback_report(fallbacks, src.shapes)
    for c in classes:
        rows = " or ".join(str(n) for n in c["row_lengths"])  # type: ignore[attr-defined]
        block = GGML_QUANT_SIZES[T[str(c["from"])]][0]
        warnings.warn(f"{out}: {c['tensors']} of {len(types)} tensors fell back from {c['from']} to {c['to']} "
                      f"(rows of {rows} values do not fill {c['from']}'s blocks of {block})", stacklevel=2)
    if report is not None:
        report["fallbacks"] = classes
        report["bits_per_weight"] = round(bits_per_weight(types, src.shapes), 4)
    requant = [n for n, t in types.items()
               if src.quantized_source and src.source_types[n] not in (T.F32, T.F16, T.BF16)
               and t != src.source_types[n] and t not in (T.F32, T.F16, T.BF16)]
    if requant:
        warnings.warn(f"{src.description} is already quantized; re-quantizing {len(requant)} tensors "
                      f"to {mixname} compounds the error (quantize from the original weights when you can)",
                      stacklevel=2)
    if imat is not None:
        check_imatrix(types, src, imat, imatrix_path)

    planned = [PlannedTensor(n, src.shapes[n], t) for n, t in types.items()]
    ftype = mixes.FTYPES.get(mixname, 1)

    kvs = list(src.kvs)
    kvs.append(KV("general.quantization_version", V.UINT32, 2))
    kvs.append(KV("general.file_type", V.UINT32, ftype))
    if im_file is not None and imat is not None:
        _set_provenance(kvs, str(imatrix_path), im_file.datasets, len(imat), im_file.chunk_count)

    def produce(t: PlannedTensor) -> np.ndarray:
        if encoded is not None:
            data = encoded(t, src)
            if data is not None:
                return data
        x = values(t.name, src) if values is not None else None
        st = src.source_types.get(t.name)
        if x is None and src.raw is not None and st == t.qtype:
            return src.raw(t.name)
        if x is None:
            x = src.compact(t.name) if src.compact is not None else src.get(t.name)
        float_out = t.qtype in (T.F32, T.F16, T.BF16)
        if (x.dtype != np.float16 or float_out) and not np.isfinite(x).all():  # else the block quantizer checks
            raise LowbitError(src.description, f"tensor {t.name} has NaN or Inf values")
        im = None
        if imat is not None and not float_out:
            v = imat.get(t.name)
            if v is not None and v.size == x.shape[-1] * (x.shape[0] if x.ndim == 3 else 1):
                im = v
        try:
            return quantize_array(x, t.qtype, im, device)
        except LowbitError as e:
            raise LowbitError(src.description, f"tensor {t.name}: {e.problem}") from e

    def progress(items):
        return track(items, desc=f"GGUF {mixname}", total=len(planned), unit="tensor")

    with atomic_file(out, overwrite=overwrite) as tmp:
        write_gguf(tmp, src.arch, kvs, planned, produce, progress)
    return out


def _c_string(s: str) -> bytes:
    """``s`` as llama-quantize stores it: UTF-8, cut to 127 bytes (``strncpy`` into ``char[128]``)."""
    return s.encode("utf-8")[:127]


def _set_provenance(kvs: list[KV], imatrix_file: str, datasets: list[str], entries: int, chunks: int) -> None:
    """The ``quantize.imatrix.*`` keys llama-quantize writes with an importance matrix, with its
    types, values and order (tools/quantize/quantize.cpp: the file name and the first dataset as
    strings of at most 127 bytes, the entry count and, when positive, the chunk count as UINT32);
    like ``gguf_set_val_*``, a key the source already has is replaced and moved to the end."""
    new = [KV("quantize.imatrix.file", V.STRING, _c_string(imatrix_file))]
    if datasets:
        new.append(KV("quantize.imatrix.dataset", V.STRING, _c_string(str(datasets[0]))))
    new.append(KV("quantize.imatrix.entries_count", V.UINT32, abs(int(entries)) & 0xFFFFFFFF))
    if chunks > 0:
        new.append(KV("quantize.imatrix.chunks_count", V.UINT32, int(chunks) & 0xFFFFFFFF))
    for kv in new:
        kvs[:] = [k for k in kvs if k.key != kv.key]
        kvs.append(kv)


def convert_to_gguf(source, out_path, outtype: str = "F16", overwrite: bool = False) -> Path:
    """Unquantized (F32/F16/BF16) or Q8_0 conversion; same as ``quantize_to_gguf`` with that mix."""
    return quantize_to_gguf(source, out_path, outtype, overwrite=overwrite)
