"""W8A8 linears on CUDA: bf16 cuBLAS against lowbit's FP8 (torch._scaled_mm) and INT8 (torch._int_mm) kernels.

Usage (a CUDA machine with torch, transformers and lowbit; prints tables, writes JSON lines)::

    python bench/bench_w8a8_kernels.py [--shapes 4096x4096,14336x4096,4096x14336] [--tokens 1,16,128,512]
        [--no-graph] [--skip-e2e] [--out bench/results/w8a8_kernels_h100.jsonl]

Part 1, Llama-3-8B's linear shapes (``out x in``) at 1, 16, 128 and 512 tokens. Every timing is a
CUDA graph of ``L`` calls, each on its own copy of the weight (``L`` copies hold at least 4x the
GPU's L2 cache, so every weight comes from HBM), replayed and divided by ``L`` (``--no-graph``:
the same calls timed with CUDA events over many iterations). Rows:

* ``bf16``: ``F.linear`` on the bf16 weight (cuBLAS), the baseline;
* ``fp8``: lowbit's whole FP8_DYNAMIC linear (``QuantLinear`` through the kernel registry, which
  picks ``scaled-mm-fp8``): per-token E4M3 rounding of the bf16 input (one Triton launch), then
  ``torch._scaled_mm`` with row-wise scales; ``fp8 torchq``: the same with the rounding in torch ops
  (no Triton); ``fp8 tw+scale``: the same linear with ``scaled_mm_fp8.ROWWISE = False`` (the GEMM with
  unit tensor-wise scales and float32 output, then one Triton launch applying both scales);
  ``fp8 gemm``: ``torch._scaled_mm`` alone (row-wise scales) on inputs quantized beforehand;
* ``int8``, ``int8 torchq``, ``int8 gemm``: lowbit's whole W8A8 linear (``int-mm-w8a8``): per-token
  int8 rounding (one Triton launch, padding included), ``torch._int_mm`` (inputs of 16 rows or fewer
  padded to 32), the scaling (one Triton launch); the same with torch ops; ``torch._int_mm`` alone.

Ratios are bf16 time / kernel time (higher is faster). Beside each kernel, its maximum absolute
error against the fake-quant oracle (the same layer forced to the ``torch`` reference kernel:
dequantized weight, ``fake_quantize_input``, ``F.linear`` in bf16) on the same input, and the
oracle's largest output for scale.

Part 2, end to end: a random bf16 Llama (2 layers, hidden 1024, every linear shape a multiple of
16) written to a temporary folder, quantized by lowbit to FP8_DYNAMIC and W8A8, loaded with
``load_quantized`` on the GPU in bf16 (every linear on the kernels; the script checks the
selection) and run on 4 x 128 random tokens. Its logits are compared with (a) the same model
forced to the reference kernel (bf16 fake quantization) and (b) what ``lowbit eval`` computes
(``models.load``: dequantized float32 weights, the checkpoint's activation rounding installed by
``eval.numerics.apply``): maximum absolute logit difference, the logits' largest value, and top-1
agreement.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from cuda_timing import graph_time

from lowbit.core.floatq import quantize_fp8, quantize_int
from lowbit.core.presets import preset
from lowbit.runtime import QuantLinear
from lowbit.runtime.activations import quantize_rows
from lowbit.runtime.kernels import _rows_triton, scaled_mm_fp8, select
from lowbit.runtime.kernels._w8a8 import int_mm_rows

KERNELS = {"fp8": ("FP8_DYNAMIC", "scaled-mm-fp8"), "int8": ("W8A8", "int-mm-w8a8")}


def event_time(calls: list[Callable[[], object]], reps: int = 50) -> float:
    """Seconds per call over ``reps`` rounds of ``calls`` (CUDA events, no graph)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        for c in calls:
            c()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (reps * len(calls))


def layer_for(kind: str, w: torch.Tensor) -> QuantLinear:
    """lowbit's FP8_DYNAMIC or W8A8 linear of ``w`` (RTN, scales in bf16 as llm-compressor makes them)."""
    p = preset(KERNELS[kind][0])
    assert p.weights is not None
    make = quantize_fp8 if kind == "fp8" else quantize_int
    return QuantLinear.from_quantized(make(w, p.weights, torch.bfloat16).to("cpu"), None,
                                      p.input_activations).to(w.device)


