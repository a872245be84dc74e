"""Issue 15, items 1-4: nothing wrong served silently.

1. a GGUF's converted copy is cached under a digest of its whole content (a change in the middle,
   same size, is converted again), and reuse is announced;
2. architecture metadata (GGUF hyper-parameters, config.json) is validated against the tensors
   before any work, one error naming the file and the key;
3. safetensors headers are validated completely before the safetensors library sees them;
4. a source's tensor names and shapes are checked against what its architecture expects.
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as V
from paths import STORIES

from lowbit.errors import LowbitError
from lowbit.gguf.reader import GGUFFile
from lowbit.gguf.writer import KV, PlannedTensor, write_gguf

pytestmark = pytest.mark.skipif(not STORIES.exists(), reason="stories260K not available")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def stories_f32(tmp_path_factory) -> Path:
    from lowbit.gguf.convert import quantize_to_gguf

    return quantize_to_gguf(STORIES, tmp_path_factory.mktemp("g") / "stories-f32.gguf", "F32")


def rewrite_gguf(src: Path, dst: Path, kv: dict[str, tuple[V, object] | None] | None = None,
                 rename: dict[str, str] | None = None, drop: tuple[str, ...] = (),
                 reshape: dict[str, tuple[int, ...]] | None = None) -> Path:
    """A copy of ``src`` with metadata changed (``None`` deletes a key) and tensors renamed,
    dropped or given another shape (same bytes)."""
    f = GGUFFile(src)
    kv = kv or {}
    arch = f.kv["general.architecture"]
    kvs = []
    for k, vt, v, sub in f.kv_entries():
        if k in kv:
            change = kv.pop(k)
            if change is None:
                continue
            vt, v = change
            sub = V.UINT32 if vt == V.ARRAY else None
        kvs.append(KV(k, vt, v, sub))
    kvs += [KV(k, *change) for k, change in kv.items() if change is not None]
    planned, names = [], {}
    for t in f.tensors:
        if t.name in drop:
            continue
        name = (rename or {}).get(t.name, t.name)
        names[name] = t.name
        planned.append(PlannedTensor(name, (reshape or {}).get(t.name, t.shape), t.type))
    write_gguf(dst, arch, kvs, planned, lambda p: np.array(f.data(names[p.name])))
    return dst


# --- 1: the conversion cache keys on content --------------------------------------------------------


def test_gguf_changed_in_the_middle_is_not_served_stale(stories_f32, tmp_path):
    from lowbit.models import Checkpoint, resolve

    p = tmp_path / "model.gguf"
    shutil.copy(stories_f32, p)
    first = resolve(p)
    f = GGUFFile(p)
    t = f.by_name["blk.2.ffn_up.weight"]  # a tensor in the middle of the file, far from both ends
    start = f.header.data_offset + t.offset + t.nbytes // 2
    size = p.stat().st_size
    assert 1 << 20 < start < size - (1 << 20) or size < 2 << 20
    with open(p, "r+b") as fh:  # same size, new values (finite floats)
        fh.seek(start)
        fh.write(np.full(16, 0.25, np.float32).tobytes())
    assert p.stat().st_size == size
    second = resolve(p)
    assert second.hf_dir != first.hf_dir
    a = Checkpoint(first.hf_dir).get("model.layers.2.mlp.up_proj.weight")
    b = Checkpoint(second.hf_dir).get("model.layers.2.mlp.up_proj.weight")
    assert not np.array_equal(a.numpy(), b.numpy())
    with pytest.warns(UserWarning, match=r"model\.gguf: reusing its converted copy .* \(same content"):
        third = resolve(p)
    assert third.hf_dir == second.hf_dir


def test_content_digest_is_remembered_by_identity(tmp_path, monkeypatch):
    import hashlib
    import time

    from lowbit.models import gguf_source

    p = tmp_path / "x.bin"
    p.write_bytes(b"abc" * 1000)
    want = hashlib.sha256(p.read_bytes()).hexdigest()
    assert gguf_source.content_digest(p) == want
    assert not list((tmp_path / "cache" / "digests").glob("*"))  # a file written just now is not remembered
    monkeypatch.setattr(time, "time_ns", lambda: 10**19)  # ... one that has settled is
    assert gguf_source.content_digest(p) == want
    (memo,) = (tmp_path / "cache" / "digests").glob("*")
    memo.write_text("f" * 64)
    assert gguf_source.content_digest(p) == "f" * 64  # read from the memo, not from the file
    p.write_bytes(b"abd" * 1000)  # any write changes the file's identity (change time)
    monkeypatch.undo()
    assert gguf_source.content_digest(p) == hashlib.sha256(p.read_bytes()).hexdigest()


# --- 2: architecture metadata -------------------------------------------------------------------------

GGUF_CASES = {
    "head count 0": ({"llama.attention.head_count": (V.UINT32, 0)}, r"llama\.attention\.head_count = 0 is out of range"),
    "head count not dividing": ({"llama.attention.head_count": (V.UINT32, 7)},
                                r"llama\.attention\.head_count_kv = 4 does not divide llama\.attention\.head_count = 7"),
    "kv heads not dividing": ({"llama.attention.head_count_kv": (V.UINT32, 3)}, r"head_count_kv = 3 does not divide"),
    "heads x dim != rows": ({"llama.attention.head_count": (V.UINT32, 16), "llama.rope.dimension_count": None},
                            r"tensor blk\.0\.attn_k\.weight has shape \(32, 64\), but the metadata implies \(16, 64\) "
                            r"from llama\.attention\.head_count_kv \(4\) x head dimension \(4 = llama\.embedding_length / "
                            r"llama\.attention\.head_count\)"),
    "huge block count": ({"llama.block_count": (V.UINT32, 4_000_000_000)}, r"llama\.block_count = 4000000000 is out of range"),
    "more blocks than tensors": ({"llama.block_count": (V.UINT32, 8)},
                                 r"llama\.block_count = 8, but the file holds tensors of blk\.0-4"),
    "fewer blocks than tensors": ({"llama.block_count": (V.UINT32, 3)},
                                  r"llama\.block_count = 3, but the file holds tensors of blk\.0-4"),
    "eps NaN": ({"llama.attention.layer_norm_rms_epsilon": (V.FLOAT32, float("nan"))},
                r"layer_norm_rms_epsilon = nan is not a small positive number"),
    "eps negative": ({"llama.attention.layer_norm_rms_epsilon": (V.FLOAT32, -1e-5)}, r"epsilon = -1e-05 is not"),
    "eps missing": ({"llama.attention.layer_norm_rms_epsilon": None}, r"missing metadata key llama\.attention\.layer_norm"),
    "eps a string": ({"llama.attention.layer_norm_rms_epsilon": (V.STRING, "1e-5")}, r"= '1e-5' is not a number"),
    "context 0": ({"llama.context_length": (V.UINT32, 0)}, r"llama\.context_length = 0 is out of range"),
    "embedding length": ({"llama.embedding_length": (V.UINT32, 128)},
                         r"embedding_length = 128, but token_embd\.weight has 64 columns"),
    "vocab size": ({"llama.vocab_size": (V.UINT32, 1000)}, r"llama\.vocab_size = 1000, but token_embd\.weight has 512"),
    "rope dims": ({"llama.rope.dimension_count": (V.UINT32, 6)}, r"rope\.dimension_count = 6 differs from the head"),
    "bos out of range": ({"tokenizer.ggml.bos_token_id": (V.UINT32, 512)}, r"bos_token_id = 512 is out of range"),
    "block count an array": ({"llama.block_count": (V.ARRAY, [5, 5])}, r"llama\.block_count is an array"),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_hyperparameters_are_validated(stories_f32, tmp_path, case):
    from lowbit.gguf.convert import quantize_to_gguf
    from lowbit.models import resolve

    changes, pattern = GGUF_CASES[case]
    p = rewrite_gguf(stories_f32, tmp_path / "bad.gguf", kv=dict(changes))
    with pytest.raises(LowbitError, match=pattern) as e:
        resolve(p)  # evaluation and calibrated methods: refused before the conversion
    assert e.value.where == str(p) and "\n" not in str(e.value)
    with pytest.raises(LowbitError, match=pattern):
        quantize_to_gguf(p, tmp_path / "out.gguf", "Q8_0")  # GGUF to GGUF
    assert not (tmp_path / "out.gguf").exists() and not list((tmp_path / "cache").glob("models/*"))


def test_valid_gguf_hyperparameters_pass(stories_f32):
    from lowbit.gguf.hparams import validate_hparams

    f = GGUFFile(stories_f32)
    hp = validate_hparams(f.kv, {t.name: t.shape for t in f.tensors}, stories_f32)
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_vocab) == (5, 64, 8, 4, 8, 512)


@pytest.fixture
def stories_copy(tmp_path) -> Path:
    d = tmp_path / "stories"
    shutil.copytree(STORIES, d)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


CONFIG_CASES = {
    "heads 0": ({"num_attention_heads": 0}, r"config\.json: num_attention_heads = 0 is out of range"),
    "heads not dividing": ({"num_attention_heads": 7, "head_dim": None},
                           r"num_key_value_heads = 4 does not divide num_attention_heads = 7"),
    "hidden not divisible": ({"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": None},
                             r"num_attention_heads = 6 does not divide hidden_size = 64"),
    "eps NaN": ({"rms_norm_eps": float("nan")}, r"rms_norm_eps = nan is not a small positive number"),
    "eps negative": ({"rms_norm_eps": -1.0}, r"rms_norm_eps = -1\.0 is not"),
    "layers a string": ({"num_hidden_layers": "5"}, r"num_hidden_layers = '5' is not an integer"),
    "layers float": ({"num_hidden_layers": 5.0}, r"num_hidden_layers = 5\.0 is not an integer"),
    "eos out of vocab": ({"eos_token_id": 9999}, r"eos_token_id = 9999 is not a token id"),
    "more layers": ({"num_hidden_layers": 8}, r"num_hidden_layers = 8, but the checkpoint holds layers 0-4"),
    "fewer layers": ({"num_hidden_layers": 3}, r"num_hidden_layers = 3, but the checkpoint holds layers 0-4"),
    "hidden size": ({"hidden_size": 128, "head_dim": 16}, r"hidden_size = 128, but model\.embed_tokens\.weight has 64"),
    "vocab size": ({"vocab_size": 600}, r"vocab_size = 600, but model\.embed_tokens\.weight has 512 rows"),
    "heads x dim": ({"head_dim": 16}, r"tensor 'model\.layers\.0\.self_attn\.[qk]_proj\.weight' has shape \((64|32), 64\), "
                                      r"the config implies \((128|64), 64\)"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_hf_config_is_validated_against_the_safetensors(stories_copy, tmp_path, case):
    from lowbit.gguf.convert import quantize_to_gguf
    from lowbit.models import load
    from lowbit.pipeline import quantize_model

    changes, pattern = CONFIG_CASES[case]
    cfg_path = stories_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    cfg_path.write_text(json.dumps(cfg))
    for run in (lambda: load(stories_copy), lambda: quantize_to_gguf(stories_copy, tmp_path / "o.gguf", "Q8_0"),
                lambda: quantize_model(stories_copy, "rtn", workdir=tmp_path / "work")):
        with pytest.raises(LowbitError, match=pattern) as e:
            run()
        assert str(stories_copy) in str(e.value.where) and "\n" not in str(e.value)
    assert not (tmp_path / "o.gguf").exists() and not (tmp_path / "work").exists()


# --- 3: safetensors headers ---------------------------------------------------------------------------


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: dict | bytes, data: bytes) -> None:
    b = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(b)) + b + data)


def _first(h: dict) -> str:
    return min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def _mut_offsets_str(h, d):
    k = _first(h)
    h[k]["data_offsets"] = [str(x) for x in h[k]["data_offsets"]]
    return h, d


def _mut_offsets_float(h, d):
    k = _first(h)
    h[k]["data_offsets"] = [float(x) for x in h[k]["data_offsets"]]
    return h, d


def _mut_overlap(h, d):
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = names[1], names[2]
    h[b] = dict(h[b], data_offsets=h[a]["data_offsets"], shape=h[a]["shape"], dtype=h[a]["dtype"])
    return h, d


def _mut_gap(h, d):
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    del h[names[3]]  # a deleted entry leaves its bytes to nobody
    return h, d


SAFETENSORS_CASES = {
    "offsets as strings": (_mut_offsets_str, r"tensor '.*' has invalid data_offsets \['0'"),
    "offsets as floats": (_mut_offsets_float, r"has invalid data_offsets \[0\.0"),
    "overlapping ranges": (_mut_overlap, r"overlaps another tensor's"),
    "gap from a deleted entry": (_mut_gap, r"belong to no tensor \(a gap in the data section\)"),
    "trailing bytes": (lambda h, d: (h, d + b"\0" * 64), r"the tensors cover \d+ bytes, the data section has"),
    "truncated data": (lambda h, d: (h, d[:-100]), r"lies past the end of the data section"),
    "metadata a list": (lambda h, d: ({**h, "__metadata__": ["x"]}, d), r"__metadata__ is not a table of strings"),
    "metadata values ints": (lambda h, d: ({**h, "__metadata__": {"format": 1}}, d), r"__metadata__ is not a table"),
    "unknown dtype": (lambda h, d: ({**h, _first(h): dict(h[_first(h)], dtype="F7")}, d), r"unsupported dtype 'F7'"),
    "negative dim": (lambda h, d: ({**h, _first(h): dict(h[_first(h)], shape=[-512, -64])}, d), r"invalid shape"),
    "overflowing dims": (lambda h, d: ({**h, _first(h): dict(h[_first(h)], shape=[2**40, 2**40, 0])}, d),
                         r"element count overflows"),
    "shape and size differ": (lambda h, d: ({**h, _first(h): dict(h[_first(h)], shape=[512, 65])}, d),
                              r"has 131072 bytes of data, its shape \[512, 65\] of F32 needs 133120"),
    "not an object": (lambda h, d: (b"[1, 2]", d), r"not a JSON object of tensors"),
    "NaN in the header": (lambda h, d: (json.dumps(h).replace('"pt"', "NaN").encode(), d), r"NaN is not JSON"),
    "duplicate keys": (lambda h, d: (json.dumps(h).encode()[:-1] + b', "' + _first(h).encode() + b'": '
                                     + json.dumps(h[_first(h)]).encode() + b"}", d), r"duplicate key"),
    "nested too deeply": (lambda h, d: (b"[" * 100_000 + b"]" * 100_000, d), r"nested too deeply"),
    "not UTF-8": (lambda h, d: (json.dumps(h).encode("utf-16"), d), r"not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_safetensors_header_is_validated_completely(stories_copy, case):
    from lowbit.models import Checkpoint

    mutate, pattern = SAFETENSORS_CASES[case]
    st = stories_copy / "model.safetensors"
    header, data = _header(st)
    h, d = mutate(header, data)
    _write(st, h, d)
    with pytest.raises(LowbitError, match=pattern) as e:
        Checkpoint(stories_copy)
    assert e.value.where == str(st) and "\n" not in str(e.value)


def test_header_length_past_the_file(stories_copy):
    from lowbit.models import Checkpoint

    st = stories_copy / "model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(struct.pack("<Q", 2**63) + raw[8:])
    with pytest.raises(LowbitError, match=r"header length 9223372036854775808 for a"):
        Checkpoint(stories_copy)


def _shard(folder: Path, n: int = 2) -> None:
    """Split model.safetensors into ``n`` shards with an index."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    wm = {}
    for i in range(n):
        part = names[i::n]
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / fname))
        wm.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def test_sharded_index_is_validated(stories_copy):
    from lowbit.models import Checkpoint

    _shard(stories_copy)
    ck = Checkpoint(stories_copy)
    assert len(ck.keys()) == 47
    index = stories_copy / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    for wm, pattern in [
        ({**good["weight_map"], "model.norm.weight": "../outside.safetensors"}, r"is not a file name in the model folder"),
        ({**good["weight_map"], "model.norm.weight": "/etc/passwd"}, r"is not a file name in the model folder"),
        ({**good["weight_map"], "model.extra.weight": "model-00001-of-00002.safetensors"},
         r"model-00001-of-00002\.safetensors: the index places tensor 'model\.extra\.weight' in this shard, which lacks it"),
        ("not a map", r"corrupt index"),
    ]:
        index.write_text(json.dumps({"weight_map": wm}))
        with pytest.raises(LowbitError, match=pattern):
            Checkpoint(stories_copy)
    index.unlink()  # shards without an index: a tensor in two of them is refused
    shutil.copy(stories_copy / "model-00001-of-00002.safetensors", stories_copy / "model-00003-of-00003.safetensors")
    with pytest.raises(LowbitError, match=r"tensor '.*' is also in model-0000"):
        Checkpoint(stories_copy)


