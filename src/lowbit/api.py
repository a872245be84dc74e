"""The Python API behind every CLI command: quantize, evaluate, inspect, demo."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .core.quantized import QuantizedModel
from .core.scheme import QuantScheme
from .errors import LowbitError
from .eval import chunk_bos, default_text, folder_size, kl_divergence, perplexity, read_text, tokenize
from .models import Checkpoint, load, resolve
from .models.demo import DEFAULT_DEMO
from .models.loader import read_config
from .recipe import Recipe


def quantize_model(source: Any, method: str = "rtn", recipe: Recipe | None = None, format: str | None = None,  # noqa: A002
                   calib: str | None = None, samples: int | None = None, seq_len: int | None = None,
                   act_order: bool | str | None = None, device: str = "cpu", seed: int = 0,
                   workdir: str | Path | None = None, **options: Any) -> QuantizedModel:
    """Quantize ``source`` with a registered method and ``recipe``'s rules, in memory of about one
    layer; the result's tensors are read from disk on access (see :func:`lowbit.pipeline.quantize_model`).

    ``format`` (when known) is checked to hold every planned tensor before any calibration.
    ``calib``/``samples``/``seq_len``/``seed``: calibration text for calibrated methods (a file,
    ``pydoc`` or ``selfgen``; sizes default to the method's). ``act_order``: GPTQ's mode
    (``"static"`` by default, ``"dynamic"``, ``"off"``). ``options`` go to the method's handler.
    """
    from .models.calibration import CalibrationConfig
    from .pipeline import quantize_model as run

    cfg = CalibrationConfig(path=calib, n_samples=samples, seq_len=seq_len, seed=seed)
    return run(source, method=method, recipe=recipe or Recipe(), calib=cfg, act_order=act_order, device=device,
               workdir=workdir, format=format, **options)


def quantize(source: Any, out: str | Path, method: str = "rtn", recipe: Recipe | None = None,
             format: str | None = None, overwrite: bool = False, *, to: str | None = None,  # noqa: A002
             imatrix: str | Path | None = None, pure: bool = False, tensor_types: tuple[str, ...] | list[str] = (),
             output_tensor_type: str | None = None, token_embedding_type: str | None = None,
             device: str = "cpu", report: dict[str, Any] | None = None, target_bpw: float | None = None,
             target_size: str | int | None = None, sensitivity: str | Path | None = None,
             **method_args: Any) -> Path:
    """Quantize ``source`` and write it to ``out``: the one entry point for every method and format.

    ``format``: a registered checkpoint format (``compressed-tensors``, ``gptq``, ``awq``...) or
    ``gguf`` (the default when ``to`` is given). For GGUF, ``to`` is the type or mix: with
    ``method="rtn"`` llama.cpp's own types and mixes (``Q4_K_M``, ``IQ4_XS``...) byte-identical to
    llama-quantize, with ``imatrix``, ``pure``, ``tensor_types`` (``PATTERN=TYPE``),
    ``output_tensor_type`` and ``token_embedding_type`` as llama-quantize takes them; with a
    calibrated method (``gptq``, ``awq``) blocks holding the calibrated codes (``Q4_0``,
    ``Q4_1``, ``Q8_0``; ``Q4_K`` with GPTQ on llama.cpp's own grid), every tensor the type fits
    (``pure`` is implied), the same options applying to the tensors around them.
    ``method_args`` go to :func:`quantize_model` (calibration, ``act_order``, handler options).
    An existing ``out`` is refused before any work unless ``overwrite``. ``report`` (a dict, GGUF
    outputs): filled with the tensors that fell back to other types and the real bits per weight.
    ``to="auto"`` (GGUF, RTN): llama.cpp's types chosen per tensor from measured sensitivity to a
    budget, ``target_bpw`` or ``target_size`` (:mod:`lowbit.mix.gguf_auto`; ``sensitivity``: a table
    file reused when it exists, else written; calibration text ``method_args["calib"]``, pydoc by default).
    """
    from . import distributed as dist
    from .fileio import check_output_path
    from .formats import FORMATS, save

    fmt = (format or ("gguf" if to else "compressed-tensors")).lower()
    device = dist.setup(device)  # several processes (torchrun): join the group; rank 0 writes the output
    if dist.is_main():
        check_output_path(out, overwrite)
    if fmt != "gguf":
        if to:
            raise LowbitError(out, f"--to {to} is a GGUF type: it needs --format gguf (or no --format)")
        if fmt not in FORMATS:
            raise LowbitError(out, f"unknown format {fmt!r} (choose from {', '.join([*FORMATS, 'gguf'])})")
    if fmt == "gguf" and method_args.get("kv_cache") not in (None, "none"):
        raise LowbitError(out, "GGUF files hold no KV-cache scales (llama.cpp picks its cache type at run "
                               "time): drop kv_cache (--kv-cache) or write compressed-tensors")
    # llama.cpp's types read a GGUF source as it is: no dequantized copy of it is made (or reused)
    src = source if fmt == "gguf" and method == "rtn" else resolve(source)
    if fmt == "gguf":
        if not to and method == "rtn":
            raise LowbitError(out, "--format gguf needs --to TYPE (e.g. Q4_K_M)")
        to = to or "Q4_0"  # calibrated codes: 4-bit blocks of 32
        gguf_args: dict[str, Any] = dict(imatrix_path=imatrix, tensor_types=list(tensor_types), overwrite=overwrite,
                                         output_tensor_type=output_tensor_type,
                                         token_embedding_type=token_embedding_type, report=report)
        if method == "rtn" and to.lower() == "auto":
            from .mix.gguf_auto import quantize_auto_cached

            with _disk_full(out):
                return quantize_auto_cached(source, out, target_bpw=target_bpw, target_size=target_size,
                                            imatrix=imatrix, sensitivity=sensitivity, calib=method_args.get("calib"),
                                            overwrite=overwrite, report=report)
        if target_bpw is not None or target_size is not None:
            raise LowbitError(out, "--target-bpw/--target-size go with --to auto")
        if method == "rtn":
            from .gguf.convert import quantize_to_gguf

            with _disk_full(out), dist.rank0_writes():  # llama.cpp's types: encoded by one process
                return quantize_to_gguf(src, out, to, pure=pure, device=device, **gguf_args) if dist.is_main() else Path(out)
        from .gguf.from_quantized import KQUANT_GRIDS, quantized_to_gguf

        recipe = recipe or Recipe()
        if to.upper() in KQUANT_GRIDS:  # GPTQ picks codes on llama.cpp's own K-quant grid
            if method != "gptq":
                raise LowbitError(out, f"--to {to} with calibrated codes needs --method gptq "
                                       "(AWQ codes go to Q4_0, Q4_1 or Q8_0)")
            recipe = replace(recipe, scheme=QuantScheme(4, 32, False))
            method_args["grid"] = to.upper()
        qm = quantize_model(src, method, recipe, device=device, **method_args)
        with _disk_full(out), dist.rank0_writes():
            return quantized_to_gguf(src, qm, out, qtype=to, **gguf_args) if dist.is_main() else Path(out)
    qm = quantize_model(src, method, recipe or Recipe(), format=fmt, device=device, **method_args)
    with _disk_full(out), dist.rank0_writes():
        return save(qm, src.hf_dir, out, format=fmt, overwrite=overwrite) if dist.is_main() else Path(out)


@contextlib.contextmanager
def _disk_full(out: str | Path) -> Iterator[None]:
    """A full disk while writing ``out`` is a one-line error (the writers remove their partial output)."""
    from .models.store import no_space_left

    try:
        yield
    except Exception as exc:
        if no_space_left(exc):
            raise LowbitError(out, "no space left on device while writing; nothing was written "
                                   "(free some space or write to another disk)") from None
        raise


@dataclass
class EvalSettings:
    """How :func:`evaluate` measures. ``runtime``: ``"lowbit"`` (the model dequantized into
    transformers, float32 activations) or ``"llama.cpp"`` (GGUF files run by llama.cpp itself
    through llama-cpp-python; PPL/KL computed by lowbit on its logits). ``emulate``:
    ``"llama.cpp"`` rounds, in lowbit's runtime, the inputs of every linear of a GGUF file as
    llama.cpp's CPU matmuls do for that weight's type (:mod:`lowbit.runtime.emulate`)."""

    text: str | Path | None = None
    ctx: int = 512
    max_chunks: int | None = None
    batch_size: int = 4
    score_all: bool = False
    runtime: str = "lowbit"
    emulate: str | None = None


RUNTIMES = ("lowbit", "llama.cpp")
EMULATIONS = ("llama.cpp",)


def _text_tokens(tokenizer: Any, settings: EvalSettings) -> tuple[str, torch.Tensor]:
    if settings.text is None:
        name, text = default_text()
    else:
        name, text = str(settings.text), read_text(settings.text)
    # Only what the chunks need is tokenized, so a large file costs no more than the evaluation.
    if settings.max_chunks is not None:
        text = text[: settings.ctx * settings.max_chunks * 12]
    return name, tokenize(tokenizer, text, where=name)


def _gguf_file(spec: Any, flag: str) -> Path:
    """The GGUF file of a source given as a ``.gguf`` path or a demo name (llama.cpp runs files)."""
    from .models.demo import DEMOS, demo_gguf
    from .models.loader import ModelSource, is_gguf

    if isinstance(spec, ModelSource) and spec.gguf_path is not None:
        return Path(spec.gguf_path)
    if str(spec) in DEMOS:
        return demo_gguf(str(spec))
    p = Path(str(spec)).expanduser()
    if p.is_file() and is_gguf(p):
        return p
    raise LowbitError(p, f"{flag}: llama.cpp runs GGUF files; write one first "
                         f"(lowbit quantize {spec} --to F32 -o model-f32.gguf)")


def _eval_model(spec: Any, settings: EvalSettings, first: int, role: str) -> tuple[Any, Any, Any, str]:
    """(what produces the logits, its tokenizer, its ModelSource or None, its numerics) for ``spec``
    under ``settings.runtime`` / ``settings.emulate``. ``role``: ``model`` or ``ref``."""
    from .runtime.emulate import NUMERICS_EMULATED, NUMERICS_LOWBIT, install_gguf

    if settings.runtime == "llama.cpp":
        from .gguf.llamacpp import LlamaCppTokenizer, Runner, Vocab

        path = _gguf_file(spec, "--runtime llama.cpp" if role == "model" else "--ref with --runtime llama.cpp")
        runner = Runner(path, settings.ctx, first)
        return runner, LlamaCppTokenizer(None, Vocab(path)), None, Runner.numerics
    loaded = _eval_load(spec)
    if settings.emulate == "llama.cpp":
        gguf = loaded.source.gguf_path
        if gguf is None:
            if role == "model":
                raise LowbitError(spec, "--emulate llama.cpp applies to GGUF files (each weight's GGML type decides "
                                        "how llama.cpp rounds that matmul's input)")
            install_gguf(loaded.model, None)  # float weights run as F32 in llama.cpp: only its F16 KV cache applies
            return loaded.model, loaded.tokenizer, loaded.source, NUMERICS_EMULATED
        install_gguf(loaded.model, gguf)
        return loaded.model, loaded.tokenizer, loaded.source, NUMERICS_EMULATED
    return loaded.model, loaded.tokenizer, loaded.source, NUMERICS_LOWBIT + _declared_numerics(loaded)


def _eval_load(spec: Any) -> Any:
    """``spec`` loaded for evaluation; a checkpoint of float weights with an FP8 KV cache
    (compressed-tensors ``dense``) loads as the float model it is (``resolve``: kind ``hf``; its
    k/v scales are applied by :func:`_declared_numerics`)."""
    return load(resolve(spec))


def _declared_numerics(loaded: Any) -> str:
    """Install the activation and KV-cache rounding a compressed-tensors checkpoint declares
    (:mod:`lowbit.eval.numerics`) and say so in ``numerics``."""
    from .eval.numerics import apply

    src = loaded.source
    if src is None or src.kind not in ("quantized", "hf") or src.quantization_config is None:
        return ""
    words = apply(loaded.model, src.hf_dir)
    return f"; as the checkpoint's runtime runs it: {words}" if words else ""


def _unapplied_activations(source: Any) -> str:
    """A note when a checkpoint declares activation quantization (compressed-tensors
    ``input_activations``) that lowbit's evaluation does not apply."""
    qcfg = source.quantization_config if source.kind == "quantized" else None
    groups = (qcfg or {}).get("config_groups") or {}
    acts = [g["input_activations"] for g in groups.values() if isinstance(g, dict) and g.get("input_activations")]
    if not acts:
        return ""
    a = acts[0] if isinstance(acts[0], dict) else {}
    desc = f"{a.get('type', '?')}{a.get('num_bits', '')} {a.get('strategy', '')}".strip()
    return (f"; NOTE: the checkpoint's runtime also quantizes input activations ({desc}), which this "
            "evaluation does not apply")


def evaluate(model: Any, ref: Any = None, settings: EvalSettings | None = None) -> dict[str, Any]:
    """Perplexity of ``model`` (and KL-divergence against ``ref`` when given), plus its size.

    ``numerics`` in the result says what was measured: lowbit's runtime (dequantized weights,
    float32 activations), the same with llama.cpp's activation rounding emulated, or llama.cpp's
    own runtime; the reference runs the same way as the model."""
    from . import distributed as dist

    dist.setup("cpu")  # several processes (torchrun): each scores its share of the chunks
    settings = settings or EvalSettings()
    if settings.runtime not in RUNTIMES:
        raise LowbitError("--runtime", f"unknown runtime {settings.runtime!r} (choose from {', '.join(RUNTIMES)})")
    if settings.emulate is not None and settings.emulate not in EMULATIONS:
        raise LowbitError("--emulate", f"unknown runtime to emulate {settings.emulate!r} (choose from {', '.join(EMULATIONS)})")
    if settings.emulate is not None and settings.runtime != "lowbit":
        raise LowbitError("--emulate", "emulation happens in lowbit's runtime; with --runtime llama.cpp llama.cpp itself runs")
    first = 0 if settings.score_all else settings.ctx // 2
    evaluated, tokenizer, source, numerics = _eval_model(model, settings, first, "model")
    text_name, tokens = _text_tokens(tokenizer, settings)
    bos = chunk_bos(tokenizer, tokens)
    kwargs: dict[str, Any] = dict(ctx=settings.ctx, batch_size=settings.batch_size, bos_id=bos,
                                  score_all=settings.score_all, max_chunks=settings.max_chunks)
    result: dict[str, Any] = {"model": str(model), "text": text_name, "ctx": settings.ctx,
                              "runtime": settings.runtime, "numerics": numerics}
    if ref is None:
        result.update(perplexity(evaluated, tokens, **kwargs).as_dict())
    else:
        ref_model, _, _, ref_numerics = _eval_model(ref, settings, first, "ref")
        result["ref"] = str(ref)
        if ref_numerics != numerics:
            result["ref_numerics"] = ref_numerics
        result.update(kl_divergence(ref_model, evaluated, tokens, **kwargs).as_dict())
        if hasattr(ref_model, "close"):
            ref_model.close()
    if hasattr(evaluated, "close"):
        evaluated.close()
    result["size"] = folder_size(source.hf_dir).as_dict() if source is not None and source.kind in ("quantized", "hf") else None
    return result


def inspect(path: str | Path) -> dict[str, Any]:
    """Tensors, dtypes, quantization, bits per weight, parameters and architecture of a model."""
    p = Path(path)
    if p.is_file():
        from .gguf.reader import inspect_gguf

        return inspect_gguf(p)
    src = resolve(path)
    cfg = read_config(src.hf_dir)
    ckpt = Checkpoint(src.hf_dir)
    tensors = [{"name": n, "shape": list(ckpt.shape(n)), "dtype": ckpt.dtype(n)} for n in sorted(ckpt.keys())]
    from .formats import detect_format

    qcfg = cfg.get("quantization_config")
    return {
        "path": str(src.hf_dir),
        "kind": src.kind,
        "architecture": cfg.get("model_type"),
        "layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "format": detect_format(src.hf_dir) or "float",
        "quantization": qcfg,
        "size": folder_size(src.hf_dir).as_dict(),
        "tensors": tensors,
    }


DEMO_SETTINGS: tuple[tuple[str, QuantScheme, bool], ...] = (
    ("int8 g64 sym", QuantScheme(8, 64, True), False),
    ("int4 g64 sym", QuantScheme(4, 64, True), False),
    ("int4 g64 asym+clip", QuantScheme(4, 64, False), True),
    ("int4 per-channel sym", QuantScheme(4, -1, True), False),
)


def demo(model: str = DEFAULT_DEMO, settings: EvalSettings | None = None,
         schemes: tuple[tuple[str, QuantScheme, bool], ...] = DEMO_SETTINGS) -> dict[str, Any]:
    """Quantize ``model`` at a few RTN settings and measure size, perplexity and KL-divergence.

    Each setting is written as a compressed-tensors checkpoint and loaded back, so the numbers
    describe the files, not an in-memory shortcut. The reference runs once for all settings and
    its log-probabilities are kept (on disk), so that memory holds one model at a time: the
    reference, then each quantized model in turn (packed, as :func:`lowbit.runtime.qlinear.load_quantized`
    runs it: the same logits as the model dequantized), freed before the next is loaded.
    """
    import gc

    from .eval.perplexity import reference_scores, score_against
    from .fileio import scratch
    from .memory import trim
    from .progress import track
    from .runtime.qlinear import load_quantized

    settings = settings or EvalSettings(max_chunks=4)
    src = resolve(model)
    ref = load(src)
    tokenizer = ref.tokenizer
    text_name, tokens = _text_tokens(tokenizer, settings)
    bos = chunk_bos(tokenizer, tokens)
    ref_size = folder_size(src.hf_dir)
    rows = []
    results: dict[str, Any] = {}
    extra: dict[str, dict[str, float]] = {}
    with scratch("lowbit-demo-") as tmp:  # <tmp>/lowbit-demo-<pid>.<random>: a killed demo's is removed by the next
        reference = reference_scores(ref.model, tokens, ctx=settings.ctx, batch_size=settings.batch_size,
                                     bos_id=bos, score_all=settings.score_all, max_chunks=settings.max_chunks,
                                     folder=tmp, desc="reference (float)")
        del ref
        gc.collect()
        trim()
        for label, scheme, clip in track(schemes, "demo", unit="setting"):
            out = Path(tmp) / label.replace(" ", "_").replace("+", "_")
            t0 = time.perf_counter()
            quantize(src, out, recipe=Recipe(scheme=scheme, mse_clip=clip, group_fallback=True))
            seconds = time.perf_counter() - t0
            trim()
            size = folder_size(out)
            extra[label] = {"bytes": size.file_bytes, "bpw": size.bpw_quantized, "quantize_s": seconds}
            trim()
            qmodel, _ = load_quantized(out)  # packed weights, dequantized one linear at a time (same logits)
            trim()
            results[label] = score_against(reference, qmodel, desc=f"kl-divergence {label}")
            del qmodel
            gc.collect()
            trim()
    first = next(iter(results.values()))
    rows.append({"setting": "float32 (reference)", "bytes": ref_size.file_bytes, "bpw": 32.0, "ppl": first.ppl_ref,
                 "kl_mean": 0.0, "kl_p99": 0.0, "top1": 1.0, "quantize_s": 0.0})
    for label, kl in results.items():
        rows.append({"setting": label, **extra[label], "ppl": kl.ppl, "kl_mean": kl.kl_mean,
                     "kl_p99": kl.kl_p99, "top1": kl.top1_agreement})
    speed = sum(r.tokens_per_s for r in results.values()) / len(results)
    return {"model": model, "text": text_name, "ctx": settings.ctx, "tokens_scored": first.n_tokens,
            "eval_tokens_per_s": speed, "rows": rows, "note": _demo_note(src)}


def _demo_note(src: Any) -> str:
    """What to keep in mind reading the demo's table; a 4-bit grid is claimed only for a source that
    was a quantized GGUF file (the demo models are), never for float weights."""
    general = "KL-divergence against the unquantized model is the more telling column."
    if src.gguf_path is None:
        return general
    from .gguf.reader import validate_gguf

    hdr = validate_gguf(src.gguf_path)
    types = {t.type.name for t in hdr.tensors if len(t.shape) >= 2}
    quantized = sorted(types - {"F32", "F16", "BF16", "F64"})
    if not quantized:
        return general
    return (f"{Path(src.gguf_path).name} stores its weights as {'/'.join(quantized)}, so the float reference is "
            f"already on that grid and rows at the same bits look better than they would on an FP16 model; "
            f"{general}")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of demo rows."""
    head = f"{'setting':<22} {'MB':>8} {'bpw':>6} {'PPL':>9} {'KL mean':>9} {'KL p99':>8} {'top-1':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['setting']:<22} {r['bytes'] / 1e6:>8.1f} {r['bpw']:>6.2f} {r['ppl']:>9.3f} "
                     f"{r['kl_mean']:>9.5f} {r['kl_p99']:>8.4f} {100 * r['top1']:>6.2f}%")
    return "\n".join(lines)
