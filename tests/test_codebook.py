"""bitsandbytes' numerics (lowbit.core.codebook) byte for byte against bitsandbytes 0.50's own outputs.

The goldens in tests/data/bnb/ were written by ``tests/reference/make_bnb_goldens.py`` run with
bitsandbytes 0.50.0 (CPU build), torch 2.13.0 and transformers 5.25 in their own virtualenv
(see that script). ``test_live_*`` run bitsandbytes itself when it is importable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lowbit.core import codebook as cb
from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError

DATA = Path(__file__).parent / "data" / "bnb"


@pytest.fixture(scope="module")
def blocks() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "blocks.safetensors"))


def _cases(golden: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(".packed")] for k in golden if k.endswith(".packed"))


def test_codebook_tables() -> None:
    assert cb.codebook_values("nf4").tolist() == list(cb.NF4_VALUES)
    fp4 = cb.codebook_values("fp4")
    assert fp4[3] == 1.0 and fp4[11] == -1.0 and fp4[1] == pytest.approx(0.0625 / 12)
    dyn = cb.dynamic_map()
    assert dyn.shape == (256,) and bool((dyn[1:] >= dyn[:-1]).all()) and dyn[-1] == 1.0
    assert cb.pad_code("nf4") == 7 and cb.pad_code("fp4") == 0


def test_4bit_bytes_equal_bitsandbytes(blocks: dict[str, torch.Tensor]) -> None:
    cases = _cases(blocks)
    assert len(cases) > 80
    for key in cases:
        case, dname, qt, bs, dq = key.split(".")
        w = blocks[f"{case}.{dname}.input"]
        codes, absmax = cb.quantize_4bit(w, qt, int(bs[2:]))
        assert codes.shape == w.shape
        assert torch.equal(cb.pack_nibbles(codes, qt), blocks[f"{key}.packed"]), key
        if dq == "dq1":
            q, nested, offset = cb.double_quantize(absmax)
            assert torch.equal(q, blocks[f"{key}.absmax"]), key
            assert torch.equal(nested, blocks[f"{key}.nested_absmax"]), key
            assert torch.equal(offset.reshape(1), blocks[f"{key}.offset"]), key
        else:
            assert torch.equal(absmax, blocks[f"{key}.absmax"]), key
        assert torch.equal(cb.unpack_nibbles(blocks[f"{key}.packed"], w.numel()), codes.reshape(-1)), key


def test_dequantize_equals_bitsandbytes(blocks: dict[str, torch.Tensor]) -> None:
    """QuantizedWeight.dequantize (the reference of every runtime) gives bitsandbytes' dequantize_4bit."""
    keys = [k[: -len(".dequant")] for k in blocks if k.endswith(".dequant")]
    assert len(keys) >= 8
    for key in keys:
        case, dname, qt, bs, dq = key.split(".")
        w = blocks[f"{case}.{dname}.input"]
        codes, absmax = cb.quantize_4bit(w, qt, int(bs[2:]))
        scale = cb.double_dequantize(*cb.double_quantize(absmax)) if dq == "dq1" else absmax
        scheme = QuantScheme(4, int(bs[2:]), True, type="codebook", codebook=qt, strategy="flat")
        qw = QuantizedWeight(codes, scale, None, scheme, codebook=cb.codebook_values(qt))
        assert torch.equal(qw.dequantize(w.dtype), blocks[f"{key}.dequant"]), key


def test_blockwise8_equals_bitsandbytes_lookup_table() -> None:
    g = load_file(str(DATA / "blockwise8.safetensors"))
    i = np.arange(65536, dtype=np.float32)
    grid = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(65535)).astype(np.float32)
    blocks = np.concatenate([np.ones((256, 1), np.float32), grid.reshape(256, 256)[:, :255]], axis=1)
    grid_in = np.concatenate([blocks.reshape(-1), np.ones(1, np.float32), grid.reshape(256, 256)[:, 255]])
    assert hashlib.sha256(grid_in.tobytes()).digest() == bytes(g["grid.sha256"].tolist())
    inputs = {"grid": torch.from_numpy(grid_in), "near": g["near.input"], "rand": g["rand.input"]}
    for name, x in inputs.items():
        q, absmax = cb.quantize_blockwise_8bit(x)
        assert torch.equal(absmax, g[f"{name}.absmax"]), name
        assert torch.equal(q, g[f"{name}.codes"]), name


