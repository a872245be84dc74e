"""The one quantization pipeline: plan, check, calibrate, run the layer engine, collect results.

Every method (RTN, GPTQ, AWQ, any registered one) goes the same way:

1. **plan** the whole output from the recipe's rules over the checkpoint's tensor names and shapes
   (:func:`lowbit.recipe.plan_for`): bad group sizes are refused here, before any work;
2. **check** that the method can produce each planned scheme and, when the output format is
   known, that the format can hold it (one error listing every offending tensor);
3. **calibrate** when the method needs activations (text, chat JSONL, ``pydoc``, ``selfgen``);
4. **stream** the decoder layers through the method's handler with one layer in memory
   (:func:`lowbit.models.engine.stream_quantize`), then the planned tensors outside the layers
   (``lm_head``) with the final hidden states;
5. **collect** the per-layer result files as lazy read-only mappings (:class:`QuantizedModel`).

Writing is the formats' business (:func:`lowbit.formats.save`, the GGUF writer).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowbit.core.quantized import QuantizedModel, QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.methods import METHODS
from lowbit.methods._common import Rules, scheme_lookup
from lowbit.methods.registry import SchemeLookup
from lowbit.models.calibration import CalibrationConfig, CalibrationData, load_calibration
from lowbit.models.store import StoredTensors, StoredWeights, index_result_file
from lowbit.recipe import Plan, Recipe, plan_for

if TYPE_CHECKING:
    from lowbit.models.engine import StreamResult


W4_G128 = QuantScheme(4, 128, True)


def make_handler(method: str, scheme: QuantScheme, act_order: bool | str | None = None, rules: Rules = None,
                 **options: Any) -> Any:
    """The layer handler of a registered method; ``options`` are the handler's fields (e.g. ``damp``).

    ``act_order`` (GPTQ only, see :func:`lowbit.methods.gptq.act_order_flags`) defaults to ``"static"``.
    """
    return METHODS.get(method, "--method").handler(scheme, scheme_lookup(scheme, rules), act_order=act_order,
                                                    **options)


def check_plan(method: str, plan: Plan, format: str | None = None,  # noqa: A002
               shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Refuse, before any work, schemes the method cannot produce or the format cannot hold;
    with the tensors' ``shapes`` the format's shape rules too (whole packed words, packed rows),
    so that nothing the writer would refuse after calibration is let through."""
    m = METHODS.get(method, "--method")
    for name, scheme in plan.schemes.items():
        reason = m.supports(scheme)
        if reason:
            raise LowbitError(name, reason)
    if format is not None:
        from lowbit import formats

        check = getattr(formats, "check_holds", None)
        if check is not None:
            check(dict(plan.schemes), format,
                  {n: tuple(shapes[n]) for n in plan.schemes if n in shapes} if shapes is not None else None)


def _stored(sr: StreamResult) -> tuple[StoredWeights, StoredTensors, dict[str, Any]]:
    """Lazy views over the result files of a :class:`~lowbit.models.engine.StreamResult`."""
    from lowbit.models.layers import disk_name, full_weight_name
    from lowbit.models.manifest import layer_path, outer_path

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
    if outer_path(sr.workdir).exists():
        for name, scheme in index_result_file(outer_path(sr.workdir))[0].items():
            weights[name] = (outer_path(sr.workdir), name, scheme)
    return StoredWeights(weights, sr.scratch), StoredTensors(floats, sr.scratch), info