def test_every_reader_of_user_safetensors_validates_first():
    """Only models/checkpoint.py opens user safetensors (after validating the header); the result
    store, the selfgen cache, the evaluation's reference cache and SqueezeLLM's scratch and Fisher
    cache (written by lowbit, stamped last) read lowbit's own files."""
    src = Path(__file__).resolve().parents[1] / "src" / "lowbit"
    users = sorted(str(p.relative_to(src)) for p in src.rglob("*.py")
                   if "safe_open(" in p.read_text() or "load_file(" in p.read_text())
    assert set(users) <= {"models/checkpoint.py", "models/selfgen.py", "models/store.py", "eval/perplexity.py",
                          "methods/squeezellm.py"}, users


# --- 4: tensors against the architecture --------------------------------------------------------------


def _edit_header(folder: Path, edit) -> None:
    st = folder / "model.safetensors"
    header, data = _header(st)
    edit(header)
    _write(st, header, data)


def test_renamed_tensor_is_refused_before_quantizing(stories_copy, tmp_path):
    from lowbit.gguf.convert import quantize_to_gguf
    from lowbit.models import load
    from lowbit.pipeline import quantize_model

    _edit_header(stories_copy, lambda h: h.__setitem__("model.layers.1.mlp.up_projx.weight",
                                                       h.pop("model.layers.1.mlp.up_proj.weight")))
    pattern = (r"model\.safetensors: unexpected tensor 'model\.layers\.1\.mlp\.up_projx\.weight': not part of the "
               r"llama model its config describes; it lacks 'model\.layers\.1\.mlp\.up_proj\.weight'")
    for run in (lambda: quantize_model(stories_copy, "rtn", workdir=tmp_path / "work"),
                lambda: quantize_to_gguf(stories_copy, tmp_path / "o.gguf", "Q8_0"), lambda: load(stories_copy)):
        with pytest.raises(LowbitError, match=pattern):
            run()
    assert not (tmp_path / "work").exists() and not (tmp_path / "o.gguf").exists()


