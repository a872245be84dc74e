"""Layer-by-layer calibrated quantization with about one decoder layer in memory.

The model skeleton is built on the ``meta`` device. Only the embeddings and the rotary
embedding are materialised to turn calibration tokens into the inputs of decoder layer 0 (the
arguments every layer receives, masks and position embeddings included, are recorded by
stand-in layers during one pass of the model's own forward). Then, for each layer ``i``: its
weights are read from the checkpoint onto ``device``, a :class:`LayerHandler` quantizes its
linear layers, the layer is run to produce the inputs of layer ``i+1``, its result is written to
``<workdir>/layer_{i:03d}.safetensors`` (a temporary folder when no ``workdir`` is given) and
its weights are freed; no finished layer stays in memory. A manifest with a hash of the
whole request lets an interrupted run resume at the first unfinished layer (finished layers are
replayed from their saved results, which reproduces the activations exactly).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.memory import trim
from lowbit.methods.base import QuantizedWeight
from lowbit.methods.store import ScratchDir, read_result_file, write_result_file

from .adapters import Adapter, check_model, expert_slot, get_adapter, get_submodule, get_weight, is_expert_slot, set_weight
from .calibration import CalibrationData

ENGINE_VERSION = 1


# --- per-layer inputs and results -----------------------------------------------------------------


@dataclass
class LayerInputs:
    """The calibration activations entering one decoder layer, batch by batch."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    masks: list[torch.Tensor | None]  # [b, L] bool of real tokens, None when unpadded

    @property
    def n_batches(self) -> int:
        return len(self.hidden)


@dataclass
class LayerResult:
    """What a method produced for one layer (names relative to the layer)."""

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    float_overrides: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerContext:
    """Everything a :class:`LayerHandler` may use for one layer."""

    index: int
    layer: nn.Module
    adapter: Adapter
    config: Any
    inputs: LayerInputs
    device: torch.device

    def forward(self) -> list[torch.Tensor]:
        """Run the layer (as it currently is) over every calibration batch."""
        return [run_layer(self.layer, h, kw) for h, kw in zip(self.inputs.hidden, self.inputs.kwargs)]

    def forward_silent(self) -> None:
        """Run the layer for its hooks' sake, dropping outputs."""
        for h, kw in zip(self.inputs.hidden, self.inputs.kwargs):
            run_layer(self.layer, h, kw)


class LayerHandler(Protocol):
    """A calibrated method, seen one decoder layer at a time.

    ``propagate`` is ``"quantized"`` when the next layer should see this layer's quantized outputs
    (GPTQ) or ``"float"`` when it should see the float outputs (AWQ). ``needs_inputs`` is False
    for methods that ignore activations (RTN). ``process`` must leave quantized layers'
    weights replaced by their dequantized values.
    """

    propagate: str
    needs_inputs: bool

    def process(self, ctx: LayerContext) -> LayerResult: ...

    def fingerprint(self) -> dict[str, Any]: ...


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


# --- weight names --------------------------------------------------------------------------------


def disk_name(adapter: Adapter, rel: str) -> str:
    """The on-disk (HF checkpoint) name of a layer-relative module or parameter path."""
    if adapter.family == "mixtral" and rel.startswith("mlp."):
        return "block_sparse_moe." + rel[len("mlp.") :]
    return rel


def full_weight_name(adapter: Adapter, i: int, rel_module: str) -> str:
    return f"{adapter.layer_prefix(i)}{disk_name(adapter, rel_module)}.weight"


# --- loading one layer ---------------------------------------------------------------------------


def load_layer_weights(
    adapter: Adapter, layer: nn.Module, ckpt: Any, i: int, device: torch.device, dtype: torch.dtype
) -> None:
    """Materialise ``layer`` (built on meta) on ``device`` with its weights from the checkpoint."""
    layer.to_empty(device=device)
    prefix = adapter.layer_prefix(i)
    moe_experts = adapter.moe.experts if adapter.is_moe_layer(layer) else None
    with torch.no_grad():
        for name, p in list(layer.named_parameters()) + list(layer.named_buffers()):
            if moe_experts is not None and name.startswith(moe_experts + "."):
                fused = prefix + disk_name(adapter, name)
                if fused in ckpt:
                    p.copy_(ckpt.get(fused).to(device, dtype))
                    continue
                _load_experts(adapter, layer, ckpt, i, name, p, device, dtype)
                continue
            key = prefix + disk_name(adapter, name)
            if key not in ckpt:
                if name in dict(layer.named_buffers()) and name not in layer.state_dict():
                    continue  # non-persistent buffer, recomputed by its module
                raise LowbitError(f"layer {i}", f"checkpoint has no tensor {key!r}")
            t = ckpt.get(key)
            if tuple(t.shape) != tuple(p.shape):
                raise LowbitError(f"layer {i}", f"{key}: checkpoint shape {tuple(t.shape)} != model {tuple(p.shape)}")
            p.copy_(t.to(device, dtype if p.is_floating_point() else p.dtype))
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise LowbitError(f"layer {i}", f"non-finite (NaN/Inf) values in weight {key}")


