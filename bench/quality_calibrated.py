"""Quality of RTN, GPTQ, GPTQ+act-order and AWQ on SmolLM2-135M: WikiText-2 perplexity and KL vs float.

Calibration (never the evaluation text): ``--calibs`` lists files or named sets, ``pydoc`` (Python's
``pydoc_data.topics``, the default) and ``selfgen`` (sequences sampled from the model itself);
sizes default to the methods' defaults (GPTQ 128 x 2048, AWQ 128 x 512). Evaluation: the first
``--chunks`` 512-token chunks of WikiText-2 test. Runs on CUDA when available (``--device``).
Results are appended to ``--out`` (JSON lines) as each run finishes, and a Markdown table is
printed at the end.

    python bench/quality_calibrated.py --calibs pydoc,selfgen --chunks 40            # GPU
    python bench/quality_calibrated.py --threads 2 --n-samples 16 --seq-len 256 --chunks 8   # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

SMOL = "smollm2-135m"
WIKI = str(Path(os.environ.get("LOWBIT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
           / "data" / "wikitext-2-raw" / "wiki.test.raw")


def apply(model: torch.nn.Module, qm) -> torch.nn.Module:
    """Put dequantized weights and float overrides into a float model (in place)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, qw in qm.weights.items():
            params[name].copy_(qw.dequantize(params[name].dtype))
        for name, t in qm.float_overrides.items():
            params[name].copy_(t.to(params[name].dtype))
    return model