def test_extra_dimension_is_refused(stories_copy, tmp_path):
    from lowbit.pipeline import quantize_model

    def edit(h):
        e = h["model.layers.0.self_attn.o_proj.weight"]
        e["shape"] = [*e["shape"], 1]

    _edit_header(stories_copy, edit)
    with pytest.raises(LowbitError, match=r"tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' has shape "
                                          r"\(64, 64, 1\), the config implies \(64, 64\)"):
        quantize_model(stories_copy, "rtn", workdir=tmp_path / "work")


def test_tied_and_untied_lm_head_both_pass(stories_copy, tmp_path):
    from transformers import AutoConfig

    from lowbit.models import Checkpoint
    from lowbit.models.validate import check_checkpoint

    config = AutoConfig.from_pretrained(str(stories_copy))
    check_checkpoint(config, Checkpoint(stories_copy))  # tied, no lm_head.weight
    from safetensors.torch import load_file, save_file

    t = load_file(str(stories_copy / "model.safetensors"))
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    save_file(t, str(stories_copy / "model.safetensors"))
    check_checkpoint(config, Checkpoint(stories_copy))  # tied, with a copy of it
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = t["model.norm.weight"][:4].clone()  # old checkpoints
    save_file(t, str(stories_copy / "model.safetensors"))
    check_checkpoint(config, Checkpoint(stories_copy))


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_moe_fused_and_per_expert_layouts_both_pass(tmp_path, family):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    from lowbit.models import Checkpoint
    from lowbit.models.validate import check_checkpoint

    small = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 num_experts_per_tok=2, max_position_embeddings=64)
    cfg = (Qwen2MoeConfig(intermediate_size=32, moe_intermediate_size=8, shared_expert_intermediate_size=16,
                          num_experts=4, tie_word_embeddings=False, **small) if family == "qwen2_moe"
           else MixtralConfig(intermediate_size=8, num_local_experts=4, **small))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    per_expert = tmp_path / "per_expert"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(per_expert)  # transformers writes one tensor per expert
    config = AutoConfig.from_pretrained(str(per_expert))
    check_checkpoint(config, Checkpoint(per_expert))
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(per_expert / "config.json", fused / "config.json")
    sd = {k if family == "qwen2_moe" else k.replace(".mlp.", ".block_sparse_moe."): v.contiguous()
          for k, v in model.state_dict().items()}
    save_file(sd, str(fused / "model.safetensors"))
    check_checkpoint(config, Checkpoint(fused))
    del sd[next(k for k in sd if k.endswith("experts.down_proj"))]
    save_file(sd, str(fused / "model.safetensors"))
    with pytest.raises(LowbitError, match=r"missing tensor '.*experts\.down_proj'"):
        check_checkpoint(config, Checkpoint(fused))


