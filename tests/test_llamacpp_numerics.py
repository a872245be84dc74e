"""What ``lowbit eval`` measures, beside llama.cpp's runtime (issue 17, item 2).

* lowbit's emulation of llama.cpp's activation rounding is bit-exact: the activation format of
  every GGML weight type is the ``vec_dot_type`` ggml's CPU backend reports, and the rounded
  values equal what ggml's own CPU quantizers (``from_float``) produce;
* ``--runtime llama.cpp`` gives llama.cpp's logits (batched as llama-perplexity batches them),
  and PPL / KL computed on them equal llama.cpp's numbers up to float summation;
* with ``--emulate llama.cpp`` lowbit's own runtime lands within 5% of llama.cpp's KL, where
  the plain float32 runtime does not;
* ``numerics`` says which of these was measured.
"""

from __future__ import annotations

import ctypes
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.llamacpp


# --- ggml's own CPU type traits and quantizers (ctypes) -------------------------------------------


class _TraitsCPU(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


class _Traits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_ROW = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@pytest.fixture(scope="module")
def ggml():
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TraitsCPU)
    cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    base.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    base.ggml_get_type_traits.argtypes = [ctypes.c_int]
    cpu.ggml_cpu_init()
    return base, cpu


def _ggml_quantize(ggml, x: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray | None]:
    """ggml's CPU conversion of ``x`` to ``fmt`` (its ``from_float``), read back as the values the dot
    product uses; for q8_1 also the stored block sums."""
    from gguf import GGMLQuantizationType as T

    base, cpu = ggml
    t = {"q8_0": T.Q8_0, "q8_1": T.Q8_1, "q8_K": T.Q8_K, "f16": T.F16, "bf16": T.BF16}[fmt]
    tc, tb = cpu.ggml_get_type_traits_cpu(int(t)).contents, base.ggml_get_type_traits(int(t)).contents
    x = np.ascontiguousarray(x, np.float32)
    k = x.size
    nbytes = k // tb.blck_size * tb.type_size
    buf = ctypes.create_string_buffer(nbytes + 64)
    _ROW(tc.from_float)(x.ctypes.data, ctypes.addressof(buf), k)
    raw = np.frombuffer(buf.raw[:nbytes], np.uint8)
    if fmt == "f16":
        return raw.view(np.float16).astype(np.float32), None
    if fmt == "bf16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32), None
    if fmt == "q8_K":  # float d; int8 qs[256]; int16 bsums[16]
        blk = raw.reshape(-1, 292)
        return (blk[:, 4:260].view(np.int8).astype(np.float32) * blk[:, :4].copy().view(np.float32)).reshape(-1), None
    size = 34 if fmt == "q8_0" else 36  # fp16 d (, fp16 s), int8 qs[32]
    blk = raw.reshape(-1, size)
    d = blk[:, :2].copy().view(np.float16).astype(np.float32)
    vals = (blk[:, size - 32:].view(np.int8).astype(np.float32) * d).reshape(-1)
    s = blk[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0] if fmt == "q8_1" else None
    return vals, s


