"""SqueezeLLM-style lookup tables: packing, weighted k-means, the streamed Fisher, the format, the runtime, bad input.

No reference library: SqueezeLLM's own code needs CUDA (its ``quant_cuda`` extension) and vLLM
removed its loader in 2024. The packing is checked against an unpacker written here from the
layout description (SqueezeLLM's ``QuantLinearLUT.pack2``), the Fisher pass against whole-model
autograd, the k-means against its optimality conditions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.core.lut import outlier_mask, pack_qweight, sparse_dense, uniform_levels, unpack_qweight, weighted_kmeans
from lowbit.core.presets import preset
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError

LUT4 = preset("LUT4").weights
LUT3 = preset("LUT3").weights


def _weights(stories: Path) -> dict[str, torch.Tensor]:
    t = load_file(str(stories / "model.safetensors"))
    return {k: v.float() for k, v in t.items() if k.endswith("proj.weight")}


# --- packing ---------------------------------------------------------------------------------------


def _unpack_by_description(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """SqueezeLLM's layout read word by word: 4 bits, code j of a column at bits 4 (j % 8) of word j // 8;
    3 bits, per 3 words: codes 0-9 at 3k of word 0, code 10 = bits 30-31 of word 0 + bit 0 of word 1
    (as its bit 2), codes 11-20 at 3k + 1 of word 1, code 21 = bit 31 of word 1 + bits 0-1 of word 2
    (as its bits 1-2), codes 22-31 at 3k + 2 of word 2."""
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    rows, out_f = words.shape
    codes: list[list[int]] = [[] for _ in range(out_f)]
    for o in range(out_f):
        col = [int(v) for v in words[:, o]]
        if bits == 4:
            for wd in col:
                codes[o] += [(wd >> (4 * k)) & 15 for k in range(8)]
            continue
        for r in range(0, rows, 3):
            w0, w1, w2 = col[r : r + 3]
            c = [(w0 >> (3 * k)) & 7 for k in range(10)]
            c.append((w0 >> 30) | ((w1 & 1) << 2))
            c += [(w1 >> (3 * k + 1)) & 7 for k in range(10)]
            c.append((w1 >> 31) | ((w2 & 3) << 1))
            c += [(w2 >> (3 * k + 2)) & 7 for k in range(10)]
            codes[o] += c
    return torch.tensor(codes, dtype=torch.int64)


@pytest.mark.parametrize("bits", [3, 4])
def test_qweight_packing_matches_the_layout_description(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, 96), generator=g).to(torch.uint8)
    qweight = pack_qweight(codes, bits)
    assert qweight.dtype == torch.int32 and tuple(qweight.shape) == (96 * bits // 32, 5)
    assert torch.equal(_unpack_by_description(qweight, bits), codes.long())
    assert torch.equal(unpack_qweight(qweight, bits), codes)


def test_qweight_packing_known_words() -> None:
    codes = torch.arange(32).reshape(1, 32) % 8  # 3 bits: 0..7 repeated
    q = pack_qweight(codes.to(torch.uint8), 3)
    # word 0: codes 0-9 (0,1,...,7,0,1) at 3k, and code 10 (= 2) low bits 0b10 at bit 30
    expected0 = sum((k % 8) << (3 * k) for k in range(10)) | (2 << 30)
    assert int(q[0, 0]) & 0xFFFFFFFF == expected0
    q4 = pack_qweight(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8] * 4], dtype=torch.uint8), 4)
    assert int(q4[0, 0]) & 0xFFFFFFFF == 0x87654321


# --- weighted k-means ------------------------------------------------------------------------------


def _weighted_error(w: torch.Tensor, f: torch.Tensor, values: torch.Tensor) -> float:
    return float((f.double() * (w.double() - values.double()) ** 2).sum())


@pytest.mark.parametrize("bits", [3, 4])
def test_kmeans_no_worse_than_rtn_and_centroids_are_cluster_means(stories_dir: Path, bits: int) -> None:
    g = torch.Generator().manual_seed(0)
    for name, w in list(_weights(stories_dir).items())[:7]:
        f = torch.rand(w.shape, generator=g) ** 3  # uneven sensitivities
        lut, codes = weighted_kmeans(w, f, bits, iters=1000)
        q = codes.long()
        deq = torch.gather(lut, 1, q)
        # uniform per-channel asymmetric grid at the same bits (RTN), nearest level
        levels = uniform_levels(w, 1 << bits)
        rtn = torch.gather(levels, 1, (w[:, :, None] - levels[:, None, :]).abs().argmin(2))
        assert _weighted_error(w, f, deq) <= _weighted_error(w, f, rtn) * (1 + 1e-6), name
        # each centroid is the weighted mean of its cluster (clusters with weight)
        num = torch.zeros(lut.shape, dtype=torch.float64).scatter_add_(1, q, (f * w).double())
        den = torch.zeros(lut.shape, dtype=torch.float64).scatter_add_(1, q, f.double())
        has = den > 0
        assert torch.allclose((num / den.clamp_min(1e-300))[has], lut.double()[has], rtol=1e-5, atol=1e-9), name
        # and every value sits with its nearest centroid (at convergence)
        dist = (w[:, :, None] - lut[:, None, :]).abs()
        assert bool((dist.gather(2, q[:, :, None]).squeeze(2) <= dist.min(2).values + 1e-7).all()), name


def test_kmeans_is_deterministic_and_sensitivity_matters() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    f = torch.rand(64, 256, generator=g)
    a = weighted_kmeans(w, f, 4)
    b = weighted_kmeans(w.clone(), f.clone(), 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    f2 = f.clone()
    f2[:, :8] = 1e4  # very sensitive values get (almost) their own centroids
    lut, codes = weighted_kmeans(w, f2, 4)
    err_sensitive = (w[:, :8] - torch.gather(lut, 1, codes.long())[:, :8]).abs().mean()
    err_plain = (w[:, :8] - torch.gather(a[0], 1, a[1].long())[:, :8]).abs().mean()
    assert err_sensitive < err_plain / 5


def test_dense_and_sparse_is_exact_at_the_outliers() -> None:
    from lowbit.methods.squeezellm import lut_quantize

    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=g)
    f = torch.rand(32, 64, generator=g)
    mask = outlier_mask(w, f, 0.02, 0.01)
    assert int(mask.sum()) == round(0.02 * w.numel()) + round(0.01 * w.numel()) - int(
        (outlier_mask(w, f, 0.02, 0) & outlier_mask(w, f, 0, 0.01)).sum())
    qw = lut_quantize(w, LUT4, f, outliers=0.02, sensitive=0.01)
    dense = qw.dequantize()
    ulp = torch.finfo(torch.float32).eps * w[mask].abs()
    assert bool(((dense[mask] - w[mask]).abs() <= ulp).all())  # the sparse remainder restores the outliers (1 ulp)
    crow = qw.extra["sparse_rows"]
    assert crow.dtype == torch.int32 and int(crow[-1]) == int(mask.sum())
    plain = lut_quantize(w, LUT4, f)
    assert (dense - w).abs()[~mask].mean() < (plain.dequantize() - w).abs()[~mask].mean()
    s = sparse_dense(qw.extra, (32, 64))
    assert s is not None and int((s != 0).sum()) <= int(mask.sum())


# --- the Fisher diagonal, streamed against whole-model autograd ----------------------------------


def _calib(stories: Path, n: int = 2, length: int = 32):
    from lowbit.models.calibration import CalibrationData

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 500, (n, length), generator=g)
    return CalibrationData(ids, None, "test")


def test_streamed_fisher_equals_whole_model_autograd(stories_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.methods.squeezellm import fisher_diagonal
    from lowbit.models import Checkpoint

    calib = _calib(stories_dir)
    config = AutoConfig.from_pretrained(stories_dir)
    n = fisher_diagonal(config, Checkpoint(stories_dir), calib, tmp_path, lm_head=True)
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32, attn_implementation="sdpa")
    sums = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for s in range(calib.input_ids.shape[0]):
        model.zero_grad()
        ids = calib.input_ids[s : s + 1]
        model(input_ids=ids, labels=ids).loss.backward()
        for k, p in model.named_parameters():
            if p.grad is not None:
                sums[k] += p.grad.square()
    for i in range(n):
        mine = load_file(str(tmp_path / f"fisher_{i:03d}.safetensors"))
        assert set(mine) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
        for rel, t in mine.items():
            ref = sums[f"model.layers.{i}.{rel}.weight"]
            assert torch.allclose(t, ref, rtol=1e-3, atol=1e-6 * float(ref.abs().max())), (i, rel)
    head = load_file(str(tmp_path / "fisher_outer.safetensors"))["lm_head.weight"]
    ref_head = sums["lm_head.weight"] if "lm_head.weight" in sums else sums["model.embed_tokens.weight"]
    if not config.tie_word_embeddings:
        assert torch.allclose(head, ref_head, rtol=1e-3, atol=1e-6 * float(ref_head.abs().max()))
    assert not list(tmp_path.glob("inputs_*"))  # the saved layer inputs are removed as the pass goes down


def test_fisher_pass_holds_one_layer_at_a_time(stories_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoConfig

    import lowbit.models.capture as capture
    import lowbit.models.layers as layers_mod
    from lowbit.methods.squeezellm import fisher_diagonal
    from lowbit.models import Checkpoint

    built = {}
    real_build, real_load = capture.build_skeleton, layers_mod.load_layer_weights
    loaded_counts: list[int] = []

    def build(config):
        built["model"] = real_build(config)
        return built["model"]

    def load(adapter, layer, ckpt, i, device, dtype):
        stack = built["model"].model.layers
        loaded_counts.append(sum(any(p.device.type != "meta" for p in lay.parameters()) for lay in stack))
        return real_load(adapter, layer, ckpt, i, device, dtype)

    monkeypatch.setattr(capture, "build_skeleton", build)
    monkeypatch.setattr(layers_mod, "load_layer_weights", load)
    n = fisher_diagonal(AutoConfig.from_pretrained(stories_dir), Checkpoint(stories_dir), _calib(stories_dir), tmp_path)
    assert len(loaded_counts) == 2 * n and max(loaded_counts) == 0  # every earlier layer freed before the next loads


# --- pipeline, format, runtime ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def squeezed(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K through --method squeezellm --format squeezellm (down_proj's 172 columns kept float)."""
    import lowbit.api as lb
    from lowbit.recipe import Recipe

    out = tmp_path_factory.mktemp("sq") / "q"
    lb.quantize(stories_dir, out, method="squeezellm", format="squeezellm", samples=2, seq_len=32,
                recipe=Recipe(scheme=LUT4, overrides=((r"down_proj", None),)), outliers=0.004, sensitive=0.001)
    return out


