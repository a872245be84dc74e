"""The one description of a numeric scheme, for weights, input activations and the KV cache.

Modelled on compressed-tensors' ``QuantizationArgs`` so that writing its config is a
translation (:meth:`QuantScheme.to_quantization_args`), not a guess. No models, no files.

A scheme says:

* ``type``: ``"int"`` (an affine integer grid), ``"float"`` (a minifloat: E4M3, E5M2, E2M1)
  or ``"codebook"`` (an index into a table of values: NF4, FP4, a learned per-channel table);
* ``bits``;
* the strategy, i.e. which values share a scale: ``tensor``, ``channel`` (one per output row),
  ``group`` (``group_size`` consecutive input columns of a row), ``block`` (``block`` =
  rows x columns tiles), ``token`` (one per row of an activation), ``head`` (one per KV head) or
  ``flat`` (``group_size`` consecutive values of the row-major flattened weight: blocks may span
  rows, the last may be short; bitsandbytes).
  For weights it follows ``group_size`` (> 0 group, -1 channel, 0 tensor) unless given;
* symmetric or not (integer grids only: asymmetric grids carry zero points);
* static (scales fixed at quantization time) or dynamic (computed at run time; ``"local"``
  for NVFP4 activations: dynamic local scales under a static global scale);
* the format of the scales themselves: ``None`` (the model's float type), ``"float32"``,
  ``"bfloat16"``, ``"float16"``, ``"e4m3"`` (NVFP4) or ``"e8m0"`` (MXFP4, powers of two).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from lowbit.errors import LowbitError

PER_CHANNEL = -1
PER_TENSOR = 0

TYPES = ("int", "float", "codebook")
STRATEGIES = ("tensor", "channel", "group", "block", "token", "head", "flat")
# "nested8": the scales coded again, 8-bit dynamic-map codes in blocks of 256 around their mean
# (bitsandbytes' double quantization, lowbit.core.codebook)
SCALE_FORMATS = ("float32", "bfloat16", "float16", "e4m3", "e8m0", "nested8")


@dataclass(frozen=True)
class FloatFormat:
    """A minifloat element format: exponent and mantissa bits and its largest finite value."""

    name: str
    exponent: int
    mantissa: int
    max: float

    @property
    def bits(self) -> int:
        return 1 + self.exponent + self.mantissa


FLOAT_FORMATS = {
    "e4m3": FloatFormat("e4m3", 4, 3, 448.0),  # torch.float8_e4m3fn (no infinities)
    "e5m2": FloatFormat("e5m2", 5, 2, 57344.0),
    "e2m1": FloatFormat("e2m1", 2, 1, 6.0),  # FP4 of NVFP4 / MXFP4
}
DEFAULT_FLOAT_FORMAT = {8: "e4m3", 4: "e2m1"}


@dataclass(frozen=True)
class QuantScheme:
    """How one tensor (a weight, an activation, keys or values) is quantized.

    The first three fields keep the historical positional form ``QuantScheme(bits, group_size,
    symmetric)`` of an integer weight grid ``w ~ (q - zero) * scale`` with ``q`` in
    ``[0, 2**bits - 1]``; symmetric integer grids fix ``zero = 2**(bits-1)`` (stored signed as
    ``q - zero``).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    type: str = "int"
    strategy: str | None = None  # None: from group_size (group / channel / tensor)
    block: tuple[int, int] | None = None  # rows x columns of a "block" tile
    dynamic: bool | str = False  # False static, True dynamic, "local" (dynamic under a static global scale)
    scale_format: str | None = None  # None: the model's float type
    float_format: str | None = None  # type "float": e4m3 / e5m2 / e2m1 (default by bits)
    codebook: str | None = None  # type "codebook": its name (nf4, fp4, learned)
    # A weight scheme's companion: how the layer's input activations are quantized (W8A8, FP8,
    # NVFP4...), written into the checkpoint's config; None: weight-only.
    activations: QuantScheme | None = None

    def __post_init__(self) -> None:
        def bad(problem: str) -> LowbitError:
            return LowbitError(None, f"scheme {self.describe_raw()}: {problem}")

        if self.type not in TYPES:
            raise bad(f"unknown type {self.type!r} (choose from {', '.join(TYPES)})")
        if self.type == "int" and not 1 <= self.bits <= 8:
            raise LowbitError(None, f"bits must be between 1 and 8, got {self.bits}")
        if self.type == "codebook" and not 1 <= self.bits <= 8:
            raise bad(f"codebook bits must be between 1 and 8, got {self.bits}")
        if self.type == "float":
            fmt = self.float_format or DEFAULT_FLOAT_FORMAT.get(self.bits)
            if fmt not in FLOAT_FORMATS or FLOAT_FORMATS[fmt].bits != self.bits:
                raise bad(f"no float format of {self.bits} bits named {self.float_format!r} "
                          f"(choose from {', '.join(f'{k} ({v.bits} bits)' for k, v in FLOAT_FORMATS.items())})")
            object.__setattr__(self, "float_format", fmt)
        elif self.float_format is not None:
            raise bad("float_format applies to float types only")
        if self.group_size < -1:
            raise LowbitError(None, f"group_size must be > 0, -1 (per channel) or 0 (per tensor), got {self.group_size}")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise bad(f"unknown strategy {self.strategy!r} (choose from {', '.join(STRATEGIES)})")
        if self.strategy == "block":
            if self.block is None or len(self.block) != 2 or min(self.block) <= 0:
                raise bad("a block strategy needs block=(rows, columns), both positive")
            object.__setattr__(self, "block", (int(self.block[0]), int(self.block[1])))
        elif self.block is not None:
            raise bad("block applies to the block strategy only")
        if self.strategy == "group" and self.group_size <= 0:
            raise bad("a group strategy needs group_size > 0")
        if self.strategy == "flat" and self.group_size <= 0:
            raise bad("a flat strategy needs group_size > 0 (values per block)")
        if self.scale_format is not None and self.scale_format not in SCALE_FORMATS:
            raise bad(f"unknown scale format {self.scale_format!r} (choose from {', '.join(SCALE_FORMATS)})")
        if self.dynamic not in (False, True, "local"):
            raise bad(f"dynamic must be False, True or 'local', got {self.dynamic!r}")
        if (self.type == "codebook") != (self.codebook is not None):
            raise bad("a codebook type needs a codebook name, and only it")
        if self.activations is not None and self.activations.activations is not None:
            raise bad("an activation scheme has no activation scheme of its own")

    # --- the grid ---------------------------------------------------------------------------

    @property
    def qmax(self) -> int:
        """The largest integer code (``2**bits - 1``)."""
        return (1 << self.bits) - 1

    @property
    def mid(self) -> int:
        """The zero point of a symmetric integer grid."""
        return 1 << (self.bits - 1)

    @property
    def float_spec(self) -> FloatFormat:
        """The element format of a float scheme."""
        if self.float_format is None:
            raise LowbitError(None, f"scheme {self.describe()} is not a float scheme")
        return FLOAT_FORMATS[self.float_format]

    @property
    def granularity(self) -> str:
        """Which values share a scale (see :data:`STRATEGIES`)."""
        if self.strategy is not None:
            return self.strategy
        if self.group_size > 0:
            return "group"
        return "channel" if self.group_size == PER_CHANNEL else "tensor"

    def n_groups(self, in_features: int) -> int:
        """Groups per row; raises :class:`LowbitError` when the group size does not divide the row."""
        if self.granularity != "group":
            return 1
        if in_features % self.group_size:
            raise LowbitError(None, f"group size {self.group_size} does not divide the row length {in_features}")
        return in_features // self.group_size

    # --- names --------------------------------------------------------------------------------

    def describe_raw(self) -> str:
        return f"{self.type}{self.bits}"

    def describe(self) -> str:
        """A short human name: ``int4 sym g64``, ``float8 e4m3 per-channel``, ``codebook4 nf4 g64``."""
        g = {"group": f"g{self.group_size}", "channel": "per-channel", "tensor": "per-tensor",
             "token": "per-token", "head": "per-head", "flat": f"flat{self.group_size}",
             "block": f"block{self.block[0]}x{self.block[1]}" if self.block else "block"}[self.granularity]
        if self.type == "int":
            text = f"int{self.bits} {'sym' if self.symmetric else 'asym'} {g}"
        elif self.type == "float":
            text = f"float{self.bits} {self.float_format} {g}"
        else:
            text = f"codebook{self.bits} {self.codebook} {g}"
        if self.dynamic:
            text += " dynamic" if self.dynamic is True else " dynamic-local"
        if self.scale_format:
            text += f" scale:{self.scale_format}"
        if self.activations is not None:
            text += f", activations {self.activations.describe()}"
        return text

    # --- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field (JSON-able); :meth:`from_dict` inverts it."""
        d = asdict(self)
        if d["block"] is not None:
            d["block"] = list(d["block"])
        if self.activations is None:
            del d["activations"]  # weight-only dicts stay as they were before activations existed
        else:
            d["activations"] = self.activations.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | list[Any]) -> QuantScheme:
        """Inverse of :meth:`to_dict`; also accepts the old ``[bits, group_size, symmetric]`` form."""
        if isinstance(d, list):
            return cls(*d)
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("block") is not None:
            kw["block"] = tuple(kw["block"])
        if kw.get("activations") is not None:
            kw["activations"] = cls.from_dict(kw["activations"])
        return cls(**kw)

    def to_quantization_args(self) -> dict[str, Any]:
        """compressed-tensors' ``QuantizationArgs`` of this scheme (the config it writes)."""
        strategy = self.granularity
        if self.type == "float" and self.float_format == "e2m1" and self.scale_format == "e4m3":
            strategy = "tensor_group"  # NVFP4: E4M3 group scales under a per-tensor global scale
        args: dict[str, Any] = {
            "num_bits": self.bits,
            "type": "int" if self.type == "int" else "float",
            "symmetric": self.symmetric,
            "group_size": self.group_size if strategy in ("group", "tensor_group") else None,
            "strategy": strategy,
            "block_structure": list(self.block) if self.block else None,
            "dynamic": self.dynamic,
            "actorder": None,
            "observer": None if self.dynamic is True else "minmax",
            "observer_kwargs": {},
        }
        if self.scale_format in ("e4m3", "e8m0"):
            args["scale_dtype"] = {"e4m3": "torch.float8_e4m3fn", "e8m0": "torch.uint8"}[self.scale_format]
        return args
