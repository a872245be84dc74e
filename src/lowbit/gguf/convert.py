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
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from ..errors import LowbitError
from ..fileio import atomic_file, check_output_path
from ..progress import track
from . import mixes
from .imatrix import load_imatrix_values
from .plan import check_encodable, check_imatrix, plan_source, plan_types
from .sources import Source, open_source
from .writer import KV, PlannedTensor, quantize_array, write_gguf

__all__ = ["quantize_to_gguf", "convert_to_gguf", "plan_types"]


def quantize_to_gguf(source, out_path, mix: str, imatrix_path=None, pure: bool = False,
                     output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                     tensor_types: list[str] | tuple[str, ...] = (), overwrite: bool = False,
                     values: Callable[[str, Source], np.ndarray | None] | None = None,
                     encoded: Callable[[PlannedTensor, Source], np.ndarray | None] | None = None,
                     device: str | None = None) -> Path:
    """Write ``source`` as a GGUF file of ``mix`` at ``out_path``; returns the path.

    ``source``: anything ``lowbit.models.resolve`` accepts (HF folder, GGUF file, ...).
    ``mix``: ``F32``, ``F16``, ``BF16``, ``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``,
    ``Q2_K``, ``Q3_K_S/M/L``, ``Q4_K_S/M``, ``Q5_K_S/M``, ``Q6_K``, ``IQ4_NL``, ``IQ4_XS``
    (IQ1-IQ3 mixes when ``lowbit.gguf.quants`` can encode them).  ``imatrix_path``: a
    llama.cpp imatrix file (GGUF or legacy .dat).  ``pure``: one type for every quantized
    tensor.  ``output_tensor_type``/``token_embedding_type``: type names (``q8_0``) for
    output.weight/token_embd.weight.  ``tensor_types``: ``PATTERN=TYPE`` overrides, PATTERN a
    regex searched in the GGUF tensor name (first match wins), as ``llama-quantize
    --tensor-type``.  The file is written atomically; an existing one needs ``overwrite``.
    ``device``: where the block encoders run (``"cuda"``; default the CPU); same bytes.

    Hooks (used by :mod:`lowbit.gguf.from_quantized`): ``values(name, src)`` may return float32
    values (GGUF layout) replacing the source's for tensor ``name``; ``encoded(planned, src)``
    may return the finished data of a tensor (uint8 ``[rows, bytes_per_row]`` of its planned
    type).  Either returns ``None`` to leave a tensor to the normal path.
    """
    out = check_output_path(out_path, overwrite)
    src = open_source(source)
    mixname = mixes.normalize_mix(mix)
    imat = load_imatrix_values(imatrix_path) if imatrix_path is not None else None
    types = plan_source(src, mixname, pure, output_tensor_type, token_embedding_type, tensor_types, imat is not None)
    check_encodable(types, src, mixname, out, imat is not None)
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
    if imat is not None:
        kvs.append(KV("quantize.imatrix.file", V.STRING, str(imatrix_path)))
        kvs.append(KV("quantize.imatrix.entries_count", V.UINT32, len(imat)))

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


def convert_to_gguf(source, out_path, outtype: str = "F16", overwrite: bool = False) -> Path:
    """Unquantized (F32/F16/BF16) or Q8_0 conversion; same as ``quantize_to_gguf`` with that mix."""
    return quantize_to_gguf(source, out_path, outtype, overwrite=overwrite)
