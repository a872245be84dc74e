"""The per-tensor type map of llama.cpp's mixes: rules, options, and equality with llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from lowbit.errors import LowbitError
from lowbit.gguf import mixes
from lowbit.gguf.mixes import ModelHParams, TypeOptions, tensor_types

MAIN_MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
              "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS"]
IQ_MIXES = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ1_S", "IQ1_M"]


def llama_like(n_layer=8, cols=4096, ff=11008, kv_rows=1024, tied=False):
    t = [("token_embd.weight", (32000, cols)), ("output_norm.weight", (cols,))]
    if not tied:
        t.append(("output.weight", (32000, cols)))
    for i in range(n_layer):
        p = f"blk.{i}."
        t += [(p + "attn_norm.weight", (cols,)), (p + "attn_q.weight", (cols, cols)),
              (p + "attn_k.weight", (kv_rows, cols)), (p + "attn_v.weight", (kv_rows, cols)),
              (p + "attn_output.weight", (cols, cols)), (p + "ffn_norm.weight", (cols,)),
              (p + "ffn_gate.weight", (ff, cols)), (p + "ffn_up.weight", (ff, cols)),
              (p + "ffn_down.weight", (cols, ff))]
    return t


HP = ModelHParams("llama", n_layer=8, n_head=32, n_head_kv=8)


def test_q4_k_m_rules():
    ty = tensor_types(llama_like(), HP, "Q4_K_M")
    assert ty["output.weight"] == T.Q6_K and ty["token_embd.weight"] == T.Q4_K
    assert ty["blk.0.attn_norm.weight"] == T.F32
    # use_more_bits(i, 8): first/last eighth and every third layer in between
    more = [i for i in range(8) if ty[f"blk.{i}.ffn_down.weight"] == T.Q6_K]
    assert more == [0, 3, 6, 7]
    assert [i for i in range(8) if ty[f"blk.{i}.attn_v.weight"] == T.Q6_K] == more
    assert ty["blk.1.attn_q.weight"] == T.Q4_K and ty["blk.1.ffn_up.weight"] == T.Q4_K


def test_q3_k_m_and_gqa():
    ty = tensor_types(llama_like(), HP, "Q3_K_M")
    assert ty["blk.0.attn_v.weight"] == T.Q5_K and ty["blk.1.attn_v.weight"] == T.Q5_K
    assert ty["blk.2.attn_v.weight"] == T.Q4_K
    assert ty["blk.0.attn_output.weight"] == T.Q4_K
    q2 = tensor_types(llama_like(), HP, "Q2_K")  # n_gqa = 4 -> attn_v Q4_K
    assert q2["blk.0.attn_v.weight"] == T.Q4_K and q2["blk.0.ffn_down.weight"] == T.Q3_K
    q2 = tensor_types(llama_like(), ModelHParams("llama", 8, 32, 32), "Q2_K")
    assert q2["blk.0.attn_v.weight"] == T.Q3_K


def test_tied_embeddings_take_output_rule():
    ty = tensor_types(llama_like(tied=True), HP, "Q4_K_M")
    assert "output.weight" not in ty and ty["token_embd.weight"] == T.Q6_K


def test_fallbacks_for_rows_not_multiple_of_256():
    t = [("blk.0.attn_q.weight", (64, 640)), ("blk.0.ffn_down.weight", (640, 172)),
         ("blk.0.attn_v.weight", (64, 640)), ("token_embd.weight", (100, 640))]
    hp = ModelHParams("llama", 1, 4, 1)
    ty = tensor_types(t, hp, "Q4_K_M")
    assert ty["blk.0.attn_q.weight"] == T.Q5_0  # Q4_K -> Q5_0
    assert ty["blk.0.attn_v.weight"] == T.Q8_0  # Q6_K -> Q8_0
    assert ty["blk.0.ffn_down.weight"] == T.F16  # 172 is not a multiple of 32 either
    assert ty["token_embd.weight"] == T.Q8_0  # tied output rule: not divisible -> Q8_0
    assert tensor_types(t, hp, "Q5_K_S")["blk.0.attn_q.weight"] == T.Q5_1
    assert tensor_types(t, hp, "Q3_K_S")["blk.0.attn_q.weight"] == T.Q4_0
    assert tensor_types(t, hp, "IQ4_XS")["blk.0.attn_q.weight"] == T.IQ4_NL


def test_options():
    t = llama_like(n_layer=2)
    hp = ModelHParams("llama", 2, 32, 8)
    pure = tensor_types(t, hp, "Q4_K_M", TypeOptions(pure=True))
    assert pure["blk.0.attn_v.weight"] == T.Q4_K and pure["output.weight"] == T.Q4_K
    o = tensor_types(t, hp, "Q4_K_M", TypeOptions(output_tensor_type=T.Q8_0, token_embedding_type=T.Q2_K))
    assert o["output.weight"] == T.Q8_0 and o["token_embd.weight"] == T.Q2_K
    ov = mixes.parse_overrides([r"ATTN_[qk]=q8_0", "ffn_down=Q5_K", "blk\\.1\\..*=q2_k"])
    o = tensor_types(t, hp, "Q4_K_M", TypeOptions(overrides=ov))
    assert o["blk.0.attn_q.weight"] == T.Q8_0 and o["blk.1.attn_k.weight"] == T.Q8_0
    assert o["blk.0.ffn_down.weight"] == T.Q5_K and o["blk.1.ffn_down.weight"] == T.Q5_K  # first match wins
    assert o["blk.1.ffn_up.weight"] == T.Q2_K and o["blk.0.ffn_up.weight"] == T.Q4_K
    with pytest.raises(LowbitError):
        mixes.parse_overrides(["nothing"])
    with pytest.raises(LowbitError):
        mixes.parse_overrides(["a=q9_9"])
    with pytest.raises(LowbitError):
        mixes.normalize_mix("Q7_K")


def test_moe_layers_from_names():
    t = [(f"blk.{i}.ffn_down_exps.weight", (8, 4096, 14336)) for i in range(8)]
    t += [(f"blk.{i}.attn_v.weight", (1024, 4096)) for i in range(8)]
    t += [(f"blk.{i}.ffn_gate_inp.weight", (8, 4096)) for i in range(8)]
    ty = tensor_types(t, ModelHParams("llama", 8, 32, 8, n_expert=8), "Q4_K_M")
    assert all(ty[f"blk.{i}.attn_v.weight"] == T.Q8_0 for i in range(8))  # 8 experts -> Q8_0
    assert ty["blk.0.ffn_down_exps.weight"] == T.Q6_K and ty["blk.1.ffn_down_exps.weight"] == T.Q4_K
    assert ty["blk.0.ffn_gate_inp.weight"] == T.F16  # never quantized: keeps its source type


def test_ftype_names():
    assert mixes.ftype_name(15) == "Q4_K_M" and mixes.ftype_name(1) == "F16"
    assert mixes.FTYPES["IQ4_XS"] == 30


# --------------------------------------------------------------------------------------------
# against llama.cpp's quantizer

def _types_from_file(path):
    from lowbit.gguf.reader import GGUFFile

    f = GGUFFile(path)
    return f, [(t.name, t.shape) for t in f.tensors], {t.name: t.type for t in f.tensors}


@pytest.fixture(scope="module")
def skeletons(tmp_path_factory):
    """Skeletons of the demo models; a model that cannot be obtained maps to the reason (a string)."""
    pytest.importorskip("llama_cpp")
    from gguf_util import make_skeleton

    from lowbit.errors import LowbitError
    from lowbit.models.demo import demo_gguf

    d = tmp_path_factory.mktemp("skel")
    out = {}
    for name, demo in (("smollm2", "smollm2-135m"), ("gemma3", "gemma3-270m")):
        try:
            out[name] = make_skeleton(demo_gguf(demo), d / f"{name}.gguf")
        except LowbitError as e:
            out[name] = f"{demo} is not available: {e}"
    return out


def _skeleton(skeletons, model: str):
    if isinstance(skeletons[model], str):
        pytest.skip(skeletons[model])
    return skeletons[model]


def _check(skel, mix, tmp_path, imatrix: bool):
    from gguf_util import gguf_types, llamacpp_quantize

    f, shapes, stypes = _types_from_file(skel)
    im = None
    if imatrix:
        im = {n: np.ones(s[-1], np.float32) for n, s in shapes if len(s) >= 2}
    out = tmp_path / f"{mix}.gguf"
    llamacpp_quantize(skel, out, mix, imatrix=im)
    theirs = gguf_types(out)
    ours = tensor_types(shapes, mixes.hparams_from_gguf_kv(f.kv), mix,
                        TypeOptions(has_imatrix=imatrix), stypes)
    diff = {k: (v.name, ours.get(k)) for k, v in theirs.items() if ours.get(k) != v}
    assert not diff and len(ours) == len(theirs)


@pytest.mark.llamacpp
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
@pytest.mark.parametrize("mix", MAIN_MIXES)
def test_type_map_equals_llamacpp(skeletons, model, mix, tmp_path):
    _check(_skeleton(skeletons, model), mix, tmp_path, imatrix=False)


@pytest.mark.llamacpp
@pytest.mark.parametrize("mix", [pytest.param(m, marks=pytest.mark.slow) if m in ("IQ1_S", "IQ1_M", "IQ2_M", "IQ2_S")
                                 else m for m in IQ_MIXES] + ["Q4_0", "IQ4_NL", "Q2_K_S"])
def test_type_map_with_imatrix_equals_llamacpp(skeletons, mix, tmp_path):
    _check(_skeleton(skeletons, "gemma3"), mix, tmp_path, imatrix=True)


@pytest.mark.llamacpp
def test_type_map_options_equal_llamacpp(skeletons, tmp_path):
    from gguf_util import gguf_types, llamacpp_quantize

    skel = _skeleton(skeletons, "smollm2")
    f, shapes, stypes = _types_from_file(skel)
    hp = mixes.hparams_from_gguf_kv(f.kv)
    tt = ["attn_v=q8_0", r"blk\.1[0-9]\.ffn_down=iq4_nl"]
    for kw, opts in [
        (dict(pure=True), TypeOptions(pure=True)),
        (dict(output_tensor_type="q5_k", token_embedding_type="q4_0"),
         TypeOptions(output_tensor_type=T.Q5_K, token_embedding_type=T.Q4_0)),
        (dict(tensor_types=tt), TypeOptions(overrides=mixes.parse_overrides(tt))),
    ]:
        out = tmp_path / "o.gguf"
        llamacpp_quantize(skel, out, "Q4_K_M", **kw)
        ours = tensor_types(shapes, hp, "Q4_K_M", opts, stypes)
        assert gguf_types(out) == ours, kw
