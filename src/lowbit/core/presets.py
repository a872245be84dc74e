"""Named schemes users type (``--scheme W4A16``): weights, input activations and KV cache together.

The names and their meaning follow compressed-tensors' preset schemes (``W4A16``, ``W8A8``,
``FP8_DYNAMIC``, ``NVFP4``...) plus bitsandbytes' ``NF4``/``FP4``. A preset is data: adding one is
one :func:`register_preset` call. Which methods can produce a preset and which formats can hold
it is decided by the method and format registries, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lowbit.registry import Registry

from .scheme import QuantScheme


@dataclass(frozen=True)
class Preset:
    """Schemes for a layer's weights, its input activations and the attention's KV cache."""

    name: str
    weights: QuantScheme | None
    input_activations: QuantScheme | None = None
    kv_cache: QuantScheme | None = None
    description: str = ""

    @property
    def weight_only(self) -> bool:
        return self.input_activations is None

    @property
    def scheme(self) -> QuantScheme | None:
        """The weight scheme carrying the input-activation scheme (what a recipe quantizes with)."""
        if self.weights is None or self.input_activations is None:
            return self.weights
        return replace(self.weights, activations=self.input_activations)


PRESETS: Registry[Preset] = Registry("scheme")


def register_preset(preset: Preset) -> Preset:
    PRESETS.add(preset.name, preset, preset.description)
    return preset


def preset(name: str, where: str | None = None) -> Preset:
    """The preset called ``name`` (case-insensitive), or a one-line error listing them."""
    return PRESETS.get(name, where)


_FP8 = dict(bits=8, type="float")
_INT8_TOKEN = QuantScheme(8, 0, True, strategy="token", dynamic=True)

for _p in (
    Preset("W4A16", QuantScheme(4, 128, True), description="int4 weights, groups of 128, symmetric"),
    Preset("W4A16_ASYM", QuantScheme(4, 128, False), description="int4 weights, groups of 128, zero points"),
    Preset("W8A16", QuantScheme(8, -1, True), description="int8 weights per channel"),
    Preset("W8A8", QuantScheme(8, -1, True), _INT8_TOKEN,
           description="int8 weights per channel, int8 activations per token (dynamic)"),
    Preset("INT8", QuantScheme(8, -1, True), _INT8_TOKEN, description="alias of W8A8"),
    Preset("W4A8", QuantScheme(4, 128, True), _INT8_TOKEN,
           description="int4 weights in groups of 128, int8 activations per token (dynamic)"),
    Preset("FP8", QuantScheme(group_size=0, **_FP8), QuantScheme(group_size=0, **_FP8),  # type: ignore[arg-type]
           description="FP8 E4M3 weights and activations, static per-tensor scales"),
    Preset("FP8_DYNAMIC", QuantScheme(group_size=-1, **_FP8),  # type: ignore[arg-type]
           QuantScheme(group_size=0, strategy="token", dynamic=True, **_FP8),  # type: ignore[arg-type]
           description="FP8 E4M3 weights per channel, activations per token (dynamic)"),
    Preset("FP8_BLOCK", QuantScheme(group_size=0, strategy="block", block=(128, 128), **_FP8),  # type: ignore[arg-type]
           QuantScheme(group_size=128, strategy="group", dynamic=True, **_FP8),  # type: ignore[arg-type]
           description="FP8 E4M3 weights in 128x128 blocks, activations in groups of 128 (dynamic)"),
    Preset("NVFP4A16", QuantScheme(4, 16, True, type="float", scale_format="e4m3"),
           description="FP4 E2M1 weights, E4M3 scales per 16, a global scale"),
    Preset("NVFP4", QuantScheme(4, 16, True, type="float", scale_format="e4m3"),
           QuantScheme(4, 16, True, type="float", scale_format="e4m3", dynamic="local"),
           description="FP4 E2M1 weights and activations, E4M3 scales per 16, global scales"),
    Preset("MXFP4A16", QuantScheme(4, 32, True, type="float", scale_format="e8m0"),
           description="FP4 E2M1 weights, power-of-two (E8M0) scales per 32"),
    Preset("MXFP4", QuantScheme(4, 32, True, type="float", scale_format="e8m0"),
           QuantScheme(4, 32, True, type="float", scale_format="e8m0", dynamic=True),
           description="FP4 E2M1 weights and activations, E8M0 scales per 32"),
    Preset("NF4", QuantScheme(4, 64, True, type="codebook", codebook="nf4", strategy="flat"),
           description="bitsandbytes NormalFloat4 codebook, absmax per flat block of 64 (--method bnb)"),
    Preset("FP4", QuantScheme(4, 64, True, type="codebook", codebook="fp4", strategy="flat"),
           description="bitsandbytes FP4 codebook, absmax per flat block of 64 (--method bnb)"),
    Preset("NF4_DQ", QuantScheme(4, 64, True, type="codebook", codebook="nf4", strategy="flat", scale_format="nested8"),
           description="NF4 with double quantization: absmax as 8-bit codes per 256 (QLoRA; --method bnb)"),
    Preset("FP4_DQ", QuantScheme(4, 64, True, type="codebook", codebook="fp4", strategy="flat", scale_format="nested8"),
           description="FP4 with double quantization: absmax as 8-bit codes per 256 (--method bnb)"),
    Preset("LLM_INT8", QuantScheme(8, -1, True),
           description="int8 weights per row, absmax scales (bitsandbytes LLM.int8 with --method bnb)"),
    Preset("LUT4", QuantScheme(4, -1, True, type="codebook", codebook="learned", strategy="channel"),
           description="a learned 16-value lookup table per output row (SqueezeLLM; --method squeezellm)"),
    Preset("LUT3", QuantScheme(3, -1, True, type="codebook", codebook="learned", strategy="channel"),
           description="a learned 8-value lookup table per output row (SqueezeLLM; --method squeezellm)"),
):
    register_preset(_p)
