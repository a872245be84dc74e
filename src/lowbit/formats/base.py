"""What a checkpoint format is, and the registry every format file adds itself to.

A format is one module of :mod:`lowbit.formats` holding one :class:`Format` subclass decorated
with :func:`register`::

    @register
    class MyFormat(Format):
        \"\"\"One line: what it writes and who reads it (the CLI's --format help).\"\"\"

        name = "my-format"

        def holds(self, scheme): ...          # None, or why this format cannot store such weights
        def detect(self, config, folder): ... # is this folder one of ours?
        def encoder(self, config, linears, dtype): ...   # -> Encoder: add(name, qw) / config()
        def decode(self, get, names, config): ...        # -> (weights, tensor names consumed)

:func:`lowbit.formats.save`, :func:`~lowbit.formats.detect_format` and
:func:`~lowbit.formats.read_checkpoint` only ever go through :data:`FORMATS`, so a new format is
that one file (plus its tests). :func:`check_holds` refuses a whole quantization plan up front,
before any calibration runs, with one error that lists every tensor the format cannot hold.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch

from ..core.quantized import QuantizedWeight
from ..core.scheme import QuantScheme
from ..errors import LowbitError
from ..registry import Registry

__all__ = ["FORMATS", "Encoder", "Format", "FormatRegistry", "check_holds", "register"]

#: ``get(name) -> tensor`` of a checkpoint being read.
Getter = Callable[[str], torch.Tensor]


class Encoder(Protocol):
    """One format's writer: :meth:`add` validates and encodes a weight, :meth:`config` comes last."""

    def add(self, name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """The tensors (full checkpoint names) that store weight ``name``; raises :class:`LowbitError`."""
        ...

    def config(self) -> dict[str, Any]:
        """The ``quantization_config`` of everything added (called once, after the last :meth:`add`)."""
        ...


@runtime_checkable
class Holder(Protocol):
    """Anything :func:`check_holds` can ask: a :class:`Format`, or e.g. the GGUF writer's stand-in."""

    @property
    def name(self) -> str: ...

    def holds(self, scheme: QuantScheme) -> str | None: ...


class Format:
    """Base class of a checkpoint format (see the module doc); subclasses are registered instances."""

    #: The name users type (``--format NAME``).
    name: ClassVar[str] = ""
    #: Where it comes in lists and help (lowest first; the default format has 0).
    rank: ClassVar[int] = 100

    # --- planning ---------------------------------------------------------------------------

    def holds(self, scheme: QuantScheme) -> str | None:
        """``None`` when weights of ``scheme`` can be stored, else one line saying why not."""
        raise NotImplementedError

    def holds_tensor(self, name: str, scheme: QuantScheme, shape: tuple[int, ...] | None = None) -> str | None:
        """:meth:`holds` for one named tensor, with the rules that need its name or ``[out, in]`` shape.

        The default adds the one rule every grouped format shares: the group size divides the row.
        """
        why = self.holds(scheme)
        if why is None and shape is not None and len(shape) == 2 and scheme.granularity == "group":
            if shape[1] % scheme.group_size:
                why = f"group size {scheme.group_size} does not divide the {shape[1]} input columns"
        act = scheme.activations
        if why is None and shape is not None and len(shape) == 2 and act is not None and act.granularity == "group":
            if shape[1] % act.group_size:  # e.g. FP8_BLOCK's dynamic activation groups of 128
                why = f"activation groups of {act.group_size} do not divide the {shape[1]} input columns"
        return why

    def plan_issue(self, plan: Mapping[str, QuantScheme]) -> str | None:
        """A rule about the plan as a whole (AWQ: one group size per checkpoint), or ``None``."""
        return None

    # --- writing ----------------------------------------------------------------------------

    def encoder(self, config: Mapping[str, Any], linears: list[str], dtype: torch.dtype) -> Encoder:
        """A fresh :class:`Encoder` for one checkpoint (``config``: the source model's config.json)."""
        raise NotImplementedError

    def side_files(self, folder: Path, qconfig: Mapping[str, Any]) -> None:
        """Write files besides ``config.json`` and the weights (GPTQ's ``quantize_config.json``)."""

    # --- reading ----------------------------------------------------------------------------

    #: the ``quantization_config.quant_method`` that marks a checkpoint of this format (the default :meth:`detect`)
    quant_method: str = ""

    def detect(self, config: Mapping[str, Any], folder: Path) -> bool:
        """Whether ``folder`` (whose ``config.json`` is ``config``, ``{}`` if absent) is in this format:
        by default, its ``quantization_config`` names :attr:`quant_method` (case-insensitive)."""
        if not self.quant_method:
            raise NotImplementedError
        q = config.get("quantization_config")
        return isinstance(q, Mapping) and str(q.get("quant_method", "")).lower() == self.quant_method.lower()

    def read_config(self, folder: Path, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` completed with what this format keeps elsewhere (default: unchanged)."""
        return config

    def decode(
        self, get: Getter, names: list[str], config: Mapping[str, Any]
    ) -> tuple[dict[str, QuantizedWeight], set[str]]:
        """Quantized weights keyed ``<module>.weight`` and the tensor names they consumed."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<format {self.name}>"


class FormatRegistry(Registry[Format]):
    """The format registry; iterating it (or ``in``) gives the names, as the old ``FORMATS`` tuple did.

    Names are kept in :attr:`Format.rank` order (then by name), whatever order the modules load in,
    so the CLI lists the default first.
    """

    def add(self, name: str, entry: Format, help: str | None = None) -> None:  # noqa: A002
        super().add(name, entry, help)
        order = sorted(self._entries, key=lambda n: (getattr(self._entries[n], "rank", 100), n))
        self._entries = {n: self._entries[n] for n in order}
        self._help = {n: self._help[n] for n in order}

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


FORMATS = FormatRegistry("format", "lowbit.formats")

F = TypeVar("F", bound=type[Format])


def register(cls: F) -> F:
    """Class decorator: add one instance of a :class:`Format` subclass to :data:`FORMATS`."""
    return FORMATS.register_instance(cls)


# --------------------------------------------------------------------------------- planning


def _holder(fmt: str | Holder) -> Holder:
    if isinstance(fmt, str):
        return FORMATS.get(fmt)
    return fmt


def cannot_hold(
    plan: Mapping[str, QuantScheme], fmt: str | Holder, shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, str]:
    """``{tensor: why}`` for every tensor of ``plan`` that ``fmt`` cannot hold (empty: all fit)."""
    holder = _holder(fmt)
    shapes = shapes or {}
    out = {}
    for name in sorted(plan):
        scheme = plan[name]
        tensor_check = getattr(holder, "holds_tensor", None)
        if tensor_check is not None:
            why = tensor_check(name, scheme, shapes.get(name))
        else:
            why = holder.holds(scheme)
        if why is not None:
            out[name] = why
    return out


def _ranges(ints: list[int]) -> str:
    """``0-3,5,7-9`` for ``[0, 1, 2, 3, 5, 7, 8, 9]``."""
    parts: list[str] = []
    for i in sorted(set(ints)):
        if parts and "-" in parts[-1] and int(parts[-1].split("-")[1]) == i - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{i}"
        elif parts and "-" not in parts[-1] and int(parts[-1]) == i - 1:
            parts[-1] = f"{parts[-1]}-{i}"
        else:
            parts.append(str(i))
    return ",".join(parts)


def compact_names(names: list[str]) -> list[str]:
    """Every name, those differing only in their layer number written once:
    ``model.layers.{0-29}.mlp.down_proj.weight``."""
    groups: dict[str, list[int]] = {}
    singles: list[str] = []
    for n in names:
        m = re.search(r"\.(\d+)\.", n)
        if m is None:
            singles.append(n)
            continue
        groups.setdefault(f"{n[: m.start()]}.{{}}.{n[m.end():]}", []).append(int(m.group(1)))
    out = [t.replace("{}", str(ix[0]) if len(ix) == 1 else "{" + _ranges(ix) + "}", 1) for t, ix in groups.items()]
    return out + singles


def check_holds(
    plan: Mapping[str, QuantScheme], fmt: str | Holder, shapes: Mapping[str, tuple[int, ...]] | None = None
) -> None:
    """Raise ONE :class:`LowbitError` naming every tensor of ``plan`` that ``fmt`` cannot hold.

    ``plan`` maps weight names to the scheme they will be quantized with; ``fmt`` is a registered
    format's name or any object with ``name`` and ``holds(scheme)`` (and optionally
    ``holds_tensor(name, scheme, shape)``); ``shapes`` (``[out, in]`` per name, optional) lets the
    shape rules apply too (GPTQ's whole int32 words, AWQ's 8 packed rows). The message lists every
    tensor, grouped by reason (names that differ only in their layer number written once, as
    ``model.layers.{0-29}.mlp.down_proj.weight``), and gives the ways out: keep them in float,
    another group size or per channel, or a format that holds them all.
    """
    holder = _holder(fmt)
    bad = cannot_hold(plan, holder, shapes)
    plan_check = getattr(holder, "plan_issue", None)
    whole = plan_check(plan) if plan_check is not None and not bad else None
    if whole is not None:
        raise LowbitError(None, f"the {holder.name} format cannot hold this plan: {whole}")
    if not bad:
        return
    by_reason: dict[tuple[str, str], list[str]] = {}
    for n, why in bad.items():
        by_reason.setdefault((why, plan[n].describe()), []).append(n)
    listed = "; ".join(f"{why} [{scheme}]: {', '.join(compact_names(names))}" for (why, scheme), names in by_reason.items())
    options = ["keep them in float (--keep PATTERN)",
               "another bit width, group size or per channel (--bits, --group-size N or -1, --override PATTERN=SPEC)"]
    others = [n for n, f in FORMATS.items() if n != holder.name
              and not cannot_hold({k: plan[k] for k in bad}, f, shapes)]
    if others:
        options.append(f"write another format that holds them ({', '.join('--format ' + o for o in others)})")
    else:
        options.append("write another format")
    raise LowbitError(None, f"the {holder.name} format cannot hold {len(bad)} of {len(plan)} planned "
                      f"tensor(s): {listed}. Options: {'; '.join(options)}")
