"""vLLM's native FP8 checkpoints (``quant_method: "fp8"``, ``Fp8Config``): AutoFP8's and DeepSeek-V3's layout.

One quantized linear ``<m>`` (weight ``[out, in]``):

* ``<m>.weight`` float8_e4m3fn ``[out, in]``;
* per tensor: ``<m>.weight_scale`` float32 scalar (0-dim, as AutoFP8 writes it); with static
  activations ``<m>.input_scale`` float32 scalar;
* blocks (``weight_block_size: [rows, cols]``, dynamic activations only): ``<m>.weight_scale_inv``
  float32 ``[ceil(out/rows), ceil(in/cols)]``; despite its name a multiplier (``w = fp8 * scale``),
  DeepSeek-V3's name; blocks that overhang the weight are scaled from its values alone (zero padding).

``config.json`` gains ``quantization_config = {"quant_method": "fp8", "activation_scheme":
"static" | "dynamic", "ignored_layers": [...]}`` (plus ``weight_block_size``). The codes and scales
are those of the ``FP8`` / ``FP8_BLOCK`` presets (llm-compressor's rules, :mod:`lowbit.core.floatq`).
vLLM holds per-tensor or block weights only (per channel: use ``compressed-tensors``); it
re-quantizes fused q/k/v and gate/up with the largest of their per-tensor scales (a warning names
the groups whose scales differ). transformers reads the block layout; its per-tensor names differ
(``weight_scale_inv`` / ``activation_scale``), so per-tensor files are for vLLM.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..core.quantized import QuantizedWeight
from ..core.scheme import QuantScheme
from ..errors import LowbitError
from ._common import decoding, module_of
from .base import Format, register

QUANT_METHOD = "fp8"
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _activation_scheme(scheme: QuantScheme) -> str:
    acts = scheme.activations
    assert acts is not None
    return "dynamic" if acts.dynamic else "static"


class Encoder:
    """vLLM fp8 tensors one module at a time, then the ``quantization_config``."""

    def __init__(self, linears: list[str]) -> None:
        self.linears = linears
        self.modules: list[str] = []
        self.kinds: set[tuple[str, tuple[int, int] | None]] = set()
        self.scales: dict[str, float] = {}

    def add(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        why = VllmFp8().holds(qw.scheme)
        if why is not None:
            raise LowbitError(name, why)
        module = module_of(name)
        self.modules.append(module)
        block = qw.scheme.block if qw.scheme.granularity == "block" else None
        self.kinds.add((_activation_scheme(qw.scheme), block))
        t = {f"{module}.weight": qw.codes.cpu().to(torch.float8_e4m3fn).contiguous()}
        scale = qw.scale.detach().cpu().to(torch.float32)
        if block is None:
            t[f"{module}.weight_scale"] = scale.reshape(())
            self.scales[module] = float(scale.reshape(()))
            if _activation_scheme(qw.scheme) == "static":
                if "input_scale" not in qw.extra:
                    raise LowbitError(name, "static FP8 activations without a calibrated input_scale")
                t[f"{module}.input_scale"] = qw.extra["input_scale"].detach().cpu().to(torch.float32).reshape(())
        else:
            t[f"{module}.weight_scale_inv"] = scale.contiguous()
        return t

    def config(self) -> dict[str, Any]:
        if len(self.kinds) != 1:
            raise LowbitError(None, f"the fp8 format holds one activation scheme and block size per checkpoint, "
                              f"not {sorted(map(str, self.kinds))}")
        (acts, block), = self.kinds
        for parent, group in _fused_groups(self.modules):
            values = {self.scales[m] for m in group if m in self.scales}
            if len(values) > 1:
                warnings.warn(f"{parent}: {', '.join(m.rsplit('.', 1)[1] for m in group)} have different per-tensor "
                              "scales; vLLM fuses them and re-quantizes with the largest (use FP8_DYNAMIC's "
                              "per-channel scales in compressed-tensors to avoid it)", stacklevel=3)
        quantized = set(self.modules)
        qconfig: dict[str, Any] = {"quant_method": QUANT_METHOD, "activation_scheme": acts,
                                   "ignored_layers": sorted(m for m in self.linears if m not in quantized)}
        if block is not None:
            qconfig["weight_block_size"] = list(block)
        return qconfig


def _fused_groups(modules: list[str]) -> list[tuple[str, list[str]]]:
    have = set(modules)
    out = []
    for parent in sorted({m.rsplit(".", 1)[0] for m in modules if "." in m}):
        for group in FUSED:
            members = [f"{parent}.{g}" for g in group]
            if all(m in have for m in members):
                out.append((parent, members))
    return out


def _scheme(qconfig: Mapping[str, Any], block: bool) -> QuantScheme:
    acts_kind = qconfig.get("activation_scheme")
    if acts_kind not in ("static", "dynamic"):
        raise LowbitError("config.json", f"quantization_config.activation_scheme must be 'static' or 'dynamic', "
                          f"not {acts_kind!r}")
    fp8 = dict(bits=8, type="float")
    if block:
        size = qconfig.get("weight_block_size")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise LowbitError("config.json", f"quantization_config.weight_block_size must be [rows, cols], not {size!r}")
        acts = QuantScheme(group_size=size[1], strategy="group", dynamic=True, **fp8)  # type: ignore[arg-type]
        return QuantScheme(group_size=0, strategy="block", block=(size[0], size[1]), activations=acts,
                           **fp8)  # type: ignore[arg-type]
    if acts_kind == "static":
        acts = QuantScheme(group_size=0, **fp8)  # type: ignore[arg-type]
    else:
        acts = QuantScheme(group_size=0, strategy="token", dynamic=True, **fp8)  # type: ignore[arg-type]
    return QuantScheme(group_size=0, activations=acts, **fp8)  # type: ignore[arg-type]


@register
class VllmFp8(Format):
    """vLLM's native FP8 (quant_method fp8): per-tensor weight_scale/input_scale or 128x128 weight_scale_inv"""

    name = "fp8"
    quant_method = QUANT_METHOD
    rank = 40

    def holds(self, scheme: QuantScheme) -> str | None:
        if scheme.type != "float" or scheme.float_format != "e4m3":
            return f"the fp8 format holds FP8 E4M3 weights, not {scheme.describe()}"
        if scheme.granularity not in ("tensor", "block"):
            return (f"vLLM's fp8 format holds per-tensor or block FP8 weights, not {scheme.granularity} ones "
                    "(per-channel FP8 is written as compressed-tensors)")
        acts = scheme.activations
        if acts is None or acts.type != "float" or acts.bits != 8:
            return "vLLM's fp8 format always quantizes activations to FP8: use FP8, FP8_DYNAMIC or FP8_BLOCK"
        if scheme.granularity == "block" and not acts.dynamic:
            return "vLLM's fp8 block weights take dynamic activations only"
        if scheme.granularity == "tensor" and acts.dynamic is False and acts.granularity != "tensor":
            return f"vLLM's fp8 static activations are per tensor, not {acts.granularity}"
        return None

    def plan_issue(self, plan: Mapping[str, QuantScheme]) -> str | None:
        kinds = {("dynamic" if s.activations and s.activations.dynamic else "static", s.block) for s in plan.values()}
        if len(kinds) > 1:
            return "one activation scheme and one block size for every tensor (its config has one of each)"
        return None

    def encoder(self, config: Mapping[str, Any], linears: list[str], dtype: torch.dtype) -> Encoder:
        return Encoder(linears)

    def decode(
        self, get: Callable[[str], torch.Tensor], names: list[str], config: Mapping[str, Any]
    ) -> tuple[dict[str, QuantizedWeight], set[str]]:
        qconfig = config.get("quantization_config") or {}
        have = set(names)
        out: dict[str, QuantizedWeight] = {}
        used: set[str] = set()
        for scale_name in sorted(n for n in names if n.endswith((".weight_scale", ".weight_scale_inv"))):
            block = scale_name.endswith("_inv")
            module = scale_name[: -len(".weight_scale_inv" if block else ".weight_scale")]
            w_name = f"{module}.weight"
            with decoding(module):
                scheme = _scheme(qconfig, block)
                weight, scale = get(w_name), get(scale_name).to(torch.float32)
                if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
                    raise LowbitError(w_name, f"{weight.dtype} {tuple(weight.shape)}, expected float8_e4m3fn [out, in]")
                out_f, in_f = weight.shape
                if block:
                    assert scheme.block is not None
                    want = (-(-out_f // scheme.block[0]), -(-in_f // scheme.block[1]))
                    if tuple(scale.shape) != want:
                        raise LowbitError(scale_name, f"shape {tuple(scale.shape)}, expected {want}")
                elif scale.numel() != 1:
                    raise LowbitError(scale_name, f"shape {tuple(scale.shape)}, expected one per-tensor scale")
                else:
                    scale = scale.reshape(1, 1)
                extra = {}
                if f"{module}.input_scale" in have:
                    extra["input_scale"] = get(f"{module}.input_scale").to(torch.float32).reshape(1)
                    used.add(f"{module}.input_scale")
            out[w_name] = QuantizedWeight(weight, scale, None, scheme, extra=extra)
            used |= {w_name, scale_name}
        return out, used
