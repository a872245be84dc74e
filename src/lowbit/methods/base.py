"""The format-agnostic result of quantizing one linear layer's weight."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lowbit.core.scheme import QuantScheme


@dataclass
class QuantizedWeight:
    """Integer codes and affine parameters of one 2-D weight ``[out, in]``.

    ``codes`` are unsigned ints in ``[0, 2**bits - 1]`` (int32 ``[out, in]``); ``scale`` and
    ``zero`` are float ``[out, n_groups]`` (``zero`` holds integers, except on a GGUF K-quant grid where
    it is ``minimum / scale``); ``w ~ (q - zero) * scale``.
    ``g_idx`` (int32 ``[in]``), when set, names the group of each input column (act-order GPTQ);
    when ``None`` column ``j`` belongs to group ``j // group_size`` (or group 0 per channel).
    Per-tensor schemes store ``scale``/``zero`` as ``[1, 1]``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scheme: QuantScheme
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.codes.dim() != 2:
            raise ValueError(f"codes must be 2-D [out, in], got {tuple(self.codes.shape)}")
        if self.scale.shape != self.zero.shape:
            raise ValueError(f"scale {tuple(self.scale.shape)} and zero {tuple(self.zero.shape)} differ")
        if self.g_idx is not None and self.g_idx.shape != (self.codes.shape[1],):
            raise ValueError(f"g_idx must have shape [{self.codes.shape[1]}], got {tuple(self.g_idx.shape)}")

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

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``(codes - zero) * scale`` as ``[out, in]``."""
        out_f, in_f = self.codes.shape
        if self.scale.numel() == 1:
            s = self.scale.reshape(1, 1).expand(out_f, in_f)
            z = self.zero.reshape(1, 1).expand(out_f, in_f)
        else:
            idx = self.column_groups()
            s = self.scale.float()[:, idx]
            z = self.zero.float()[:, idx]
        return ((self.codes.float() - z) * s).to(dtype)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """A copy on ``device``."""
        return QuantizedWeight(
            self.codes.to(device),
            self.scale.to(device),
            self.zero.to(device),
            self.scheme,
            None if self.g_idx is None else self.g_idx.to(device),
        )

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat CPU tensors (``codes``, ``scale``, ``zero``, optional ``g_idx``) for saving."""
        out = {f"{prefix}codes": self.codes, f"{prefix}scale": self.scale, f"{prefix}zero": self.zero}
        if self.g_idx is not None:
            out[f"{prefix}g_idx"] = self.g_idx
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], scheme: QuantScheme, prefix: str = "") -> "QuantizedWeight":
        """Inverse of :meth:`tensors`."""
        return cls(t[f"{prefix}codes"], t[f"{prefix}scale"], t[f"{prefix}zero"], scheme, t.get(f"{prefix}g_idx"))


@dataclass
class QuantizedModel:
    """The result of quantizing a whole model.

    ``weights`` maps HF weight names (``model.layers.0.self_attn.q_proj.weight``) to their
    quantized form; ``float_overrides`` maps HF names to float tensors that replace the original
    ones (AWQ-folded norms, a MoE router); every other tensor is the original checkpoint's.
    ``config`` is the HF model config (a dict) plus ``info`` about the run (``config["lowbit"]``).
    Both mappings may be read-only views over results on disk
    (:class:`~lowbit.methods.store.StoredWeights`) that read one tensor per access.
    """

    weights: Mapping[str, QuantizedWeight]
    float_overrides: Mapping[str, torch.Tensor]
    config: dict
    method: str
