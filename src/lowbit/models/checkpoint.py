"""Lazy, validated access to the tensors of a Hugging Face folder.

Safetensors headers are checked before use (bounded header size, offsets inside the file,
sizes consistent with shapes), so a truncated or corrupt file gets a clear error naming it.
``pytorch_model.bin`` is read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import LowbitError

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSORS = 1_000_000

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and validate a safetensors header; returns ``{name: {dtype, shape, data_offsets}}``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise LowbitError(path, "not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise LowbitError(path, f"corrupt or truncated safetensors file (header length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LowbitError(path, f"corrupt safetensors header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict) or len(header) > MAX_TENSORS:
        raise LowbitError(path, "corrupt safetensors header (not a table of tensors)")
    data_len = size - 8 - n
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, info in tensors.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise ValueError
                numel *= d
        except (KeyError, TypeError, ValueError):
            raise LowbitError(path, f"corrupt safetensors header entry for tensor {name!r}") from None
        if dtype not in _DTYPE_BYTES:
            raise LowbitError(path, f"tensor {name!r} has unsupported dtype {dtype}")
        if not (0 <= begin <= end <= data_len) or end - begin != numel * _DTYPE_BYTES[dtype]:
            raise LowbitError(path, f"truncated or corrupt safetensors file: tensor {name!r} lies outside the data")
    return tensors


class Checkpoint:
    """The weights of a Hugging Face folder, read one tensor at a time."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._where: dict[str, Path] = {}
        self._info: dict[str, dict] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        self._open: dict[Path, object] = {}
        self._index()

    def _index(self) -> None:
        st_index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if st_index.exists():
            try:
                weight_map = json.loads(st_index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LowbitError(st_index, "corrupt index (expected a JSON object with 'weight_map')") from None
            files = sorted({self.folder / f for f in weight_map.values()})
        elif single.exists():
            files = [single]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if files:
            for f in files:
                if not f.exists():
                    raise LowbitError(f, "shard named in the index is missing")
                header = read_safetensors_header(f)
                for name, info in header.items():
                    self._where[name] = f
                    self._info[name] = info
            return
        bins = sorted(self.folder.glob("pytorch_model*.bin"))
        if bins:
            self._bin = {}
            for b in bins:
                self._bin.update(_load_bin(b))
            for name, t in self._bin.items():
                self._where[name] = b
                self._info[name] = {"shape": list(t.shape), "dtype": str(t.dtype)}
            return
        raise LowbitError(self.folder, "no weights found (expected *.safetensors or pytorch_model.bin)")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info[name]["shape"])

    def dtype(self, name: str) -> str:
        return str(self._info[name]["dtype"])

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped safetensors; a fresh tensor, safe to modify)."""
        if name not in self._where:
            raise LowbitError(self.folder, f"no tensor named {name!r}")
        if self._bin is not None:
            return self._bin[name]
        path = self._where[name]
        handle = self._open.get(path)
        if handle is None:
            handle = safe_open(str(path), framework="pt")
            self._open[path] = handle
        return handle.get_tensor(name)  # type: ignore[attr-defined]

    def close(self) -> None:
        """Drop the open (memory-mapped) files; the next :meth:`get` reopens what it needs."""
        self._open.clear()

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self._where.values()))


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal or corruption
        raise LowbitError(
            path,
            "refused: this .bin needs arbitrary unpickling or is corrupt "
            f"(only plain tensors are loaded; {exc.__class__.__name__})",
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LowbitError(path, "not a state dict of tensors")
    return state