def test_checkpoint_layout_and_round_trip(squeezed: Path) -> None:
    from lowbit.formats import read_checkpoint

    cfg = json.loads((squeezed / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "squeezellm", "wbits": 4}
    assert json.loads((squeezed / "quant_config.json").read_text()) == {"wbits": 4}
    t = load_file(str(squeezed / "model.safetensors"))
    m = "model.layers.0.self_attn.q_proj"
    assert t[f"{m}.qweight"].dtype == torch.int32 and tuple(t[f"{m}.qweight"].shape) == (64 * 4 // 32, 64)
    assert t[f"{m}.lookup_table"].dtype == torch.float32 and tuple(t[f"{m}.lookup_table"].shape) == (64, 16)
    assert t[f"{m}.rows"].shape == (65,) and int(t[f"sparse_threshold.{m}"]) == t[f"{m}.vals"].numel() > 0
    assert "model.layers.0.mlp.down_proj.weight" in t  # kept float
    weights, floats, _ = read_checkpoint(squeezed)
    qw = weights[f"{m}.weight"]
    codes = _unpack_by_description(t[f"{m}.qweight"], 4)
    dense = torch.gather(t[f"{m}.lookup_table"], 1, codes)
    crow = t[f"{m}.rows"].long()
    for r in range(64):  # the CSR part, read as SqueezeLLM's kernels read it
        for k in range(int(crow[r]), int(crow[r + 1])):
            dense[r, int(t[f"{m}.cols"][k])] += t[f"{m}.vals"][k]
    assert torch.equal(qw.dequantize(), dense)


def test_runtime_lut_kernel_equals_reference_and_eval_runs(squeezed: Path) -> None:
    from lowbit.runtime import load_quantized
    from lowbit.runtime.qlinear import QuantLinear

    model, _ = load_quantized(squeezed)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(lay.sparse_vals is not None for lay in layers)
    ids = torch.randint(1, 500, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        QuantLinear.kernel = "lut"
        try:
            a = model(ids).logits
            QuantLinear.kernel = "torch"
            b = model(ids).logits
        finally:
            QuantLinear.kernel = None
    assert torch.equal(a, b)
    x = torch.randn(3, layers[0].in_features, dtype=torch.bfloat16)
    layers[0].kernel = "lut"
    ya = layers[0](x)
    layers[0].kernel = "torch"
    assert torch.equal(ya, layers[0](x))


def test_same_input_same_bytes(stories_dir: Path, squeezed: Path, tmp_path: Path) -> None:
    import lowbit.api as lb
    from lowbit.recipe import Recipe

    again = tmp_path / "again"
    lb.quantize(stories_dir, again, method="squeezellm", format="squeezellm", samples=2, seq_len=32,
                recipe=Recipe(scheme=LUT4, overrides=((r"down_proj", None),)), outliers=0.004, sensitive=0.001)
    assert (again / "model.safetensors").read_bytes() == (squeezed / "model.safetensors").read_bytes()


def test_options_reach_the_handler_through_the_api(stories_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import lowbit.api as lb
    import lowbit.methods.squeezellm as sq
    from lowbit.recipe import Recipe

    seen = {}

    class Stop(Exception):
        pass

    def prepare(self, *a, **k):
        seen.update(weighting=self.weighting, outliers=self.outliers, fisher_dir=self.fisher_dir)
        raise Stop

    monkeypatch.setattr(sq.SqueezeLLMHandler, "prepare", prepare)
    with pytest.raises(Stop):  # api.quantize has a 'sensitivity' argument of its own: the option must not be called that
        lb.quantize(stories_dir, tmp_path / "o", method="squeezellm", format="lowbit", samples=2, seq_len=32,
                    recipe=Recipe(scheme=LUT4), weighting="none", outliers=0.01, fisher_dir=str(tmp_path / "f"))
    assert seen == {"weighting": "none", "outliers": 0.01, "fisher_dir": str(tmp_path / "f")}


# --- bad input -------------------------------------------------------------------------------------


def test_method_and_format_refuse_what_they_cannot_do(stories_dir: Path, tmp_path: Path) -> None:
    import lowbit.api as lb
    from lowbit.methods import METHODS
    from lowbit.methods.squeezellm import lut_quantize
    from lowbit.recipe import Recipe

    m = METHODS.get("squeezellm")
    assert m.supports(QuantScheme(4, 128, True)) is not None
    assert m.supports(LUT4) is None and m.supports(LUT3) is None
    with pytest.raises(LowbitError, match="NaN"):
        lut_quantize(torch.tensor([[1.0, float("nan")] * 16]), LUT4)
    with pytest.raises(LowbitError, match="fraction"):
        lut_quantize(torch.randn(4, 32), LUT4, outliers=0.7)
    with pytest.raises(LowbitError, match="multiple of 32"):  # down_proj's 172 columns, refused before any work
        lb.quantize(stories_dir, tmp_path / "o", method="squeezellm", format="squeezellm", samples=2, seq_len=32,
                    recipe=Recipe(scheme=LUT4))
    with pytest.raises(LowbitError, match="unknown option"):
        m.handler(LUT4, None, bogus=1)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["wbits", "lut_shape", "rows", "cols", "qweight_dtype", "nan_vals"])
def test_corrupt_checkpoints_are_one_line_errors(squeezed: Path, tmp_path: Path, case: str) -> None:
    from lowbit.formats import read_checkpoint

    d = _copy(squeezed, tmp_path / case)
    m = "model.layers.1.self_attn.k_proj"
    if case == "wbits":
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"]["wbits"] = 5
        (d / "config.json").write_text(json.dumps(cfg))
    else:
        t = load_file(str(d / "model.safetensors"))
        if case == "lut_shape":
            t[f"{m}.lookup_table"] = t[f"{m}.lookup_table"][:, :8].contiguous()
        elif case == "rows":
            t[f"{m}.rows"] = t[f"{m}.rows"].flip(0).contiguous()
        elif case == "cols":
            t[f"{m}.cols"] = t[f"{m}.cols"] + 1000
        elif case == "qweight_dtype":
            t[f"{m}.qweight"] = t[f"{m}.qweight"].float()
        elif case == "nan_vals":
            t[f"{m}.vals"][0] = float("nan")
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LowbitError) as exc:
        weights, _, _ = read_checkpoint(d)
        for qw in weights.values():  # lazily decoded formats fail on access
            qw.dequantize()
    assert "\n" not in str(exc.value)


# --- the command line: quantize, eval, generate ----------------------------------------------------


def test_cli_refuses_with_one_line(capsys, stories_dir: Path, tmp_path: Path) -> None:
    from lowbit.cli import EXIT_OK, main

    for argv, needle in ((["--outliers", "0.01"], "--outliers"),
                         (["--method", "squeezellm", "--group-size", "-1"], "--scheme LUT4"),
                         (["--method", "squeezellm", "--scheme", "LUT4", "--format", "squeezellm"], "multiple of 32")):
        code = main(["--quiet", "quantize", str(stories_dir), *argv, "-o", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert code != EXIT_OK and needle in err and err.count("\n") == 1, err
        assert not (tmp_path / "x").exists()


def test_eval_of_a_squeezellm_checkpoint(squeezed: Path, stories_dir: Path, wikitext: Path) -> None:
    import lowbit.api as lb

    r = lb.evaluate(str(squeezed), ref=str(stories_dir), settings=lb.EvalSettings(text=str(wikitext), ctx=128, max_chunks=1))
    assert r["kl_mean"] < 0.5 and r["top1_agreement"] > 0.5


@pytest.mark.skipif(os.environ.get("LOWBIT_SLOW_TESTS") != "1", reason="quantize, eval, generate in one process: LOWBIT_SLOW_TESTS=1")
def test_cli_quantize_eval_generate(capsys, stories_dir: Path, wikitext: Path, tmp_path: Path) -> None:
    from lowbit.cli import EXIT_OK, main

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(["--quiet", *argv])
        except SystemExit as exc:
            code = int(exc.code)  # type: ignore[arg-type]
        out, err = capsys.readouterr()
        return code, out, err

    out = tmp_path / "sq"
    code, stdout, err = run("quantize", str(stories_dir), "--method", "squeezellm", "--scheme", "LUT3", "--format",
                            "squeezellm", "--keep", "down_proj", "--samples", "2", "--seq-len", "32",
                            "--outliers", "0.004", "-o", str(out), "--json")
    assert code == EXIT_OK, err
    assert json.loads((out / "quant_config.json").read_text()) == {"wbits": 3}
    code, stdout, err = run("eval", str(out), "--ref", str(stories_dir), "--text", str(wikitext), "--chunks", "1",
                            "--ctx", "128", "--json")
    assert code == EXIT_OK, err
    res = json.loads(stdout)
    assert res["kl_mean"] < 1.0 and res["top1_agreement"] > 0.4
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\n")
    code, stdout, err = run("generate", str(out), "--ref", str(stories_dir), "--prompts", str(prompts),
                            "--max-new-tokens", "8", "--json")
    assert code == EXIT_OK, err


def test_kept_fisher_is_reused_only_for_the_same_inputs(stories_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoConfig

    import lowbit.methods.squeezellm as sq
    from lowbit.models import Checkpoint

    calls: list[int] = []
    real = sq.fisher_diagonal

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sq, "fisher_diagonal", counted)
    config, ckpt = AutoConfig.from_pretrained(stories_dir), Checkpoint(stories_dir)
    for calib in (_calib(stories_dir, 1, 16), _calib(stories_dir, 1, 16), _calib(stories_dir, 2, 16)):
        h = sq.SqueezeLLMHandler(LUT4, fisher_dir=str(tmp_path / "f"))
        h.prepare(config, ckpt, calib)
        assert h._fisher("fisher_000.safetensors")
    assert len(calls) == 2  # the second run reused the first's; other calibration tokens computed again
