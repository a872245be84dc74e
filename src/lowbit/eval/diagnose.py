"""``lowbit diagnose``: where a quantized model loses, and what to do about it.

The quantized model and its reference are loaded (dequantized, HF names: a GGUF output too) and compared:

- per tensor: relative weight error ``|W_q - W|^2 / |W|^2``, NaN/Inf counts;
- per layer: the KL-divergence against the reference when only that layer's weights are the quantized
  ones (the rest float), on a few chunks of text; then per tensor, the same for each tensor of the
  worst layers (``per_tensor_layers``);
- outlier channels: input channels of each linear whose largest activation (on the same text, in the
  reference) is over 10x the median channel's, the ones AWQ's scaling and an importance matrix address;
- the advice that follows (a layer is dominant when its single-layer KL is over 2.5x the median layer's), with the exact flags: keep the worst tensors at higher precision
  (``--tensor-type`` for GGUF, ``--override`` otherwise), an importance matrix, more or better
  calibration text, AWQ for outlier channels, another scheme when the error is spread evenly.

``scheme``: diagnose ``model`` (a float model) quantized with a scheme of ``lowbit compare``
(``Q4_K_M``, ``W4A16-gptq``...), made in a scratch folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import LowbitError

OUTLIER_FACTOR = 10.0  # a channel's activation max over the median channel's
DOMINANT_FACTOR = 2.5  # a layer whose single-layer KL is this many times the median layer's is worth keeping


@dataclass
class DiagnoseSettings:
    text: str | Path | None = None
    ctx: int = 256
    max_chunks: int = 2
    batch_size: int = 4
    per_tensor_layers: int = 3
    top: int = 10


def _unit(name: str) -> str:
    m = re.search(r"layers\.(\d+)\.", name)
    return m.group(1) if m else name.rsplit(".weight", 1)[0]


@torch.inference_mode()
def _log_probs(model: torch.nn.Module, chunks: torch.Tensor, first: int, batch_size: int) -> list[torch.Tensor]:
    out = []
    for i in range(0, chunks.shape[0], batch_size):
        logits = model(input_ids=chunks[i : i + batch_size], use_cache=False).logits[:, first:-1].float()
        out.append(F.log_softmax(logits, dim=-1))
    return out


def _kl(ref_lp: list[torch.Tensor], lp: list[torch.Tensor]) -> float:
    total = sum(float((r.exp() * (r - q)).sum(-1).clamp_min(0).sum()) for r, q in zip(ref_lp, lp, strict=True))
    return total / sum(r.shape[0] * r.shape[1] for r in ref_lp)


class _Swap:
    """Put the quantized values of some weights into the reference model, and back."""

    def __init__(self, ref_params: dict[str, torch.nn.Parameter], quantized: dict[str, torch.Tensor]) -> None:
        self.ref, self.q = ref_params, quantized
        self.saved: dict[str, torch.Tensor] = {}

    def __call__(self, names: list[str]) -> _Swap:
        self.names = names
        return self

    def __enter__(self) -> None:
        with torch.no_grad():
            for n in self.names:
                self.saved[n] = self.ref[n].detach().clone()
                self.ref[n].copy_(self.q[n])

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for n in self.names:
                self.ref[n].copy_(self.saved.pop(n))


@torch.inference_mode()
def activation_outliers(model: torch.nn.Module, chunks: torch.Tensor, batch_size: int) -> dict[str, dict[str, Any]]:
    """Per linear (weight name): input channels whose max |activation| is over ``OUTLIER_FACTOR`` x the median's."""
    peaks: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m: torch.nn.Module, args: tuple[torch.Tensor, ...], key: str = f"{name}.weight") -> None:
                peak = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
                peaks[key] = torch.maximum(peaks[key], peak) if key in peaks else peak
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for i in range(0, chunks.shape[0], batch_size):
            model(input_ids=chunks[i : i + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, dict[str, Any]] = {}
    for key, peak in peaks.items():
        med = float(peak.median().clamp_min(1e-12))
        big = (peak > OUTLIER_FACTOR * med).nonzero().flatten()
        out[key] = {"channels": int(big.numel()), "max_ratio": float(peak.max()) / med,
                    "top": [int(c) for c in peak.argsort(descending=True)[: min(5, big.numel())]]}
    return out


def _gguf_info(source: Any) -> dict[str, Any] | None:
    """Mix, per-tensor GGML types (HF names) and imatrix use of a GGUF source; None for other sources."""
    if source.gguf_path is None:
        return None
    from ..gguf.mixes import ftype_name
    from ..gguf.names import hf_tensor_name
    from ..gguf.reader import validate_gguf

    hdr = validate_gguf(source.gguf_path)
    arch = str(hdr.kv.get("general.architecture", "llama"))
    types = {}
    for t in hdr.tensors:
        hf = hf_tensor_name(t.name, arch)
        if hf is not None:
            types[hf] = t.type.name
    ft = hdr.kv.get("general.file_type")
    return {"path": str(source.gguf_path), "arch": arch, "mix": ftype_name(ft) if ft is not None else None,
            "types": types, "imatrix": "quantize.imatrix.file" in hdr.kv}


def _nonfinite_weights(source: Any) -> list[dict[str, Any]]:
    """Weights of a quantized checkpoint that dequantize to NaN/Inf (one at a time), with their counts."""
    if source.kind != "quantized":
        return []
    from ..formats import read_checkpoint

    weights, floats, _ = read_checkpoint(source.hf_dir)
    found = []
    for name in sorted(weights):
        bad = int((~torch.isfinite(weights[name].dequantize())).sum())
        if bad:
            found.append({"name": name, "nonfinite": bad})
    for name in sorted(floats):
        bad = int((~torch.isfinite(floats[name])).sum()) if floats[name].is_floating_point() else 0
        if bad:
            found.append({"name": name, "nonfinite": bad})
    return found


def _quantized_source(source: Any, gguf: dict[str, Any] | None) -> bool:
    if gguf is not None:
        return any(t not in ("F32", "F16", "BF16") for t in gguf["types"].values())
    return source.kind == "quantized"


def _method_of(source: Any) -> str | None:
    q = source.quantization_config or {}
    m = q.get("quant_method")
    return str(m) if m else None


def _keep_flag(name: str, gguf: dict[str, Any] | None) -> str:
    """The flag that keeps tensor ``name`` (HF name) at higher precision when quantizing again."""
    if gguf is not None:
        from ..gguf.names import gguf_tensor_name

        g = gguf_tensor_name(name, gguf["arch"]) or name
        return f"--tensor-type '{re.escape(g.rsplit('.weight', 1)[0])}=Q8_0'"
    module = name.rsplit(".weight", 1)[0]
    return f"--override '{re.escape(module.removeprefix('model.'))}=bits:8'"


def _advice(report: dict[str, Any], gguf: dict[str, Any] | None, method: str | None, ref: str) -> list[str]:
    adv = []
    if report["nonfinite_tensors"]:
        names = ", ".join(t["name"] for t in report["nonfinite_tensors"][:3])
        adv.append(f"NaN/Inf in the quantized weights ({names}): the quantization itself failed (a zero or "
                   "overflowing scale); quantize again, and check the source for NaN/Inf")
    if report["nonfinite_tensors"] and not report["layers"]:
        return adv + ["lowbit refuses to load NaN/Inf weights, so nothing else could be measured"]
    layers = report["layers"]
    total = sum(row["kl"] for row in layers) or 1e-12
    worst = layers[0] if layers else None
    median = sorted(row["kl"] for row in layers)[len(layers) // 2] if layers else 0.0
    flags = [_keep_flag(t["name"], gguf) for t in report["worst_tensors"][:3]]
    if worst is not None and worst["kl"] >= DOMINANT_FACTOR * median and worst["kl"] > 0:
        cmd = (f"lowbit quantize {ref} --to {gguf['mix'] or 'MIX'} " if gguf else f"lowbit quantize {ref} ... ")
        adv.append(f"layer {worst['layer']} alone gives {100 * worst['kl'] / total:.0f}% of the single-layer KL: "
                   f"keep its worst tensors at higher precision: {cmd}{' '.join(flags)}")
    elif report["kl_mean"] > 0.05:
        adv.append("the error is spread over the layers: another scheme gains more than per-tensor fixes "
                   "(more bits: Q5_K_M/Q6_K or W8A16; or a calibrated method: --method gptq / awq)")
    if gguf is not None and not gguf["imatrix"] and any(t.startswith(("Q2", "Q3", "Q4", "IQ")) for t in gguf["types"].values()):
        adv.append(f"no importance matrix was used: lowbit imatrix {ref} --text in-domain.txt -o imatrix.gguf, "
                   f"then quantize with --imatrix imatrix.gguf")
    calib = ("calibrate on text like the deployment's (--calib in-domain.txt, --samples 256; --calib selfgen "
             "when none is at hand)")
    if method in ("gptq", "awq"):
        adv.append(f"calibrated methods fit their text: {calib}")
    elif method == "compressed-tensors" and report["kl_mean"] > 0.05:
        adv.append(f"if it was made with --method gptq or awq: {calib}")
    outl = [t for t in report["worst_tensors"][:5] if t.get("outlier_channels", 0) > 0]
    if outl and method != "awq":
        names = ", ".join(t["name"].removeprefix("model.") for t in outl[:3])
        adv.append(f"outlier input channels feed {names}: AWQ (--method awq) scales them before rounding; "
                   "for GGUF an importance matrix weights them")
    if not adv:
        adv.append(f"mean KL {report['kl_mean']:.4f} nats with no dominant layer: nothing stands out")
    return adv


def diagnose(model: Any, ref: Any, settings: DiagnoseSettings | None = None, scheme: str | None = None) -> dict[str, Any]:
    """Per-layer and per-tensor error of ``model`` against ``ref``, outliers, NaN/Inf, advice (see the module)."""
    if scheme is not None:
        from ..fileio import scratch
        from .compare import make_scheme, parse_scheme

        spec = parse_scheme(scheme)
        with scratch("lowbit-diagnose-") as tmp:
            out = Path(tmp) / (spec.slug + (".gguf" if spec.is_gguf else ""))
            make_scheme(spec, str(model), out)
            try:
                result = diagnose(out, ref if ref is not None else model, settings)
            finally:
                if spec.is_gguf and out.exists():  # the dequantized copy loading converted into the cache
                    import shutil
                    import warnings

                    from ..models import resolve

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        shutil.rmtree(resolve(out).hf_dir, ignore_errors=True)
            result.update(model=str(model), scheme=scheme)
            return result
    if ref is None:
        raise LowbitError("--ref", "diagnose compares with a reference: give --ref (or --scheme to quantize MODEL)")
    from ..api import EvalSettings, _text_tokens
    from ..models import load, resolve
    from ..text import chunk_bos, make_chunks

    settings = settings or DiagnoseSettings()
    src = resolve(model)
    gguf = _gguf_info(src)
    if not _quantized_source(src, gguf):
        raise LowbitError(model, "not a quantized model: give a lowbit output (or --scheme to quantize it here)")
    nonfinite = _nonfinite_weights(src)
    if nonfinite:  # the loader refuses such weights: nothing can run, so this is the diagnosis
        report: dict[str, Any] = {"model": str(model), "ref": str(ref), "nonfinite_tensors": nonfinite,
                                  "layers": [], "worst_tensors": [], "kl_mean": float("nan")}
        report["advice"] = _advice(report, gguf, _method_of(src), str(ref))
        return report
    q = load(src)
    r = load(ref)
    text_name, tokens = _text_tokens(r.tokenizer, EvalSettings(text=settings.text, ctx=settings.ctx,
                                                               max_chunks=settings.max_chunks))
    chunks = make_chunks(tokens, settings.ctx, chunk_bos(r.tokenizer, tokens), settings.max_chunks)
    first = settings.ctx // 2
    ref_params = dict(r.model.named_parameters())
    q_params = {n: p.detach() for n, p in q.model.named_parameters()}
    names = [n for n, p in q_params.items() if p.dim() == 2 and n in ref_params and ref_params[n].shape == p.shape
             and not torch.equal(p, ref_params[n])]
    if not names:
        raise LowbitError(model, "no weight differs from the reference's: nothing to diagnose")
    tensors: dict[str, dict[str, Any]] = {}
    for n in names:
        w, wq = ref_params[n].detach().double(), q_params[n].double()
        bad = int((~torch.isfinite(wq)).sum())
        finite = torch.nan_to_num(wq, nan=0.0, posinf=0.0, neginf=0.0)
        tensors[n] = {"name": n, "rel_error": float((finite - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))}
        if gguf is not None and n in gguf["types"]:
            tensors[n]["type"] = gguf["types"][n]
        if bad:  # not reached through the loader, which refuses NaN/Inf; kept for sources that let them through
            nonfinite.append({"name": n, "nonfinite": bad})
    from ..progress import bar

    outliers = activation_outliers(r.model, chunks, settings.batch_size)
    for n, t in tensors.items():
        if n in outliers:
            t["outlier_channels"] = outliers[n]["channels"]
            t["outlier_ratio"] = outliers[n]["max_ratio"]
    ref_lp = _log_probs(r.model, chunks, first, settings.batch_size)
    q_lp = _log_probs(q.model, chunks, first, settings.batch_size)
    full_kl = _kl(ref_lp, q_lp)
    nan_logits = any(bool((~torch.isfinite(x)).any()) for x in q_lp)
    del q_lp, q
    with torch.no_grad():
        quantized = {n: torch.nan_to_num(q_params[n]) for n in names}
    del q_params
    swap = _Swap(ref_params, quantized)
    units: dict[str, list[str]] = {}
    for n in names:
        units.setdefault(_unit(n), []).append(n)
    layers = []
    with bar(len(units), "diagnose: one layer at a time", unit="layer") as pbar:
        for unit, members in units.items():
            with swap(members):
                kl = _kl(ref_lp, _log_probs(r.model, chunks, first, settings.batch_size))
            layers.append({"layer": unit, "kl": kl, "tensors": len(members),
                           "rel_error": sum(tensors[m]["rel_error"] for m in members) / len(members)})
            pbar.update(1)
    layers.sort(key=lambda row: -row["kl"])
    worst_units = [row["layer"] for row in layers[: settings.per_tensor_layers]]
    members_all = [m for u in worst_units for m in units[u]]
    with bar(len(members_all), "diagnose: tensors of the worst layers", unit="tensor") as pbar:
        for m in members_all:
            with swap([m]):
                tensors[m]["kl"] = _kl(ref_lp, _log_probs(r.model, chunks, first, settings.batch_size))
            pbar.update(1)
    worst = sorted(tensors.values(), key=lambda t: (-t.get("kl", -1.0), -t["rel_error"]))[: settings.top]
    report = {
        "model": str(model), "ref": str(ref), "text": text_name, "ctx": settings.ctx, "chunks": int(chunks.shape[0]),
        "tokens_scored": int(chunks.shape[0] * (settings.ctx - 1 - first)), "kl_mean": full_kl,
        "kl_sum_single_layers": sum(row["kl"] for row in layers), "nan_in_logits": nan_logits,
        "nonfinite_tensors": nonfinite, "layers": layers, "worst_tensors": worst,
        "outliers": sorted(({"name": k, **v} for k, v in outliers.items() if v["channels"]),
                           key=lambda o: -o["max_ratio"])[: settings.top],
        "gguf": None if gguf is None else {k: gguf[k] for k in ("mix", "imatrix")},
    }
    report["advice"] = _advice(report, gguf, _method_of(src), str(ref))
    return report


def format_diagnose(result: dict[str, Any]) -> str:
    if not result["layers"]:
        bad = "; ".join(f"{t['name']}: {t['nonfinite']} values" for t in result["nonfinite_tensors"])
        return "\n".join([f"model: {result['model']}   ref: {result['ref']}", f"NaN/Inf weights: {bad}", "",
                          "advice:"] + [f"  - {a}" for a in result["advice"]])
    lines = [f"model: {result['model']}" + (f" quantized as {result['scheme']}" if result.get("scheme") else "")
             + f"   ref: {result['ref']}",
             f"text: {result['text']}, {result['chunks']} chunks of {result['ctx']}, {result['tokens_scored']} tokens scored",
             f"KL mean (all quantized): {result['kl_mean']:.5f} nats; sum of single-layer KLs "
             f"{result['kl_sum_single_layers']:.5f}; NaN/Inf in logits: {'yes' if result['nan_in_logits'] else 'no'}; "
             f"tensors with NaN/Inf: {len(result['nonfinite_tensors'])}", "",
             "layers by KL when only that layer is quantized:"]
    total = result["kl_sum_single_layers"] or 1e-12
    for row in result["layers"][:10]:
        lines.append(f"  {row['layer']:>14}  KL {row['kl']:.5f}  ({100 * row['kl'] / total:4.1f}%)  "
                     f"weight error {row['rel_error']:.2e}")
    lines += ["", "worst tensors:"]
    for t in result["worst_tensors"]:
        kl = f"KL {t['kl']:.5f}" if "kl" in t else "KL -"
        extra = f"  {t['type']}" if "type" in t else ""
        if t.get("outlier_channels"):
            extra += f"  {t['outlier_channels']} outlier input channels (max {t['outlier_ratio']:.0f}x median)"
        lines.append(f"  {t['name']}  {kl}  weight error {t['rel_error']:.2e}{extra}")
    lines += ["", "advice:"] + [f"  - {a}" for a in result["advice"]]
    return "\n".join(lines)