def _activations(n: int, seed: int = 0) -> np.ndarray:
    """Heavy-tailed values with the awkward cases: an all-zero block, exact halves (ties), a block
    whose largest magnitude is negative, one with a repeated maximum."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp(rng.standard_normal(n))).astype(np.float32)
    x[:256] = 0
    x[256:512] = np.round(x[256:512] * 4) / 4
    x[512:768] = -np.abs(x[512:768])
    x[768:1024] = np.where(np.arange(256) % 7 == 0, 3.0, x[768:1024] % 1)
    return x


def test_activation_format_is_ggmls_vec_dot_type(ggml):
    from gguf import GGMLQuantizationType as T

    from lowbit.runtime.emulate import ACTIVATION_FORMAT

    _, cpu = ggml
    names = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q8_1": "Q8_1", "q8_K": "Q8_K"}
    for tname, fmt in ACTIVATION_FORMAT.items():
        if tname not in T.__members__:
            continue
        got = cpu.ggml_get_type_traits_cpu(int(T[tname])).contents.vec_dot_type
        assert T(got).name == names[fmt], f"{tname}: ggml uses {T(got).name}, lowbit {fmt}"


@pytest.mark.parametrize("fmt", ["q8_0", "q8_1", "q8_K", "f16", "bf16"])
def test_rounding_equals_ggml_cpu_quantizer(ggml, fmt):
    from lowbit.runtime.emulate import q8_1_sum_error, round_activations

    x = _activations(256 * 96)
    theirs, s = _ggml_quantize(ggml, x, fmt)
    ours = round_activations(torch.from_numpy(x).reshape(12, -1), fmt).reshape(-1).numpy()
    assert np.array_equal(ours, theirs)
    if fmt == "q8_1":  # the stored block sums, through the sum error lowbit adds for Q4_1/Q5_1
        qsum = theirs.reshape(-1, 32).sum(-1)  # exact: d16 * sum(q) in float64 is what the error is measured from
        err = q8_1_sum_error(torch.from_numpy(x)).numpy()
        assert np.allclose(err, s - qsum, rtol=0, atol=1e-6 * np.abs(s).max())


# --- the three runtimes on stories260K ------------------------------------------------------------


@pytest.fixture(scope="module")
def stories_ggufs(tmp_path_factory):
    """stories260K as an F32 GGUF (the reference), as Q4_1 (Q8_1 activations, with the block-sum
    term) and as Q8_0 (Q8_0 activations: as coarse as the weights, so the float32 runtime
    misses about half of the KL)."""
    from paths import STORIES

    if not STORIES.exists():
        pytest.skip("stories260K missing")
    from lowbit.gguf.convert import quantize_to_gguf

    d = tmp_path_factory.mktemp("stories-numerics")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f32 = quantize_to_gguf(STORIES, d / "f32.gguf", "F32")
        q41 = quantize_to_gguf(f32, d / "q4_1.gguf", "Q4_1", pure=True)
        q80 = quantize_to_gguf(f32, d / "q8_0.gguf", "Q8_0", pure=True)
    return f32, q41, q80


def _text(tmp_path) -> Path:
    from paths import WIKITEXT

    p = tmp_path / "text.txt"
    p.write_text(WIKITEXT.read_text(encoding="utf-8")[:40_000] if WIKITEXT.exists() else
                 "Once upon a time there was a little girl. " * 600, encoding="utf-8")
    return p


def test_runner_logits_equal_llamacpp(stories_ggufs, tmp_path):
    """Runner decodes n_batch // ctx chunks at once as parallel sequences; the logits equal
    llama.cpp's for each chunk alone (same micro-batch shape: 512 tokens / 4 sequences = 128 each)."""
    from gguf_util import LlamaRunner, chunks_of

    from lowbit.gguf.llamacpp import Runner

    _, q41, _ = stories_ggufs
    text = _text(tmp_path).read_text()
    with LlamaRunner(q41, n_ctx=512) as r:
        toks = r.tokenize(text, True)
        chunks = chunks_of(toks, 512, 5, r.bos if r.add_bos else None)
        alone = [r.logits(c) for c in chunks]
    with Runner(q41, 512, first=256) as run:
        assert run.n_seq == 4
        got = run.chunk_logits(torch.tensor(chunks))
    for i in range(5):
        assert np.array_equal(got[i, 256:].numpy(), alone[i][256:])
        assert not got[i, :256].any()  # positions before ``first`` are not computed


def _evaluate(model, ref, text, **kw):
    import lowbit.api as lb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lb.evaluate(model, ref, lb.EvalSettings(text=text, max_chunks=6, **kw))