def guarded(timer: Callable[..., float], row: dict, key: str) -> Callable[[Sequence[Callable[[], object]]], None]:
    """``timer`` whose result (microseconds) goes to ``row[key + "_us"]``, a failure to ``row[key + "_error"]``."""
    def run(calls: Sequence[Callable[[], object]]) -> None:
        try:
            row[key + "_us"] = timer(calls) * 1e6
        except Exception as exc:  # noqa: BLE001 - one failing kernel does not end the table
            row[key + "_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            torch.cuda.synchronize()
    return run


def measure(shape: str, m: int, dev: torch.device, l2: int, timer: Callable[..., float]) -> dict:
    """One weight shape and token count: every kernel's time per call and its error against the oracle."""
    n, k = (int(v) for v in shape.split("x"))
    torch.manual_seed(0)
    w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    row: dict = {"shape": shape, "tokens": m, "device": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    copies_bf16 = max(2, -(-4 * l2 // (n * k * 2)))
    wb = [w.clone() for _ in range(copies_bf16)]
    row["bf16_us"] = timer([partial(F.linear, x, wb[i]) for i in range(copies_bf16)]) * 1e6
    del wb
    for kind, (_, kname) in KERNELS.items():
        layer = layer_for(kind, w)
        chosen = select(layer, x).name
        row[f"{kind}_kernel"] = chosen
        layer.kernel = "torch"
        ref = layer(x).float()
        layer.kernel = None
        y = layer(x)
        row[f"{kind}_err"] = float((y.float() - ref).abs().max())
        row[f"{kind}_ref_max"] = float(ref.abs().max())
        if chosen != kname:
            row[f"{kind}_error"] = f"registry chose {chosen!r}, not {kname!r}"
            continue
        copies = max(2, -(-4 * l2 // (n * k)))
        layers = [layer] + [copy.deepcopy(layer) for _ in range(copies - 1)]
        guarded(timer, row, kind)([partial(lay, x) for lay in layers])
        if kind == "fp8":  # the variant: unit tensor-wise scales, float32 sums, then one scaling launch
            scaled_mm_fp8.ROWWISE = False
            try:
                row["fp8_tw_err"] = float((layer(x).float() - ref).abs().max())
                guarded(timer, row, "fp8_tw")([partial(lay, x) for lay in layers])
            finally:
                scaled_mm_fp8.ROWWISE = True
        enabled, _rows_triton.ENABLED = _rows_triton.ENABLED, False
        try:
            guarded(timer, row, f"{kind}_torchq")([partial(lay, x) for lay in layers])
        finally:
            _rows_triton.ENABLED = enabled
        assert layer.input_scheme is not None
        codes, sa = quantize_rows(x, layer.input_scheme)
        if kind == "fp8":
            wts = [(lay.qweight.t(), lay.scales.float().reshape(1, n).contiguous()) for lay in layers]
            sa = sa.expand(m, 1).contiguous()
            calls = [partial(torch._scaled_mm, codes, wt, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
                     for wt, sb in wts]
        else:
            padded = F.pad(codes, (0, 0, 0, int_mm_rows(m) - m))
            wts = [(lay.codes() - 128).to(torch.int8).contiguous().t() for lay in layers]
            calls = [partial(torch._int_mm, padded, wt) for wt in wts]
        guarded(timer, row, f"{kind}_gemm")(calls)
        del layers, wts, calls
        torch.cuda.empty_cache()
    return row


def cell(row: dict, key: str) -> str:
    v = row.get(key + "_us")
    return f"{v:7.1f} ({row['bf16_us'] / v:4.2f}x)" if v else f"{'-':>15}"


# ----------------------------------------------------------------------------- end to end


def tiny_llama(folder: Path) -> None:
    """A random bf16 Llama with a word-level tokenizer, written as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=False, torch_dtype="bfloat16")
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # a few larger input channels, as real activations have
        for layer in model.model.layers:
            layer.input_layernorm.weight[::97] = 8.0
    model.save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, cfg.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def end_to_end(dev: torch.device) -> list[dict]:
    import lowbit.api as lb
    from lowbit.eval.numerics import apply
    from lowbit.models.loader import load
    from lowbit.recipe import Recipe
    from lowbit.runtime import load_quantized

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "tiny-llama"
        tiny_llama(src)
        ids = torch.randint(3, 2048, (4, 128), generator=torch.Generator().manual_seed(1))
        for scheme, kname in KERNELS.values():
            out = lb.quantize(src, Path(tmp) / scheme, recipe=Recipe(scheme=preset(scheme).scheme))
            model, _ = load_quantized(out, device=dev, dtype=torch.bfloat16)
            layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
            chosen = sorted({select(m, torch.zeros(1, m.in_features, device=dev, dtype=torch.bfloat16)).name
                             for m in layers})
            with torch.no_grad():
                fast = model(ids.to(dev)).logits.float()
                QuantLinear.kernel = "torch"
                try:
                    slow = model(ids.to(dev)).logits.float()
                finally:
                    QuantLinear.kernel = None
                ev = load(out, device=dev)  # lowbit eval's path: float32, fake-quant hooks
                numerics = apply(ev.model, out)
                oracle = ev.model(ids.to(dev)).logits.float()
            row = {"e2e": scheme, "kernels": chosen, "linears": len(layers), "numerics": numerics,
                   "logit_max": float(oracle.abs().max()),
                   "kernel_vs_reference_bf16": float((fast - slow).abs().max()),
                   "kernel_vs_eval_fp32": float((fast - oracle).abs().max()),
                   "reference_bf16_vs_eval_fp32": float((slow - oracle).abs().max()),
                   "top1_kernel_vs_eval": float((fast.argmax(-1) == oracle.argmax(-1)).float().mean()),
                   "top1_reference_vs_eval": float((slow.argmax(-1) == oracle.argmax(-1)).float().mean())}
            assert chosen == [kname], chosen
            rows.append(row)
            del model, ev
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336")
    ap.add_argument("--tokens", default="1,16,128,512")
    ap.add_argument("--no-graph", action="store_true", help="CUDA events over many iterations instead of graphs")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = torch.device("cuda")
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20)
    timer = event_time if a.no_graph else graph_time
    rows = []
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, L2 {l2 / 2**20:.0f} MiB, "
          f"{'CUDA events' if a.no_graph else 'CUDA graphs'}, weights from HBM")
    print(f"{'shape':>11} {'tok':>4} {'bf16 us':>8} {'fp8 (lowbit)':>15} {'fp8 tw+scale':>15} {'fp8 torchq':>15} {'fp8 gemm':>15} "
          f"{'int8 (lowbit)':>15} {'int8 torchq':>15} {'int8 gemm':>15}  max abs err vs oracle (oracle max)")
    for shape, m in itertools.product(a.shapes.split(","), [int(t) for t in a.tokens.split(",")]):
        row = measure(shape, m, dev, l2, timer)
        rows.append(row)
        cells = " ".join(cell(row, key) for key in ("fp8", "fp8_tw", "fp8_torchq", "fp8_gemm", "int8", "int8_torchq",
                                                   "int8_gemm"))
        problems = "; ".join(f"{k}: {v}" for k, v in row.items() if k.endswith("_error"))
        print(f"{shape:>11} {m:>4} {row['bf16_us']:8.1f} {cells}  fp8 {row['fp8_err']:.3g} int8 {row['int8_err']:.3g} "
              f"({row['fp8_ref_max']:.3g}) {problems}", flush=True)
    print("ratios: bf16 time / kernel time (higher is faster); 'gemm' = the torch GEMM alone on pre-quantized inputs; "
          f"input rounding in Triton: {'yes' if _rows_triton.ENABLED else 'NO (it failed: see the warning)'}")
    if not a.skip_e2e:
        print("\nend to end: random bf16 Llama (2 layers, hidden 1024, ffn 2816), 4 x 128 tokens, logits")
        try:
            e2e = end_to_end(dev)
        except Exception as exc:  # noqa: BLE001 - the kernel table above still gets written
            print(f"end to end failed: {type(exc).__name__}: {exc}")
            e2e = []
        for row in e2e:
            rows.append(row)
            print(f"{row['e2e']:>12}: kernels {','.join(row['kernels'])} on {row['linears']} linears; max |logit| "
                  f"{row['logit_max']:.3g}; max diff kernel vs bf16 reference {row['kernel_vs_reference_bf16']:.3g}, "
                  f"kernel vs eval (fp32) {row['kernel_vs_eval_fp32']:.3g}, bf16 reference vs eval "
                  f"{row['reference_bf16_vs_eval_fp32']:.3g}; top-1 agreement with eval: kernel "
                  f"{row['top1_kernel_vs_eval']:.4f}, reference {row['top1_reference_vs_eval']:.4f}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