def test_renamed_or_missing_gguf_tensor_is_refused(stories_f32, tmp_path):
    from lowbit.gguf.convert import quantize_to_gguf
    from lowbit.models import resolve

    p = rewrite_gguf(stories_f32, tmp_path / "ren.gguf", rename={"blk.1.ffn_up.weight": "blk.1.ffn_upx.weight"})
    for run in (lambda: resolve(p), lambda: quantize_to_gguf(p, tmp_path / "o.gguf", "Q8_0")):
        with pytest.raises(LowbitError, match=r"ren\.gguf: unexpected tensor 'blk\.1\.ffn_upx\.weight'.*"
                                              r"it lacks 'blk\.1\.ffn_up\.weight'"):
            run()
    p = rewrite_gguf(stories_f32, tmp_path / "drop.gguf", drop=("blk.4.attn_norm.weight",))
    with pytest.raises(LowbitError, match=r"drop\.gguf: missing tensor 'blk\.4\.attn_norm\.weight'"):
        resolve(p)
    p = rewrite_gguf(stories_f32, tmp_path / "shape.gguf", reshape={"output_norm.weight": (8, 8)})
    with pytest.raises(LowbitError, match=r"shape\.gguf: tensor 'output_norm\.weight' has shape \(8, 8\), "
                                          r"the config implies \(64,\)"):
        resolve(p)