def test_runtime_llamacpp_numbers_equal_llamacpp(stories_ggufs, tmp_path):
    """``--runtime llama.cpp``: PPL and KL equal llama-perplexity's formulas on llama.cpp's logits
    (gguf_util.score_chunk) up to float summation."""
    from gguf_util import LlamaRunner, chunks_of, score_chunk

    f32, q41, _ = stories_ggufs
    text = _text(tmp_path)
    res = _evaluate(q41, f32, text, runtime="llama.cpp")
    assert res["runtime"] == "llama.cpp" and "llama.cpp runtime" in res["numerics"]
    nll, kl, nll_ref = [], [], []
    with LlamaRunner(f32, n_ctx=512) as base, LlamaRunner(q41, n_ctx=512) as q:
        toks = base.tokenize(text.read_text(), True)
        for c in chunks_of(toks, 512, 6, base.bos if base.add_bos else None):
            n0, _, lp0 = score_chunk(base.logits(c), c)
            n1, k1, _ = score_chunk(q.logits(c), c, lp0)
            nll_ref.append(n0)
            nll.append(n1)
            kl.append(k1)
    assert res["n_tokens"] == sum(len(x) for x in kl)
    assert res["ppl"] == pytest.approx(float(np.exp(np.concatenate(nll).mean())), rel=1e-5)
    assert res["ppl_ref"] == pytest.approx(float(np.exp(np.concatenate(nll_ref).mean())), rel=1e-5)
    assert res["kl_mean"] == pytest.approx(float(np.concatenate(kl).mean()), rel=1e-4)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_emulation_kl_within_5_percent_of_llamacpp(stories_ggufs, tmp_path, kind):
    f32, q41, q80 = stories_ggufs
    model = q41 if kind == "q4_1" else q80
    text = _text(tmp_path)
    llama = _evaluate(model, f32, text, runtime="llama.cpp")
    emulated = _evaluate(model, f32, text, emulate="llama.cpp")
    plain = _evaluate(model, f32, text)
    assert "F16 KV cache" in emulated["numerics"] and plain["numerics"].startswith("dequantized weights, float32")
    assert emulated["kl_mean"] == pytest.approx(llama["kl_mean"], rel=0.05)
    assert emulated["ppl_ref"] == pytest.approx(llama["ppl_ref"], rel=1e-3)
    assert emulated["ppl"] == pytest.approx(llama["ppl"], rel=2e-3)
    if kind == "q8_0":  # activations as coarse as the weights: float32 activations miss much of the KL
        assert plain["kl_mean"] < 0.7 * llama["kl_mean"]


def test_cli_reports_numerics_and_refuses_bad_combinations(stories_ggufs, tmp_path, capsys):
    from lowbit.cli import main

    f32, q41, _ = stories_ggufs
    text = _text(tmp_path)
    assert main(["--quiet", "eval", str(q41), "--text", str(text), "--chunks", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["numerics"] == "dequantized weights, float32 activations (lowbit runtime)"
    assert main(["--quiet", "eval", str(q41), "--text", str(text), "--chunks", "2", "--runtime", "llama.cpp",
                 "--emulate", "llama.cpp"]) == 1
    assert "--emulate" in capsys.readouterr().err
    from paths import STORIES

    assert main(["--quiet", "eval", str(STORIES), "--text", str(text), "--chunks", "2", "--runtime", "llama.cpp"]) == 1
    assert "GGUF" in capsys.readouterr().err
    assert main(["--quiet", "eval", str(STORIES), "--text", str(text), "--chunks", "2", "--emulate", "llama.cpp"]) == 1
    assert "GGUF" in capsys.readouterr().err


def test_numerics_note_when_a_checkpoint_quantizes_activations():
    """HF checkpoints: the activation quantization a checkpoint declares and lowbit does not apply is named."""
    from types import SimpleNamespace

    from lowbit.api import _unapplied_activations

    fp8 = {"config_groups": {"group_0": {"input_activations": {"type": "float", "num_bits": 8, "strategy": "token"}}}}
    assert "float8 token" in _unapplied_activations(SimpleNamespace(kind="quantized", quantization_config=fp8))
    w4 = {"config_groups": {"group_0": {"input_activations": None}}}
    assert _unapplied_activations(SimpleNamespace(kind="quantized", quantization_config=w4)) == ""
    assert _unapplied_activations(SimpleNamespace(kind="hf", quantization_config=None)) == ""


def test_gelu_table_equals_ggmls(ggml):
    """Gemma-3's GEGLU: lowbit's F16 GELU table against the one ggml fills (ggml_table_gelu_f16)."""
    from lowbit.runtime.emulate import GeluFP16

    _, cpu = ggml
    theirs = np.frombuffer(bytes((ctypes.c_uint16 * 65536).in_dll(cpu, "ggml_table_gelu_f16")), dtype=np.float16)
    ours = GeluFP16.table().numpy().astype(np.float16)
    x = np.arange(65536).astype(np.uint16).view(np.float16).astype(np.float32)
    used = np.isfinite(x) & (np.abs(x) < 10)  # outside, ggml does not read the table
    differ = np.nonzero(used & (ours.view(np.uint16) != theirs.view(np.uint16)))[0]
    assert len(differ) <= 2
    steps = np.abs(ours[differ].astype(np.float32) - theirs[differ].astype(np.float32)) / np.spacing(np.abs(theirs[differ]))
    assert (steps <= 1).all()
    y = GeluFP16()(torch.tensor([-12.0, -10.0, 0.5, 9.99, 10.0, 30.0]))
    assert y[0] == 0 and y[1] == 0 and y[4] == 10 and y[5] == 30