class RefCache:
    """The float model's log-probabilities on the scored half of each chunk, computed once."""

    def __init__(self, model: torch.nn.Module, chunks: torch.Tensor, batch_size: int = 2) -> None:
        from lowbit.eval.perplexity import _first_scored, _logits

        self.chunks, self.bs = chunks, batch_size
        self.first = _first_scored(chunks.shape[1], False)
        self.lp = [
            torch.log_softmax(_logits(model, chunks[i : i + batch_size])[:, self.first : -1], -1).to(torch.float16)
            for i in range(0, chunks.shape[0], batch_size)
        ]

    def compare(self, model: torch.nn.Module) -> dict:
        """KL(float || model) per token, top-1 agreement and both perplexities."""
        import math

        from lowbit.eval.perplexity import _logits

        kls, same, nll_r, nll_q = [], [], [], []
        for b, i in enumerate(range(0, self.chunks.shape[0], self.bs)):
            batch = self.chunks[i : i + self.bs]
            lq = torch.log_softmax(_logits(model, batch)[:, self.first : -1], -1)
            lr = self.lp[b].float()
            tgt = batch[:, self.first + 1 :, None]
            kls.append((lr.exp() * (lr - lq)).sum(-1).flatten())
            same.append((lr.argmax(-1) == lq.argmax(-1)).flatten().float())
            nll_r.append(-lr.gather(-1, tgt).flatten())
            nll_q.append(-lq.gather(-1, tgt).flatten())
        return {
            "ppl": math.exp(float(torch.cat(nll_q).double().mean())),
            "ppl_ref": math.exp(float(torch.cat(nll_r).double().mean())),
            "kl": float(torch.cat(kls).double().clamp_min(0).mean()),
            "top1": float(torch.cat(same).mean()),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=SMOL)
    ap.add_argument("--methods", default="rtn,gptq,gptq_ao,awq",
                    help="comma list of rtn, gptq, awq, gptq_default (lowbit's GPTQ defaults); suffixes (explicit, "
                         "otherwise off): _ao = act-order, _mse = MSE-searched group ranges, _static = static groups")
    ap.add_argument("--schemes", default="4:64,3:64,4:-1,3:-1", help="bits:group_size list")
    ap.add_argument("--sym", action="store_true", help="symmetric grids (default asymmetric)")
    ap.add_argument("--n-samples", type=int, default=None, help="default: the method's (128)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the method's (GPTQ 2048, AWQ 512)")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibs", default="pydoc", help="comma list of calibration files or named sets (pydoc, selfgen)")
    ap.add_argument("--token-file", default=None,
                    help="safetensors with wiki_ids (the tokenized WikiText-2 test) and bos ([-1] = none), used "
                         "instead of this machine's tokenizer; selfgen samples then start with that BOS")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--damp", type=float, default=None, help="GPTQ dampening (default 0.01)")
    ap.add_argument("--awq-search-batches", type=int, default=None, help="batches (of 4 samples) used by AWQ's scale search")
    ap.add_argument("--out", default="bench/results/quality_calibrated.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LOWBIT_NO_PROGRESS", "1")

    from lowbit.core import QuantScheme
    from lowbit.text import make_chunks
    from lowbit.text import model_adds_bos, tokenize
    from lowbit.methods import METHODS
    from lowbit.pipeline import quantize_model
    from lowbit.models import load, resolve
    from lowbit.models.calibration import CalibrationConfig

    src = resolve(args.model)
    ref = load(src, device=args.device)
    if args.token_file:  # token ids made elsewhere (another transformers version may tokenize differently)
        from safetensors.torch import load_file

        tf = load_file(args.token_file)
        tokens, forced_bos = tf["wiki_ids"], int(tf["bos"][0])
        forced_bos = None if forced_bos < 0 else forced_bos
    else:
        tokens = tokenize(ref.tokenizer, Path(WIKI).read_text(encoding="utf-8"))
    cand = load(src, device=args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    bos = ref.tokenizer.bos_token_id if model_adds_bos(ref.tokenizer) else None
    if args.token_file:
        bos = forced_bos
    cache = RefCache(ref.model, make_chunks(tokens, 512, bos, args.chunks).to(args.device))
    base = cache.compare(ref.model)
    rows.append({"method": "float", "scheme": "-", "ppl": base["ppl_ref"], "kl": 0.0, "top1": 1.0, "quant_s": 0.0})
    print(json.dumps(rows[-1]), flush=True)
    runs = [(spec, m, c) for spec in args.schemes.split(",") for m in args.methods.split(",")
            for c in (["-"] if m == "rtn" else args.calibs.split(","))]
    for spec, m, calib_name in runs:
        bits, gs = (int(v) for v in spec.split(":"))
        scheme = QuantScheme(bits, gs, args.sym)
        method, ao, mse = m.split("_")[0], "_ao" in m, "_mse" in m  # e.g. gptq_ao_mse_static
        default = m == "gptq_default"  # lowbit's GPTQ defaults (static act-order, MSE ranges)
        calib = CalibrationConfig(path=None if calib_name == "-" else calib_name, n_samples=args.n_samples,
                                  seq_len=args.seq_len, seed=0, batch_size=4)
        resolved = calib.resolved(METHODS.get(method).calibration_default)
        if method != "rtn" and calib_name == "selfgen":  # sample (or read the cached samples) outside the timing
            from lowbit.models.calibration import CalibrationData
            from lowbit.models.selfgen import self_generated

            ids = self_generated(src, resolved.n_samples, resolved.seq_len, 0, args.device,
                                 bos_id=bos if args.token_file else "auto")
            if args.token_file:
                calib = CalibrationData(ids, None, "selfgen")
        t0 = time.perf_counter()
        opts = {"search_batches": args.awq_search_batches} if method == "awq" else {}
        if method in ("gptq", "rtn") and not default:  # explicit: the flags in the name, nothing else
            opts["mse_clip"] = mse
        if method == "gptq" and not default:
            opts["static_groups"] = "_static" in m
        if method == "gptq" and args.damp is not None:
            opts["damp"] = args.damp
        qm = quantize_model(src, method, scheme, calib, act_order=None if default else ao, device=args.device, **opts)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        cand_model = cand.model
        cand_model.load_state_dict(ref.model.state_dict())
        apply(cand_model, qm)
        r = cache.compare(cand_model)
        row = {"method": m, "scheme": scheme.describe(), "ppl": r["ppl"], "kl": r["kl"],
               "top1": r["top1"], "quant_s": round(dt, 1),
               "calib": "-" if method == "rtn" else f"{calib_name} {resolved.n_samples}x{resolved.seq_len}",
               "damp": args.damp, "eval_chunks": args.chunks, "device": args.device, "model": args.model}
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print("\n| scheme | method | calibration | PPL | KL | top-1 | quantize s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['method']} | {r.get('calib', '-')} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.3f} "
              f"| {r['quant_s']} |")


if __name__ == "__main__":
    main()