def _load_experts(
    adapter: Adapter, layer: nn.Module, ckpt: Any, i: int, name: str, p: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> None:
    moe = adapter.moe
    assert moe is not None
    n_exp = p.shape[0]
    projs = (0, 1) if name.endswith("gate_up_proj") else (2,)
    for e in range(n_exp):
        parts = []
        for proj in projs:
            key = full_weight_name(adapter, i, moe.expert_name(e, proj))
            if key not in ckpt:
                raise LowbitError(f"layer {i}", f"checkpoint has no tensor {key!r}")
            parts.append(ckpt.get(key))
        t = torch.cat(parts, 0)
        if not torch.isfinite(t).all():
            raise LowbitError(f"layer {i}", f"non-finite (NaN/Inf) values in expert {e} weights")
        p[e].copy_(t.to(device, dtype))


def free_layer(layer: nn.Module) -> None:
    """Drop a layer's storage (back to meta)."""
    layer.to_empty(device="meta")


def apply_result(adapter: Adapter, layer: nn.Module, result: LayerResult, dequantized: bool = True) -> None:
    """Write a layer result into a loaded layer: float overrides, then dequantized weights."""
    with torch.no_grad():
        params = dict(layer.named_parameters())
        for name, t in result.float_overrides.items():
            params[name].data.copy_(t.to(params[name].device, params[name].dtype))
        if dequantized:
            for name, qw in result.weights.items():
                w = get_weight(adapter, layer, name)
                set_weight(adapter, layer, name, qw.dequantize(w.dtype).to(w.device))


# --- the skeleton and the inputs of layer 0 -------------------------------------------------------


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer ``idx``: records its call arguments and passes hidden states on."""

    def __init__(self, idx: int, sink: dict[int, tuple[torch.Tensor, dict[str, Any]]], last: bool) -> None:
        super().__init__()
        self.idx, self.sink, self.last = idx, sink, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise LowbitError(f"layer {self.idx}", "decoder layer called with positional extras; unsupported")
        self.sink[self.idx] = (hidden_states, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


def build_skeleton(config: Any) -> nn.Module:
    """The model on the ``meta`` device (no storage), eager/sdpa attention."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


def _materialise_outer(adapter: Adapter, model: nn.Module, ckpt: Any, device: torch.device, dtype: torch.dtype) -> None:
    emb = get_submodule(model, adapter.embed)
    emb.to_empty(device=device)
    with torch.no_grad():
        emb.weight.copy_(ckpt.get(f"{adapter.embed}.weight").to(device, dtype))
        if not torch.isfinite(emb.weight).all():
            raise LowbitError(adapter.embed, "non-finite (NaN/Inf) values in the embedding weights")
        if hasattr(emb, "scalar_embed_scale"):  # Gemma's scaled embedding buffer
            emb.embed_scale = torch.tensor(emb.scalar_embed_scale, device=device)
    if adapter.rotary is not None:
        rot = get_submodule(model, adapter.rotary)
        parent_path, _, attr = adapter.rotary.rpartition(".")
        fresh = type(rot)(rot.config).to(device)
        setattr(get_submodule(model, parent_path), attr, fresh)


def _free_outer(adapter: Adapter, model: nn.Module) -> None:
    get_submodule(model, adapter.embed).to_empty(device="meta")


@contextmanager
def _recorders(layers: nn.ModuleList, sink: dict[int, Any]) -> Iterator[None]:
    originals = list(layers)
    n = len(originals)
    for i in range(n):
        layers[i] = _Recorder(i, sink, i == n - 1)
    try:
        yield
    finally:
        for i in range(n):
            layers[i] = originals[i]


def capture_all_layer_args(
    adapter: Adapter, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Run the model's own forward with stand-in layers: the hidden states entering layer 0 and the
    keyword arguments every layer receives (masks, position embeddings...)."""
    layers = get_submodule(model, adapter.layers)
    base = get_submodule(model, adapter.layers.rpartition(".")[0])
    sink: dict[int, Any] = {}
    with _recorders(layers, sink), torch.no_grad():
        try:
            base(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
    hidden0 = sink[0][0]
    return hidden0, [sink[i][1] for i in range(len(layers))]


# --- the manifest --------------------------------------------------------------------------------


def request_hash(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines the result."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def layer_path(workdir: Path, i: int) -> Path:
    """The result file of layer ``i`` (see :mod:`lowbit.methods.store` for its layout)."""
    return workdir / f"layer_{i:03d}.safetensors"


def save_layer_result(workdir: Path, i: int, result: LayerResult) -> None:
    write_result_file(layer_path(workdir, i), result.weights, result.float_overrides, result.info)


def load_layer_result(workdir: Path, i: int) -> LayerResult:
    weights, floats, info = read_result_file(layer_path(workdir, i))
    return LayerResult(weights, floats, info)


def _read_manifest(workdir: Path, digest: str) -> int:
    """How many layers of this exact request are already finished in ``workdir``."""
    path = workdir / "manifest.json"
    if not path.exists():
        return 0
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError:
        return 0
    if man.get("hash") != digest:
        warnings.warn(f"{workdir}: results of a different request found; starting over", stacklevel=3)
        return 0
    done = int(man.get("layers_done", 0))
    while done > 0 and not layer_path(workdir, done - 1).exists():
        done -= 1
    return done


def _write_manifest(workdir: Path, digest: str, done: int, n_layers: int, request: dict[str, Any]) -> None:
    path = workdir / "manifest.json"
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps({"hash": digest, "layers_done": done, "n_layers": n_layers, "request": request}, indent=1, default=str))
    os.replace(tmp, path)


# --- the engine ----------------------------------------------------------------------------------


@dataclass
class StreamResult:
    """Where the per-layer results lie (``layer_path(workdir, i)``), plus the adapter used.

    ``scratch`` is the temporary folder that is ``workdir`` when the caller gave none: it is
    deleted once this object (or whatever else holds ``scratch``) is gone.
    """

    workdir: Path
    n_layers: int
    adapter: Adapter
    seconds: float
    resumed_from: int
    scratch: ScratchDir | None = None


def _check_finite(t: torch.Tensor, what: str, i: int) -> None:
    if not torch.isfinite(t).all():
        raise LowbitError(f"layer {i}", f"non-finite (NaN/Inf) values in {what}")


def stream_quantize(
    config: Any,
    ckpt: Any,
    calib: CalibrationData | None,
    handler: LayerHandler,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    workdir: str | Path | None = None,
    request: dict[str, Any] | None = None,
    stop_after: int | None = None,
    on_layer: Callable[[int, float, float], None] | None = None,
) -> StreamResult:
    """Quantize every decoder layer of the checkpoint with ``handler``, one layer in memory.

    Each finished layer's result is written to ``workdir`` (a temporary folder when ``None``)
    and not kept in memory. ``request`` (JSON-able) identifies the run for resuming from
    ``workdir``. ``stop_after`` (for tests) raises ``KeyboardInterrupt`` after that many layers are finished in this call.
    ``on_layer(i, seconds, eta)`` is called after each layer.
    """
    from lowbit.progress import bar

    device = torch.device(device)
    config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    adapter = get_adapter(config)
    model = build_skeleton(config)
    check_model(adapter, model)
    layers = get_submodule(model, adapter.layers)
    n_layers = len(layers)

    scratch = None
    if workdir is None:
        scratch = ScratchDir("lowbit-layers-")
        workdir = scratch.path
    wd = Path(workdir)
    digest = request_hash({"engine": ENGINE_VERSION, "config": config.to_dict(), "handler": handler.fingerprint(), **(request or {})})
    wd.mkdir(parents=True, exist_ok=True)
    start = _read_manifest(wd, digest)
    if start == 0:
        _write_manifest(wd, digest, 0, n_layers, request or {})

    t0 = time.perf_counter()
    inputs: LayerInputs | None = None
    all_kwargs: list[list[dict[str, Any]]] = []
    if handler.needs_inputs or start > 0:
        if calib is None:
            raise LowbitError("calibration", "this method needs calibration data")
        _materialise_outer(adapter, model, ckpt, device, dtype)
        hidden, masks = [], []
        for ids, m in calib.batches(batch_size):
            h, kws = capture_all_layer_args(adapter, model, ids.to(device), None if m is None else m.to(device))
            hidden.append(h)
            all_kwargs.append(kws)
            masks.append(None if m is None else m.to(device).bool())
        _free_outer(adapter, model)
        inputs = LayerInputs(hidden, [kw[0] for kw in all_kwargs], masks)

    progress = bar(n_layers, desc=f"quantizing {n_layers} layers", unit="layer")
    progress.update(start)
    finished_here = 0
    for i in range(n_layers):
        lt = time.perf_counter()
        layer = layers[i]
        load_layer_weights(adapter, layer, ckpt, i, device, dtype)
        if inputs is not None:
            inputs.kwargs = [kw[i] for kw in all_kwargs]
        if i < start:
            assert inputs is not None
            if handler.propagate == "quantized":
                apply_result(adapter, layer, load_layer_result(wd, i))
            with torch.no_grad():
                inputs.hidden = [run_layer(layer, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
            _release(layer, ckpt)
            continue
        ctx = LayerContext(i, layer, adapter, config, inputs if inputs is not None else LayerInputs([], [], []), device)
        with torch.no_grad():
            float_out = ctx.forward() if (inputs is not None and handler.propagate == "float") else None
            res = handler.process(ctx)
            if inputs is not None:
                outs = float_out if float_out is not None else ctx.forward()
                for o in outs:
                    _check_finite(o, "the layer outputs", i)
                inputs.hidden = outs
        save_layer_result(wd, i, res)
        _write_manifest(wd, digest, i + 1, n_layers, request or {})
        del res  # only one layer's result in memory at a time
        _release(layer, ckpt)
        progress.update(1)
        finished_here += 1
        if on_layer is not None:
            dt = time.perf_counter() - lt
            on_layer(i, dt, dt * (n_layers - i - 1))
        if stop_after is not None and finished_here >= stop_after and i + 1 < n_layers:
            progress.close()
            raise KeyboardInterrupt(f"stopped after layer {i} (stop_after={stop_after})")
    progress.close()
    return StreamResult(wd, n_layers, adapter, time.perf_counter() - t0, start, scratch)


def _release(layer: nn.Module, ckpt: Any) -> None:
    """Free a finished layer, unmap the checkpoint files and return freed heap pages to the system."""
    free_layer(layer)
    close = getattr(ckpt, "close", None)
    if close is not None:
        close()
    trim()


# --- statistics hooks ----------------------------------------------------------------------------


@contextmanager
def input_hooks(
    adapter: Adapter, layer: nn.Module, names: list[str], callback: Callable[[str, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``callback(name, x)`` with the input of every named linear / expert slot during forwards.

    Expert slots are served by temporarily replacing the experts' forward with an instrumented
    copy of the routed computation (same math), which reports each expert's routed tokens.
    """
    handles = []
    plain = [n for n in names if not is_expert_slot(adapter, n)]
    expert_names = set(n for n in names if is_expert_slot(adapter, n))
    for n in plain:
        mod = get_submodule(layer, n)

        def hook(_m: nn.Module, args: tuple[Any, ...], _n: str = n) -> None:
            callback(_n, args[0])

        handles.append(mod.register_forward_pre_hook(hook))
    restore = None
    if expert_names:
        moe = adapter.moe
        assert moe is not None
        experts = get_submodule(layer, moe.experts)
        restore = experts.forward
        experts.forward = _instrumented_experts(adapter, experts, expert_names, callback)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if restore is not None:
            del get_submodule(layer, adapter.moe.experts).forward  # type: ignore[union-attr]


def _instrumented_experts(
    adapter: Adapter, experts: nn.Module, wanted: set[str], callback: Callable[[str, torch.Tensor], None]
) -> Callable[..., torch.Tensor]:
    moe = adapter.moe
    assert moe is not None

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        n_exp = experts.gate_up_proj.shape[0]
        for e in range(n_exp):
            tok, pos = torch.where(top_k_index == e)
            if tok.numel() == 0:
                continue
            x = hidden_states[tok]
            for proj in (0, 1):
                if moe.expert_name(e, proj) in wanted:
                    callback(moe.expert_name(e, proj), x)
            gate, up = nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            h = experts.act_fn(gate) * up
            if moe.expert_name(e, 2) in wanted:
                callback(moe.expert_name(e, 2), h)
            y = nn.functional.linear(h, experts.down_proj[e]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    return forward


def token_mask_for(x: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor | None:
    """The real-token mask matching an input ``x`` shaped ``[b, L, in]`` (None for routed 2-D inputs)."""
    if masks is None or x.dim() != 3 or x.shape[:2] != masks.shape:
        return None
    return masks


__all__ = [
    "LayerContext",
    "LayerHandler",
    "LayerInputs",
    "LayerResult",
    "StreamResult",
    "apply_result",
    "build_skeleton",
    "capture_all_layer_args",
    "disk_name",
    "expert_slot",
    "full_weight_name",
    "input_hooks",
    "layer_path",
    "load_layer_weights",
    "load_layer_result",
    "run_layer",
    "save_layer_result",
    "stream_quantize",
]
