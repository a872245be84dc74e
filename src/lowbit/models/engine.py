"""The layer engine: calibrated (or plain) quantization with about one decoder layer in memory.

For each decoder layer ``i``: its weights are read from the checkpoint onto ``device`` (the rest
of the model stays a ``meta`` skeleton, :mod:`lowbit.models.capture`), a
:class:`~lowbit.models.layers.LayerHandler` quantizes its linear layers, the layer is run to
produce the inputs of layer ``i+1``, its result is written to ``<workdir>/layer_{i:03d}.safetensors``
(a temporary folder when no ``workdir`` is given) and its weights are freed; no finished layer
stays in memory. A manifest with a hash of the whole request lets an interrupted run resume at
the first unfinished layer (finished layers are replayed from their saved results, which
reproduces the activations exactly). After the last layer, tensors outside the decoder layers
that the plan quantizes (``lm_head``) are handed to the handler with the final hidden states.
"""

from __future__ import annotations

import os
import signal
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import distributed as dist
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.memory import trim

from .adapters import Adapter, get_submodule
from .calibration import CalibrationData
from .capture import capture_all_layer_args, free_outer, layer_stack, materialise_outer
from .layers import LayerContext, LayerHandler, LayerInputs, apply_result, free_layer, load_layer_weights, run_layer
from .manifest import (
    finished_layers,
    load_layer_result,
    outer_path,
    request_hash,
    save_layer_result,
    write_manifest,
)
from .store import ScratchDir, write_result_file

