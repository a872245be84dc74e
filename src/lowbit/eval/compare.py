"""``lowbit compare``: quantize a model with several schemes, evaluate each, write one report.

A scheme is a GGUF mix by its name (``Q4_K_M``, ``IQ4_XS``: llama.cpp's types, method RTN) or a
preset with an optional method, ``PRESET[-METHOD]`` (``W4A16-gptq``, ``NF4``: method ``rtn`` when
none is given), written in the first registered format that holds it. The names come from the
registries (mixes, presets, methods, formats), so schemes added later are accepted without a change
here; every scheme is checked before any work, and one that cannot be made is a one-line error.

Each scheme runs in its own process (``isolate``, the default): its peak memory is its own, and its
result (size, bits per weight, PPL, KL mean/p99, top-1, quantization time, evaluation speed, peak
memory, per-layer relative weight error) is cached as ``<out>/cache/<slug>.json`` with the settings
it was measured under, so that a rerun with the same settings resumes where the last one stopped.
The report (``report.html`` with the plots embedded, ``report.md``, ``results.json``,
``pareto.png``, ``sensitivity.png``) is written from the cache at the end.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import LowbitError

#: what a cached result must have been measured with to be reused
_SETTINGS_KEYS = ("model", "text", "ctx", "max_chunks", "batch_size", "calib", "samples", "seq_len")


@dataclass(frozen=True)
class SchemeSpec:
    """One scheme of a comparison: how to make it (``api.quantize``'s arguments)."""

    name: str  # as the user typed it
    method: str
    mix: str | None = None  # a GGUF mix (format gguf)
    preset: str | None = None  # a registered preset (weights only)
    format: str | None = None  # the checkpoint format holding the preset's weights

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)

    @property
    def is_gguf(self) -> bool:
        return self.mix is not None


def _methods() -> list[str]:
    from ..methods import METHODS

    return sorted(METHODS.names(), key=len, reverse=True)  # longest first: rtn-clip before rtn


def parse_scheme(name: str) -> SchemeSpec:
    """The :class:`SchemeSpec` of one name, or a one-line error saying why it cannot be made."""
    from ..core.presets import PRESETS
    from ..formats import FORMATS
    from ..gguf.mixes import MIXES
    from ..methods import METHODS

    text = name.strip()
    if text.upper().replace("-", "_") in MIXES and text.upper() not in PRESETS:
        return SchemeSpec(text, "rtn", mix=text.upper().replace("-", "_"))
    preset_name, method = text, "rtn"
    for m in _methods():
        if text.lower().endswith("-" + m.lower()):
            preset_name, method = text[: -len(m) - 1], m
            break
    if preset_name not in PRESETS:
        raise LowbitError("--schemes", f"unknown scheme {text!r}: a GGUF mix ({', '.join(MIXES)}) or "
                                       f"PRESET[-METHOD] (presets: {', '.join(PRESETS.names())}; "
                                       f"methods: {', '.join(METHODS.names())})")
    p = PRESETS.get(preset_name)
    if p.weights is None or not p.weight_only or p.kv_cache is not None:
        raise LowbitError("--schemes", f"{text}: {p.name} quantizes activations or the KV cache, which lowbit does "
                                       "not write yet")
    reason = METHODS.get(method).supports(p.weights)
    if reason:
        raise LowbitError("--schemes", f"{text}: {reason}")
    for fmt, f in FORMATS.items():
        if f.holds(p.weights) is None:
            return SchemeSpec(text, method, preset=p.name, format=fmt)
    raise LowbitError("--schemes", f"{text}: no registered format holds {p.weights.describe()}")


