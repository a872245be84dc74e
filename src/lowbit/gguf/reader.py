"""Safe GGUF reading: a bounds-checked header scan before anything trusts the file.

``gguf.GGUFReader`` assumes a well-formed file: a hostile header (a string length of 2**63, a
tensor count of 10**12, dimensions whose product overflows, offsets past the end) makes it
allocate huge arrays, raise obscure numpy errors or read garbage.  :func:`validate_gguf` walks
the header once with explicit limits, using only the bytes that exist, and raises
:class:`~lowbit.errors.LowbitError` naming the file and the problem.  :class:`GGUFFile` (full
metadata, memory-mapped tensors) and :func:`inspect_gguf` (the summary ``lowbit inspect``
prints) read only what it validated; gguf-py's reader is never used.

Shapes: GGUF stores dimensions fastest-first (``ne[0]`` = columns).  Everything returned here
uses the PyTorch order ``(rows, cols)`` under ``shape`` and keeps the raw order under ``ne``.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import LowbitError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_TENSORS = 1 << 20  # a million tensors is far beyond any real model
MAX_KV = 1 << 20
MAX_KEY_LEN = 1 << 16
MAX_STRING_LEN = 1 << 28  # 256 MiB for one string value (chat templates are KiB)
MAX_ARRAY_LEN = 1 << 28
MAX_ARRAY_DEPTH = 4
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 48
DEFAULT_ALIGNMENT = 32

_SCALAR_FMT: dict[int, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass
class TensorEntry:
    name: str
    ne: tuple[int, ...]  # GGUF order, fastest dimension first
    type: GGMLQuantizationType
    offset: int  # relative to the data section
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n


@dataclass
class GGUFHeader:
    path: Path
    version: int
    file_size: int
    data_offset: int
    alignment: int
    kv: dict[str, Any] = field(default_factory=dict)  # arrays longer than 64 summarized
    kv_types: dict[str, str] = field(default_factory=dict)
    kv_sub: dict[str, GGUFValueType | None] = field(default_factory=dict)  # array element types
    tensors: list[TensorEntry] = field(default_factory=list)


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def fail(self, problem: str) -> LowbitError:
        return LowbitError(self.path, f"not a valid GGUF file: {problem}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated while reading {what} (needs {n} bytes at offset {self.pos}, "
                            f"file has {self.size})")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str, limit: int = MAX_STRING_LEN) -> str:
        n = self.u64(f"length of {what}")
        if n > limit:
            raise self.fail(f"{what} has length {n}, above the limit {limit}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")


def _value(cur: _Cursor, vtype: int, what: str, depth: int = 0, keep: bool = True, full: bool = False) -> Any:
    if vtype in _SCALAR_FMT:
        return cur.scalar(_SCALAR_FMT[vtype], what)
    if vtype == GGUFValueType.STRING:
        s = cur.string(what)
        return s if keep else None
    if vtype == GGUFValueType.ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise cur.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        etype = cur.u32(f"element type of {what}")
        if etype not in _SCALAR_FMT and etype not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            raise cur.fail(f"{what}: unknown array element type {etype}")
        count = cur.u64(f"length of {what}")
        if count > MAX_ARRAY_LEN:
            raise cur.fail(f"{what}: array length {count} above the limit {MAX_ARRAY_LEN}")
        if etype in _SCALAR_FMT:
            esize = struct.calcsize(_SCALAR_FMT[etype])
            cur.need(count * esize, what)
            out: Any
            if keep and full and count > 64:
                out = np.frombuffer(cur.buf, dtype=np.dtype(_SCALAR_FMT[etype]), count=count, offset=cur.pos).copy()
            elif keep and count <= 64:
                out = list(struct.unpack_from("<" + _SCALAR_FMT[etype][1] * count, cur.buf, cur.pos))
            else:
                out = _ArraySummary(GGUFValueType(etype).name, count)
            cur.pos += count * esize
            return out
        # every string needs at least its 8-byte length: reject impossible counts before looping
        cur.need(count * 8, what)
        small = keep and (count <= 64 or full)
        items = []
        if small and etype == GGUFValueType.STRING:
            return _string_items(cur, count, what)
        for i in range(count):
            v = _value(cur, etype, f"{what}[{i}]", depth + 1, keep=small, full=full)
            if small:
                items.append(v)
        return items if small else _ArraySummary(GGUFValueType(etype).name, count)
    raise cur.fail(f"{what}: unknown value type {vtype}")


_U64 = struct.Struct("<Q")


def _string_items(cur: _Cursor, count: int, what: str) -> list[str]:
    """``count`` strings (a tokenizer's vocabulary): ``_Cursor.string`` in one tight loop."""
    buf, pos, size, unpack = cur.buf, cur.pos, cur.size, _U64.unpack_from
    items: list[str] = []
    append = items.append
    for _ in range(count):
        if pos + 8 > size:
            break
        (n,) = unpack(buf, pos)
        if n > MAX_STRING_LEN or pos + 8 + n > size:
            break
        append(buf[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"))
        pos += 8 + n
    cur.pos = pos
    for i in range(len(items), count):  # only reached for a bad item: the checked path raises the error
        append(cur.string(f"{what}[{i}]"))
    return items


@dataclass
class _ArraySummary:
    element_type: str
    length: int

    def __repr__(self) -> str:
        return f"[{self.element_type} x {self.length}]"


def validate_gguf(path: str | Path, full: bool = False) -> GGUFHeader:
    """Scan the GGUF header of ``path`` with bounds checks; raise LowbitError on anything wrong.

    ``full``: keep every metadata array (numeric ones as numpy arrays) instead of summarizing
    arrays longer than 64 elements."""
    p = Path(path)
    if not p.is_file():
        raise LowbitError(p, "no such file")
    size = p.stat().st_size
    if size < 24:
        raise LowbitError(p, f"not a GGUF file: only {size} bytes")
    with open(p, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _scan(_Cursor(buf, p), p, size, full)
    finally:
        buf.close()


def _scan(cur: _Cursor, p: Path, size: int, full: bool = False) -> GGUFHeader:
    magic = bytes(cur.buf[0:4])
    if magic != GGUF_MAGIC:
        raise LowbitError(p, f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if struct.unpack("<I", struct.pack(">I", version))[0] in SUPPORTED_VERSIONS:
            raise cur.fail("big-endian GGUF files are not supported")
        raise cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    if n_tensors > MAX_TENSORS:
        raise cur.fail(f"tensor count {n_tensors} above the limit {MAX_TENSORS}")
    if n_kv > MAX_KV:
        raise cur.fail(f"metadata count {n_kv} above the limit {MAX_KV}")
    # each KV needs >= 12 bytes (key length + type), each tensor info >= 24
    cur.need(n_kv * 12 + n_tensors * 24, "metadata and tensor infos")

    hdr = GGUFHeader(path=p, version=version, file_size=size, data_offset=0, alignment=DEFAULT_ALIGNMENT)
    for i in range(n_kv):
        key = cur.string(f"key #{i}", MAX_KEY_LEN)
        if key in hdr.kv:
            raise cur.fail(f"duplicate metadata key {key!r}")
        vtype = cur.u32(f"type of {key!r}")
        if vtype not in _SCALAR_FMT and vtype not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            raise cur.fail(f"metadata {key!r} has unknown value type {vtype}")
        if vtype == GGUFValueType.ARRAY:
            cur.need(4, f"array type of {key!r}")
            (sub,) = struct.unpack_from("<I", cur.buf, cur.pos)
            hdr.kv_sub[key] = GGUFValueType(sub) if sub in iter(GGUFValueType) else None
        hdr.kv[key] = _value(cur, vtype, f"metadata {key!r}", full=full)
        hdr.kv_types[key] = GGUFValueType(vtype).name

    align = hdr.kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1) or align > (1 << 16):
        raise cur.fail(f"general.alignment {align!r} is not a power of two up to 65536")
    hdr.alignment = align

    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}", MAX_KEY_LEN)
        if name in names:
            raise cur.fail(f"duplicate tensor name {name!r}")
        names.add(name)
        n_dims = cur.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = tuple(cur.u64(f"dimension of {name!r}") for _ in range(n_dims))
        n_el = 1
        for d in ne:
            if d == 0 or d > MAX_ELEMENTS:
                raise cur.fail(f"tensor {name!r} has an invalid dimension {d} in {list(ne)}")
            n_el *= d
            if n_el > MAX_ELEMENTS:
                raise cur.fail(f"tensor {name!r} has too many elements ({list(ne)})")
        tid = cur.u32(f"type of {name!r}")
        try:
            ttype = GGMLQuantizationType(tid)
        except ValueError:
            raise cur.fail(f"tensor {name!r} has unknown type id {tid}") from None
        if ttype not in GGML_QUANT_SIZES:
            raise cur.fail(f"tensor {name!r} has type {ttype.name} of unknown size")
        blk, tsize = GGML_QUANT_SIZES[ttype]
        if ne[0] % blk:
            raise cur.fail(f"tensor {name!r}: row length {ne[0]} is not a multiple of the "
                           f"{ttype.name} block size {blk}")
        nbytes = n_el // blk * tsize
        off = cur.u64(f"data offset of {name!r}")
        if off % align:
            raise cur.fail(f"tensor {name!r} data offset {off} is not aligned to {align}")
        hdr.tensors.append(TensorEntry(name, ne, ttype, off, nbytes))

    data_offset = (cur.pos + align - 1) // align * align
    hdr.data_offset = data_offset
    data_size = size - data_offset if size >= data_offset else -1
    if hdr.tensors and data_size < 0:
        raise cur.fail("file ends before its tensor data section")
    spans = []
    for t in hdr.tensors:
        end = t.offset + t.nbytes
        if end > data_size:
            raise cur.fail(f"tensor {t.name!r} data [{t.offset}, {end}) runs past the end of the file "
                           f"(data section has {max(data_size, 0)} bytes); the file is truncated or corrupt")
        spans.append((t.offset, end, t.name))
    spans.sort()
    for (_s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise cur.fail(f"tensors {n0!r} and {n1!r} overlap in the data section")
    return hdr


class GGUFFile:
    """A validated GGUF file: full metadata and memory-mapped tensor data (fast, no gguf-py).

    ``kv``: key -> value (numeric arrays as numpy arrays, string arrays as lists);
    ``kv_types``/``kv_sub``: GGUF value type names and array element types;
    ``tensors``: :class:`TensorEntry` list in file order; ``data(name)``: raw bytes (uint8
    view of the file); ``array(name)``: float32 values in PyTorch shape order."""

    def __init__(self, path: str | Path) -> None:
        self.header = validate_gguf(path, full=True)
        self.path = self.header.path
        self.kv = self.header.kv
        self.tensors = self.header.tensors
        self.by_name = {t.name: t for t in self.tensors}
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")

    def entry(self, name: str) -> TensorEntry:
        """The tensor called ``name``; :class:`LowbitError` naming the file when there is none."""
        t = self.by_name.get(name)
        if t is None:
            raise LowbitError(self.path, f"no tensor {name!r}")
        return t

    def data(self, name: str) -> np.ndarray:
        t = self.entry(name)
        start = self.header.data_offset + t.offset
        return self._mm[start:start + t.nbytes]

    def array(self, name: str) -> np.ndarray:
        from .writer import dequantize_bytes

        t = self.entry(name)
        try:
            return dequantize_bytes(np.array(self.data(name)), t.type, t.shape)
        except LowbitError as e:
            raise LowbitError(self.path, f"tensor {name}: {e.problem}") from None

    def kv_entries(self):
        """(key, GGUFValueType, value, element type or None) for every metadata key."""
        for k, v in self.kv.items():
            vt = GGUFValueType[self.header.kv_types[k]]
            sub = self.header.kv_sub.get(k)
            if isinstance(v, np.ndarray):
                v = v.tolist()
            yield k, vt, v, sub


def inspect_gguf(path: str | Path) -> dict:
    """Summary of a GGUF file for ``lowbit inspect``.

    Keys: ``path``, ``version``, ``file_size``, ``architecture``, ``name``, ``file_type``,
    ``alignment``, ``n_kv``, ``metadata`` (key -> value; arrays longer than 64 as
    ``"[TYPE x N]"``), ``n_tensors``, ``tensors`` (list of ``{name, shape, ne, type, bytes,
    n_elements, bpw}``, shape in PyTorch order), ``n_elements``, ``tensor_bytes``,
    ``bits_per_weight`` (tensor bytes * 8 / elements over all tensors), and ``per_type``
    (type name -> ``{n_tensors, n_elements, bytes, bpw}``).
    """
    hdr = validate_gguf(path)
    tensors = []
    per_type: dict[str, dict] = {}
    total_el = total_bytes = 0
    for t in hdr.tensors:
        n_el = t.n_elements
        tensors.append({"name": t.name, "shape": list(t.shape), "ne": list(t.ne), "type": t.type.name,
                        "bytes": t.nbytes, "n_elements": n_el, "bpw": 8.0 * t.nbytes / n_el})
        d = per_type.setdefault(t.type.name, {"n_tensors": 0, "n_elements": 0, "bytes": 0})
        d["n_tensors"] += 1
        d["n_elements"] += n_el
        d["bytes"] += t.nbytes
        total_el += n_el
        total_bytes += t.nbytes
    for d in per_type.values():
        d["bpw"] = 8.0 * d["bytes"] / d["n_elements"]
    meta = {k: (repr(v) if isinstance(v, _ArraySummary) else v) for k, v in hdr.kv.items()}
    ftype = hdr.kv.get("general.file_type")
    ftype_name = None
    if isinstance(ftype, int):
        from .mixes import ftype_name as _fname

        ftype_name = _fname(ftype)
    return {
        "path": str(hdr.path),
        "version": hdr.version,
        "file_size": hdr.file_size,
        "architecture": hdr.kv.get("general.architecture"),
        "name": hdr.kv.get("general.name"),
        "file_type": ftype_name,
        "alignment": hdr.alignment,
        "n_kv": len(hdr.kv),
        "metadata": meta,
        "n_tensors": len(hdr.tensors),
        "tensors": tensors,
        "n_elements": total_el,
        "tensor_bytes": total_bytes,
        "bits_per_weight": 8.0 * total_bytes / total_el if total_el else 0.0,
        "per_type": dict(sorted(per_type.items(), key=lambda kv: -kv[1]["bytes"])),
    }
