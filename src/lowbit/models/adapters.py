"""Per-architecture descriptions of a decoder-only transformer, for layer-by-layer quantization.

An :class:`Adapter` names (relative to the model or to one decoder layer) everything the
streaming engine and the calibrated methods need: where the decoder layers, embeddings, final
norm and rotary embedding live; the sequential groups of linear layers inside a layer (each
group's inputs depend on the previous group's outputs); the AWQ scaling groups (an op whose
output feeds some linears, so a per-channel scale can be folded into it); the SmoothQuant
smoothing mappings (the norms whose outputs feed linears; attention only in MoE layers); and, for
mixture-of-experts layers, where the experts and the router are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class ScaleGroup:
    """An AWQ scaling group: ``prev``'s output channels feed every linear in ``linears``.

    ``prev_kind`` is ``"norm"`` (an RMSNorm ``y = n(x) * w``), ``"norm_plus_one"`` (Gemma's
    ``y = n(x) * (1 + w)``) or ``"linear"`` (the scale divides the rows of ``prev``'s weight and
    bias). ``inspect`` is the module whose output measures the loss of a candidate scale
    (``""`` = the first linear itself). ``followers`` are float linears that also read ``prev``'s
    output (a MoE router): their input columns are multiplied by the scale so they are unchanged.
    """

    prev: str
    prev_kind: str
    linears: tuple[str, ...]
    inspect: str
    followers: tuple[str, ...] = ()


@dataclass(frozen=True)
class MoESpec:
    """Fused mixture-of-experts parameters inside a decoder layer (transformers >= 5 layout).

    ``experts`` holds ``gate_up_proj`` ``[E, 2*I, H]`` and ``down_proj`` ``[E, H, I]``; on disk each
    expert ``e`` is ``{experts}.{e}.{gate|up|down}.weight`` with the names in ``proj_names``.
    ``router`` is the routing linear (kept float); ``shared`` the always-on dense linears.
    """

    block: str = "mlp"
    experts: str = "mlp.experts"
    router: str = "mlp.gate"
    proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_gate_up: tuple[str, ...] = ()
    shared_down: tuple[str, ...] = ()
    float_extra: tuple[str, ...] = ()  # other float parameters of the block (e.g. shared gate)

    def expert_name(self, e: int, proj: int) -> str:
        return f"{self.experts}.{e}.{self.proj_names[proj]}"


@dataclass(frozen=True)
class Adapter:
    """Where things are in one architecture family."""

    family: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    norm: str = "model.norm"
    rotary: str | None = "model.rotary_emb"
    sequential: tuple[tuple[str, ...], ...] = ()
    scale_groups: tuple[ScaleGroup, ...] = ()
    #: SmoothQuant mappings: a norm and the linears reading its output (empty: cannot be smoothed)
    smooth_groups: tuple[ScaleGroup, ...] = ()
    norm_plus_one: bool = False
    moe: MoESpec | None = None
    notes: str = ""

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers}.{i}."

    def is_moe_layer(self, layer: nn.Module) -> bool:
        """Whether this decoder layer holds routed experts (some MoE models mix in dense layers)."""
        if self.moe is None:
            return False
        return get_submodule(layer, self.moe.experts) is not None

    def sequential_for(self, layer: nn.Module) -> list[list[str]]:
        """The linear groups of this layer, in dependency order, limited to modules that exist.

        Expert slots appear as ``{experts}.{e}.{proj}`` names (no module of that name exists).
        """
        groups: list[list[str]] = []
        if self.is_moe_layer(layer):
            moe = self.moe
            assert moe is not None
            n_exp = int(get_submodule(layer, moe.experts).gate_up_proj.shape[0])
            attn = [list(g) for g in self.sequential[:2]]
            gate_up = list(moe.shared_gate_up) + [moe.expert_name(e, p) for e in range(n_exp) for p in (0, 1)]
            down = list(moe.shared_down) + [moe.expert_name(e, 2) for e in range(n_exp)]
            groups = attn + [gate_up, down]
        else:
            groups = [list(g) for g in self.sequential]
        out = []
        for g in groups:
            present = [n for n in g if _is_expert_slot(self, n) or isinstance(get_submodule(layer, n), nn.Linear)]
            if present:
                out.append(present)
        return out

    def scale_groups_for(self, layer: nn.Module, config: Any) -> list[ScaleGroup]:
        """AWQ scaling groups valid for this layer (``v -> o`` only when shapes match)."""
        out = []
        for sg in self.scale_groups:
            if self.is_moe_layer(layer) and any(n.startswith(self.moe.block + ".") for n in sg.linears):  # type: ignore[union-attr]
                continue
            mods = [get_submodule(layer, n) for n in sg.linears]
            prev = get_submodule(layer, sg.prev)
            if prev is None or any(m is None for m in mods):
                continue
            if sg.prev_kind == "linear":
                if any(prev.weight.shape[0] != m.weight.shape[1] for m in mods):
                    continue
            out.append(sg)
        if self.is_moe_layer(layer):
            out.extend(self._moe_scale_groups(layer))
        return out

    def smooth_groups_for(self, layer: nn.Module) -> list[ScaleGroup]:
        """SmoothQuant mappings valid for this layer: those whose norm and linears all exist
        (in a MoE layer the MLP mapping is absent: experts are routed, only attention is smoothed)."""
        out = []
        for sg in self.smooth_groups:
            if get_submodule(layer, sg.prev) is None:
                continue
            if all(isinstance(get_submodule(layer, n), nn.Linear) for n in sg.linears):
                out.append(sg)
        return out

    def _moe_scale_groups(self, layer: nn.Module) -> list[ScaleGroup]:
        moe = self.moe
        assert moe is not None
        n_exp = int(get_submodule(layer, moe.experts).gate_up_proj.shape[0])
        linears = tuple(moe.shared_gate_up) + tuple(moe.expert_name(e, p) for e in range(n_exp) for p in (0, 1))
        followers = (moe.router,) + tuple(n for n in moe.float_extra)
        post = "post_attention_layernorm"
        return [ScaleGroup(post, "norm_plus_one" if self.norm_plus_one else "norm", linears, moe.block, followers)]


def _is_expert_slot(adapter: Adapter, name: str) -> bool:
    return adapter.moe is not None and name.startswith(adapter.moe.experts + ".")


def get_submodule(root: nn.Module, path: str) -> Any:
    """``root``'s submodule at dotted ``path`` (``""`` is ``root``), or ``None``."""
    if path == "":
        return root
    mod: Any = root
    for part in path.split("."):
        if not hasattr(mod, part):
            return None
        mod = getattr(mod, part)
    return mod