def parse_schemes(names: str | list[str]) -> list[SchemeSpec]:
    """Every scheme of a comma-separated list (or a list), checked before any work; duplicates refused."""
    items = [n for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not items:
        raise LowbitError("--schemes", "no scheme given (e.g. --schemes Q4_K_M,W4A16-gptq)")
    specs = [parse_scheme(n) for n in items]
    slugs = [s.slug.lower() for s in specs]
    dup = sorted({s for s in slugs if slugs.count(s) > 1})
    if dup:
        raise LowbitError("--schemes", f"scheme given twice: {', '.join(dup)}")
    return specs


@dataclass
class CompareSettings:
    """What every scheme is measured with (the cache key) and how it is made."""

    model: str
    text: str | None = None
    ctx: int = 512
    max_chunks: int | None = 8
    batch_size: int = 4
    calib: str | None = None
    samples: int | None = None
    seq_len: int | None = None
    keep_models: bool = False
    tasks: tuple[str, ...] = ()  # lm-evaluation-harness tasks (lowbit eval --tasks), accuracy per scheme
    task_limit: int | None = None


def _eval_settings(s: CompareSettings) -> Any:
    from ..api import EvalSettings

    return EvalSettings(text=s.text, ctx=s.ctx, max_chunks=s.max_chunks, batch_size=s.batch_size)


def _peak_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def layer_weight_errors(model: Any, ref: Any) -> dict[str, float]:
    """Per decoder layer, ``sum ||W_q - W||^2 / sum ||W||^2`` over its 2-D weights; ``lm_head`` and
    the embedding under their own names (a cheap sensitivity profile: where the scheme loses most)."""
    import torch

    ref_params = dict(ref.named_parameters())
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = ref_params.get(name)
            if p.dim() != 2 or r is None or r.shape != p.shape:
                continue
            m = re.search(r"layers\.(\d+)\.", name)
            key = m.group(1) if m else ("lm_head" if "lm_head" in name else "embed" if "embed" in name else name)
            num[key] = num.get(key, 0.0) + float((p.double() - r.double()).pow(2).sum())
            den[key] = den.get(key, 0.0) + float(r.double().pow(2).sum())
    return {k: num[k] / den[k] for k in num if den[k] > 0}


def make_scheme(spec: SchemeSpec, model: str, out: Path, calib: str | None = None, samples: int | None = None,
                seq_len: int | None = None) -> dict[str, Any]:
    """Quantize ``model`` with ``spec`` to ``out`` (replaced if present); the GGUF writer's report (fallbacks)."""
    from .. import api
    from ..methods import METHODS
    from ..recipe import Recipe

    method_args: dict[str, Any] = {}
    if METHODS.get(spec.method).calibrated:
        method_args = {"calib": calib, "samples": samples, "seq_len": seq_len}
    report: dict[str, Any] = {}
    if spec.is_gguf:
        api.quantize(model, out, to=spec.mix, overwrite=True, report=report)
    else:
        from ..core.presets import preset

        weights = preset(str(spec.preset)).weights
        assert weights is not None  # parse_scheme refused presets without weights
        api.quantize(model, out, method=spec.method, format=spec.format, overwrite=True,
                     recipe=Recipe(scheme=weights, group_fallback=True), **method_args)
    return report


def run_scheme(spec: SchemeSpec, settings: CompareSettings, workdir: str | Path) -> dict[str, Any]:
    """Quantize ``settings.model`` with ``spec`` into ``workdir``, evaluate it against the model, and
    return its row (the quantized output is removed unless ``keep_models``)."""
    import shutil

    from .. import api
    from ..models import load, resolve

    out = Path(workdir) / (spec.slug + (".gguf" if spec.is_gguf else ""))
    t0 = time.perf_counter()
    report = make_scheme(spec, settings.model, out, settings.calib, settings.samples, settings.seq_len)
    quantize_s = time.perf_counter() - t0
    src = resolve(out)
    t1 = time.perf_counter()
    res = api.evaluate(src, ref=settings.model, settings=_eval_settings(settings))
    eval_s = time.perf_counter() - t1
    quantized, reference = load(src), load(settings.model)
    errors = layer_weight_errors(quantized.model, reference.model)
    params = sum(p.numel() for p in reference.model.parameters())  # tied weights counted once
    del quantized, reference
    file_bytes = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    row = {"scheme": spec.name, "method": spec.method, "format": "gguf" if spec.is_gguf else spec.format,
           "bytes": file_bytes, "params": params, "bpw": 8 * file_bytes / max(1, params),
           "ppl": res["ppl"], "ppl_ref": res["ppl_ref"], "kl_mean": res["kl_mean"], "kl_p99": res["kl_p99"],
           "top1": res["top1_agreement"], "quantize_s": quantize_s, "eval_s": eval_s,
           "eval_tokens_per_s": res["tokens_per_s"], "tokens_scored": res["n_tokens"],
           "numerics": res["numerics"], "text": res["text"], "layer_error": errors}
    tasks = getattr(settings, "tasks", ())
    if tasks:
        from .tasks import evaluate_tasks

        row["tasks"] = evaluate_tasks(src, list(tasks), limit=getattr(settings, "task_limit", None))["tasks"]
    if spec.is_gguf and report.get("fallbacks"):
        row["fallbacks"] = report["fallbacks"]
    if src.kind == "gguf":  # the dequantized copy evaluate converted into the cache
        shutil.rmtree(src.hf_dir, ignore_errors=True)
    if not settings.keep_models and out.is_dir():
        shutil.rmtree(out, ignore_errors=True)
    elif not settings.keep_models:
        out.unlink(missing_ok=True)
    row["peak_rss_mb"] = _peak_rss_mb()
    return row


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    import sys

    print(f"lowbit: warning: {' '.join(str(message).split())}", file=file if file is not None else sys.stderr)


def _child(spec: SchemeSpec, settings: CompareSettings, workdir: str, queue: Any, quiet: bool) -> None:
    import warnings

    from .. import progress

    progress.set_enabled(not quiet)
    warnings.showwarning = _one_line_warning  # as the command line shows them
    try:
        queue.put(("ok", run_scheme(spec, settings, workdir)))
    except LowbitError as exc:
        queue.put(("lowbit", (str(exc.where) if exc.where is not None else None, exc.problem)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        queue.put(("error", f"{exc.__class__.__name__}: {exc}"))


def _run_isolated(spec: SchemeSpec, settings: CompareSettings, workdir: Path) -> dict[str, Any]:
    import multiprocessing as mp

    from .. import progress

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(spec, settings, str(workdir), queue, progress._silenced()))
    proc.start()
    try:
        while True:
            try:
                kind, value = queue.get(timeout=1.0)
                break
            except Exception:  # noqa: BLE001 - queue.Empty: is the child still there?
                if not proc.is_alive():
                    raise LowbitError(spec.name, f"its process ended with code {proc.exitcode} "
                                                 "(out of memory?) before returning a result") from None
        proc.join()
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join()
    if kind == "ok":
        return dict(value)
    if kind == "lowbit":
        raise LowbitError(value[0], value[1])
    raise LowbitError(spec.name, f"failed: {value}")


def _cache_key(settings: CompareSettings, spec: SchemeSpec) -> dict[str, Any]:
    from ..methods import METHODS

    s = asdict(settings)
    if not METHODS.get(spec.method).calibrated:  # calibration settings do not change what RTN makes
        s.update(calib=None, samples=None, seq_len=None)
    key = {"spec": asdict(spec), **{k: s[k] for k in _SETTINGS_KEYS}}
    if s["tasks"]:  # keys of runs without tasks stay as they were
        key.update(tasks=list(s["tasks"]), task_limit=s["task_limit"])
    return key


def compare(model: str, schemes: str | list[str], out: str | Path, text: str | None = None, ctx: int = 512,
            max_chunks: int | None = 8, batch_size: int = 4, calib: str | None = None, samples: int | None = None,
            seq_len: int | None = None, isolate: bool = True, keep_models: bool = False,
            tasks: str | list[str] | None = None, task_limit: int | None = None) -> dict[str, Any]:
    """Quantize ``model`` with every scheme, evaluate each against it and write the report in ``out``
    (an existing report folder is resumed: schemes already measured with the same settings are reused)."""
    from ..progress import track

    specs = parse_schemes(schemes)
    task_names: tuple[str, ...] = ()
    if tasks:
        from .tasks import _require, parse_tasks

        task_names = tuple(parse_tasks(tasks))
        _require()  # lm-eval missing: refused before any work
    settings = CompareSettings(str(model), None if text is None else str(text), ctx, max_chunks, batch_size,
                               calib, samples, seq_len, keep_models, task_names, task_limit)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise LowbitError(folder, "exists and is not a folder")
    cache = folder / "cache"
    work = folder / "work"
    cache.mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    reused: list[str] = []
    for spec in track(specs, "compare", unit="scheme"):
        path = cache / f"{spec.slug}.json"
        key = _cache_key(settings, spec)
        if path.exists():
            try:
                saved = json.loads(path.read_text())
            except ValueError:
                saved = {}
            if saved.get("key") == key:
                rows.append(saved["row"])
                reused.append(spec.name)
                continue
        row = _run_isolated(spec, settings, work) if isolate else run_scheme(spec, settings, work)
        _write_json(path, {"key": key, "row": row})
        rows.append(row)
    if not keep_models:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    result = {"model": str(model), "settings": asdict(settings), "rows": rows, "reused": reused}
    from .report import write_compare_report

    result["files"] = [str(p) for p in write_compare_report(result, folder)]
    return result


def _write_json(path: Path, data: Any) -> None:
    from ..fileio import atomic_file

    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
