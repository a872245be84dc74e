"""The Python API behind every CLI command: quantize, evaluate, inspect, demo."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .core.scheme import QuantScheme
from .errors import LowbitError
from .eval import chunk_bos, compare_models, default_text, folder_size, kl_divergence, perplexity, read_text, tokenize
from .methods.base import QuantizedModel
from .methods.rtn import rtn
from .methods.store import ScratchDir, StoredWeights, write_result_file
from .models import Checkpoint, load, resolve
from .models.loader import read_config
from .progress import track
from .recipe import Recipe


def quantize_rtn(source: Any, recipe: Recipe) -> QuantizedModel:
    """Round-to-nearest over a whole model, one tensor in memory at a time.

    Each result goes to a file in a temporary folder; the returned weights read them back on access.
    """
    src = resolve(source)
    ckpt = Checkpoint(src.hf_dir)
    plan = recipe.plan({n: ckpt.shape(n) for n in ckpt.keys()}, where=src.spec)
    scratch = ScratchDir("lowbit-rtn-")
    entries: dict[str, tuple[Path, str, QuantScheme]] = {}
    for k, name in enumerate(track(plan, desc="rtn", total=len(plan), unit="tensor")):
        w = ckpt.get(name).float()
        if not torch.isfinite(w).all():
            raise LowbitError(ckpt.file_of(name), f"tensor {name} has NaN or Inf values")
        path = scratch.path / f"{k:06d}.safetensors"
        qw = rtn(w, plan[name], mse_clip=recipe.mse_clip)
        write_result_file(path, {name: qw}, {}, {})
        entries[name] = (path, name, qw.scheme)
        ckpt.close()
    return QuantizedModel(StoredWeights(entries, scratch), {}, read_config(src.hf_dir), "rtn")


def quantize_calibrated(source: Any, method: str, recipe: Recipe, calib: str | None = None,
                        samples: int | None = None, seq_len: int | None = None, act_order: bool | str | None = None,
                        device: str = "cpu", seed: int = 0, workdir: str | Path | None = None,
                        **options: Any) -> QuantizedModel:
    """GPTQ or AWQ through the layer-by-layer engine, with ``recipe``'s rules.

    ``act_order``: GPTQ's mode (``"static"`` by default, ``"dynamic"``, ``"off"``). GPTQ always
    searches its group ranges by MSE; ``recipe.mse_clip`` applies to RTN-quantized tensors.
    ``options`` go to the method's layer handler (e.g. GPTQ's ``grid="Q4_K"`` for GGUF output).
    """
    from .methods import quantize_model
    from .models.calibration import CalibrationConfig

    src = resolve(source)
    ckpt = Checkpoint(src.hf_dir)
    plan = recipe.plan({n: ckpt.shape(n) for n in ckpt.keys()}, where=src.spec)  # refuse bad groups before calibrating
    cfg = CalibrationConfig(path=calib, n_samples=samples, seq_len=seq_len, seed=seed)
    return quantize_model(src, method=method, scheme=recipe.scheme, calib=cfg, act_order=act_order,
                          device=device, workdir=workdir, rules=plan.get, **options)


def quantize(source: Any, out: str | Path, method: str = "rtn", recipe: Recipe | None = None,
             format: str = "compressed-tensors", overwrite: bool = False, **method_args: Any) -> Path:  # noqa: A002
    """Quantize ``source`` with ``method`` and write it to ``out`` in ``format``."""
    from . import formats

    recipe = recipe or Recipe()
    src = resolve(source)
    if format not in formats.FORMATS:
        raise LowbitError(out, f"unknown format {format!r} (choose from {', '.join(formats.FORMATS)}, gguf)")
    if method == "rtn":
        qm = quantize_rtn(src, recipe)
    else:
        qm = quantize_calibrated(src, method, recipe, **method_args)
    return formats.save(qm, src.hf_dir, out, format=format, overwrite=overwrite)


@dataclass
class EvalSettings:
    text: str | Path | None = None
    ctx: int = 512
    max_chunks: int | None = None
    batch_size: int = 4
    score_all: bool = False


def _text_tokens(tokenizer: Any, settings: EvalSettings) -> tuple[str, torch.Tensor]:
    if settings.text is None:
        name, text = default_text()
    else:
        name, text = str(settings.text), read_text(settings.text)
    # Only what the chunks need is tokenized, so a large file costs no more than the evaluation.
    if settings.max_chunks is not None:
        text = text[: settings.ctx * settings.max_chunks * 12]
    return name, tokenize(tokenizer, text, where=name)


def evaluate(model: Any, ref: Any = None, settings: EvalSettings | None = None) -> dict[str, Any]:
    """Perplexity of ``model`` (and KL-divergence against ``ref`` when given), plus its size."""
    settings = settings or EvalSettings()
    loaded = load(model)
    text_name, tokens = _text_tokens(loaded.tokenizer, settings)
    bos = chunk_bos(loaded.tokenizer, tokens)
    kwargs = dict(ctx=settings.ctx, batch_size=settings.batch_size, bos_id=bos,
                  score_all=settings.score_all, max_chunks=settings.max_chunks)
    result: dict[str, Any] = {"model": str(model), "text": text_name, "ctx": settings.ctx}
    if ref is None:
        result.update(perplexity(loaded.model, tokens, **kwargs).as_dict())
    else:
        ref_model = load(ref).model
        result["ref"] = str(ref)
        result.update(kl_divergence(ref_model, loaded.model, tokens, **kwargs).as_dict())
    result["size"] = folder_size(loaded.source.hf_dir).as_dict() if loaded.source.kind in ("quantized", "hf") else None
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


def demo(model: str = "smollm2-135m", settings: EvalSettings | None = None,
         schemes: tuple[tuple[str, QuantScheme, bool], ...] = DEMO_SETTINGS) -> dict[str, Any]:
    """Quantize ``model`` at a few RTN settings and measure size, perplexity and KL-divergence.

    Each setting is written as a compressed-tensors checkpoint and loaded back, so the numbers
    describe the files, not an in-memory shortcut. The reference runs once for all settings.
    """
    settings = settings or EvalSettings(max_chunks=4)
    src = resolve(model)
    ref = load(src)
    text_name, tokens = _text_tokens(ref.tokenizer, settings)
    bos = chunk_bos(ref.tokenizer, tokens)
    ref_size = folder_size(src.hf_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-demo-") as tmp:
        models: dict[str, torch.nn.Module] = {}
        extra: dict[str, dict[str, float]] = {}
        for label, scheme, clip in schemes:
            out = Path(tmp) / label.replace(" ", "_").replace("+", "_")
            t0 = time.perf_counter()
            quantize(src, out, recipe=Recipe(scheme=scheme, mse_clip=clip, group_fallback=True))
            seconds = time.perf_counter() - t0
            size = folder_size(out)
            models[label] = load(out).model
            extra[label] = {"bytes": size.file_bytes, "bpw": size.bpw_quantized, "quantize_s": seconds}
        results = compare_models(ref.model, models, tokens, ctx=settings.ctx, batch_size=settings.batch_size,
                                 bos_id=bos, score_all=settings.score_all, max_chunks=settings.max_chunks)
    first = next(iter(results.values()))
    rows.append({"setting": "float32 (reference)", "bytes": ref_size.file_bytes, "bpw": 32.0, "ppl": first.ppl_ref,
                 "kl_mean": 0.0, "kl_p99": 0.0, "top1": 1.0, "quantize_s": 0.0})
    for label, kl in results.items():
        rows.append({"setting": label, **extra[label], "ppl": kl.ppl, "kl_mean": kl.kl_mean,
                     "kl_p99": kl.kl_p99, "top1": kl.top1_agreement})
    speed = sum(r.tokens_per_s for r in results.values()) / len(results)
    return {"model": model, "text": text_name, "ctx": settings.ctx, "tokens_scored": first.n_tokens,
            "eval_tokens_per_s": speed, "rows": rows,
            "note": "the demo models' weights already sit on a 4-bit grid (Q4_1 / Q4_K_M), so 4-bit rows look "
                    "better than they would on an FP16 model; KL-divergence is the more telling column."}


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of demo rows."""
    head = f"{'setting':<22} {'MB':>8} {'bpw':>6} {'PPL':>9} {'KL mean':>9} {'KL p99':>8} {'top-1':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['setting']:<22} {r['bytes'] / 1e6:>8.1f} {r['bpw']:>6.2f} {r['ppl']:>9.3f} "
                     f"{r['kl_mean']:>9.5f} {r['kl_p99']:>8.4f} {100 * r['top1']:>6.2f}%")
    return "\n".join(lines)