_ATTN = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
_MLP = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _dense_groups(post_norm: str, kind: str) -> tuple[ScaleGroup, ...]:
    return (
        ScaleGroup("input_layernorm", kind, _ATTN[0], "self_attn"),
        ScaleGroup("self_attn.v_proj", "linear", _ATTN[1], "self_attn.o_proj"),
        ScaleGroup(post_norm, kind, _MLP[0], "mlp"),
        ScaleGroup("mlp.up_proj", "linear", _MLP[1], "mlp.down_proj"),
    )


def _smooth_groups(post_norm: str | None, kind: str) -> tuple[ScaleGroup, ...]:
    """SmoothQuant's mappings: input norm -> q/k/v and (dense MLPs) the MLP's norm -> gate/up."""
    attn = (ScaleGroup("input_layernorm", kind, _ATTN[0], "self_attn"),)
    return attn if post_norm is None else attn + (ScaleGroup(post_norm, kind, _MLP[0], "mlp"),)


LLAMA = Adapter(
    family="llama",
    sequential=_ATTN + _MLP,
    scale_groups=_dense_groups("post_attention_layernorm", "norm"),
    smooth_groups=_smooth_groups("post_attention_layernorm", "norm"),
    notes="llama, mistral, qwen2 and qwen3 share this layout (qwen3 adds q/k norms inside attention)",
)

GEMMA3 = Adapter(
    family="gemma3",
    sequential=_ATTN + _MLP,
    scale_groups=_dense_groups("pre_feedforward_layernorm", "norm_plus_one"),
    smooth_groups=_smooth_groups("pre_feedforward_layernorm", "norm_plus_one"),
    norm_plus_one=True,
    notes=(
        "norms compute n(x) * (1 + w); the MLP reads pre_feedforward_layernorm "
        "(post_attention_layernorm and post_feedforward_layernorm act on block outputs, not linear inputs)"
    ),
)

QWEN2_MOE = Adapter(
    family="qwen2_moe",
    sequential=_ATTN + _MLP,
    scale_groups=_dense_groups("post_attention_layernorm", "norm"),
    smooth_groups=_smooth_groups(None, "norm"),
    moe=MoESpec(
        shared_gate_up=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
        shared_down=("mlp.shared_expert.down_proj",),
        float_extra=("mlp.shared_expert_gate",),
    ),
    notes="routed experts are fused [E, ...] parameters; router and shared-expert gate stay float",
)

