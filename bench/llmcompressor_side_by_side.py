"""GPTQ by lowbit and by llm-compressor on the same model, calibration tokens and scheme.

llm-compressor needs its own environment (it pins transformers and compressed-tensors), so the
run has three steps, each a sub-command of this script:

    python bench/llmcompressor_side_by_side.py prepare --model smollm2-135m --calib pydoc \
        --samples 32 --seq-len 512 --work /tmp/lcsbs            # lowbit env: calibration ids
    /tmp/lcvenv/bin/python bench/llmcompressor_side_by_side.py llmc --work /tmp/lcsbs \
        --bits 3 --group-size 64 --asym                           # llm-compressor env
    python bench/llmcompressor_side_by_side.py compare --work /tmp/lcsbs --bits 3 --group-size 64 --asym

Both quantize the same float model with the same token ids (no padding), GPTQ with dampening
0.01, block size 128 and static act-order (llm-compressor's default); ``compare`` reads
llm-compressor's compressed-tensors checkpoint with lowbit's reader, runs lowbit's GPTQ, and
reports WikiText-2 perplexity, KL-divergence and top-1 agreement against the float model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def prepare(args: argparse.Namespace) -> None:
    from lowbit.models import resolve
    from lowbit.methods import METHODS
    from lowbit.models.calibration import CalibrationConfig, load_calibration
    from lowbit.models.loader import load_tokenizer

    src = resolve(args.model)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = CalibrationConfig(path=args.calib, n_samples=args.samples, seq_len=args.seq_len, seed=0)
    data = load_calibration(load_tokenizer(src.hf_dir), cfg, METHODS.get("gptq").calibration_default, source=src)
    save_file({"input_ids": data.input_ids.contiguous()}, str(work / "calib.safetensors"))
    (work / "source.json").write_text(json.dumps({"hf_dir": str(src.hf_dir), "calib": args.calib,
                                                  "samples": args.samples, "seq_len": args.seq_len}))
    print(f"calibration {tuple(data.input_ids.shape)} from {data.source}; model {src.hf_dir}")


def llmc(args: argparse.Namespace) -> None:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    work = Path(args.work)
    meta = json.loads((work / "source.json").read_text())
    ids = load_file(str(work / "calib.safetensors"))["input_ids"]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(meta["hf_dir"], torch_dtype=torch.float32)
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=not args.asym,
                               strategy="group" if args.group_size > 0 else "channel",
                               group_size=args.group_size if args.group_size > 0 else None)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], dampening_frac=0.01, block_size=128)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1])
    dt = time.perf_counter() - t0
    out = work / f"llmc-{_tag(args)}"
    model.save_pretrained(str(out), save_compressed=True)
    (out / "lowbit_bench.json").write_text(json.dumps({"seconds": dt}))
    print(f"llm-compressor GPTQ in {dt:.1f}s -> {out}")


def _tag(args: argparse.Namespace) -> str:
    return f"w{args.bits}g{args.group_size}{'a' if args.asym else 's'}"


def compare(args: argparse.Namespace) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality_calibrated import WIKI, RefCache, apply

    from lowbit.core import QuantScheme
    from lowbit.text import make_chunks
    from lowbit.text import model_adds_bos, tokenize
    from lowbit.formats import read_checkpoint
    from lowbit.pipeline import quantize_model
    from lowbit.core.quantized import QuantizedModel
    from lowbit.models import load
    from lowbit.models.calibration import CalibrationData

    work = Path(args.work)
    meta = json.loads((work / "source.json").read_text())
    ref = load(meta["hf_dir"])
    cand = load(meta["hf_dir"])
    bos = ref.tokenizer.bos_token_id if model_adds_bos(ref.tokenizer) else None
    chunks = make_chunks(tokenize(ref.tokenizer, Path(WIKI).read_text(encoding="utf-8")), 512, bos, args.chunks)
    cache = RefCache(ref.model, chunks)
    scheme = QuantScheme(args.bits, args.group_size, not args.asym)
    ids = load_file(str(work / "calib.safetensors"))["input_ids"]
    rows = [{"who": "float", **cache.compare(ref.model)}]

    llmc_dir = work / f"llmc-{_tag(args)}"
    weights, floats, _ = read_checkpoint(llmc_dir)
    seconds = json.loads((llmc_dir / "lowbit_bench.json").read_text())["seconds"]
    cand.model.load_state_dict(ref.model.state_dict())
    apply(cand.model, QuantizedModel(weights, {}, {}, "llm-compressor"))
    rows.append({"who": "llm-compressor GPTQ (static act-order)", "seconds": round(seconds, 1), **cache.compare(cand.model)})

    data = CalibrationData(ids, None, f"{meta['calib']} ids")  # exactly the samples llm-compressor saw
    for label, opts in (("lowbit GPTQ (defaults: static act-order, MSE ranges)", {}),
                        ("lowbit GPTQ (static act-order, min/max ranges)", {"mse_clip": False})):
        t0 = time.perf_counter()
        qm = quantize_model(meta["hf_dir"], "gptq", scheme, data, act_order="static", **opts)
        dt = time.perf_counter() - t0
        cand.model.load_state_dict(ref.model.state_dict())
        apply(cand.model, qm)
        rows.append({"who": label, "seconds": round(dt, 1), **cache.compare(cand.model)})
    print(f"\n{meta['hf_dir']}: {scheme.describe()}, calibration {meta['calib']} {tuple(ids.shape)}, "
          f"WikiText-2 {args.chunks} x 512\n")
    print("| quantizer | PPL | KL | top-1 | seconds (2-core CPU) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['who']} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.3f} | {r.get('seconds', '-')} |")
    with open(work / f"compare-{_tag(args)}.json", "w") as f:
        json.dump(rows, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "llmc", "compare"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="pydoc")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/lcsbs")
    args = ap.parse_args()
    os.environ.setdefault("LOWBIT_NO_PROGRESS", "1")
    torch.set_num_threads(args.threads)
    {"prepare": prepare, "llmc": llmc, "compare": compare}[args.step](args)


if __name__ == "__main__":
    main()