def test_int8_rows_equal_bitsandbytes() -> None:
    g = load_file(str(DATA / "int8.safetensors"))
    for dname in ("f32", "f16", "bf16"):
        codes, scb = cb.int8_rowwise(g[f"{dname}.input"])
        assert torch.equal(codes, g[f"{dname}.CB"]), dname
        assert torch.equal(scb, g[f"{dname}.SCB"]), dname


def test_stories_tensors_equal_bitsandbytes() -> None:
    g = load_file(str(DATA / "stories.safetensors"))
    names = sorted({k.rsplit(".weight", 1)[0] + ".weight" for k in g})
    assert len(names) == 2
    for name in names:
        w = g[f"{name}.input"]
        codes, absmax = cb.quantize_4bit(w, "nf4", 64)
        q, nested, offset = cb.double_quantize(absmax)
        assert torch.equal(cb.pack_nibbles(codes, "nf4"), g[f"{name}.nf4dq.packed"])
        assert torch.equal(q, g[f"{name}.nf4dq.absmax"]) and torch.equal(nested, g[f"{name}.nf4dq.nested_absmax"])
        assert torch.equal(offset.reshape(1), g[f"{name}.nf4dq.offset"])
        codes, absmax = cb.quantize_4bit(w, "fp4", 64)
        assert torch.equal(cb.pack_nibbles(codes, "fp4"), g[f"{name}.fp4.packed"])
        assert torch.equal(absmax, g[f"{name}.fp4.absmax"])
        c8, scb = cb.int8_rowwise(w)
        assert torch.equal(c8, g[f"{name}.int8.CB"]) and torch.equal(scb, g[f"{name}.int8.SCB"])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bs", [0, 16, 48, 100, 8192, -64, True])
def test_bad_blocksize(bs: int) -> None:
    with pytest.raises(LowbitError, match="blocksize"):
        cb.quantize_4bit(torch.randn(4, 64), "nf4", bs)


def test_bad_input() -> None:
    with pytest.raises(LowbitError, match="unknown 4-bit quant type 'int4'"):
        cb.quantize_4bit(torch.randn(4, 64), "int4", 64)
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(LowbitError, match="w: 1 weight value"):
        cb.quantize_4bit(w, "nf4", 64, where="w")
    w[1, 3] = float("inf")
    with pytest.raises(LowbitError, match="NaN or infinite"):
        cb.int8_rowwise(w)
    with pytest.raises(LowbitError, match="float32/float16/bfloat16"):
        cb.quantize_4bit(torch.ones(4, 4, dtype=torch.int32), "nf4", 64)
    with pytest.raises(LowbitError, match="packed bytes"):
        cb.unpack_nibbles(torch.zeros(3, 1, dtype=torch.uint8), 10)
    with pytest.raises(LowbitError, match="flat strategy"):
        QuantScheme(4, 0, True, type="codebook", codebook="nf4", strategy="flat")


# -------------------------------------------------------------------------- live reference


def test_live_bitsandbytes_random_shapes() -> None:
    F = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(3)
    for trial in range(40):
        shape = (int(torch.randint(1, 40, (1,), generator=gen)), int(torch.randint(1, 300, (1,), generator=gen)))
        w = torch.randn(shape, generator=gen).to([torch.float32, torch.float16, torch.bfloat16][trial % 3])
        qt, bs = ("nf4", "fp4")[trial % 2], cb.BLOCKSIZES[trial % len(cb.BLOCKSIZES)]
        packed, st = F.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=True)
        codes, absmax = cb.quantize_4bit(w, qt, bs)
        q, nested, offset = cb.double_quantize(absmax)
        assert torch.equal(cb.pack_nibbles(codes, qt), packed)
        assert torch.equal(q, st.absmax) and torch.equal(nested, st.state2.absmax)
        assert float(offset) == float(st.offset)
