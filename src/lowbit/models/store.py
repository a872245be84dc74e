"""Quantization results kept on disk and read back one weight at a time.

A result file is a safetensors file holding the quantized weights and float tensors of one
group (a decoder layer, or one tensor for RTN): ``q::<name>::codes|scale|zero[|g_idx]`` and
``f::<name>``, with the weights' schemes and a free-form ``info`` dict in its metadata. Integer
codes are stored as uint8 (no integer scheme has more than 8 bits) and read back as int32; other
codes (minifloats, codebook indices) keep their dtype.

:class:`StoredWeights` and :class:`StoredTensors` are read-only mappings over such files: each
access opens the file and reads just the tensors asked for, so a whole model's results never
sit in memory at once. Without a folder of its own a run writes into a :class:`ScratchDir`,
a temporary folder deleted once no mapping uses it any more (or at interpreter exit).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.fileio import scratch_dir


def write_result_file(
    path: Path, weights: Mapping[str, QuantizedWeight], floats: Mapping[str, torch.Tensor], info: Mapping[str, Any]
) -> None:
    """Write one group's results to ``path`` (atomically: a partial file is never left under that name)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in weights.items():
        stored = replace(qw, codes=qw.codes.to(torch.uint8)) if qw.scheme.type == "int" else qw
        tensors.update(stored.tensors(prefix=f"q::{name}::"))
    for name, t in floats.items():
        tensors[f"f::{name}"] = t.detach().contiguous().cpu()
    # Own storage for each (one act-order g_idx is shared by q/k/v; MoE experts are slices of one tensor);
    # a tensor that already owns all of its storage is not copied (a layer's codes: no second copy).
    seen: set[int] = set()
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if not whole or ptr in seen:
            tensors[k] = t.clone()
        seen.add(ptr)
    meta = {"info": json.dumps(dict(info), default=str), "schemes": json.dumps(
        {n: qw.scheme.to_dict() for n, qw in weights.items()}
    )}
    tmp = path.with_suffix(".partial")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if no_space_left(exc):
            raise LowbitError(path.parent, "no space left on device for the per-layer results "
                                           "(free some space, or pass a work folder on another disk)") from None
        raise


def no_space_left(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk is full (``OSError`` ENOSPC, or safetensors' error around it)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    return "No space left on device" in text or f"os error {errno.ENOSPC}" in text


def index_result_file(path: Path) -> tuple[dict[str, QuantScheme], list[str], dict[str, Any]]:
    """What a result file holds, from its header only: weight schemes, float tensor names, info."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        floats = [k[3:] for k in f.keys() if k.startswith("f::")]
    schemes = {n: QuantScheme.from_dict(d) for n, d in json.loads(meta.get("schemes", "{}")).items()}
    return schemes, floats, json.loads(meta.get("info", "{}"))


def _read_weight(f: Any, name: str, scheme: QuantScheme) -> QuantizedWeight:
    prefix = f"q::{name}::"
    qw = QuantizedWeight.from_tensors({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}, scheme, prefix)
    return replace(qw, codes=qw.codes.to(torch.int32)) if scheme.type == "int" else qw


def read_result_file(path: Path) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict[str, Any]]:
    """Everything in one result file: ``(weights, floats, info)``."""
    schemes, float_names, info = index_result_file(path)
    with safe_open(str(path), framework="pt") as f:
        weights = {n: _read_weight(f, n, s) for n, s in schemes.items()}
        floats = {n: f.get_tensor(f"f::{n}") for n in float_names}
    return weights, floats, info


class ScratchDir:
    """A temporary folder (under the system temp dir) deleted when this object is garbage or at exit."""

    def __init__(self, prefix: str = "lowbit-") -> None:
        self.path = scratch_dir(prefix)  # <tmp>/<prefix><pid>.<random>: a killed run's is removed by the next
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.path), True)


class _Stored(Mapping[str, Any]):
    """Read-only mapping of names to entries in result files; subclasses read one entry per access.

    ``keep_alive`` (e.g. a :class:`ScratchDir`) lives as long as the mapping.
    """

    def __init__(self, entries: Mapping[str, tuple], keep_alive: object = None) -> None:
        self._entries = dict(entries)
        self._keep_alive = keep_alive

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


class StoredWeights(_Stored):
    """Read-only ``{HF weight name: QuantizedWeight}`` whose values are read from result files on access.

    ``entries`` maps each name to ``(file, name inside the file, scheme)``; ``keep_alive`` (e.g. the
    :class:`ScratchDir` holding the files) lives as long as this mapping.
    """

    def __getitem__(self, name: str) -> QuantizedWeight:
        path, stored, scheme = self._entries[name]
        with safe_open(str(path), framework="pt") as f:
            return _read_weight(f, stored, scheme)


class StoredTensors(_Stored):
    """Read-only ``{HF name: float tensor}`` read from result files on access (see :class:`StoredWeights`)."""

    def __getitem__(self, name: str) -> torch.Tensor:
        path, stored = self._entries[name]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(f"f::{stored}")

