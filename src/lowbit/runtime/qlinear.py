"""A quantized linear layer that picks a kernel per layer, and a loader for quantized checkpoints.

:class:`QuantLinear` keeps an integer weight bit-packed (one little-endian bit stream per
output row, int32 words) with its per-group scales and zero points and an optional act-order
``g_idx``; weights of any other scheme (minifloats, codebooks, block scales) keep the tensors of
their :class:`~lowbit.core.quantized.QuantizedWeight`. Its forward pass runs the kernel that
:func:`lowbit.runtime.kernels.select` picks for the layer, the device, the input's shape and
dtype: a registered kernel of :mod:`lowbit.runtime.kernels` (Triton on CUDA for 2/4/8-bit
integers), else the torch reference that dequantizes in float32 and runs ``F.linear``.
``QuantLinear.kernel = "torch"`` (class or instance) or ``LOWBIT_KERNEL=torch`` forces the reference.

A layer may also quantize its input activations (``input_scheme``; ``None`` = float inputs):
the reference applies :func:`~lowbit.runtime.activations.fake_quantize_input`, dynamic per
token / group / tensor or static per tensor with the ``input_scale`` buffer.

:func:`load_quantized` turns any checkpoint :func:`lowbit.formats.read_checkpoint`
understands (compressed-tensors, GPTQ, AWQ) into a transformers model whose quantized
linear layers are :class:`QuantLinear`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.packing import pack, unpack
from ..core.quantized import QuantizedWeight
from ..core.scheme import PER_CHANNEL, QuantScheme
from ..errors import LowbitError
from .activations import check_input_scheme, declared_inputs
from .kernels import select

__all__ = ["QuantLinear", "load_quantized", "quantize_model_linears"]

#: ``extra`` tensors of a :class:`QuantizedWeight` kept as buffers (``lowbit.core.lut``'s CSR outliers)
SPARSE = ("sparse_rows", "sparse_cols", "sparse_vals")


def _packable(scheme: QuantScheme) -> bool:
    """Integer grids with one scale per row or per group: stored bit-packed."""
    return scheme.type == "int" and scheme.granularity in ("group", "channel")


class QuantLinear(nn.Module):
    """``y = x @ dequant(W).T + b`` with ``W`` stored quantized (see the module doc).

    Packed integer layers: buffers ``qweight`` int32 ``[out, ceil(in*bits/32)]``, ``scales``
    float32 ``[out, G]``, ``zeros`` float32 ``[out, G]`` (integer values), ``g_idx`` int64
    ``[in]`` (group of each input column; the default ``j // group_size`` map when there is no
    act-order). Other schemes: ``qweight`` holds the codes unpacked (their own dtype),
    ``scales`` / ``zeros`` / ``g_idx`` those of the weight, plus ``global_scale`` and
    ``codebook`` where set. Optional: ``bias``, and ``input_scale`` (float32 ``[1]``) for a
    static ``input_scheme``. Set ``cache_weight = True`` to keep the dequantized weight between
    calls (faster repeated forward passes at the cost of the float weight's memory).

    ``kernel``: ``None`` (default) picks the best registered kernel per call; a kernel name
    (``"torch"``, ``"triton-wna16"``) forces it.
    """

    kernel: str | None = None

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = False,
                 input_scheme: QuantScheme | None = None, input_scale: torch.Tensor | float | None = None) -> None:
        super().__init__()
        if scheme.granularity == "tensor" and scheme.type == "int":
            raise LowbitError(None, "QuantLinear takes per-channel or grouped integer schemes; convert per-tensor "
                              "to per-channel (QuantLinear.from_quantized does)")
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.packed = _packable(scheme)
        if self.packed:
            n_groups = scheme.n_groups(in_features)
            words = -(-in_features * scheme.bits // 32)
            self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32))
            self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch.float32))
            self.register_buffer("zeros", torch.full((out_features, n_groups), float(scheme.mid)))
            default = torch.arange(in_features) // (in_features // n_groups)
            self.register_buffer("g_idx", default.to(torch.int64))
        else:  # filled by from_quantized
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int32))
            self.register_buffer("scales", torch.ones(1, 1))
            self.register_buffer("zeros", None)
            self.register_buffer("g_idx", None)
        self.global_scale: torch.Tensor | None
        self.codebook: torch.Tensor | None
        self.register_buffer("global_scale", None)
        self.register_buffer("codebook", None)
        self.sparse_rows: torch.Tensor | None  # dense-and-sparse (SqueezeLLM): a CSR remainder added to the weight
        self.sparse_cols: torch.Tensor | None
        self.sparse_vals: torch.Tensor | None
        for name in SPARSE:
            self.register_buffer(name, None)
        self.bias: torch.Tensor | None
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.input_scheme: QuantScheme | None = None
        self.input_scale: torch.Tensor | None
        self.register_buffer("input_scale", None)
        self.set_input_scheme(input_scheme, input_scale)
        self.cache_weight = False
        self._cached: torch.Tensor | None = None
        self._grouped: bool | None = None  # g_idx is the default map (checked lazily)

    def set_input_scheme(self, scheme: QuantScheme | None, input_scale: torch.Tensor | float | None = None) -> None:
        """Quantize input activations with ``scheme`` (``None``: float inputs); a static scheme needs ``input_scale``."""
        if scheme is not None:
            check_input_scheme(scheme)
            if not scheme.dynamic and input_scale is None:
                raise LowbitError(None, f"input activations {scheme.describe()}: a static scheme needs input_scale")
        self.input_scheme = scheme
        if scheme is None or scheme.dynamic:
            self.input_scale = None
        else:
            s = torch.as_tensor(input_scale, dtype=torch.float32).detach().reshape(-1).clone()
            if s.numel() != 1 or not bool(torch.isfinite(s).all()) or float(s) <= 0:
                raise LowbitError(None, f"input_scale must be one positive finite value, got {s.tolist()}")
            self.input_scale = s.to(self.qweight.device)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       input_scheme: QuantScheme | None = None,
                       input_scale: torch.Tensor | float | None = None) -> QuantLinear:
        """Build from a :class:`QuantizedWeight` (per-tensor integer schemes become per-channel)."""
        out_f, in_f = qw.codes.shape
        scheme = qw.scheme
        if scheme.type == "int" and scheme.granularity == "tensor":
            assert qw.zero is not None
            scheme = replace(scheme, group_size=PER_CHANNEL, strategy=None)
            qw = replace(qw, scheme=scheme, scale=qw.scale.reshape(1, 1).expand(out_f, 1),
                         zero=qw.zero.reshape(1, 1).expand(out_f, 1))
        m = cls(in_f, out_f, scheme, bias=bias is not None)
        if m.packed:
            assert qw.zero is not None
            codes = qw.codes.to(torch.int32).cpu()
            pad = (-in_f) % 32
            if pad:
                codes = F.pad(codes, (0, pad))
            words = m.qweight.shape[1]
            m.qweight = pack(codes, scheme.bits, dim=1, dtype=torch.int32)[:, :words].contiguous().to(qw.codes.device)
            m.scales = qw.scale.float().contiguous().clone()
            m.zeros = qw.zero.float().contiguous().clone()
            if qw.g_idx is not None:
                m.g_idx = qw.g_idx.to(torch.int64).clone()
        else:
            m.qweight = qw.codes.detach().clone()
            m.scales = qw.scale.detach().clone()
            m.zeros = None if qw.zero is None else qw.zero.detach().clone()
            m.g_idx = None if qw.g_idx is None else qw.g_idx.to(torch.int64).clone()
            m.codebook = None if qw.codebook is None else qw.codebook.detach().clone()
            for name in SPARSE:
                if name in qw.extra:
                    setattr(m, name, qw.extra[name].detach().clone())
        m.global_scale = None if qw.global_scale is None else qw.global_scale.detach().clone()
        m._grouped = None
        if bias is not None:
            m.bias = bias.detach().clone()
        m.set_input_scheme(input_scheme, input_scale)
        return m

    def codes(self) -> torch.Tensor:
        """The codes ``[out, in]`` (unpacked int32 for packed layers, as stored otherwise)."""
        if not self.packed:
            return self.qweight
        bits = self.scheme.bits
        if 32 % bits:  # 3, 5, 6, 7 bits: values cross word boundaries
            return unpack(self.qweight, bits, self.in_features, dim=1)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=self.qweight.device)
        vals = (self.qweight.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return vals.reshape(self.out_features, -1)[:, : self.in_features]

    def default_groups(self) -> bool:
        """Whether ``g_idx`` is the default ``column // group_size`` map (cached; moves reset it)."""
        if self._grouped is None:
            self._grouped = self._default_groups()
        return self._grouped

    def _default_groups(self) -> bool:
        if self.g_idx is None:
            return True
        n_groups = self.scales.shape[1]
        if n_groups == 1:
            return True
        default = torch.arange(self.in_features, device=self.g_idx.device) // (self.in_features // n_groups)
        return torch.equal(self.g_idx, default)

    def to_quantized(self) -> QuantizedWeight:
        """The stored weight as a :class:`QuantizedWeight` (``g_idx`` kept only if non-default)."""
        g_idx = None if self._default_groups() else self.g_idx.to(torch.int32)  # type: ignore[union-attr]
        extra = {n: t for n in SPARSE if (t := getattr(self, n)) is not None}
        return QuantizedWeight(self.codes(), self.scales.clone(), None if self.zeros is None else self.zeros.clone(),
                               self.scheme, g_idx, global_scale=self.global_scale, codebook=self.codebook, extra=extra)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[out, in]`` in ``dtype``, as :meth:`QuantizedWeight.dequantize` computes it (float32)."""
        if self._cached is not None and self._cached.dtype == dtype:
            return self._cached
        if not self.packed:
            w = self.to_quantized().dequantize(torch.float32)
        else:
            assert self.zeros is not None
            codes = self.codes().float()
            if self.default_groups():  # contiguous groups: broadcast [out, G, 1] over [out, G, in/G]
                n_groups = self.scales.shape[1]
                g = codes.reshape(self.out_features, n_groups, -1)
                w = ((g - self.zeros.float().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)).reshape(self.out_features, -1)
            else:  # act-order: gather each column's group
                assert self.g_idx is not None
                s = self.scales.float().index_select(1, self.g_idx)
                z = self.zeros.float().index_select(1, self.g_idx)
                w = (codes - z) * s
            if self.global_scale is not None:
                w = w / self.global_scale.float().reshape(1, 1)
        w = w.to(dtype)
        if self.cache_weight:
            self._cached = w
        return w

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def,override]
        self._cached = None  # device / dtype moves invalidate the cache
        self._grouped = None
        return super()._apply(fn, recurse)

    def describe(self) -> str:
        """``[out, in] int4 sym g32`` (plus the input scheme), for messages."""
        text = f"[{self.out_features}, {self.in_features}] {self.scheme.describe()}"
        if self.input_scheme is not None:
            text += f", inputs {self.input_scheme.describe()}"
        return text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select(self, x).forward(self, x)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.describe()}"
        if self.input_scheme is not None:
            text += f", input={self.input_scheme.describe()}"
        return text + f", bias={self.bias is not None}"


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

    A bias for a replaced layer is taken (and removed) from ``floats``; the input-activation
    quantization a weight declares (W8A8, FP8) is applied by the layer. Returns the replaced
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
        try:
            layer = QuantLinear.from_quantized(qw, bias, *declared_inputs(qw))
        except LowbitError as exc:
            raise LowbitError(exc.where or module_name, exc.problem) from None
        _set_module(model, module_name, layer)
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
    from ..models.validate import config_errors

    with config_errors(folder / "config.json"):  # a config transformers refuses: one line naming it
        cfg = AutoConfig.from_pretrained(folder)
        if getattr(cfg, "quantization_config", None) is not None:
            cfg.quantization_config = None
            with contextlib.suppress(AttributeError):
                delattr(cfg, "quantization_config")
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    floats = dict(floats)
    for name in sorted(weights):  # one layer at a time: each decoded weight is freed once packed
        quantize_model_linears(model, {name: weights.pop(name)}, floats)
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
