"""``quantize_model``: calibrated (GPTQ, AWQ) or plain (RTN) quantization of a whole model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.models.calibration import CalibrationConfig, CalibrationData, load_calibration

from .base import QuantizedModel, QuantizedWeight
from .layerwise import GPTQHandler, RTNHandler, Rules
from .store import StoredTensors, StoredWeights, index_result_file

if TYPE_CHECKING:
    from lowbit.models.streaming import StreamResult

METHODS = ("gptq", "awq", "rtn")


ACT_ORDERS = ("static", "dynamic", "off")


def act_order_flags(act_order: bool | str) -> tuple[bool, bool]:
    """``(act_order, static_groups)`` of a GPTQ act-order mode.

    ``"static"`` (the default): columns in order of decreasing Hessian diagonal, groups fixed
    up front in the original column order, so checkpoints need no ``g_idx`` (llm-compressor's
    "static" actorder); ``"dynamic"`` or ``True``: groups follow the visiting order and a ``g_idx``
    maps columns to groups (AutoGPTQ's ``desc_act``); ``"off"`` or ``False``: plain column order.
    """
    modes = {"static": (True, True), "dynamic": (True, False), "off": (False, False), True: (True, False), False: (False, False)}
    if act_order not in modes:
        raise LowbitError("act_order", f"unknown act-order mode {act_order!r} (choose from {', '.join(ACT_ORDERS)})")
    return modes[act_order]


def make_handler(
    method: str, scheme: QuantScheme, act_order: bool | str | None = None, rules: Rules = None, **options: Any
) -> Any:
    """The layer handler of a method; ``options`` are the handler's fields (e.g. ``damp``).

    ``act_order`` (GPTQ only, see :func:`act_order_flags`) defaults to ``"static"``.
    """
    if act_order is None:
        act_order = "static" if method == "gptq" else "off"
    if method == "gptq":
        ao, static = act_order_flags(act_order)
        options.setdefault("static_groups", static)
        return GPTQHandler(scheme, act_order=ao, rules=rules, **options)
    if method == "rtn":
        return RTNHandler(scheme, rules=rules, **options)
    if method == "awq":
        from .awq import AWQHandler

        if act_order not in (False, "off"):
            raise LowbitError("awq", "act_order applies to GPTQ only")
        return AWQHandler(scheme, rules=rules, **options)
    raise LowbitError(f"method {method!r}", f"unknown quantization method (choose from {', '.join(METHODS)})")


def _flatten(adapter: Any, results: dict[int, Any]) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict[str, Any]]:
    from lowbit.models.streaming import disk_name, full_weight_name

    weights: dict[str, QuantizedWeight] = {}
    floats: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {}
    for i in sorted(results):
        res = results[i]
        for name, qw in res.weights.items():
            weights[full_weight_name(adapter, i, name)] = qw
        for name, t in res.float_overrides.items():
            floats[f"{adapter.layer_prefix(i)}{disk_name(adapter, name)}"] = t
        if res.info:
            info[str(i)] = res.info
    return weights, floats, info


def _stored(sr: StreamResult) -> tuple[StoredWeights, StoredTensors, dict[str, Any]]:
    """Lazy views over the per-layer result files of a :class:`~lowbit.models.streaming.StreamResult`."""
    from lowbit.models.streaming import disk_name, full_weight_name, layer_path

    adapter = sr.adapter
    weights: dict[str, tuple[Path, str, QuantScheme]] = {}
    floats: dict[str, tuple[Path, str]] = {}
    info: dict[str, Any] = {}
    for i in range(sr.n_layers):
        path = layer_path(sr.workdir, i)
        schemes, float_names, layer_info = index_result_file(path)
        for name, scheme in schemes.items():
            weights[full_weight_name(adapter, i, name)] = (path, name, scheme)
        for name in float_names:
            floats[f"{adapter.layer_prefix(i)}{disk_name(adapter, name)}"] = (path, name)
        if layer_info:
            info[str(i)] = layer_info
    return StoredWeights(weights, sr.scratch), StoredTensors(floats, sr.scratch), info


def _ids_digest(data: CalibrationData) -> str:
    import hashlib

    h = hashlib.sha256(data.input_ids.to(torch.int64).contiguous().numpy().tobytes())
    if data.attention_mask is not None:
        h.update(data.attention_mask.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _source_identity(hf_dir: Path) -> dict[str, Any]:
    files = sorted(p for p in hf_dir.glob("*") if p.suffix in (".safetensors", ".bin", ".json"))
    return {"dir": str(hf_dir.resolve()), "files": [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]}


def quantize_model(
    source: Any,
    method: str = "gptq",
    scheme: QuantScheme = QuantScheme(4, 128, True),
    calib: CalibrationConfig | CalibrationData | None = None,
    act_order: bool | str | None = None,
    device: str | torch.device = "cpu",
    workdir: str | Path | None = None,
    rules: Rules = None,
    dtype: torch.dtype = torch.float32,
    stop_after: int | None = None,
    **options: Any,
) -> QuantizedModel:
    """Quantize every linear layer inside the decoder layers of ``source``, streaming layer by layer.

    ``source`` is anything :func:`lowbit.models.resolve` accepts (an HF folder, a GGUF file...).
    ``calib`` is a :class:`CalibrationConfig` (text to sample) or ready :class:`CalibrationData`
    (token ids, e.g. the exact samples another tool used). ``rules`` maps regular expressions over HF weight names to a scheme or ``None`` (keep float).
    Embeddings, ``lm_head`` and norms stay float (AWQ may return folded norms in
    ``float_overrides``). Finished layers' results are written to ``workdir`` (so an interrupted
    run resumes) or to a temporary folder, and the returned model's ``weights`` and
    ``float_overrides`` read them from there one tensor at a time: keep ``workdir`` until the
    result is saved (a temporary folder lives as long as the returned mappings).
    ``options`` go to the method's handler (GPTQ: ``damp``, ``static_groups``, ``block_size``,
    ``mse_clip``, ``min_expert_tokens``; AWQ: ``n_grid``, ``duo_scaling``, ``clip``...).

    GPTQ defaults: act-order ``"static"`` and group ranges chosen by an MSE search
    (``mse_clip=True``); ``act_order="off", mse_clip=False`` is the plain published algorithm.
    At 3 bits on SmolLM2-135M these defaults take WikiText-2 perplexity from 84-121 (plain,
    worse than RTN's 81) to 52-68 (bench/results/quality_calibrated.md).
    """
    from transformers import AutoConfig

    from lowbit.models import Checkpoint, resolve
    from lowbit.models.loader import load_tokenizer
    from lowbit.models.streaming import stream_quantize

    given = calib if isinstance(calib, CalibrationData) else None
    calib = CalibrationConfig() if given is not None or calib is None else calib
    handler = make_handler(method, scheme, act_order, rules, **options)
    src = resolve(source)
    ckpt = Checkpoint(src.hf_dir)
    config = AutoConfig.from_pretrained(str(src.hf_dir))
    data: CalibrationData | None = given
    if handler.needs_inputs and data is None:
        data = load_calibration(load_tokenizer(src.hf_dir), calib, method, source=src, device=device)
    calib_id = calib.resolved(method).describe() if given is None else {"ids_sha256": _ids_digest(given)}
    request = {"source": _source_identity(src.hf_dir), "calib": calib_id, "dtype": str(dtype)}
    sr = stream_quantize(
        config, ckpt, data, handler, device=device, dtype=dtype, batch_size=calib.batch_size,
        workdir=workdir, request=request, stop_after=stop_after,
    )
    weights, floats, info = _stored(sr)
    cfg = config.to_dict()
    cfg["lowbit"] = {
        "method": method, "scheme": scheme.describe(), "act_order": getattr(handler, "act_order", False),
        "static_groups": getattr(handler, "static_groups", False), "calibration": request["calib"],
        "calibration_source": None if data is None else data.source, "seconds": sr.seconds,
        "resumed_from_layer": sr.resumed_from, "layers": info,
    }
    return QuantizedModel(weights, floats, cfg, method)


def quantize_in_memory(
    model: nn.Module, data: CalibrationData | None, handler: Any, batch_size: int = 8
) -> QuantizedModel:
    """Reference path with the whole model in memory (for tests and small models).

    The inputs of layer ``i`` are captured by running the whole model (layers before ``i``
    already quantized, or restored to float for float-propagating methods) and stopping at
    layer ``i``; the handler then quantizes layer ``i`` in place.
    """
    from lowbit.models.adapters import get_adapter, get_submodule
    from lowbit.models.streaming import LayerContext, LayerInputs, LayerResult

    adapter = get_adapter(model.config)
    layers = get_submodule(model, adapter.layers)
    base = get_submodule(model, adapter.layers.rpartition(".")[0])
    device = next(model.parameters()).device
    results: dict[int, LayerResult] = {}

    class _Stop(Exception):
        pass

    for i, layer in enumerate(layers):
        hidden: list[torch.Tensor] = []
        kwargs: list[dict[str, Any]] = []
        masks: list[torch.Tensor | None] = []

        def grab(_m: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
            hidden.append(args[0] if args else kw.pop("hidden_states"))
            kwargs.append(dict(kw))
            raise _Stop

        if handler.needs_inputs:
            assert data is not None
            h = layer.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                for ids, m in data.batches(batch_size):
                    try:
                        with torch.no_grad():
                            base(input_ids=ids.to(device), attention_mask=None if m is None else m.to(device), use_cache=False)
                    except _Stop:
                        pass
                    masks.append(None if m is None else m.to(device).bool())
            finally:
                h.remove()
        snapshot = {k: v.clone() for k, v in layer.state_dict().items()} if handler.propagate == "float" else None
        ctx = LayerContext(i, layer, adapter, model.config, LayerInputs(hidden, kwargs, masks), device)
        with torch.no_grad():
            results[i] = handler.process(ctx)
        if snapshot is not None:
            layer.load_state_dict(snapshot)
    weights, floats, info = _flatten(adapter, results)
    return QuantizedModel(weights, floats, {"lowbit": {"layers": info}}, "in-memory")