ENGINE_VERSION = 1


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
        raise LowbitError(f"layer {i}" if i >= 0 else None, f"non-finite (NaN/Inf) values in {what}")


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
    outer: Mapping[str, QuantScheme | None] | None = None,
    desc: str = "quantizing",
) -> StreamResult:
    """Quantize every decoder layer of the checkpoint with ``handler``, one layer in memory.

    Each finished layer's result is written to ``workdir`` (a temporary folder when ``None``)
    and not kept in memory. ``request`` (JSON-able) identifies the run for resuming from
    ``workdir``. ``stop_after`` (for tests) raises ``KeyboardInterrupt`` after that many layers are finished in this call.
    ``on_layer(i, seconds, eta)`` is called after each layer. ``outer`` names tensors outside the
    decoder layers to quantize afterwards (``lm_head.weight``: the handler's
    ``quantize_linear`` sees the final norm's outputs); their results go to
    :func:`~lowbit.models.manifest.outer_path`.

    In several processes (:mod:`lowbit.distributed`; ``workdir`` must be one folder they all see):
    a handler without inputs (RTN) quantizes whole layers, layer ``i`` on rank ``i % N``, each rank
    writing its own; a calibrated handler that reads activations only through
    :func:`~lowbit.models.statistics.observe` (GPTQ) runs each rank on its round-robin share of the
    calibration batches, the statistics seeing every batch in one-process order, and rank 0
    writes; other calibrated handlers run every batch on every rank (the same work, no gain).
    The files are the same bytes as in one process.
    """
    from lowbit.progress import bar

    device = torch.device(device)
    adapter, model, layers = layer_stack(config)
    n_layers = len(layers)

    scratch = None
    if workdir is None:
        if dist.is_main():
            scratch = ScratchDir("lowbit-layers-")
        workdir = dist.broadcast(str(scratch.path) if scratch is not None else None)
    wd = Path(str(workdir))
    digest = request_hash({"engine": ENGINE_VERSION, "config": config.to_dict(), "handler": handler.fingerprint(), **(request or {})})
    done: set[int] = set()
    if dist.is_main():
        wd.mkdir(parents=True, exist_ok=True)
        done = finished_layers(wd, digest, n_layers)
        if not done:
            write_manifest(wd, digest, 0, n_layers, request or {})
    done = dist.broadcast(done)
    start = next((i for i in range(n_layers) if i not in done), n_layers)
    outer = dict(outer or {})
    if start == n_layers and (not outer or outer_path(wd).exists()):  # a finished run: nothing to redo
        return StreamResult(wd, n_layers, adapter, 0.0, start, scratch)

    split_layers = dist.active() and not handler.needs_inputs
    split_tokens = dist.active() and handler.needs_inputs and _observes_only(handler)
    writes = split_layers or dist.is_main()
    t0 = time.perf_counter()
    inputs: LayerInputs | None = None
    all_kwargs: list[list[dict[str, Any]]] = []
    if handler.needs_inputs:
        if calib is None:
            raise LowbitError("calibration", "this method needs calibration data")
        materialise_outer(adapter, model, ckpt, device, dtype)
        hidden, masks = [], []
        batches = list(zip(calib.batches(batch_size), calib.statistics_masks(batch_size)))
        for (ids, m), sm in (dist.mine(batches) if split_tokens else batches):
            h, kws = capture_all_layer_args(adapter, model, ids.to(device), None if m is None else m.to(device))
            hidden.append(h)
            all_kwargs.append(kws)
            masks.append(None if sm is None else sm.to(device).bool())
        free_outer(adapter, model)
        inputs = LayerInputs(hidden, [kw[0] for kw in all_kwargs], masks)

    progress = bar(n_layers, desc=f"{desc} {n_layers} layers", unit="layer")
    progress.update(len(done))
    finished_here = 0
    for i in range(n_layers):
        lt = time.perf_counter()
        layer = layers[i]
        if i in done or (split_layers and not dist.owns(i)):
            if inputs is None:
                continue  # nothing flows from layer to layer without activations
            # a finished layer is replayed from its saved result: the same activations exactly
            load_layer_weights(adapter, layer, ckpt, i, device, dtype)
            inputs.kwargs = [kw[i] for kw in all_kwargs]
            if handler.propagate == "quantized":
                apply_result(adapter, layer, load_layer_result(wd, i))
            with torch.no_grad():
                inputs.hidden = [run_layer(layer, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
            _release(layer, ckpt)
            continue
        load_layer_weights(adapter, layer, ckpt, i, device, dtype)
        if inputs is not None:
            inputs.kwargs = [kw[i] for kw in all_kwargs]
        ctx = LayerContext(i, layer, adapter, config, inputs if inputs is not None else LayerInputs([], [], []), device)
        with torch.no_grad(), dist.sharded_inputs(split_tokens):
            float_out = ctx.forward() if (inputs is not None and handler.propagate == "float") else None
            res = handler.process(ctx)
            if inputs is not None:
                outs = float_out if float_out is not None else ctx.forward()
                for o in outs:
                    _check_finite(o, "the layer outputs", i)
                inputs.hidden = outs
        _fault_point(i)
        _release(layer, ckpt)  # the float layer is not needed to write its result: one layer less at the peak
        if writes:
            save_layer_result(wd, i, res)
            if not split_layers:
                write_manifest(wd, digest, i + 1, n_layers, request or {})
        del res  # only one layer's result in memory at a time
        trim()
        progress.update(1)
        finished_here += 1
        if on_layer is not None:
            dt = time.perf_counter() - lt
            on_layer(i, dt, dt * (n_layers - i - 1))
        if stop_after is not None and finished_here >= stop_after and i + 1 < n_layers:
            progress.close()
            raise KeyboardInterrupt(f"stopped after layer {i} (stop_after={stop_after})")
    progress.close()
    dist.barrier()  # every rank's layer files are written
    if split_layers and dist.is_main():
        write_manifest(wd, digest, n_layers, n_layers, request or {})
    if outer:
        _quantize_outer(model, adapter, ckpt, handler, outer, inputs, wd, device, dtype, split_tokens)
        dist.barrier()
    return StreamResult(wd, n_layers, adapter, time.perf_counter() - t0, start, scratch)


def _observes_only(handler: LayerHandler) -> bool:
    """Whether the handler reads activations only through ``observe`` (so it can run on a share
    of the calibration batches): GPTQ. Others (AWQ's searches run the layer on ``ctx.inputs``) are
    run on every batch by every process."""
    fp = handler.fingerprint()
    if fp.get("method") in _OBSERVES_ONLY:
        return True
    if dist.is_main():
        warnings.warn(f"{fp.get('method', 'this method')}: each of the {dist.size()} processes runs every calibration "
                      "batch (only GPTQ and RTN split their work across processes)", stacklevel=3)
    return False


_OBSERVES_ONLY = ("gptq",)


def _fault_point(i: int) -> None:
    """Fault injection for the resume tests: ``LOWBIT_TEST_KILL_LAYER=i`` kills this process
    (SIGKILL, no clean-up) in the middle of layer ``i``, after its work and before its result is
    written; ``LOWBIT_TEST_KILL_RANK`` limits it to one rank."""
    at = os.environ.get("LOWBIT_TEST_KILL_LAYER")
    if at is None or int(at) != i:
        return
    who = os.environ.get("LOWBIT_TEST_KILL_RANK")
    if who is not None and int(who) != dist.rank():
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _quantize_outer(
    model: nn.Module, adapter: Adapter, ckpt: Any, handler: LayerHandler, outer: Mapping[str, QuantScheme | None],
    inputs: LayerInputs | None, wd: Path, device: torch.device, dtype: torch.dtype, sharded: bool = False,
) -> None:
    """Quantize the planned tensors outside the decoder layers (``lm_head``) and save them (rank 0;
    with ``sharded`` inputs the final hidden states of every rank are gathered first, in order)."""
    unknown = sorted(n for n in outer if n != "lm_head.weight")
    if unknown:
        raise LowbitError(unknown[0], "only lm_head can be quantized outside the decoder layers "
                                      "(embeddings stay float in these formats); keep it float")
    xs: list[torch.Tensor] | None = None
    masks: list[torch.Tensor | None] = []
    if inputs is not None and handler.needs_inputs:
        norm = get_submodule(model, adapter.norm)
        norm.to_empty(device=device)
        with torch.no_grad():
            for name, p in norm.named_parameters():
                p.copy_(ckpt.get(f"{adapter.norm}.{name}").to(device, dtype))
            xs = [norm(h) for h in inputs.hidden]
        masks = list(inputs.masks)
        norm.to_empty(device="meta")
        if sharded:
            shares = dist.gather([(x.cpu(), None if m is None else m.cpu()) for x, m in zip(xs, masks)])
            both = dist.interleave(shares)
            xs = [x.to(device) for x, _ in both]
            masks = [None if m is None else m.to(device) for _, m in both]
    if not dist.is_main():
        return
    weights = {}
    for name, scheme in outer.items():
        key = name if name in ckpt or name != "lm_head.weight" else f"{adapter.embed}.weight"  # tied embeddings
        w = ckpt.get(key).to(device, dtype)
        _check_finite(w, f"weight {key}", -1)
        with torch.no_grad():
            qw = handler.quantize_linear(name, w, scheme, xs, masks)  # type: ignore[arg-type]
        if qw is not None:
            weights[name] = qw.to("cpu")
    write_result_file(outer_path(wd), weights, {}, {})
    trim()


def _release(layer: nn.Module, ckpt: Any) -> None:
    """Free a finished layer, unmap the checkpoint files and return freed heap pages to the system."""
    free_layer(layer)
    close = getattr(ckpt, "close", None)
    if close is not None:
        close()
    trim()
