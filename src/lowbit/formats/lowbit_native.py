"""lowbit's own checkpoint: every QuantizedWeight stored as it is, for any scheme (int, float, codebook).

Each quantized linear ``M`` is stored as its result's named tensors (``M.q.codes``, ``M.q.scale``,
``M.q.zero``, ``M.q.g_idx``, ``M.q.global_scale``, ``M.q.codebook``, ``M.q.extra.*``) and its scheme in
``quantization_config.schemes[M]`` (``quant_method: "lowbit"``). Lossless for every scheme lowbit
can produce, including those no runtime format holds yet; read by lowbit (``lowbit eval``,
:func:`lowbit.runtime.load_quantized`), not by other runtimes. Added as one file to show what a
new format takes (ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch

from ..core.quantized import QuantizedWeight
from ..core.scheme import QuantScheme
from ..errors import LowbitError
from ._common import decoding, module_of
from .base import Format, register

QUANT_METHOD = "lowbit"
VERSION = 1


class _Encoder:
    def __init__(self) -> None:
        self.schemes: dict[str, dict[str, Any]] = {}

    def add(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        module = module_of(name)
        if qw.scheme.type == "int" and qw.scheme.bits <= 8:
            qw = replace(qw, codes=qw.codes.to(torch.uint8))  # compact: read back as int32
        self.schemes[module] = qw.scheme.to_dict()
        return qw.tensors(prefix=f"{module}.q.")

    def config(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": VERSION, "schemes": dict(sorted(self.schemes.items()))}


@register
class LowbitNative(Format):
    """lowbit's own lossless container: any scheme (int, float, codebook), read by lowbit only"""

    name = "lowbit"
    quant_method = QUANT_METHOD
    rank = 50

    def holds(self, scheme: QuantScheme) -> str | None:
        return None

    def encoder(self, config: Mapping[str, Any], linears: list[str], dtype: torch.dtype) -> _Encoder:
        return _Encoder()

    def decode(
        self, get: Callable[[str], torch.Tensor], names: list[str], config: Mapping[str, Any]
    ) -> tuple[dict[str, QuantizedWeight], set[str]]:
        q = config["quantization_config"]
        if q.get("format_version") != VERSION or not isinstance(q.get("schemes"), Mapping):
            raise LowbitError("quantization_config", f"not a lowbit checkpoint of format version {VERSION}")
        weights: dict[str, QuantizedWeight] = {}
        used: set[str] = set()
        for module, scheme_dict in q["schemes"].items():
            prefix = f"{module}.q."
            with decoding(module):
                scheme = QuantScheme.from_dict(scheme_dict)
                mine = [n for n in names if n.startswith(prefix)]
                qw = QuantizedWeight.from_tensors({n: get(n) for n in mine}, scheme, prefix)
                if scheme.type == "int":
                    qw = replace(qw, codes=qw.codes.to(torch.int32))
            weights[f"{module}.weight"] = qw
            used.update(mine)
        return weights, used
