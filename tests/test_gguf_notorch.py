"""The torch-free GGUF path (src/lowbit/gguf/fastpath.py, issue 16: 3).

* ``lowbit quantize model.gguf --to MIX`` in a fresh process never imports torch (nor
  transformers) when the C quantizers serve every tensor, and writes the same bytes as the torch
  path (``lowbit.api.quantize`` in this process) and as llama.cpp's quantizer (llama-cpp-python's
  ``llama_model_quantize``, when installed), with and without an importance matrix.
* The torch-free check of a GGUF file's tensors expects exactly the tensors transformers' model
  skeleton expects (:func:`lowbit.models.validate.check_gguf_tensors`), every family and variant.
* Requests the C code cannot serve fall back to the torch path (nothing written by the fast path).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from gguf_util import STORIES

from lowbit.gguf import fastpath, native

needs_native = pytest.mark.skipif(not native.enabled(), reason="native library not built (or LOWBIT_NATIVE=0)")

# runs the CLI and reports which heavy modules it imported (SystemExit passes through finally)
_RUN = """
import runpy, sys
sys.argv = ["lowbit"] + sys.argv[1:]
try:
    runpy.run_module("lowbit.cli", run_name="__main__")
finally:
    print("MODULES", "torch" in sys.modules, "transformers" in sys.modules, file=sys.stderr)
"""


@pytest.fixture(scope="module")
def f16(tmp_path_factory):
    """stories260K as an F16 GGUF (llama; 64-wide rows: the mixes fall back to 32-blocks) and an imatrix."""
    from lowbit.gguf.convert import quantize_to_gguf
    from lowbit.gguf.imatrix import IMatrix, save_imatrix
    from lowbit.gguf.reader import GGUFFile

    d = tmp_path_factory.mktemp("notorch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = quantize_to_gguf(STORIES, d / "stories-F16.gguf", "F16")
    rng = np.random.default_rng(0)
    im = IMatrix(chunk_count=4)
    for t in GGUFFile(path).tensors:
        if len(t.shape) == 2 and t.name != "token_embd.weight":
            im.sums[t.name] = rng.uniform(0.1, 4.0, (1, t.shape[-1])) * 2048
            im.counts[t.name] = np.array([2048.0])
    return path, save_imatrix(im, d / "imatrix.gguf")


def _cli(*args: str) -> tuple[bool, bool]:
    p = subprocess.run([sys.executable, "-c", _RUN, "--quiet", "quantize", *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    line = [x for x in p.stderr.splitlines() if x.startswith("MODULES")][-1].split()
    return line[1] == "True", line[2] == "True"


@needs_native
@pytest.mark.parametrize("mix,imatrix", [("Q4_K_M", False), ("Q4_K_M", True), ("IQ4_XS", True)])
def test_cli_gguf_quantize_imports_no_torch_same_bytes(f16, tmp_path, mix, imatrix):
    from lowbit.api import quantize

    src, im = f16
    extra = ["--imatrix", str(im)] if imatrix else []
    fast = tmp_path / "fast.gguf"
    assert _cli(str(src), "--to", mix, "-o", str(fast), *extra) == (False, False)
    slow = tmp_path / "slow.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(str(src), slow, to=mix, imatrix=im if imatrix else None)
    assert fast.read_bytes() == slow.read_bytes()
    if not imatrix:  # llama.cpp's own quantizer writes the same tensors
        pytest.importorskip("llama_cpp")
        from gguf_util import gguf_tensor_bytes, llamacpp_quantize

        theirs = llamacpp_quantize(src, tmp_path / "llama.gguf", mix)
        assert gguf_tensor_bytes(fast) == gguf_tensor_bytes(theirs)


@needs_native
def test_fallback_to_torch_path(f16, tmp_path):
    """A type without C code, a non-GGUF source, LOWBIT_NATIVE=0: the fast path declines, writes nothing."""
    src, _ = f16
    out = tmp_path / "x.gguf"
    assert fastpath.quantize(src, out, "Q4_0", tensor_types=["attn_q=mxfp4"]) is None
    assert fastpath.quantize(STORIES, out, "Q4_0") is None
    assert not out.exists()
    assert _cli(str(src), "--to", "Q4_0", "--tensor-type", "attn_q=mxfp4", "-o", str(out))[0]  # torch path ran
    assert out.exists()


def _hp(family: str, arch: str, explicit: bool = True):
    from lowbit.gguf.hparams import GGUFHParams

    return GGUFHParams(arch=arch, family=family, n_layer=2, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, head_dim=32,
                       explicit_head_dim=explicit, eps=1e-5, n_ctx=128, n_vocab=100, rope_base=None,
                       sliding_window=None)


@pytest.mark.parametrize("variant", ["plain", "bias", "tied"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_expected_tensors_equal_transformers_skeleton(family, variant):
    """The per-family table of fastpath equals what check_gguf_tensors reads from transformers."""
    from transformers import AutoConfig

    from lowbit.gguf.names import gguf_tensor_name
    from lowbit.models.architectures import ARCHITECTURES
    from lowbit.models.validate import expected_tensors

    a = next(x for x in ARCHITECTURES if x.name == family)
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=100, head_dim=32, tie_word_embeddings=variant == "tied")
    if family == "llama":
        cfg["attention_bias"] = variant == "bias"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = expected_tensors(AutoConfig.for_model(a.model_types[0], **cfg))
    want = {gguf_tensor_name(n, a.gguf_arch): s for n, s in {**hf.required, **hf.optional}.items()}
    required = {gguf_tensor_name(n, a.gguf_arch) for n in hf.required}
    names = list(want)
    ours = fastpath.expected_gguf_tensors(_hp(family, a.gguf_arch), names)
    assert {**ours.required, **ours.optional} == want
    assert set(ours.required) == required - {"output.weight"}  # a present output.weight is checked either way
    if family in ("qwen3", "gemma3"):  # head_dim from transformers' defaults: left to the torch path
        with pytest.raises(fastpath._NeedsTorch):
            fastpath.expected_gguf_tensors(_hp(family, a.gguf_arch, explicit=False), names)
