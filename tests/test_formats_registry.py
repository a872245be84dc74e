"""The format registry: names and help, holds() per scheme, check_holds, a toy format, bad checkpoints."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit import formats
from lowbit.core.presets import PRESETS
from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats import FORMATS, Format, check_holds
from lowbit.formats.base import compact_names

from formats_util import SRC, assert_same_weight, make_model, needs_model, rtn_weights, synthetic_model

W4_SYM = QuantScheme(4, 32, True)
W4_ASYM = QuantScheme(4, 32, False)
FP8 = QuantScheme(8, -1, True, type="float")
NF4 = QuantScheme(4, 64, True, type="codebook", codebook="nf4")


def test_names_help_and_old_tuple_use():
    assert FORMATS.names()[:3] == ["compressed-tensors", "gptq", "awq"]  # the default first
    assert "gguf" not in FORMATS  # GGUF is written by lowbit.gguf, not through this registry
    assert list(FORMATS) == FORMATS.names() and "awq" in FORMATS and "exl2" not in FORMATS
    assert ", ".join(formats.FORMATS).startswith("compressed-tensors, gptq, awq")
    help_text = FORMATS.help_text()
    for name in ("compressed-tensors", "gptq", "awq"):
        assert f"{name}: " in help_text
    with pytest.raises(LowbitError, match="unknown format 'exl2'"):
        FORMATS.get("exl2")


def test_holds_every_preset_or_says_why():
    ct, gptq, awq = (FORMATS.get(n) for n in ("compressed-tensors", "gptq", "awq"))
    for name in ("w4a16", "w4a16_asym", "w8a16", "w8a8"):
        assert ct.holds(PRESETS.get(name).weights) is None
        assert gptq.holds(PRESETS.get(name).weights) is None
    assert awq.holds(PRESETS.get("w4a16_asym").weights) is None
    assert "asymmetric 4-bit groups only" in awq.holds(PRESETS.get("w4a16").weights)
    for name in ("fp8", "fp8_dynamic", "fp8_block", "nvfp4", "mxfp4"):  # float-quantized, nvfp4/mxfp4-pack-quantized
        assert ct.holds(PRESETS.get(name).weights) is None
        assert gptq.holds(PRESETS.get(name).weights) is not None
    assert "nf4" in ct.holds(PRESETS.get("nf4").weights)
    assert "2-8 bits" in ct.holds(QuantScheme(1, 32, True))
    assert gptq.holds(QuantScheme(5, 32, True)) is not None
    for _, preset in PRESETS.items():  # every reason is one line
        for fmt in (ct, gptq, awq):
            why = fmt.holds(preset.weights)
            assert why is None or (why and "\n" not in why)


def test_check_holds_lists_every_tensor_once_with_options():
    plan = {f"model.layers.{i}.self_attn.q_proj.weight": W4_SYM for i in range(14)}
    plan["model.layers.0.mlp.up_proj.weight"] = W4_ASYM
    with pytest.raises(LowbitError) as info:
        check_holds(plan, "awq")
    msg = str(info.value)
    assert "awq format cannot hold 14 of 15" in msg
    assert msg.count("asymmetric 4-bit groups only") == 1  # one reason, every tensor under it
    assert "model.layers.{0-13}.self_attn.q_proj.weight" in msg and "more" not in msg
    assert "up_proj" not in msg
    assert "--keep PATTERN" in msg and "--group-size" in msg
    assert "--format compressed-tensors" in msg and "--format gptq" in msg
    assert "\n" not in msg
    check_holds({"a.weight": W4_ASYM}, "awq")  # nothing to say


def test_check_holds_shape_rules_and_whole_plan_rules():
    with pytest.raises(LowbitError, match="out\\*bits divisible by 32"):
        check_holds({"m.weight": QuantScheme(3, -1, True)}, "gptq", {"m.weight": (100, 128)})
    with pytest.raises(LowbitError, match="does not divide the 172 input columns"):
        check_holds({"m.weight": W4_SYM}, "compressed-tensors", {"m.weight": (64, 172)})
    with pytest.raises(LowbitError, match="lm_head in float"):
        check_holds({"lm_head.weight": W4_ASYM}, "awq")
    with pytest.raises(LowbitError, match="one group size per checkpoint"):
        check_holds({"a.weight": W4_ASYM, "b.weight": QuantScheme(4, 64, False)}, "awq")
    with pytest.raises(LowbitError, match="no format|another format"):
        check_holds({"m.weight": NF4}, "gptq")


def test_check_holds_takes_any_holder():
    class GGUFStandIn:
        name = "gguf"

        def holds(self, scheme: QuantScheme) -> str | None:
            return None if scheme.group_size == 32 else "gguf blocks hold groups of 32"

    check_holds({"a.weight": W4_SYM}, GGUFStandIn())
    with pytest.raises(LowbitError, match="gguf format cannot hold 1 of 1.*groups of 32"):
        check_holds({"a.weight": QuantScheme(4, 64, True)}, GGUFStandIn())


@needs_model
def test_save_refuses_what_a_format_cannot_hold_before_writing(tmp_path):
    weights = synthetic_model(W4_SYM)
    with pytest.raises(LowbitError, match="awq format cannot hold 20 of 20") as info:
        formats.save(make_model(weights), SRC, tmp_path / "a", "awq")
    assert all(n in str(info.value) for n in compact_names(sorted(weights)))  # every tensor named
    g = torch.Generator().manual_seed(0)
    fp8 = {n: QuantizedWeight((torch.randn(qw.shape, generator=g) * 10).to(torch.float8_e4m3fn),
                              torch.rand(qw.shape[0], 1), None, FP8) for n, qw in list(weights.items())[:2]}
    for fmt in [n for n in FORMATS if FORMATS.get(n).holds(FP8) is not None]:  # lowbit's own format holds any
        with pytest.raises(LowbitError, match="cannot hold 2 of 2"):
            formats.save(make_model(fp8), SRC, tmp_path / fmt, fmt)
        enc = FORMATS.get(fmt).encoder({}, [], torch.float32)  # an encoder refuses too, naming the tensor
        name = next(iter(fp8))
        with pytest.raises(LowbitError, match=name.replace(".", r"\.")):
            enc.add(name, fp8[name])
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- a toy format in one class


class _RawEncoder:
    def __init__(self) -> None:
        self.modules: list[str] = []

    def add(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        module = name[: -len(".weight")]
        self.modules.append(module)
        return {f"{module}.codes": qw.codes.to(torch.uint8), f"{module}.scale": qw.scale.float(),
                f"{module}.zero": qw.zero.to(torch.uint8)}

    def config(self) -> dict[str, Any]:
        return {"quant_method": "toy-raw", "modules": sorted(self.modules)}


class ToyRaw(Format):
    """unpacked uint8 codes, float32 scales (a test format)"""

    name = "toy-raw"

    def holds(self, scheme: QuantScheme) -> str | None:
        return None if scheme.type == "int" and scheme.granularity == "group" else "toy-raw holds integer groups"

    def detect(self, config: Mapping[str, Any], folder: Path) -> bool:
        return (config.get("quantization_config") or {}).get("quant_method") == "toy-raw"

    def encoder(self, config: Mapping[str, Any], linears: list[str], dtype: torch.dtype) -> _RawEncoder:
        return _RawEncoder()

    def decode(self, get: Callable[[str], torch.Tensor], names: list[str], config: Mapping[str, Any]):
        out, used = {}, set()
        for module in config["quantization_config"]["modules"]:
            codes, scale, zero = (get(f"{module}.{k}") for k in ("codes", "scale", "zero"))
            gs = codes.shape[1] // scale.shape[1]
            out[f"{module}.weight"] = QuantizedWeight(codes.to(torch.int32), scale, zero.float(),
                                                      QuantScheme(4, gs, False))
            used |= {f"{module}.codes", f"{module}.scale", f"{module}.zero"}
        return out, used


@pytest.fixture
def toy_format():
    formats.register(ToyRaw)
    yield FORMATS.get("toy-raw")
    FORMATS._entries.pop("toy-raw")
    FORMATS._help.pop("toy-raw")


@needs_model
def test_a_registered_format_saves_detects_and_reads(tmp_path, toy_format):
    assert "toy-raw: unpacked uint8 codes" in FORMATS.help_text()
    weights = rtn_weights(W4_ASYM, ("q_proj", "k_proj"))
    path = formats.save(make_model(weights), SRC, tmp_path / "toy", "toy-raw")
    assert formats.detect_format(path) == "toy-raw"
    back, floats, _ = formats.read_checkpoint(path)
    for name, qw in weights.items():
        assert_same_weight(back[name], qw)
    assert "model.embed_tokens.weight" in floats and not any(k.endswith(".codes") for k in floats)
    with pytest.raises(LowbitError, match="toy-raw holds integer groups"):
        formats.save(make_model(rtn_weights(QuantScheme(4, -1, False), ("q_proj",))), SRC, tmp_path / "t2", "toy-raw")


# ----------------------------------------------------------------------------- bad checkpoints


def _write(tmp_path: Path, fmt: str, scheme: QuantScheme) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return formats.save(make_model(rtn_weights(scheme, ("q_proj",))), SRC, tmp_path / fmt, fmt)


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


Q = "model.layers.0.self_attn.q_proj"


@needs_model
@pytest.mark.parametrize("fmt, scheme, tensor, problem", [
    ("compressed-tensors", W4_ASYM, "weight_scale", "weight_scale"),
    ("compressed-tensors", W4_ASYM, "weight_zero_point", "weight_zero_point"),
    ("compressed-tensors", W4_ASYM, "weight_packed", "weight_packed"),
    ("gptq", W4_SYM, "scales", "scales have 1 groups"),
    ("gptq", W4_SYM, "qzeros", Q),
    ("awq", W4_ASYM, "scales", "scales"),
    ("awq", W4_ASYM, "qzeros", "qzeros"),
])
def test_bad_tensors_are_one_line_errors_naming_the_tensor(tmp_path, fmt, scheme, tensor, problem):
    path = _write(tmp_path, fmt, scheme)

    def cut(tensors):
        t = tensors[f"{Q}.{tensor}"]
        tensors[f"{Q}.{tensor}"] = t[: t.shape[0] // 2].contiguous() if tensor != "weight_packed" else t[:, :1].contiguous()

    _edit_tensors(path, cut)
    with pytest.raises(LowbitError) as info:
        formats.read(path)
    assert Q in str(info.value) and problem in str(info.value)


@needs_model
@pytest.mark.parametrize("fmt, scheme, edit, problem", [
    ("compressed-tensors", W4_SYM, lambda q: q["config_groups"]["group_0"]["weights"].update(group_size="x"),
     "config.json"),
    ("compressed-tensors", W4_SYM, lambda q: q["config_groups"]["group_0"].update(targets=["re:nothing"]),
     "no config group targets it"),
    ("gptq", W4_SYM, lambda q: q.update(bits=5), "5-bit"),
    ("gptq", W4_SYM, lambda q: q.update(group_size="big"), "config.json"),
    ("gptq", W4_SYM, lambda q: q.update(dynamic={"+:(": {}}), "config.json"),
    ("awq", W4_ASYM, lambda q: q.update(group_size=None), "config.json"),
    ("awq", W4_ASYM, lambda q: q.update(group_size=64), "groups"),
])
def test_bad_configs_are_one_line_errors(tmp_path, fmt, scheme, edit, problem):
    path = _write(tmp_path, fmt, scheme)
    _edit_config(path, edit)
    with pytest.raises(LowbitError, match=problem.replace(".", r"\.").replace("(", r"\(")):
        formats.read(path)


@needs_model
def test_gptq_side_file_and_its_errors(tmp_path):
    path = _write(tmp_path, "gptq", W4_SYM)
    side = json.loads((path / "quantize_config.json").read_text())
    assert side == json.loads((path / "config.json").read_text())["quantization_config"]
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]  # older files: only quantize_config.json says GPTQ
    (path / "config.json").write_text(json.dumps(config))
    assert formats.detect_format(path) == "gptq"
    assert len(formats.read(path)) == 5
    (path / "quantize_config.json").write_text("{bad")
    with pytest.raises(LowbitError, match="quantize_config.json: not valid JSON"):
        formats.read(path)


def test_activation_groups_must_divide_the_input_columns():
    """FP8_BLOCK's dynamic activation groups of 128: a 576-wide input (SmolLM2) is refused at plan
    time for every format (vLLM and compressed-tensors cannot split it either), 512 passes."""
    fp8_block = PRESETS.get("fp8_block").scheme
    plan = {"model.layers.0.self_attn.q_proj.weight": fp8_block, "model.layers.0.mlp.down_proj.weight": fp8_block}
    shapes = {"model.layers.0.self_attn.q_proj.weight": (512, 512), "model.layers.0.mlp.down_proj.weight": (576, 1536)}
    assert check_holds({k: v for k, v in plan.items() if "q_proj" in k}, "compressed-tensors", shapes) is None
    shapes["model.layers.0.self_attn.q_proj.weight"] = (576, 576)
    with pytest.raises(LowbitError, match="activation groups of 128 do not divide the 576 input columns"):
        check_holds(plan, "compressed-tensors", shapes)
