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

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (MAX_HEADER_SIZE)
MAX_TENSORS = 1_000_000
_MAX_INDEX = (1 << 63) - 1  # offsets, dimensions and sizes must fit a signed 64-bit integer

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def read_json(path: Path, what: str = "JSON file", strict: bool = True) -> object:
    """Parse a JSON file (UTF-8, bounded nesting; ``strict``: no NaN/Infinity, no duplicate keys);
    :class:`LowbitError` naming ``path`` on anything wrong."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LowbitError(path, f"cannot read {what} ({exc.strerror or exc.__class__.__name__})") from None
    return parse_json(raw, path, what, strict)


def parse_json(raw: bytes, path: Path, what: str, strict: bool = True) -> object:
    """:func:`read_json` of bytes already read."""
    try:
        if not strict:
            return json.loads(raw.decode("utf-8"))
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise LowbitError(path, f"corrupt {what} (not UTF-8)") from None
    except json.JSONDecodeError as exc:
        raise LowbitError(path, f"corrupt {what} (invalid JSON: {exc.msg} at line {exc.lineno})") from None
    except ValueError as exc:
        raise LowbitError(path, f"corrupt {what} ({exc})") from None
    except RecursionError:
        raise LowbitError(path, f"corrupt {what} (nested too deeply)") from None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and validate a safetensors header completely; returns ``{name: {dtype, shape, data_offsets}}``.

    Everything the safetensors library would refuse (or mis-read) is refused here first, with a
    :class:`LowbitError` naming the file and the tensor: a header length beyond the file or the
    library's limit, a header that is not a UTF-8 JSON object, ``__metadata__`` that is not a
    table of strings, an entry without a known dtype, a shape of non-negative integers and two
    integer offsets, a size that is not ``numel * itemsize``, and data ranges that overlap, leave
    gaps, or do not cover the data section exactly."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise LowbitError(path, f"not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise LowbitError(path, f"corrupt or truncated safetensors file (header length {n} for a "
                                        f"{size}-byte file; at most {MAX_HEADER_BYTES})")
            text = f.read(n)
    except OSError as exc:
        raise LowbitError(path, f"cannot read ({exc.strerror or exc.__class__.__name__})") from None
    header = parse_json(text, path, "safetensors header")
    if not isinstance(header, dict):
        raise LowbitError(path, "corrupt safetensors header (not a JSON object of tensors)")
    if len(header) > MAX_TENSORS:
        raise LowbitError(path, f"corrupt safetensors header ({len(header)} entries, at most {MAX_TENSORS})")
    meta = header.get("__metadata__")
    if meta is not None and (not isinstance(meta, dict)
                             or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise LowbitError(path, "corrupt safetensors header: __metadata__ is not a table of strings")
    data_len = size - 8 - n
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    spans: list[tuple[int, int, str]] = []
    for name, info in tensors.items():
        _check_entry(path, name, info, data_len)
        begin, end = info["data_offsets"]
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin < pos:
            raise LowbitError(path, f"corrupt safetensors header: tensor {name!r} data [{begin}, {end}) overlaps "
                                    "another tensor's")
        if begin > pos:
            raise LowbitError(path, f"corrupt safetensors header: {begin - pos} bytes before tensor {name!r} "
                                    "belong to no tensor (a gap in the data section)")
        pos = end
    if pos != data_len:
        raise LowbitError(path, f"corrupt or truncated safetensors file: the tensors cover {pos} bytes, the data "
                                f"section has {data_len}")
    return tensors


def _check_entry(path: Path, name: str, info: object, data_len: int) -> None:
    """One tensor entry of a safetensors header: types, dtype, shape, offsets inside the data."""
    def bad(problem: str) -> LowbitError:
        return LowbitError(path, f"corrupt safetensors header: tensor {name!r} {problem}")

    if not isinstance(info, dict):
        raise bad("is not a JSON object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise bad(f"has no {key}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise bad(f"has a dtype that is not a string ({dtype!r})")
    if dtype not in _DTYPE_BYTES:
        raise LowbitError(path, f"tensor {name!r} has unsupported dtype {dtype!r} "
                                f"(supported: {', '.join(_DTYPE_BYTES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= _MAX_INDEX for d in shape):
        raise bad(f"has an invalid shape {str(shape)[:80]} (expected a list of non-negative integers)")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) and 0 <= o <= _MAX_INDEX for o in offsets)):
        raise bad(f"has invalid data_offsets {str(offsets)[:80]} (expected two non-negative integers)")
    begin, end = offsets
    if begin > end:
        raise bad(f"has data_offsets [{begin}, {end}] that end before they begin")
    if end > data_len:
        raise LowbitError(path, f"truncated or corrupt safetensors file: tensor {name!r} data [{begin}, {end}) "
                                f"lies past the end of the data section ({data_len} bytes)")
    numel = 1
    for d in shape:  # the library multiplies with overflow checks: so does this
        numel *= d
        if numel > _MAX_INDEX:
            raise bad(f"has a shape {shape} whose element count overflows")
    if numel * _DTYPE_BYTES[dtype] != end - begin:
        raise bad(f"has {end - begin} bytes of data, its shape {shape} of {dtype} needs "
                  f"{numel * _DTYPE_BYTES[dtype]}")


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
        weight_map: dict[str, str] | None = None
        if st_index.exists():
            weight_map = _weight_map(st_index)
            files = sorted({self.folder / f for f in weight_map.values()})
        elif single.exists():
            files = [single]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if files:
            headers: dict[Path, dict[str, dict]] = {}
            for f in files:
                if not f.is_file():
                    raise LowbitError(f, "shard named in the index is missing")
                headers[f] = read_safetensors_header(f)
            if weight_map is not None:  # the index says where each tensor is (as transformers reads it)
                for name, shard in weight_map.items():
                    f = self.folder / shard
                    if name not in headers[f]:
                        raise LowbitError(f, f"the index places tensor {name!r} in this shard, which lacks it")
                    self._where[name] = f
                    self._info[name] = headers[f][name]
                return
            for f, header in headers.items():
                for name, info in header.items():
                    if name in self._where:
                        raise LowbitError(f, f"tensor {name!r} is also in {self._where[name].name}")
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


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name -> shard file in the folder."""
    data = read_json(index, "index")
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise LowbitError(index, "corrupt index (expected a JSON object whose 'weight_map' maps tensor names to "
                                 "shard files)")
    for shard in set(wm.values()):
        parts = Path(shard).parts
        if not shard or Path(shard).is_absolute() or ".." in parts or len(parts) != 1:
            raise LowbitError(index, f"shard {shard!r} is not a file name in the model folder")
    return wm


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