MIXTRAL = Adapter(
    family="mixtral",
    sequential=_ATTN + _MLP,
    scale_groups=_dense_groups("post_attention_layernorm", "norm"),
    smooth_groups=_smooth_groups(None, "norm"),
    moe=MoESpec(proj_names=("w1", "w3", "w2")),
    notes="on disk experts are block_sparse_moe.experts.E.w1/w3/w2; transformers renames them to mlp.experts",
)

#: Adapter of each family named by :data:`lowbit.models.architectures.ARCHITECTURES` (``adapter=``).
ADAPTERS: dict[str, Adapter] = {"llama": LLAMA, "gemma3": GEMMA3, "qwen2_moe": QWEN2_MOE, "mixtral": MIXTRAL}


def get_adapter(config: Any) -> Adapter:
    """The adapter for a transformers config; unknown families raise :class:`LowbitError`."""
    from .architectures import ARCHITECTURES, find_model_type

    model_type = getattr(config, "model_type", None)
    arch = find_model_type(model_type)
    if arch is None or arch.adapter is None:
        supported = sorted(mt for a in ARCHITECTURES if a.adapter for mt in a.model_types)
        raise LowbitError(
            f"model_type {model_type!r}",
            "no layer adapter for this architecture: lowbit needs to know its decoder layers, "
            "embeddings, final norm, rotary embedding, linear groups and AWQ scaling groups "
            f"(supported: {', '.join(supported)})",
        )
    return ADAPTERS[arch.adapter]


def check_model(adapter: Adapter, model: nn.Module) -> None:
    """Verify the adapter's paths exist in ``model``; raise naming what is missing."""
    missing = [p for p in (adapter.layers, adapter.embed, adapter.norm) if get_submodule(model, p) is None]
    if adapter.rotary is not None and get_submodule(model, adapter.rotary) is None:
        missing.append(adapter.rotary)
    layers = get_submodule(model, adapter.layers)
    if layers is not None and len(layers) > 0:
        layer = layers[0]
        for g in adapter.sequential_for(layer) if not missing else []:
            for n in g:
                if not _is_expert_slot(adapter, n) and get_submodule(layer, n) is None:
                    missing.append(f"{adapter.layers}.0.{n}")
        if not adapter.sequential_for(layer):
            missing.append("any quantizable linear in decoder layer 0")
    if missing:
        raise LowbitError(
            f"{adapter.family} adapter on {type(model).__name__}",
            f"model is missing expected modules: {', '.join(missing)}",
        )


# --- expert slots -------------------------------------------------------------------------------


def expert_slot(adapter: Adapter, layer: nn.Module, name: str) -> tuple[nn.Parameter, int, slice]:
    """For an expert slot name ``{experts}.{e}.{proj}``: the fused parameter, expert index and row slice."""
    moe = adapter.moe
    assert moe is not None
    e_str, proj = name[len(moe.experts) + 1 :].split(".")
    e = int(e_str)
    experts = get_submodule(layer, moe.experts)
    inter = experts.down_proj.shape[2]
    if proj == moe.proj_names[0]:
        return experts.gate_up_proj, e, slice(0, inter)
    if proj == moe.proj_names[1]:
        return experts.gate_up_proj, e, slice(inter, 2 * inter)
    return experts.down_proj, e, slice(None)


def get_weight(adapter: Adapter, layer: nn.Module, name: str) -> torch.Tensor:
    """The 2-D weight ``[out, in]`` of a linear or expert slot (a view for expert slots)."""
    if _is_expert_slot(adapter, name):
        p, e, rows = expert_slot(adapter, layer, name)
        return p.data[e, rows]
    return get_submodule(layer, name).weight.data


def set_weight(adapter: Adapter, layer: nn.Module, name: str, w: torch.Tensor) -> None:
    """Overwrite the weight of a linear or expert slot in place."""
    get_weight(adapter, layer, name).copy_(w)


def is_expert_slot(adapter: Adapter, name: str) -> bool:
    return _is_expert_slot(adapter, name)


__all__ = [
    "ADAPTERS",
    "Adapter",
    "MoESpec",
    "ScaleGroup",
    "check_model",
    "expert_slot",
    "get_adapter",
    "get_submodule",
    "get_weight",
    "is_expert_slot",
    "set_weight",
]
