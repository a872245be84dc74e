"""A quantized linear layer that dequantizes on the fly, and a loader for quantized checkpoints.

:class:`QuantLinear` keeps the integer codes bit-packed (one little-endian bit stream per
output row, int32 words), the per-group scales and zero points and an optional act-order
``g_idx``. Its forward pass unpacks and dequantizes the weight in float32, casts it to the
input's dtype and runs ``F.linear``: a plain torch reference that works on CPU and CUDA.

:func:`load_quantized` turns any checkpoint :func:`lowbit.formats.read_checkpoint`
understands (compressed-tensors, GPTQ, AWQ) into a transformers model whose quantized
linear layers are :class:`QuantLinear`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.packing import pack, unpack
from ..core.scheme import PER_CHANNEL, QuantScheme
from ..errors import LowbitError
from ..methods.base import QuantizedWeight

__all__ = ["QuantLinear", "load_quantized", "quantize_model_linears"]


_TRITON: list = []


def _triton_kernel():  # noqa: ANN202 - returns the kernel function or None
    """The CUDA Triton matmul (imported once), or ``None`` when Triton is unavailable."""
    if not _TRITON:
        try:
            from .triton_w4a16 import wna16_linear
        except ImportError:
            wna16_linear = None
        _TRITON.append(wna16_linear)
    return _TRITON[0]


class QuantLinear(nn.Module):
    """``y = x @ dequant(W).T + b`` with ``W`` stored as packed ``bits``-bit codes.

    Buffers: ``qweight`` int32 ``[out, ceil(in*bits/32)]``, ``scales`` float32 ``[out, G]``,
    ``zeros`` float32 ``[out, G]`` (integer values), ``g_idx`` int64 ``[in]`` (group of each
    input column; the default ``j // group_size`` map when there is no act-order), optional
    ``bias``. Set ``cache_weight = True`` to keep the dequantized weight between calls
    (faster repeated forward passes at the cost of the float weight's memory).

    On CUDA, 2/4/8-bit layers run a Triton kernel (:mod:`lowbit.runtime.triton_w4a16`) that
    dequantizes tiles in registers; set the class or instance attribute ``use_triton =
    False`` for the torch reference path.
    """

    use_triton: bool = True

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = False) -> None:
        super().__init__()
        if scheme.group_size == 0:
            raise ValueError("QuantLinear takes per-channel or grouped schemes; convert per-tensor to per-channel")
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        n_groups = scheme.n_groups(in_features)
        words = -(-in_features * scheme.bits // 32)
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch.float32))
        self.register_buffer("zeros", torch.full((out_features, n_groups), float(scheme.mid)))
        default = torch.arange(in_features) // (in_features // n_groups)
        self.register_buffer("g_idx", default.to(torch.int64))
        self.bias: torch.Tensor | None
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.cache_weight = False
        self._cached: torch.Tensor | None = None
        self._grouped: bool | None = None  # g_idx is the default map (checked lazily)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Build from a :class:`QuantizedWeight` (per-tensor schemes become per-channel)."""
        out_f, in_f = qw.codes.shape
        scale, zero, scheme = qw.scale.float(), qw.zero.float(), qw.scheme
        if scheme.group_size == 0:
            scheme = QuantScheme(scheme.bits, PER_CHANNEL, scheme.symmetric)
            scale = scale.reshape(1, 1).expand(out_f, 1)
            zero = zero.reshape(1, 1).expand(out_f, 1)
        m = cls(in_f, out_f, scheme, bias=bias is not None)
        codes = qw.codes.to(torch.int32).cpu()
        pad = (-in_f) % 32
        if pad:
            codes = F.pad(codes, (0, pad))
        m.qweight = pack(codes, scheme.bits, dim=1, dtype=torch.int32)[:, : m.qweight.shape[1]].contiguous().to(qw.codes.device)
        m.scales = scale.contiguous().clone()
        m.zeros = zero.contiguous().clone()
        if qw.g_idx is not None:
            m.g_idx = qw.g_idx.to(torch.int64).clone()
        m._grouped = None
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def codes(self) -> torch.Tensor:
        """The unpacked integer codes, int32 ``[out, in]``."""
        bits = self.scheme.bits
        if 32 % bits:  # 3, 5, 6, 7 bits: values cross word boundaries
            return unpack(self.qweight, bits, self.in_features, dim=1)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=self.qweight.device)
        vals = (self.qweight.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return vals.reshape(self.out_features, -1)[:, : self.in_features]

    def _default_groups(self) -> bool:
        n_groups = self.scales.shape[1]
        if n_groups == 1:
            return True
        default = torch.arange(self.in_features, device=self.g_idx.device) // (self.in_features // n_groups)
        return torch.equal(self.g_idx, default)

    def to_quantized(self) -> QuantizedWeight:
        """The stored weight as a :class:`QuantizedWeight` (``g_idx`` kept only if non-default)."""
        g_idx = None if self._default_groups() else self.g_idx.to(torch.int32)
        return QuantizedWeight(self.codes(), self.scales.clone(), self.zeros.clone(), self.scheme, g_idx)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(codes - zero) * scale`` as ``[out, in]`` in ``dtype`` (computed in float32)."""
        if self._cached is not None and self._cached.dtype == dtype:
            return self._cached
        if self._grouped is None:
            self._grouped = self._default_groups()
        codes = self.codes().float()
        if self._grouped:  # contiguous groups: broadcast [out, G, 1] over [out, G, in/G]
            n_groups = self.scales.shape[1]
            g = codes.reshape(self.out_features, n_groups, -1)
            w = ((g - self.zeros.float().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)).reshape(self.out_features, -1)
        else:  # act-order: gather each column's group
            s = self.scales.float().index_select(1, self.g_idx)
            z = self.zeros.float().index_select(1, self.g_idx)
            w = (codes - z) * s
        w = w.to(dtype)
        if self.cache_weight:
            self._cached = w
        return w

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        self._cached = None  # device / dtype moves invalidate the cache
        self._grouped = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.use_triton and self._cached is None and not self.cache_weight:
            kernel = _triton_kernel()
            if kernel is not None and self.scheme.bits in (2, 4, 8):
                if self._grouped is None:
                    self._grouped = self._default_groups()
                return kernel(x, self.qweight, self.scales, self.zeros, self.g_idx, self.scheme.bits, self.bias,
                              contiguous=self._grouped)
        w = self.dequantized_weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.describe()}, bias={self.bias is not None}"


# ----------------------------------------------------------------------------- model loading


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create module parameters on the meta device (buffers stay real), skipping weight init."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers < 5
            from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef]
        with no_init_weights():
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_model_linears(model: nn.Module, weights: dict[str, QuantizedWeight], floats: dict[str, torch.Tensor]) -> list[str]:
    """Replace each ``nn.Linear`` named in ``weights`` (``<module>.weight``) by a :class:`QuantLinear`.

    A bias for a replaced layer is taken (and removed) from ``floats``. Returns the replaced
    module names.
    """
    replaced = []
    for wname in sorted(weights):
        module_name = wname[: -len(".weight")]
        try:
            old = model.get_submodule(module_name)
        except AttributeError:
            raise LowbitError(module_name, "quantized layer not found in the model built from config.json") from None
        if not isinstance(old, nn.Linear):
            raise LowbitError(module_name, f"quantized layer is a {type(old).__name__}, not a Linear")
        qw = weights[wname]
        if tuple(qw.codes.shape) != (old.out_features, old.in_features):
            raise LowbitError(module_name, f"quantized shape {tuple(qw.codes.shape)} differs from the model's "
                              f"{(old.out_features, old.in_features)}")
        bias = floats.pop(f"{module_name}.bias", None)
        if old.bias is not None and bias is None:
            raise LowbitError(module_name, "the model has a bias here but the checkpoint stores none")
        _set_module(model, module_name, QuantLinear.from_quantized(qw, bias))
        replaced.append(module_name)
    return replaced


def load_quantized(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for a quantized checkpoint folder, ready for ``generate``.

    The transformers model is built from ``config.json`` without allocating or
    initialising its parameters; float tensors (embeddings, norms, unquantized layers) are
    loaded from the checkpoint and every quantized linear layer becomes a
    :class:`QuantLinear`. ``dtype`` defaults to the config's dtype. Raises
    :class:`LowbitError` when the folder is not a quantized checkpoint or a tensor is missing.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..formats import read_checkpoint
    from ..formats._common import model_dtype

    folder = Path(path)
    weights, floats, config = read_checkpoint(folder)
    dtype = dtype or model_dtype(config)
    cfg = AutoConfig.from_pretrained(folder)
    if getattr(cfg, "quantization_config", None) is not None:
        cfg.quantization_config = None
        with contextlib.suppress(AttributeError):
            delattr(cfg, "quantization_config")
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    floats = dict(floats)
    quantize_model_linears(model, weights, floats)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in floats.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise LowbitError(folder, f"tensors the model has no place for: {', '.join(sorted(result.unexpected_keys)[:5])}")
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = sorted(n for n, p in model.named_parameters() if p.device.type == "meta")
    if still_meta:
        raise LowbitError(folder, f"checkpoint lacks tensors: {', '.join(still_meta[:5])}")
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
