"""The per-tensor types of a GGUF file to write, and the checks a plan passes before writing.

:func:`plan_source` types every tensor of a :class:`~lowbit.gguf.sources.Source` for a mix
(float mixes: 1-D and norm tensors stay F32; quantized mixes: llama.cpp's rules in
:mod:`lowbit.gguf.mixes`, with ``--pure``, output/token-embedding types and ``PATTERN=TYPE``
overrides). :func:`check_encodable` refuses a plan this build cannot encode or that needs an
importance matrix it was not given; :func:`check_imatrix` refuses an importance matrix made
for another model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import LowbitError
from . import mixes
from .sources import Source, open_source
from .writer import can_quantize, native_can_quantize


def plan_types(source, mix: str, *, pure: bool = False, output_tensor_type: str | None = None,
               token_embedding_type: str | None = None, tensor_types: Sequence[str] = (),
               has_imatrix: bool = False) -> dict[str, T]:
    """The per-tensor types :func:`~lowbit.gguf.convert.quantize_to_gguf` would write (GGUF names, llama.cpp order)."""
    src = open_source(source)
    return plan_source(src, mix, pure, output_tensor_type, token_embedding_type, tensor_types, has_imatrix)


def plan_source(src: Source, mix: str, pure: bool = False, output_tensor_type: str | None = None,
                token_embedding_type: str | None = None, tensor_types: Sequence[str] = (),
                has_imatrix: bool = False, fallbacks: dict[str, tuple[T, T]] | None = None) -> dict[str, T]:
    """GGUF name -> type of every tensor of ``src`` for ``mix`` (in llama.cpp's order);
    ``fallbacks`` (filled when given): the tensors whose wanted type could not hold their rows."""
    mix = mixes.normalize_mix(mix)
    if mix in mixes.FLOAT_MIXES:
        ft = mixes.DEFAULT_TYPE[mix]
        out = {}
        for n, s in sorted(src.shapes.items(), key=lambda kv: mixes._sort_key(kv[0])):
            out[n] = ft if mixes.allows_quantization(n, s) else T.F32
        return out
    opts = mixes.TypeOptions(
        pure=pure,
        output_tensor_type=mixes.parse_type(output_tensor_type) if output_tensor_type else None,
        token_embedding_type=mixes.parse_type(token_embedding_type) if token_embedding_type else None,
        overrides=mixes.parse_overrides(tensor_types),
        has_imatrix=has_imatrix,
    )
    return mixes.tensor_types(list(src.shapes.items()), src.hparams, mix, opts, src.source_types, fallbacks)


def fallback_report(fallbacks: Mapping[str, tuple[T, T]], shapes: Mapping[str, Sequence[int]],
                    ) -> list[dict[str, object]]:
    """One entry per fallback class (wanted type -> written type), as llama-quantize counts them:
    ``{"from", "to", "tensors", "row_lengths"}``."""
    classes: dict[tuple[T, T], list[str]] = {}
    for name, pair in fallbacks.items():
        classes.setdefault(pair, []).append(name)
    return [{"from": w.name, "to": g.name, "tensors": len(names),
             "row_lengths": sorted({int(shapes[n][-1]) for n in names})}
            for (w, g), names in sorted(classes.items(), key=lambda kv: (-len(kv[1]), kv[0][0].name, kv[0][1].name))]


def bits_per_weight(types: Mapping[str, T], shapes: Mapping[str, Sequence[int]]) -> float:
    """Tensor bytes * 8 / weights of a planned file (what ``lowbit inspect`` reports of it)."""
    from .writer import PlannedTensor

    nbytes = n_el = 0
    for name, t in types.items():
        shape = tuple(int(d) for d in shapes[name])
        nbytes += PlannedTensor(name, shape, t).nbytes
        n_el += int(np.prod(shape, dtype=np.int64))
    return 8.0 * nbytes / n_el if n_el else 0.0


def check_encodable(types: Mapping[str, T], src: Source, mix: str, out: Path, has_imatrix: bool) -> None:
    """Refuse (at ``out``) a type this build cannot encode, or one llama.cpp only writes with an importance matrix."""
    for name, t in types.items():
        if t != src.source_types.get(name) and not (native_can_quantize(t) or can_quantize(t)):  # C types: no torch
            raise LowbitError(out, f"tensor {name}: type {t.name} cannot be encoded by this build of lowbit "
                              f"(lowbit.gguf.quants lacks it); pick another mix")
        if not has_imatrix and mixes.requires_imatrix(name, t, mix):
            raise LowbitError(out, f"mix {mix} needs an importance matrix ({name} -> {t.name}); "
                              "pass imatrix_path (compute one with lowbit.gguf.imatrix.compute_imatrix)")


def check_imatrix(types: Mapping[str, T], src: Source, imat: Mapping[str, np.ndarray], imatrix_path) -> None:
    """Refuse an importance matrix whose entries do not fit the tensors (made for another model)."""
    for name in types:
        if name in imat and len(src.shapes[name]) >= 2:
            s = src.shapes[name]
            want = s[-1] * (s[0] if len(s) == 3 else 1)
            if imat[name].size != want and mixes.category(name) != "token_embd":
                raise LowbitError(imatrix_path, f"imatrix entry {name} has {imat[name].size} values, "
                                  f"the tensor needs {want}; was it computed for another model?")
