"""The one pipeline: every method through the layer engine and one rules system, lm_head included,
plans checked before any calibration, GGUF from calibrated codes through the API, registries."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from digest_cases import make_synthetic_llama
from lowbit import api, formats
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.methods import METHODS
from lowbit.recipe import Recipe

CALIB = {"calib": "pydoc", "samples": 4, "seq_len": 32}


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer llama with an untied lm_head and rows that are multiples of 256."""
    return make_synthetic_llama(tmp_path_factory.mktemp("syn") / "syn")


def _head_inputs(model_dir: Path, qm_dir: Path | None = None) -> torch.Tensor:
    """The final norm's outputs (lm_head's inputs) of a model on a short prompt."""
    from lowbit.models import load

    lm = load(qm_dir or model_dir)
    ids = torch.arange(1, 33).reshape(1, -1)
    captured: list[torch.Tensor] = []
    h = lm.model.lm_head.register_forward_pre_hook(lambda _m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        lm.model(input_ids=ids)
    h.remove()
    return captured[0].reshape(-1, captured[0].shape[-1]).float()


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_lm_head_override_is_applied_under_every_method(syn: Path, tmp_path: Path, method: str) -> None:
    head = QuantScheme(4, 64, True)
    recipe = Recipe(scheme=QuantScheme(4, 64, False), overrides=((r"^lm_head\.", head),))
    extra = CALIB if METHODS.get(method).calibrated else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = api.quantize(syn, tmp_path / "out", method=method, recipe=recipe, **extra)
    weights = formats.read(out)
    assert "lm_head.weight" in weights, f"{method} dropped the lm_head rule"
    qw = weights["lm_head.weight"]
    assert qw.scheme.bits == 4 and qw.scheme.group_size == 64 and qw.scheme.symmetric
    from lowbit.models import Checkpoint

    w = Checkpoint(syn).get("lm_head.weight").float()
    err = (qw.dequantize() - w).norm() / w.norm()
    assert 0.01 < err < 0.35  # on the 4-bit grid (the outlier columns cost), not a copy of the float weight


def test_gptq_lm_head_beats_rtn_on_its_own_inputs(syn: Path, tmp_path: Path) -> None:
    """GPTQ of lm_head uses the final hidden states: its output error on real inputs is lower than RTN's."""
    head = QuantScheme(3, 64, True)
    recipe = Recipe(scheme=QuantScheme(8, -1, True), overrides=((r"^lm_head\.", head),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = api.quantize_model(syn, "gptq", recipe, calib="pydoc", samples=8, seq_len=64)
        r = api.quantize_model(syn, "rtn", recipe)
    from lowbit.models import Checkpoint

    w = Checkpoint(syn).get("lm_head.weight").float()
    x = _head_inputs(syn)
    err_g = ((g.weights["lm_head.weight"].dequantize() - w) @ x.T).pow(2).sum()
    err_r = ((r.weights["lm_head.weight"].dequantize() - w) @ x.T).pow(2).sum()
    assert err_g < err_r


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_format_limits_refused_before_calibration(syn: Path, tmp_path: Path, monkeypatch, method: str) -> None:
    """AWQ's layout holds asymmetric 4-bit only: refused at planning, before the calibration file is
    read, in well under a second, with every offending tensor and the ways out in one error."""
    import time

    import lowbit.pipeline as pipeline

    missing = tmp_path / "no-such-calibration.txt"
    calib = {"calib": str(missing)} if method != "rtn" else {}

    def refuse() -> str:
        with pytest.raises(LowbitError) as e:
            api.quantize(syn, tmp_path / "out", method=method, recipe=Recipe(scheme=QuantScheme(3, 64, True)),
                         format="awq", **calib)
        return str(e.value)

    refuse()  # imports and the source's first look happen once per process
    monkeypatch.setattr(pipeline, "load_calibration", lambda *a, **k: pytest.fail("calibration was loaded"))
    t0 = time.perf_counter()
    err = refuse()
    assert time.perf_counter() - t0 < 1.0
    assert "calibration" not in err and not (tmp_path / "out").exists()
    assert "cannot hold 14 of 14" in err
    for linear in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.{{0-1}}.{'self_attn' if linear[0] in 'qkvo' else 'mlp'}.{linear}.weight" in err
    assert "--keep PATTERN" in err and "--group-size N or -1" in err and "--format gptq" in err


def test_format_shape_limits_refused_before_calibration(tmp_path: Path, monkeypatch) -> None:
    """Shape rules too (GPTQ packs whole int32 words: 172 columns x 3 bits do not fit): refused with
    the plan, not by the writer after calibrating."""
    import lowbit.pipeline as pipeline
    from paths import STORIES

    if not STORIES.exists():
        pytest.skip("stories260K not available")
    monkeypatch.setattr(pipeline, "load_calibration", lambda *a, **k: pytest.fail("calibration was loaded"))
    with pytest.raises(LowbitError, match="gptq format cannot hold 15 of 35") as e:
        api.quantize(STORIES, tmp_path / "out", method="gptq", recipe=Recipe(scheme=QuantScheme(3, -1, True)),
                     format="gptq", calib=str(tmp_path / "missing.txt"))
    assert "model.layers.{0-4}.mlp.down_proj.weight" in str(e.value) and "--format compressed-tensors" in str(e.value)


def test_existing_output_refused_before_any_work(syn: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LowbitError, match="exists"):
        api.quantize(syn, out, method="gptq", calib=str(tmp_path / "missing.txt"))


def test_api_writes_gguf_from_calibrated_codes_with_imatrix_and_tensor_types(syn: Path, tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType as T

    from lowbit.gguf.imatrix import compute_imatrix
    from lowbit.gguf.reader import GGUFFile

    text = tmp_path / "text.txt"
    from lowbit.text import pydoc_text

    text.write_text(pydoc_text()[:200_000])
    imat = compute_imatrix(syn, text, tmp_path / "imatrix.gguf", ctx=64, chunks=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = api.quantize(syn, tmp_path / "x.gguf", method="gptq", recipe=Recipe(scheme=QuantScheme(4, 32, True)),
                           format="gguf", to="Q4_0", imatrix=imat, tensor_types=["ffn_down=q8_0"],
                           output_tensor_type="q6_k", **CALIB)
    f = GGUFFile(out)
    types = {t.name: t.type for t in f.tensors}
    assert types["blk.0.ffn_down.weight"] == T.Q8_0 and types["blk.1.attn_q.weight"] == T.Q4_0
    assert types["output.weight"] == T.Q6_K
    assert f.kv.get("quantize.imatrix.file") == str(imat)
    assert int(f.kv.get("quantize.imatrix.entries_count")) > 0


def test_unknown_method_and_format_name_the_choices(syn: Path, tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="rtn") as e:
        api.quantize(syn, tmp_path / "o", method="nope")
    assert "unknown method" in str(e.value)
    with pytest.raises(LowbitError, match="compressed-tensors"):
        api.quantize(syn, tmp_path / "o", format="nope")


def test_cli_choices_come_from_the_registries() -> None:
    from lowbit.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()  # type: ignore[union-attr]
    for name in METHODS.names():
        assert name in help_text
    for name in formats.FORMATS.names():
        assert name in help_text


def test_tied_lm_head_rule_unties_and_unmatched_rules_warn(tmp_path: Path) -> None:
    """stories260K ties lm_head to the embeddings: a rule for lm_head quantizes its own copy (the
    checkpoint is untied), and a rule that matches nothing says so instead of doing nothing."""
    from lowbit.models import load
    from paths import STORIES

    recipe = Recipe(scheme=QuantScheme(4, 4, True), overrides=((r"^lm_head\.", QuantScheme(8, -1, True)),
                                                                (r"no_such_module", QuantScheme(8, -1, True))))
    with pytest.warns(UserWarning, match="no_such_module.*matches no tensor"):
        out = api.quantize(STORIES, tmp_path / "o", recipe=recipe)
    assert formats.read(out)["lm_head.weight"].scheme.bits == 8
    model = load(out).model
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
