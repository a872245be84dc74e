"""The one result type: a quantized 2-D weight with named parameters, and its reference dequantization.

Every method fills a :class:`QuantizedWeight`; every format reads one. Its parameters:

* ``codes`` ``[out, in]``: integer grid codes (``type="int"``, unsigned in ``[0, 2**bits - 1]``),
  minifloat values (``type="float"``: stored in their torch float8 dtype for E4M3/E5M2, or as
  4-bit indices into :data:`E2M1_VALUES` in a uint8 for E2M1), or indices into ``codebook``;
* ``scale``: one per group (``[out, n_groups]``), per row (``[out, 1]``), per tensor
  (``[1, 1]``), per block (``[ceil(out / rows), ceil(in / cols)]``) or per flat block
  (``[ceil(out * in / group_size)]``: the ``flat`` strategy, blocks of the row-major weight);
* ``zero``: integer grids' zero points, same shape as ``scale``; a float where the grid's offset
  is not an integer (HQQ's zero points, a GGUF K-quant's ``minimum / scale``); ``None`` for
  float and codebook schemes;
* ``global_scale``: a per-tensor second-level scale (NVFP4); values are divided by it;
* ``codebook``: the table of values (``[2**bits]`` shared, or ``[out, 2**bits]`` per row);
* ``g_idx``: int32 ``[in]`` group of every input column (act-order GPTQ), else column ``j``
  belongs to group ``j // group_size``;
* ``extra``: nested statistics a format may need (double-quantized absmax codes, ...), named.

:meth:`QuantizedWeight.dequantize` is the reference every kernel and format is tested against:
``int: (codes - zero) * scale``; ``float: value(codes) * scale``; ``codebook: codebook[codes] *
scale``; then ``/ global_scale`` when set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch

from lowbit.errors import LowbitError

from .lut import sparse_dense
from .scheme import QuantScheme

# FP4 E2M1: index bit 3 is the sign, bits 0-2 the magnitude code (as NVFP4, MXFP4 and GGUF store it).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def e2m1_table(device: torch.device | str | None = None) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


def _expand_blocks(p: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    out_f, in_f = shape
    return p.repeat_interleave(block[0], 0)[:out_f].repeat_interleave(block[1], 1)[:, :in_f]


@dataclass
class QuantizedWeight:
    """Codes and named parameters of one quantized 2-D weight ``[out, in]`` (see the module doc)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    scheme: QuantScheme
    g_idx: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    codebook: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.codes.dim() != 2:
            raise LowbitError(None, f"codes must be 2-D [out, in], got {tuple(self.codes.shape)}")
        if self.zero is not None and self.scale.shape != self.zero.shape:
            raise LowbitError(None, f"scale {tuple(self.scale.shape)} and zero {tuple(self.zero.shape)} differ")
        if self.scheme.type == "int" and self.zero is None:
            raise LowbitError(None, "an integer grid needs zero points")
        if self.g_idx is not None and self.g_idx.shape != (self.codes.shape[1],):
            raise LowbitError(None, f"g_idx must have shape [{self.codes.shape[1]}], got {tuple(self.g_idx.shape)}")
        if self.scheme.type == "codebook" and self.codebook is None:
            raise LowbitError(None, f"a {self.scheme.codebook} codebook scheme needs its codebook")

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def column_groups(self) -> torch.Tensor:
        """Group index (int64 ``[in]``) of every input column, with or without ``g_idx``."""
        in_f = self.codes.shape[1]
        if self.g_idx is not None:
            return self.g_idx.to(torch.int64)
        n_groups = self.scale.shape[1]
        return torch.arange(in_f, device=self.codes.device) // (in_f // n_groups)

    def _per_element(self, p: torch.Tensor) -> torch.Tensor:
        out_f, in_f = self.codes.shape
        if self.scheme.granularity == "block":
            assert self.scheme.block is not None
            return _expand_blocks(p.float(), (out_f, in_f), self.scheme.block)
        if self.scheme.granularity == "flat":  # blocks of the row-major weight, spanning rows
            per = p.float().reshape(-1).repeat_interleave(self.scheme.group_size)
            return per[: out_f * in_f].reshape(out_f, in_f)
        if p.numel() == 1:
            return p.float().reshape(1, 1).expand(out_f, in_f)
        return p.float()[:, self.column_groups()]

    def values(self) -> torch.Tensor:
        """The grid values before scaling: ``codes - zero``, the minifloats, or ``codebook[codes]``."""
        kind = self.scheme.type
        if kind == "int":
            assert self.zero is not None
            return self.codes.float() - self._per_element(self.zero)
        if kind == "float":
            if self.codes.dtype.is_floating_point:
                return self.codes.float()
            return e2m1_table(self.codes.device)[self.codes.long()]
        assert self.codebook is not None
        book = self.codebook.float()
        if book.dim() == 1:
            return book[self.codes.long()]
        return torch.gather(book, 1, self.codes.long())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]`` (the reference for every kernel and format)."""
        if self.scheme.type == "int" and self.scheme.granularity != "block":
            # written out for the integer grid so that its float results stay exactly as they were
            out_f, in_f = self.codes.shape
            assert self.zero is not None
            if self.scale.numel() == 1:
                s = self.scale.reshape(1, 1).expand(out_f, in_f)
                z = self.zero.reshape(1, 1).expand(out_f, in_f)
            else:
                idx = self.column_groups()
                s = self.scale.float()[:, idx]
                z = self.zero.float()[:, idx]
            w = (self.codes.float() - z) * s
        else:
            w = self.values() * self._per_element(self.scale)
        if self.global_scale is not None:
            w = w / self.global_scale.float().reshape(1, 1)
        sparse = sparse_dense(self.extra, (w.shape[0], w.shape[1]), w.device)
        if sparse is not None:  # dense-and-sparse (SqueezeLLM): the outliers' float32 remainders
            w = w + sparse
        return w.to(dtype)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedWeight:
        def opt(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return replace(self, codes=fn(self.codes), scale=fn(self.scale), zero=opt(self.zero), g_idx=opt(self.g_idx),
                       global_scale=opt(self.global_scale), codebook=opt(self.codebook),
                       extra={k: fn(v) for k, v in self.extra.items()})

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy on ``device``."""
        return self._map(lambda t: t.to(device))

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """The rows ``[start, stop)`` (parameters shared by every row, such as ``g_idx``, kept)."""
        if self.scheme.granularity in ("tensor", "block", "flat") or self.extra:
            raise LowbitError(None, f"cannot split a {self.scheme.describe()} weight by rows")
        sl = slice(start, stop)
        book = self.codebook
        if book is not None and book.dim() == 2:
            book = book[sl].contiguous()
        return replace(self, codes=self.codes[sl].contiguous(), scale=self.scale[sl].contiguous(),
                       zero=None if self.zero is None else self.zero[sl].contiguous(), codebook=book)

    # --- flat tensors, for result files ---------------------------------------------------------

    _OPTIONAL = ("g_idx", "global_scale", "codebook")

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat CPU tensors (``codes``, ``scale``, ``zero`` and whatever else is set) for saving."""
        out = {f"{prefix}codes": self.codes, f"{prefix}scale": self.scale}
        if self.zero is not None:
            out[f"{prefix}zero"] = self.zero
        for name in self._OPTIONAL:
            t = getattr(self, name)
            if t is not None:
                out[f"{prefix}{name}"] = t
        for name, t in self.extra.items():
            out[f"{prefix}extra.{name}"] = t
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], scheme: QuantScheme, prefix: str = "") -> QuantizedWeight:
        """Inverse of :meth:`tensors`."""
        extra = {k[len(prefix) + 6 :]: v for k, v in t.items() if k.startswith(f"{prefix}extra.")}
        return cls(t[f"{prefix}codes"], t[f"{prefix}scale"], t.get(f"{prefix}zero"), scheme,
                   g_idx=t.get(f"{prefix}g_idx"), global_scale=t.get(f"{prefix}global_scale"),
                   codebook=t.get(f"{prefix}codebook"), extra=extra)


@dataclass
class QuantizedModel:
    """The result of quantizing a whole model.

    ``weights`` maps HF weight names (``model.layers.0.self_attn.q_proj.weight``) to their
    quantized form; ``float_overrides`` maps HF names to float tensors that replace the original
    ones (AWQ-folded norms, a MoE router); every other tensor is the original checkpoint's.
    ``config`` is the HF model config (a dict) plus ``info`` about the run (``config["lowbit"]``).
    Both mappings may be read-only views over results on disk
    (:class:`~lowbit.models.store.StoredWeights`) that read one tensor per access.
    """

    weights: Mapping[str, QuantizedWeight]
    float_overrides: Mapping[str, torch.Tensor]
    config: dict
    method: str
