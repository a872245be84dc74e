"""The numeric scheme of an integer grid: bits, grouping and symmetry. No models, no files."""

from __future__ import annotations

from dataclasses import dataclass

PER_CHANNEL = -1
PER_TENSOR = 0


@dataclass(frozen=True)
class QuantScheme:
    """An affine integer grid ``w ~ (q - zero) * scale`` with ``q`` in ``[0, 2**bits - 1]``.

    ``group_size`` > 0 shares one scale among that many consecutive input columns of a row;
    ``-1`` (``PER_CHANNEL``) one scale per output row; ``0`` (``PER_TENSOR``) one for the tensor.
    Symmetric grids fix ``zero = 2**(bits-1)`` (stored signed as ``q - zero``).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size < -1:
            raise ValueError(f"group_size must be > 0, -1 (per channel) or 0 (per tensor), got {self.group_size}")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def mid(self) -> int:
        """The zero point of a symmetric grid."""
        return 1 << (self.bits - 1)

    @property
    def granularity(self) -> str:
        if self.group_size > 0:
            return "group"
        return "channel" if self.group_size == PER_CHANNEL else "tensor"

    def n_groups(self, in_features: int) -> int:
        """Groups per row; raises ``ValueError`` when the group size does not divide the row."""
        if self.group_size <= 0:
            return 1
        if in_features % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide the row length {in_features}"
            )
        return in_features // self.group_size

    def describe(self) -> str:
        g = {"group": f"g{self.group_size}", "channel": "per-channel", "tensor": "per-tensor"}[self.granularity]
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} {g}"
