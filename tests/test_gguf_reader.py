"""Safe GGUF parsing: hostile, truncated and corrupt headers give LowbitError, never a crash."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from lowbit.errors import LowbitError
from lowbit.gguf.reader import GGUFFile, inspect_gguf, validate_gguf
from lowbit.gguf.writer import KV, PlannedTensor, write_gguf


def _s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def _header(n_tensors=1, n_kv=1, version=3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _kv_arch() -> bytes:
    return _s("general.architecture") + struct.pack("<I", V.STRING) + _s("llama")


def _tinfo(name="w", dims=(32, 2), ttype=T.F32, offset=0) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", int(ttype), offset)


def _pad(b: bytes, align=32) -> bytes:
    return b + b"\0" * ((-len(b)) % align)


def _file(tmp_path: Path, data: bytes, name="x.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _good(tmp_path) -> Path:
    head = _pad(_header() + _kv_arch() + _tinfo())
    return _file(tmp_path, head + np.arange(64, dtype=np.float32).tobytes())


def test_valid_minimal_file(tmp_path):
    p = _good(tmp_path)
    h = validate_gguf(p)
    assert h.tensors[0].shape == (2, 32) and h.tensors[0].nbytes == 256
    f = GGUFFile(p)
    assert np.array_equal(f.array("w").ravel(), np.arange(64, dtype=np.float32))
    info = inspect_gguf(p)
    assert info["n_tensors"] == 1 and info["bits_per_weight"] == 32.0
    assert info["per_type"]["F32"]["n_elements"] == 64


@pytest.mark.parametrize("data, message", [
    (b"", "only 0 bytes"),
    (b"PK\x03\x04" + b"\0" * 60, "not a GGUF file"),
    (_header(version=99) + b"\0" * 40, "unsupported GGUF version"),
    (b"GGUF" + struct.pack(">I", 3) + b"\0" * 40, "big-endian"),
    (_header(n_tensors=10**12), "tensor count"),
    (_header(n_kv=2**63), "metadata count"),
    (_header(n_tensors=1000, n_kv=1000), "truncated"),
])
def test_bad_headers(tmp_path, data, message):
    p = _file(tmp_path, data)
    with pytest.raises(LowbitError, match=message):
        validate_gguf(p)


def test_absurd_string_length(tmp_path):
    data = _header(0, 1) + struct.pack("<Q", 2**62) + b"key"
    with pytest.raises(LowbitError, match="length"):
        validate_gguf(_file(tmp_path, data + b"\0" * 64))


def test_string_value_past_end(tmp_path):
    data = _header(0, 1) + _s("k") + struct.pack("<I", V.STRING) + struct.pack("<Q", 10**6) + b"abc"
    with pytest.raises(LowbitError, match="truncated"):
        validate_gguf(_file(tmp_path, data + b"\0" * 64))


def test_absurd_array_length(tmp_path):
    data = _header(0, 1) + _s("k") + struct.pack("<II", V.ARRAY, V.UINT32) + struct.pack("<Q", 2**40)
    with pytest.raises(LowbitError, match="array length"):
        validate_gguf(_file(tmp_path, data + b"\0" * 64))
    data = _header(0, 1) + _s("k") + struct.pack("<II", V.ARRAY, V.STRING) + struct.pack("<Q", 10**7)
    with pytest.raises(LowbitError, match="truncated"):
        validate_gguf(_file(tmp_path, data + b"\0" * 64))


def test_unknown_value_type(tmp_path):
    data = _header(0, 1) + _s("k") + struct.pack("<I", 77) + b"\0" * 64
    with pytest.raises(LowbitError, match="unknown value type"):
        validate_gguf(_file(tmp_path, data))


def test_nested_arrays_depth(tmp_path):
    body = _s("k") + struct.pack("<I", V.ARRAY)
    for _ in range(8):
        body += struct.pack("<IQ", V.ARRAY, 1)
    with pytest.raises(LowbitError, match="nested"):
        validate_gguf(_file(tmp_path, _header(0, 1) + body + b"\0" * 64))


@pytest.mark.parametrize("tinfo, message", [
    (_tinfo(dims=(32, 2**40, 2**40)), "too many elements"),
    (_tinfo(dims=(32, 0)), "invalid dimension"),
    (_tinfo(dims=(32, 1, 1, 1, 1)), "dimensions"),
    (_tinfo(ttype=250), "unknown type id"),
    (_tinfo(dims=(33, 2), ttype=T.Q8_0), "not a multiple"),
    (_tinfo(offset=10**9), "past the end"),
    (_tinfo(offset=3), "not aligned"),
])
def test_bad_tensor_infos(tmp_path, tinfo, message):
    head = _pad(_header() + _kv_arch() + tinfo)
    p = _file(tmp_path, head + b"\0" * 256)
    with pytest.raises(LowbitError, match=message):
        validate_gguf(p)


def test_truncated_data(tmp_path):
    p = _good(tmp_path)
    raw = p.read_bytes()
    _file(tmp_path, raw[:-10], "t.gguf")
    with pytest.raises(LowbitError, match="past the end"):
        inspect_gguf(tmp_path / "t.gguf")
    # truncated inside the header at every offset: always a LowbitError
    for cut in range(0, 120, 7):
        _file(tmp_path, raw[:cut], "c.gguf")
        with pytest.raises(LowbitError):
            validate_gguf(tmp_path / "c.gguf")


def test_duplicate_and_overlap(tmp_path):
    head = _pad(_header(2, 1) + _kv_arch() + _tinfo("a") + _tinfo("a", offset=256))
    with pytest.raises(LowbitError, match="duplicate tensor"):
        validate_gguf(_file(tmp_path, head + b"\0" * 512))
    head = _pad(_header(2, 1) + _kv_arch() + _tinfo("a") + _tinfo("b", offset=128))
    with pytest.raises(LowbitError, match="overlap"):
        validate_gguf(_file(tmp_path, head + b"\0" * 512))


def test_missing_file(tmp_path):
    with pytest.raises(LowbitError, match="no such file"):
        validate_gguf(tmp_path / "nope.gguf")


def test_writer_roundtrip_and_inspect(tmp_path):
    p = tmp_path / "w.gguf"
    kvs = [KV("llama.block_count", V.UINT32, 1), KV("tokenizer.ggml.tokens", V.ARRAY, [f"t{i}" for i in range(100)], V.STRING),
           KV("general.file_type", V.UINT32, 7)]
    w = np.linspace(-1, 1, 64 * 4, dtype=np.float32).reshape(4, 64)
    planned = [PlannedTensor("blk.0.attn_q.weight", (4, 64), T.Q8_0), PlannedTensor("n", (64,), T.F32)]
    from lowbit.gguf.writer import quantize_array

    write_gguf(p, "llama", kvs, planned, lambda t: quantize_array(w, T.Q8_0) if t.qtype == T.Q8_0 else w[0])
    info = inspect_gguf(p)
    assert info["architecture"] == "llama" and info["file_type"] == "Q8_0"
    assert info["metadata"]["tokenizer.ggml.tokens"] == "[STRING x 100]"
    assert info["per_type"]["Q8_0"]["bpw"] == 8.5
    f = GGUFFile(p)
    assert f.kv["tokenizer.ggml.tokens"][99] == "t99"
    assert np.abs(f.array("blk.0.attn_q.weight") - w).max() < 0.01


def read_metadata(reader) -> dict:
    """Every KV pair of a gguf-py ``GGUFReader``: key -> (value type, value, array element type or None)."""
    out = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        vt = V(fld.types[0])
        sub = V(fld.types[1]) if vt == V.ARRAY and len(fld.types) > 1 else None
        if vt == V.ARRAY and sub == V.STRING:
            value = [bytes(fld.parts[i]).decode("utf-8", errors="replace") for i in fld.data]
        elif vt == V.ARRAY:
            value = [fld.parts[i].tolist()[0] for i in fld.data]
        elif vt == V.STRING:
            value = bytes(fld.parts[fld.data[0]]).decode("utf-8", errors="replace")
        else:
            value = fld.parts[fld.data[0]].tolist()[0]
        out[key] = (vt, value, sub)
    return out


def test_writer_metadata_read_by_gguf_py(tmp_path):
    """Every metadata value type, written by lowbit and read by gguf-py's independent reader."""
    from gguf import GGUFReader

    kvs = [KV("a.u8", V.UINT8, 200), KV("a.i8", V.INT8, -5), KV("a.u16", V.UINT16, 60000), KV("a.i16", V.INT16, -300),
           KV("a.u32", V.UINT32, 4_000_000_000), KV("a.i32", V.INT32, -7), KV("a.f32", V.FLOAT32, 0.5),
           KV("a.bool", V.BOOL, True), KV("a.str", V.STRING, "héllo"), KV("a.u64", V.UINT64, 2**63),
           KV("a.i64", V.INT64, -(2**40)), KV("a.f64", V.FLOAT64, 0.1),
           KV("a.strs", V.ARRAY, ["", "x", "ü" * 3], V.STRING), KV("a.ints", V.ARRAY, np.arange(100, dtype=np.int32), V.INT32),
           KV("a.floats", V.ARRAY, [0.25, -1.5], V.FLOAT32), KV("a.bools", V.ARRAY, [True, False], V.BOOL),
           KV("a.empty", V.ARRAY, [], V.STRING)]
    p = tmp_path / "kv.gguf"
    write_gguf(p, "llama", kvs, [PlannedTensor("n", (3, 32), T.F32)], lambda t: np.ones((3, 32), np.float32))
    md = read_metadata(GGUFReader(p))
    assert md["general.architecture"][1] == "llama"
    for kv in kvs:
        vt, value, sub = md[kv.key]
        assert vt == kv.vtype, kv.key
        want = list(kv.value) if kv.vtype == V.ARRAY else kv.value
        if kv.vtype == V.ARRAY:
            assert (sub == kv.sub_type or not want) and len(value) == len(want), kv.key  # gguf-py: no type when empty
            assert all((a == pytest.approx(b)) for a, b in zip(value, want)), kv.key
        else:
            assert value == pytest.approx(want), kv.key
    assert GGUFReader(p).tensors[0].data_offset % 32 == 0 and GGUFFile(p).array("n").sum() == 96


def test_real_models_inspect(smollm2_gguf, gemma3_gguf):
    for path in (smollm2_gguf, gemma3_gguf):
        info = inspect_gguf(path)
        assert info["n_tensors"] > 200 and 4 < info["bits_per_weight"] < 9