def _ids_digest(data: CalibrationData) -> str:
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
    scheme: QuantScheme = W4_G128,
    calib: CalibrationConfig | CalibrationData | None = None,
    act_order: bool | str | None = None,
    device: str | torch.device = "cpu",
    workdir: str | Path | None = None,
    rules: Rules = None,
    dtype: torch.dtype = torch.float32,
    stop_after: int | None = None,
    recipe: Recipe | None = None,
    format: str | None = None,  # noqa: A002
    **options: Any,
) -> QuantizedModel:
    """Quantize ``source`` with a registered ``method``, streaming layer by layer.

    ``source`` is anything :func:`lowbit.models.resolve` accepts (an HF folder, a GGUF file...).
    With a ``recipe`` its rules plan every tensor up front (:class:`~lowbit.recipe.Plan`; bad group
    sizes refused before calibrating, ``lm_head`` quantized when a rule asks for it) and
    ``format`` (when given) is checked to hold every planned scheme. Without one, every linear in
    the decoder layers uses ``scheme``, or ``rules`` (regular expressions over HF weight names to
    a scheme or ``None``, first match wins; or a callable), and group sizes that do not divide a
    row leave that tensor float with a warning.
    ``calib`` is a :class:`CalibrationConfig` (text to sample) or ready :class:`CalibrationData`.
    Finished layers' results are written to ``workdir`` (so an interrupted run resumes) or to a
    temporary folder, and the returned model's ``weights`` and ``float_overrides`` read them
    from there one tensor at a time: keep ``workdir`` until the result is saved (a temporary
    folder lives as long as the returned mappings). ``options`` go to the method's handler
    (GPTQ: ``damp``, ``static_groups``, ``block_size``, ``mse_clip``, ``grid``, ``min_expert_tokens``;
    AWQ: ``n_grid``, ``duo_scaling``, ``clip``...; RTN: ``mse_clip``).

    GPTQ defaults: act-order ``"static"`` and group ranges chosen by an MSE search
    (``mse_clip=True``); ``act_order="off", mse_clip=False`` is the plain published algorithm.
    """
    from transformers import AutoConfig

    from lowbit.models import Checkpoint, resolve
    from lowbit.models.adapters import get_adapter
    from lowbit.models.engine import stream_quantize
    from lowbit.models.loader import load_tokenizer
    from lowbit.models.validate import check_checkpoint, config_errors

    m = METHODS.get(method, "--method")
    src = resolve(source)
    ckpt = Checkpoint(src.hf_dir)
    with config_errors(src.gguf_path or src.hf_dir / "config.json"):
        config = AutoConfig.from_pretrained(str(src.hf_dir))
    adapter = get_adapter(config)
    check_checkpoint(config, ckpt, src.gguf_path)  # names and shapes against the architecture, before any work
    plan: Plan | None = None
    kv_strategy = options.pop("kv_cache", None)  # "tensor" / "head": FP8 KV-cache scales (lowbit.formats.kv_cache)
    if recipe is not None and kv_strategy is not None and all(recipe.scheme_for(n, ckpt.shape(n)) is None for n in ckpt.keys()):
        recipe, rules = None, {".": None}  # every weight kept float: a float checkpoint with an FP8 KV cache
    if recipe is not None:
        shapes = {n: ckpt.shape(n) for n in ckpt.keys()}
        embed = f"{adapter.embed}.weight"
        if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in shapes and embed in shapes:
            shapes["lm_head.weight"] = shapes[embed]  # tied: a rule may still quantize lm_head (then untied)
        plan = plan_for(recipe, shapes, where=src.spec)
        check_plan(method, plan, format, shapes)
        if format is not None and getattr(m, "wants_format", False):  # HQQ: float or integer zero points
            options.setdefault("format", format)
        scheme = recipe.scheme
        if recipe.mse_clip and method == "rtn":
            options.setdefault("mse_clip", True)
    elif m.supports(scheme):
        raise LowbitError(f"--method {method}", str(m.supports(scheme)))
    lookup: SchemeLookup = plan if plan is not None else scheme_lookup(scheme, rules)
    if kv_strategy is not None and format is not None:
        from lowbit.formats.kv_cache import check_format

        check_format(format)
    handler = m.handler(scheme, lookup, act_order=act_order, **options)
    if kv_strategy is not None:
        from lowbit.formats.kv_cache import KVCacheHandler

        handler = KVCacheHandler(handler, kv_strategy)
    acts = scheme.activations if scheme is not None else None
    if kv_strategy is not None or (acts is not None and acts.dynamic is not True):
        # llm-compressor calibrates with eager attention; SDPA's attention outputs differ by a few ulps, and
        # through them the later layers' inputs: eager gives its KV and static input scales bit for bit
        config._attn_implementation = "eager"
    check_model = getattr(handler, "check_model", None)
    if check_model is not None:  # what the method needs of the architecture (SmoothQuant's mappings), before calibrating
        check_model(adapter)
    outer = plan.outside(adapter.layers + ".") if plan is not None else {}

    given = calib if isinstance(calib, CalibrationData) else None
    cfg = calib if isinstance(calib, CalibrationConfig) else CalibrationConfig()
    data: CalibrationData | None = given
    prepare = getattr(handler, "prepare", None)  # a whole-model pass before the layers (SqueezeLLM's Fisher)
    wants = handler.needs_inputs or (prepare is not None and getattr(handler, "wants_calibration", True))
    if wants and data is None:
        data = load_calibration(load_tokenizer(src.hf_dir), cfg, m.calibration_default, source=src, device=device)
    calib_id: Any = None
    if m.calibrated:
        calib_id = cfg.resolved(m.calibration_default).describe() if given is None else {"ids_sha256": _ids_digest(given)}
    request = {"source": _source_identity(src.hf_dir), "calib": calib_id, "dtype": str(dtype)}
    if prepare is not None:
        prepare(config, ckpt, data, device=device, dtype=dtype)
    sr = stream_quantize(
        config, ckpt, data, handler, device=device, dtype=dtype, batch_size=cfg.batch_size,
        workdir=workdir, request=request, stop_after=stop_after, outer=outer,
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
    from lowbit.models.layers import LayerContext, LayerInputs, LayerResult, disk_name, full_weight_name

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

        def grab(_m: nn.Module, args: tuple[Any, ...], kw: dict[str, Any],
                 hidden: list[torch.Tensor] = hidden, kwargs: list[dict[str, Any]] = kwargs) -> None:
            hidden.append(args[0] if args else kw.pop("hidden_states"))
            kwargs.append(dict(kw))
            raise _Stop

        if handler.needs_inputs:
            assert data is not None
            h = layer.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                for ids, msk in data.batches(batch_size):
                    try:
                        with torch.no_grad():
                            base(input_ids=ids.to(device), attention_mask=None if msk is None else msk.to(device),
                                 use_cache=False)
                    except _Stop:
                        pass
                    masks.append(None if msk is None else msk.to(device).bool())
            finally:
                h.remove()
        snapshot = {k: v.clone() for k, v in layer.state_dict().items()} if handler.propagate == "float" else None
        ctx = LayerContext(i, layer, adapter, model.config, LayerInputs(hidden, kwargs, masks), device)
        with torch.no_grad():
            results[i] = handler.process(ctx)
        if snapshot is not None:
            layer.load_state_dict(snapshot)
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
    return QuantizedModel(weights, floats, {"lowbit": {"layers": info}}, "in-memory")
