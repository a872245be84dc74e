"""Seeded mutations of GGUF files and Hugging Face safetensors folders, and a driver that runs the
real command line on them (``tests/test_fuzz.py``).

Mutations (each a :class:`Mutant`: a description and the path of the mutated input):

* GGUF: byte flips (mostly in the header), huge or edge integers written into header fields
  (counts, string and array lengths, dimensions, type ids, offsets), truncations, duplicated and
  overlapping tensor ranges, duplicated names and keys, hyper-parameter edits in place (head
  counts, block count, norm epsilon NaN/negative/huge, context length, vocabulary, value types).
* safetensors folder: byte flips in the header, header length changes, offsets/shapes/dtypes
  edited (huge, negative, strings, floats, extra dimensions, other tensors' ranges), deleted and
  duplicated entries, ``__metadata__`` of other types, truncated or extended data, ``config.json``
  edits (layer and head counts, hidden and vocabulary sizes, epsilon NaN, types, broken JSON).

Run as a script, this module is the driver: ``python fuzzing.py JOBS.json RESULTS.json`` runs
``lowbit.cli.main(argv)`` for every job in this one process (torch is imported once), each
under a wall-clock limit, capturing its exit code, stdout and stderr; the caller sets the
process's memory limit. A crash of the process itself (a segfault, the memory limit) leaves the
job it was running in ``RESULTS.json.current``.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# --- GGUF structure ---------------------------------------------------------------------------------

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> size


@dataclass
class Field:
    kind: str  # "n_tensors", "n_kv", "strlen", "vtype", "scalar", "atype", "alen", "n_dims", "dim", "ttype", "offset"
    pos: int
    size: int
    vtype: int = -1  # for "scalar": the GGUF value type
    key: str = ""  # the metadata key or tensor name it belongs to


@dataclass
class GGUFLayout:
    fields: list[Field]
    data_offset: int
    tensors: list[tuple[str, int, int]]  # name, position of its name bytes, position of its offset field
    keys: list[tuple[str, int]]  # key, position of its name bytes


def gguf_layout(buf: bytes) -> GGUFLayout:
    """The position of every header field of a well-formed GGUF file."""
    pos = 24
    fields = [Field("n_tensors", 8, 8), Field("n_kv", 16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    keys, tensors = [], []

    def string(kind: str = "strlen", key: str = "") -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        fields.append(Field(kind, pos, 8, key=key))
        s = buf[pos + 8:pos + 8 + n].decode("utf-8", "replace")
        pos += 8 + n
        return s

    def value(vt: int, key: str, depth: int = 0) -> None:
        nonlocal pos
        if vt in _SCALAR:
            if depth == 0:
                fields.append(Field("scalar", pos, _SCALAR[vt], vt, key))
            pos += _SCALAR[vt]
        elif vt == 8:
            string(key=key)
        elif vt == 9:
            (et,) = struct.unpack_from("<I", buf, pos)
            fields.append(Field("atype", pos, 4, key=key))
            (count,) = struct.unpack_from("<Q", buf, pos + 4)
            fields.append(Field("alen", pos + 4, 8, key=key))
            pos += 12
            if et in _SCALAR:
                pos += _SCALAR[et] * count
            else:
                for i in range(count):
                    if et == 8:  # string items: record a few length fields only (vocabularies are long)
                        (n,) = struct.unpack_from("<Q", buf, pos)
                        if i % 97 == 0:
                            fields.append(Field("strlen", pos, 8, key=key))
                        pos += 8 + n
                    else:
                        value(et, key, depth + 1)

    for _ in range(n_kv):
        kpos = pos
        key = string()
        keys.append((key, kpos))
        (vt,) = struct.unpack_from("<I", buf, pos)
        fields.append(Field("vtype", pos, 4, key=key))
        pos += 4
        value(vt, key)
    for _ in range(n_tensors):
        npos = pos
        name = string()
        (nd,) = struct.unpack_from("<I", buf, pos)
        fields.append(Field("n_dims", pos, 4, key=name))
        pos += 4
        for _ in range(nd):
            fields.append(Field("dim", pos, 8, key=name))
            pos += 8
        fields.append(Field("ttype", pos, 4, key=name))
        pos += 4
        fields.append(Field("offset", pos, 8, key=name))
        tensors.append((name, npos, pos))
        pos += 8
    return GGUFLayout(fields, (pos + 31) // 32 * 32, tensors, keys)


EDGE_U64 = [0, 1, 2, 3, 7, 31, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**48, 2**62, 2**63 - 1,
            2**63, 2**64 - 1]
EDGE_F32 = [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, -0.0, 1.0, 1e30, 1e-45, -1e-5, 3.4e38]


def _put_int(b: bytearray, pos: int, size: int, v: int) -> None:
    b[pos:pos + size] = (v % (1 << (8 * size))).to_bytes(size, "little")


@dataclass
class Mutant:
    what: str
    path: Path


def mutate_gguf(src: bytes, rng: random.Random, out: Path) -> Mutant:
    """One seeded mutation of the GGUF bytes ``src``, written to ``out``."""
    lay = gguf_layout(src)
    b = bytearray(src)
    kind = rng.choices(["flip", "int", "truncate", "overlap", "dupname", "hparam", "vtype"],
                       weights=[3, 4, 2, 2, 1, 4, 1])[0]
    what = kind
    if kind == "flip":
        n = rng.choice([1, 1, 2, 4, 16])
        spots = []
        for _ in range(n):
            pos = rng.randrange(lay.data_offset) if rng.random() < 0.8 else rng.randrange(len(b))
            b[pos] ^= rng.randrange(1, 256)
            spots.append(pos)
        what = f"flip bytes at {spots}"
    elif kind == "int":
        f = rng.choice([f for f in lay.fields if f.kind != "scalar"])
        v = rng.choice(EDGE_U64) if rng.random() < 0.8 else rng.randrange(1 << (8 * f.size))
        if f.size == 4:
            v &= 0xFFFFFFFF
        _put_int(b, f.pos, f.size, v)
        what = f"{f.kind} of {f.key!r} at {f.pos} = {v}"
    elif kind == "truncate":
        cut = rng.choice([rng.randrange(24, lay.data_offset), lay.data_offset, lay.data_offset + rng.randrange(64),
                          rng.randrange(lay.data_offset, len(b)), len(b) - 1, rng.randrange(0, 24)])
        del b[cut:]
        what = f"truncated to {cut} bytes"
    elif kind == "overlap":
        (n1, _, o1), (n2, _, o2) = rng.sample(lay.tensors, 2)
        (off2,) = struct.unpack_from("<Q", src, o2)
        if rng.random() < 0.5:
            _put_int(b, o1, 8, off2)
            what = f"offset of {n1!r} = offset of {n2!r}"
        else:
            size = len(src) - lay.data_offset
            v = max(0, size - 32 * rng.randrange(1, 4))
            _put_int(b, o1, 8, v)
            what = f"offset of {n1!r} = {v} (near the end)"
    elif kind == "dupname":
        groups: dict[int, list[tuple[str, int]]] = {}
        for name, npos, _ in lay.tensors:
            groups.setdefault(len(name), []).append((name, npos))
        for key, kpos in lay.keys:
            groups.setdefault(-len(key), []).append((key, kpos))
        same = [g for g in groups.values() if len(g) > 1]
        (a, apos), (c, cpos) = rng.sample(rng.choice(same), 2)
        b[cpos + 8:cpos + 8 + len(a.encode())] = a.encode()
        what = f"{c!r} renamed {a!r} (a duplicate)"
    elif kind == "hparam":
        scalars = [f for f in lay.fields if f.kind == "scalar" and (f.key.startswith(("llama.", "general.alignment"))
                                                                    or "token_id" in f.key)]
        f = rng.choice(scalars)
        if f.vtype == 6:  # float32
            v = rng.choice(EDGE_F32)
            b[f.pos:f.pos + 4] = struct.pack("<f", v)
        elif f.size == 4:
            v = rng.choice([0, 1, 2, 3, 6, 7, 9, 16, 63, 4096, 2**31, 2**32 - 1, 1000000])
            _put_int(b, f.pos, 4, v)
        else:
            v = rng.choice(EDGE_U64)
            _put_int(b, f.pos, f.size, v)
        what = f"{f.key} = {v}"
    else:  # a value's type changed, keeping its bytes (u32 <-> i32 <-> f32, string <-> array ...)
        f = rng.choice([f for f in lay.fields if f.kind in ("vtype", "atype")])
        v = rng.choice([4, 5, 6, 8, 9, 10, 12, 13, 2**31])
        _put_int(b, f.pos, 4, v)
        what = f"type of {f.key!r} = {v}"
    out.write_bytes(bytes(b))
    return Mutant(f"gguf {what}", out)


# --- safetensors folders ------------------------------------------------------------------------------

CONFIG_VALUES: list[object] = [0, -1, 1, 3, 7, 2**31, 2**63, 10**30, 1e300, float("nan"), -1e-5, 0.5, "8", None,
                               [1], {}, True, 64.0]
CONFIG_KEYS = ["num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size",
               "vocab_size", "rms_norm_eps", "max_position_embeddings", "head_dim", "tie_word_embeddings",
               "bos_token_id", "eos_token_id", "model_type", "rope_theta", "rope_parameters"]


def _st_split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", raw, 0)
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _st_join(header: dict | bytes, data: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def mutate_folder(src: Path, rng: random.Random, out: Path) -> Mutant:
    """One seeded mutation of the Hugging Face folder ``src`` (safetensors and config.json), as ``out``."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    for f in out.iterdir():
        f.chmod(0o644)
    st = out / "model.safetensors"
    raw = st.read_bytes()
    header, data = _st_split(raw)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    kind = rng.choices(["flip", "length", "offsets", "shape", "dtype", "entries", "metadata", "data", "config"],
                       weights=[3, 1, 3, 2, 1, 2, 1, 1, 4])[0]
    name = rng.choice(names)
    e = header[name]
    what = kind
    if kind == "flip":
        (n,) = struct.unpack_from("<Q", raw, 0)
        b = bytearray(raw)
        spots = [rng.randrange(8 + n) for _ in range(rng.choice([1, 1, 2, 8]))]
        for p in spots:
            b[p] ^= rng.randrange(1, 256)
        st.write_bytes(bytes(b))
        return Mutant(f"safetensors flip bytes at {spots}", out)
    if kind == "length":
        (n,) = struct.unpack_from("<Q", raw, 0)
        v = rng.choice([0, 1, n - 1, n + 1, n + 8, len(raw), 2**31, 2**63, 2**64 - 1, 100_000_001])
        st.write_bytes(struct.pack("<Q", v % 2**64) + raw[8:])
        return Mutant(f"safetensors header length {n} -> {v}", out)
    if kind == "offsets":
        a, z = e["data_offsets"]
        other = header[rng.choice(names)]["data_offsets"]
        e["data_offsets"] = rng.choice([[a, z + 4], [a - 4, z], [z, a], [2**63, 2**63 + z - a], [2**64 - 1, 2**64 - 1],
                                        [-4, z - a - 4], [str(a), str(z)], [float(a), float(z)], [a, z, z], [a],
                                        list(other), None, {"a": a}, [a + len(data), z + len(data)], [True, z]])
        what = f"data_offsets of {name!r} = {e['data_offsets']}"
    elif kind == "shape":
        s = list(e["shape"])
        e["shape"] = rng.choice([[*s, 1], [1, *s], s[:-1], [], [-s[0], *s[1:]], [2**62, *s[1:]], [2**40, 2**40, 0],
                                 [str(d) for d in s], [float(d) for d in s], [s[0] * 2, *s[1:]], [0, *s[1:]],
                                 list(reversed(s)), None])
        what = f"shape of {name!r} = {e['shape']}"
    elif kind == "dtype":
        e["dtype"] = rng.choice(["F16", "BF16", "I8", "U8", "F64", "f32", "F4", "C64", "", 32, None, "F8_E4M3"])
        what = f"dtype of {name!r} = {e['dtype']!r}"
    elif kind == "entries":
        op = rng.choice(["delete", "duplicate", "rename", "missing key"])
        if op == "delete":
            del header[name]
        elif op == "duplicate":
            header[name + ".copy"] = dict(e)
        elif op == "rename":
            header[name.replace("weight", "weigth")] = header.pop(name)
        else:
            e.pop(rng.choice(["dtype", "shape", "data_offsets"]))
        what = f"{op} entry {name!r}"
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([["pt"], {"format": 1}, "pt", {"a": {"b": "c"}}, None, {"x" * 10: "y"}])
        what = f"__metadata__ = {header['__metadata__']!r}"
    elif kind == "data":
        cut = rng.choice([len(data) - 1, len(data) // 2, 0, len(data) + 1])
        data = data[:cut] if cut <= len(data) else data + b"\0" * 17
        what = f"data section {len(data)} bytes"
    else:
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        op = rng.random()
        if op < 0.1:
            cfg_path.write_text(cfg_path.read_text()[: rng.randrange(1, 200)])
            return Mutant("config.json truncated", out)
        if op < 0.15:
            cfg_path.write_text(rng.choice(["[]", "null", "1", '"x"', "[" * 5000 + "]" * 5000]))
            return Mutant("config.json not an object", out)
        key = rng.choice(CONFIG_KEYS)
        v = rng.choice(CONFIG_VALUES + ["gpt2", "llama", "qwen3"]) if rng.random() < 0.9 else "<delete>"
        if v == "<delete>":
            cfg.pop(key, None)
        else:
            cfg[key] = v
        cfg_path.write_text(json.dumps(cfg))
        return Mutant(f"config.json {key} = {v!r}", out)
    st.write_bytes(_st_join(header, data))
    return Mutant(f"safetensors {what}", out)


# --- in-process readers ---------------------------------------------------------------------------


def read_gguf_fully(path: Path) -> None:
    """Everything lowbit reads of a GGUF source before any work (header, metadata, tensors)."""
    from lowbit.gguf.reader import GGUFFile, inspect_gguf
    from lowbit.models.gguf_source import hf_config
    from lowbit.models.validate import check_gguf_tensors

    inspect_gguf(path)
    f = GGUFFile(path)
    cfg = hf_config(f, path)
    check_gguf_tensors(cfg, {t.name: t.shape for t in f.tensors}, str(f.kv["general.architecture"]), path)
    for t in f.tensors:
        f.array(t.name)


def read_folder_fully(folder: Path) -> None:
    """Everything lowbit reads of a Hugging Face folder before any work (config, headers, tensors)."""
    import warnings

    from transformers import AutoConfig

    from lowbit.models import Checkpoint
    from lowbit.models.loader import read_config
    from lowbit.models.validate import check_checkpoint, config_errors, validate_hf_config

    ck = Checkpoint(folder)
    for n in ck.keys():
        ck.get(n)
    cfg = read_config(folder)
    validate_hf_config(cfg, folder / "config.json")
    from lowbit.models.loader import check_architecture

    check_architecture(folder, cfg)
    with warnings.catch_warnings(), config_errors(folder / "config.json"):  # as the pipeline reads it
        warnings.simplefilter("ignore")
        config = AutoConfig.from_pretrained(str(folder))
    check_checkpoint(config, ck)


def run_reader(read: Callable[[Path], None], path: Path) -> str:
    """``"read"`` when ``read`` succeeds, ``"refused"`` when it raises a one-line LowbitError; else
    a description of the unexpected error."""
    import traceback

    from lowbit.errors import LowbitError

    try:
        read(path)
    except LowbitError as e:
        return f"multi-line LowbitError: {e!r}" if "\n" in str(e) else "refused"
    except Exception as e:  # noqa: BLE001
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return f"{e.__class__.__name__}: {str(e)[:200]} at {Path(tb.filename).name}:{tb.lineno}"
    return "read"


# --- the driver --------------------------------------------------------------------------------------


class JobTimeout(BaseException):
    """Raised in a job that runs past its wall-clock limit (a BaseException: the CLI's last-resort
    ``except Exception`` must not turn it into an exit code)."""


def _drive(jobs_path: Path, results_path: Path) -> None:
    import contextlib
    import io
    import resource
    import signal
    import time

    from lowbit.cli import main

    def alarm(_sig: int, _frame: object) -> None:
        raise JobTimeout

    signal.signal(signal.SIGALRM, alarm)
    jobs = json.loads(jobs_path.read_text())
    current = results_path.with_name(results_path.name + ".current")
    results = []
    for job in jobs:
        if job.get("warmup"):  # imports (torch, transformers) paid before the timed jobs
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                main(job["argv"])
            continue
        current.write_text(json.dumps(job))
        out, err = io.StringIO(), io.StringIO()
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, float(job["limit_s"]))
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code: int | str = main(job["argv"])
                except SystemExit as exc:
                    code = int(exc.code or 0) if not isinstance(exc.code, str) else 2
        except JobTimeout:
            code = "timeout"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results.append({**job, "code": code, "stdout": out.getvalue()[-4000:], "stderr": err.getvalue()[-4000:],
                        "seconds": time.perf_counter() - t0, "max_rss": rss})
    current.unlink()
    results_path.write_text(json.dumps(results))


if __name__ == "__main__":
    import sys

    _drive(Path(sys.argv[1]), Path(sys.argv[2]))


__all__ = ["Mutant", "gguf_layout", "mutate_folder", "mutate_gguf", "read_folder_fully", "read_gguf_fully",
           "run_reader"]
