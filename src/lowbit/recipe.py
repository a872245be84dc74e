"""Which tensors to quantize, and with which scheme: name rules with per-pattern overrides.

Rules are regular expressions searched in Hugging Face tensor names. By default every 2-D
weight inside the decoder layers is quantized; embeddings, ``lm_head`` and norms stay float.
Overrides are tried in order, the first match wins; an override of ``None`` keeps the tensor
in float.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .core.scheme import QuantScheme
from .errors import LowbitError

DEFAULT_INCLUDE = (r"^model\.layers\.\d+\.",)
DEFAULT_EXCLUDE = (r"embed", r"lm_head", r"norm", r"\.mlp\.gate\.weight$", r"router")


@dataclass
class Recipe:
    scheme: QuantScheme = field(default_factory=QuantScheme)
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    overrides: tuple[tuple[str, QuantScheme | None], ...] = ()
    mse_clip: bool = False
    # When a group size does not divide a row: False refuses (the default), True quantizes
    # that tensor per output channel instead (a documented fallback, reported by ``plan``).
    group_fallback: bool = False

    def scheme_for(self, name: str, shape: tuple[int, ...] | None = None) -> QuantScheme | None:
        """The scheme for tensor ``name`` (of ``shape``, when known), or None to keep it float."""
        if (shape is not None and len(shape) != 2) or not name.endswith(".weight"):
            return None
        for pattern, scheme in self.overrides:
            if re.search(pattern, name):
                return scheme
        if any(re.search(p, name) for p in self.exclude):
            return None
        if not any(re.search(p, name) for p in self.include):
            return None
        return self.scheme

    def plan(self, shapes: dict[str, tuple[int, ...]], where: str = "model") -> dict[str, QuantScheme]:
        """Schemes of every tensor to quantize; refuses group sizes that do not divide a row."""
        out: dict[str, QuantScheme] = {}
        for name in sorted(shapes):
            scheme = self.scheme_for(name, shapes[name])
            if scheme is None:
                continue
            try:
                scheme.n_groups(shapes[name][1])
            except ValueError as exc:
                if self.group_fallback:
                    out[name] = replace(scheme, group_size=-1)
                    continue
                raise LowbitError(
                    where,
                    f"{name} {list(shapes[name])}: {exc}; choose a group size that divides it, "
                    f"per-channel (--group-size -1), or an override for this tensor",
                ) from None
            out[name] = scheme
        if not out:
            raise LowbitError(where, "no tensor matches the quantization rules")
        for pattern, scheme in self.overrides:
            if scheme is not None and not any(re.search(pattern, n) for n in shapes):
                warnings.warn(f"{where}: override {pattern!r} matches no tensor of the model", stacklevel=2)
        return out


@dataclass(frozen=True)
class Plan:
    """A recipe applied to a checkpoint: the scheme of every tensor that gets quantized.

    Calling a plan looks a weight name up: the planned scheme of a checkpoint tensor, ``None``
    for a checkpoint tensor the rules keep float, and the recipe's rules for names the checkpoint
    does not hold as such (the expert slots of fused MoE tensors).
    """

    recipe: Recipe
    schemes: Mapping[str, QuantScheme]
    known: frozenset[str]

    def __call__(self, name: str) -> QuantScheme | None:
        if name in self.schemes:
            return self.schemes[name]
        if name in self.known:
            return None
        return self.recipe.scheme_for(name)

    def fingerprint(self) -> dict[str, Any]:
        return {n: s.to_dict() for n, s in sorted(self.schemes.items())}

    def outside(self, layers_prefix: str) -> dict[str, QuantScheme]:
        """The planned tensors that are not inside the decoder layers (``lm_head.weight``)."""
        return {n: s for n, s in self.schemes.items() if not n.startswith(layers_prefix)}


def plan_for(recipe: Recipe, shapes: dict[str, tuple[int, ...]], where: str = "model") -> Plan:
    """:meth:`Recipe.plan` as a :class:`Plan` (refuses bad group sizes before any work)."""
    return Plan(recipe, recipe.plan(shapes, where), frozenset(shapes))


def parse_override(text: str, base: QuantScheme) -> tuple[str, QuantScheme | None]:
    """``PATTERN=float`` or ``PATTERN=bits:8,group:64,asym`` (keys: bits, group, sym, asym)."""
    pattern, sep, spec = text.rpartition("=")
    if not sep or not pattern:
        raise LowbitError(None, f"override {text!r}: expected PATTERN=SPEC")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise LowbitError(None, f"override {text!r}: bad regular expression ({exc})") from None
    if spec.strip().lower() in ("float", "none", "skip"):
        return pattern, None
    scheme = base
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition(":")
        try:
            if key == "bits":
                scheme = replace(scheme, bits=int(value))
            elif key == "group":
                scheme = replace(scheme, group_size=int(value))
            elif key in ("sym", "asym"):
                scheme = replace(scheme, symmetric=key == "sym")
            else:
                raise LowbitError(None, f"unknown key {key!r} (keys: bits, group, sym, asym)")
        except ValueError as exc:
            raise LowbitError(None, f"override {text!r}: {exc}") from None
    return pattern, scheme
