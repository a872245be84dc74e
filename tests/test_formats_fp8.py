"""FP8 / INT8 W8A8 / NVFP4 / MXFP4 checkpoints: compressed-tensors float-, int-, nvfp4-, mxfp4-quantized
and vLLM's native ``fp8`` layout, written and read back, loaded by transformers; bad input.

Byte equality with llm-compressor itself is ``tests/test_fp8_llmc.py``; here the round trips, the
transformers check (compressed-tensors decompresses lowbit's files to exactly lowbit's dequantized
weights, and with its activation fake-quantization gives the logits of lowbit's weights with the
same per-token QDQ applied by :mod:`lowbit.core.floatq`'s rules), and the refusals.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from paths import ROOT

sys.path.insert(0, str(ROOT / "tests" / "reference"))
from make_llmc_goldens import calibration_ids, make_tiny_llama  # noqa: E402

from lowbit.core.floatq import half_range, quantize_fp8, symmetric_scale  # noqa: E402
from lowbit.core.fp4 import mx_exponent, round_e2m1  # noqa: E402
from lowbit.core.presets import preset  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402

_SLOW = pytest.mark.skipif(os.environ.get("LOWBIT_SLOW_TESTS") != "1", reason="LOWBIT_SLOW_TESTS=1 runs it")
PRESETS = ["FP8", "FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "NVFP4A16", pytest.param("NVFP4", marks=_SLOW), "MXFP4A16",
           pytest.param("MXFP4", marks=_SLOW)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny", stories_dir)


_CACHE: dict[str, object] = {}


def quantized(tiny: Path, name: str) -> object:
    from lowbit.models.calibration import CalibrationData
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    if name not in _CACHE:
        scheme = preset(name).scheme
        assert scheme is not None
        _CACHE[name] = quantize_model(str(tiny), method="rtn", recipe=Recipe(scheme=scheme),
                                      calib=CalibrationData(calibration_ids(), None, "test"))
    return _CACHE[name]


def write(tiny: Path, name: str, out: Path, fmt: str = "compressed-tensors") -> Path:
    from lowbit.formats import save

    return save(quantized(tiny, name), tiny, out, format=fmt)  # type: ignore[arg-type]


# --- numerics ------------------------------------------------------------------------------------


def test_e2m1_rounds_ties_to_even_and_keeps_negative_zero() -> None:
    y = torch.tensor([0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, -0.1, 0.0, -6.0])
    assert round_e2m1(y).tolist() == [0, 1, 2, 2, 4, 4, 6, 6, 7, 8, 0, 15]


def test_mx_exponent_rounds_up_from_three_quarters() -> None:
    # 0.04565 = 1.46 * 2**-5 -> 2**-5 -> 127 - 5 - 2 = 120; 0.05 = 1.6 * 2**-5 stays; 0.0469 = 1.5 * 2**-5
    assert mx_exponent(torch.tensor([0.04565, 1.75, 1.74, 0.0], dtype=torch.bfloat16)).tolist() == [120, 126, 125, 0]


def test_fp8_scale_divides_in_the_model_dtype() -> None:
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    scheme = preset("FP8_DYNAMIC").scheme
    assert scheme is not None
    qw = quantize_fp8(w, scheme, torch.bfloat16)
    assert qw.scale.dtype == torch.bfloat16
    assert torch.equal(qw.scale, w.abs().amax(dim=1, keepdim=True) / 448.0)
    zero = quantize_fp8(torch.zeros(2, 16), scheme, torch.bfloat16)
    assert zero.scale.flatten().tolist() == [2.0**-7, 2.0**-7]  # bf16's epsilon replaces a zero scale


def test_non_finite_weights_are_refused() -> None:
    w = torch.ones(4, 16)
    w[1, 3] = float("nan")
    for name in ("FP8", "NVFP4A16", "MXFP4A16"):
        scheme = preset(name).scheme
        assert scheme is not None
        from lowbit.methods.rtn import rtn

        with pytest.raises(LowbitError, match="non-finite"):
            rtn(w, scheme, dtype=torch.bfloat16)


def test_unknown_preset_is_one_line_error() -> None:
    with pytest.raises(LowbitError, match="FP8_DYNAMIC"):
        preset("FP9")


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_compressed_tensors_round_trip(name: str, tiny: Path, tmp_path: Path) -> None:
    from lowbit.formats import detect_format, read_checkpoint

    out = write(tiny, name, tmp_path / "out")
    assert detect_format(out) == "compressed-tensors"
    weights, floats, config = read_checkpoint(out)
    mine = quantized(tiny, name).weights  # type: ignore[attr-defined]
    assert sorted(weights) == sorted(mine)
    for n, qw in weights.items():
        assert qw.scheme.describe() == mine[n].scheme.describe(), n  # the activation scheme comes back too
        assert torch.equal(qw.dequantize(), mine[n].dequantize()), n
    assert "model.embed_tokens.weight" in floats
    assert not any(n.endswith(("_scale", "_packed")) for n in floats)


@pytest.mark.parametrize("name", ["FP8", "FP8_BLOCK"])
def test_vllm_fp8_round_trip(name: str, tiny: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from lowbit.formats import detect_format, read_checkpoint

    with pytest.warns(UserWarning) if name == "FP8" else _no_warning():
        out = write(tiny, name, tmp_path / "out", fmt="fp8")
    assert detect_format(out) == "fp8"
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    expected = {"quant_method": "fp8", "activation_scheme": "static" if name == "FP8" else "dynamic",
                "ignored_layers": ["lm_head"]}
    if name == "FP8_BLOCK":
        expected["weight_block_size"] = [128, 128]
    assert qconfig == expected
    weights, _, _ = read_checkpoint(out)
    mine = quantized(tiny, name).weights  # type: ignore[attr-defined]
    q = "model.layers.0.self_attn.q_proj"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        scale = f.get_tensor(f"{q}.weight_scale_inv" if name == "FP8_BLOCK" else f"{q}.weight_scale")
    assert scale.dtype == torch.float32
    assert (f"{q}.input_scale" in names) == (name == "FP8")
    for n, qw in weights.items():
        assert qw.scheme.describe() == mine[n].scheme.describe(), n
        assert torch.equal(qw.codes.view(torch.uint8), mine[n].codes.view(torch.uint8)), n
        assert torch.equal(qw.dequantize(), mine[n].dequantize()), n


class _no_warning:
    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def test_vllm_fp8_refuses_per_channel_before_any_work(tiny: Path) -> None:
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    for name in ("FP8_DYNAMIC", "W8A8", "NVFP4"):
        scheme = preset(name).scheme
        assert scheme is not None
        with pytest.raises(LowbitError, match=r"fp8 format cannot hold 7 of 7.*model\.layers\.0\.mlp\.down_proj"):
            quantize_model(str(tiny), method="rtn", recipe=Recipe(scheme=scheme), format="fp8")


def test_fp4_groups_must_divide_rows(stories_dir: Path) -> None:
    """stories260K's down_proj has 172 inputs: NVFP4's groups of 16 are refused at plan time, by name."""
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    scheme = preset("NVFP4A16").scheme
    assert scheme is not None
    with pytest.raises(LowbitError, match=r"down_proj.*172"):
        quantize_model(str(stories_dir), method="rtn", recipe=Recipe(scheme=scheme), format="compressed-tensors")


def test_fp8_block_pads_shapes_not_divisible_by_128(stories_dir: Path) -> None:
    """stories260K (64 wide): blocks overhang the weights and are scaled from their values alone, as
    llm-compressor and DeepSeek-V3 do (zero padding), giving one block per weight here."""
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    scheme = preset("FP8_BLOCK").scheme
    assert scheme is not None
    qm = quantize_model(str(stories_dir), method="rtn", recipe=Recipe(scheme=scheme))
    qw = qm.weights["model.layers.0.mlp.down_proj.weight"]
    assert tuple(qw.scale.shape) == (1, 2)
    w = qw.dequantize()
    assert w.shape == (64, 172)


# --- transformers (compressed-tensors) loads them ------------------------------------------------


def _qdq_per_token(x: torch.Tensor, name: str) -> torch.Tensor:
    """compressed-tensors' dynamic per-token fake quantization (FP8 or int8), in x's dtype."""
    acts = preset(name).input_activations
    assert acts is not None
    scale = symmetric_scale(x.abs().amax(dim=-1, keepdim=True), half_range(acts))
    y = x / scale + torch.zeros((), dtype=x.dtype)
    if acts.type == "float":
        q = torch.clamp(y, -448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype)
    else:
        q = torch.round(torch.clamp(y, -128, 127))
    return q * scale


@pytest.mark.parametrize("name", ["FP8_DYNAMIC", "W8A8", pytest.param("NVFP4A16", marks=_SLOW),
                                  pytest.param("MXFP4A16", marks=_SLOW)])
def test_transformers_loads_lowbit_checkpoints(name: str, tiny: Path, tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = write(tiny, name, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    mine = quantized(tiny, name).weights  # type: ignore[attr-defined]
    ids = calibration_ids(1, 32)
    with torch.no_grad():
        got = model(ids).logits  # decompresses on the first forward
    for n, qw in mine.items():
        module = model.get_submodule(n[: -len(".weight")])
        assert torch.equal(module.weight.data, qw.dequantize().to(module.weight.dtype)), n
    ref = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.bfloat16)
    sd = ref.state_dict()
    sd.update({n: qw.dequantize().to(torch.bfloat16) for n, qw in mine.items()})
    ref.load_state_dict(sd)
    if preset(name).input_activations is not None:
        for n in mine:
            ref.get_submodule(n[: -len(".weight")]).register_forward_pre_hook(
                lambda _m, args: (_qdq_per_token(args[0], name),))
    with torch.no_grad():
        want = ref(ids).logits
    assert torch.equal(got, want)
