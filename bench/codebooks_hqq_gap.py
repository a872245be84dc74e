"""Why HQQ loses to RTN on SmolLM2-135M at 3 bits (g64) although its weight MSE is lower (issue 11 item 3).

Float SmolLM2 in memory; every ``*proj`` weight quantized 3-bit asymmetric in groups of 64 by RTN
(min/max grid) and by HQQ (lowbit's solver, equal to hqq 0.2.8), and variants of HQQ. Per linear,
with the float model's own inputs (the first ``--tokens`` of WikiText-2 test, windows of 512):

* weight MSE, and the relative output error ``||X (W - Q)^T||^2 / ||X W^T||^2``;
* the share of weights HQQ leaves outside their grid cell (clipped: ``|w - q| > scale / 2``) and the
  error on each group's largest-magnitude weights (top 2 of 64) against the rest;
* the output error split into the part the inputs' mean carries (``mean(X) (W - Q)^T``, the same
  shift on every token) and the rest.

Then PPL on one window of 512 tokens (as bench/results/hqq_smollm2_direct.txt) for RTN, HQQ and the
variants. Prints a table; ``--out`` writes it.

    OMP_NUM_THREADS=2 python bench/codebooks_hqq_gap.py --out bench/results/codebooks_hqq_gap_smollm2.md
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from lowbit.core.hqq import solve
from lowbit.core.scheme import QuantScheme
from lowbit.methods.rtn import rtn

ROOT = Path(__file__).resolve().parents[1]
BITS, GROUP = 3, 64


def deq_rtn(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qw = rtn(w, QuantScheme(BITS, GROUP, False))
    return qw.dequantize(), qw.scale.repeat_interleave(GROUP, 1)


def deq_hqq(w: torch.Tensor, **kw: float) -> tuple[torch.Tensor, torch.Tensor]:
    r = solve(w, BITS, GROUP, **kw)  # type: ignore[arg-type]
    g = r.codes.float().reshape(-1, GROUP)
    d = ((g - r.zero.reshape(-1, 1)) * r.scale.reshape(-1, 1)).reshape(w.shape)
    return d, r.scale.repeat_interleave(GROUP, 1)


def deq_hqq_integer_zero(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's scale and fitted zero point rounded to an integer, codes rounded again (lowbit's integer-zero formats)."""
    from lowbit.methods.hqq import hqq

    qw = hqq(w, QuantScheme(BITS, GROUP, False), integer_zero=True)
    return qw.dequantize(), qw.scale.repeat_interleave(GROUP, 1)


def deq_rtn_float_zero(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN's min/max grid with the zero point left unrounded (min and max exact; 0 in general not on the grid)."""
    g = w.float().reshape(-1, GROUP)
    qmax = (1 << BITS) - 1
    lo, hi = g.min(1, keepdim=True).values.clamp(max=0), g.max(1, keepdim=True).values.clamp(min=0)
    s = ((hi - lo) / qmax).clamp_min(1e-12)
    z = -lo / s
    q = torch.round(g / s + z).clamp(0, qmax)
    return ((q - z) * s).reshape(w.shape), s.reshape(w.shape[0], -1).repeat_interleave(GROUP, 1)


def mixed(base: str, other: str, kinds: tuple[str, ...]) -> Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return lambda name, w: PLAIN[other if name.rsplit(".", 1)[-1] in kinds else base](w)


PLAIN: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "rtn": deq_rtn,
    "hqq (p=0.7, hqq's default)": deq_hqq,
    "hqq p=1": lambda w: deq_hqq(w, lp_norm=1.0),
    "hqq p=2 (least squares)": lambda w: deq_hqq(w, lp_norm=2.0),
    "hqq without optimisation (min/max, float zero)": lambda w: deq_hqq(w, optimize=False),  # type: ignore[dict-item]
    "rtn with a float zero point (min and max exact)": deq_rtn_float_zero,
    "hqq, fitted zero rounded to an integer": deq_hqq_integer_zero,
}
VARIANTS: dict[str, Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    **{k: (lambda name, w, f=f: f(w)) for k, f in PLAIN.items()},
    "rtn, v_proj by hqq": mixed("rtn", "hqq (p=0.7, hqq's default)", ("v_proj",)),
    "hqq, v_proj by rtn": mixed("hqq (p=0.7, hqq's default)", "rtn", ("v_proj",)),
}


def channel_check(model: torch.nn.Module, ids: torch.Tensor) -> list[str]:
    """v_proj's input channel of largest mean, per layer: how small its weights are, how many lie within half a
    grid step of 0, and the error there (and on ``W @ mean(x)``) with an integer and with a float zero point."""
    xs: dict[int, list[torch.Tensor]] = defaultdict(list)
    layers = model.model.layers  # type: ignore[union-attr]
    hooks = [lay.self_attn.v_proj.register_forward_pre_hook(
        lambda _m, a, i=i: xs[i].append(a[0].reshape(-1, a[0].shape[-1]))) for i, lay in enumerate(layers)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    lines = ["", "v_proj's input channel of largest mean (per layer; first 6 and every 10th):", "",
             "| layer | channel | its mean / median channel's | its weights' mean abs / all | within half a step of 0 |",
             "|---|---|---|---|---|"]
    tot = {"rtn (integer zero)": [0.0, 0.0], "float zero (min/max)": [0.0, 0.0], "hqq (fitted float zero)": [0.0, 0.0]}
    fns = dict(zip(tot, (deq_rtn, deq_rtn_float_zero, deq_hqq)))
    for i, lay in enumerate(layers):
        w = lay.self_attn.v_proj.weight.detach()
        mu = torch.cat(xs[i]).mean(0)
        j = int(mu.abs().argmax())
        for name, fn in fns.items():
            d, _ = fn(w)
            e = w - d
            tot[name][0] += float(e[:, j].abs().mean()) / len(layers)
            tot[name][1] += float(((e @ mu) ** 2).sum() / ((w @ mu) ** 2).sum()) / len(layers)
        if i < 6 or i % 10 == 0:
            _, s = deq_rtn(w)
            lines.append(f"| {i} | {j} | {float(mu.abs().max() / mu.abs().median()):.0f}x | "
                         f"{float(w[:, j].abs().mean() / w.abs().mean()):.2f} | "
                         f"{float((w[:, j].abs() < s[:, j] / 2).float().mean()):.0%} |")
    lines += ["", "| grid | mean abs error in that channel (all layers) | relative error of W @ mean(x) |", "|---|---|---|"]
    lines += [f"| {k} | {a:.4f} | {b:.3f} |" for k, (a, b) in tot.items()]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--channel-check", action="store_true", help="only the v_proj channel check (appended to --out)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from lowbit.models import resolve
    from lowbit.models.loader import load_tokenizer
    from lowbit.text import encode

    src = resolve(args.model)
    model = AutoModelForCausalLM.from_pretrained(src.hf_dir, dtype=torch.float32)
    model.eval()
    tok = load_tokenizer(src.hf_dir)
    ids = torch.tensor(encode(tok, Path(args.text).read_text()[:200000])[: args.tokens]).reshape(-1, 512)
    if args.channel_check:
        text = "\n".join(channel_check(model, ids)) + "\n"
        print(text)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(text)
        return
    linears = {n: m for n, m in model.named_modules() if n.endswith("proj") and isinstance(m, torch.nn.Linear)}
    xs: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in linears.items()]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    float_w = {n: m.weight.detach().clone() for n, m in linears.items()}

    stats: dict[str, dict[str, float]] = {v: defaultdict(float) for v in VARIANTS}
    per_kind: dict[tuple[str, str], list[float]] = defaultdict(list)
    mean_kind: dict[tuple[str, str], list[float]] = defaultdict(list)
    deqs: dict[str, dict[str, torch.Tensor]] = {v: {} for v in VARIANTS}
    for n, w in float_w.items():
        x = torch.cat(xs[n])
        y = x @ w.t()
        mean = x.mean(0, keepdim=True)
        top = w.abs().reshape(-1, GROUP).argsort(1, descending=True)[:, :2]
        is_top = torch.zeros(w.numel() // GROUP, GROUP, dtype=torch.bool).scatter_(1, top, True).reshape(w.shape)
        kind = n.rsplit(".", 1)[-1]
        for v, fn in VARIANTS.items():
            d, scale = fn(n, w)
            deqs[v][n] = d
            e = w - d
            oe = x @ e.t()
            s = stats[v]
            s["w_sse"] += float((e * e).sum())
            s["n"] += w.numel()
            s["out_rel"] += float((oe * oe).sum() / (y * y).sum())
            s["out_mean_part"] += float(((mean @ e.t()) ** 2).sum() * x.shape[0] / (oe * oe).sum().clamp_min(1e-30))
            s["clipped"] += float((e.abs() > scale / 2 * (1 + 1e-4)).sum())
            s["top_err"] += float((e.abs() * is_top).sum() / is_top.sum())
            s["rest_err"] += float((e.abs() * ~is_top).sum() / (~is_top).sum())
            s["layers"] += 1
            per_kind[(v, kind)].append(float((oe * oe).sum() / (y * y).sum()))
            mean_kind[(v, kind)].append(float(((mean @ e.t()) ** 2).sum() * x.shape[0] / (y * y).sum()))
    xs.clear()

    def ppl(weights: dict[str, torch.Tensor] | None) -> float:
        for n, m in linears.items():
            m.weight.data.copy_(float_w[n] if weights is None else weights[n])
        with torch.no_grad():
            out = model(ids[:1], labels=ids[:1])
        return math.exp(float(out.loss))

    lines = [f"# HQQ against RTN on {args.model}, {BITS}-bit asymmetric g{GROUP}, every *proj weight (float model in memory)",
             "", f"Inputs: the float model's own, first {ids.numel()} tokens of WikiText-2 test; PPL on the first "
             "window of 512. `python bench/codebooks_hqq_gap.py`.", "",
             "| variant | PPL | weight MSE (x1e-6) | mean rel. output error | of which the inputs' mean | clipped weights | "
             "mean abs error, top-2 of 64 | rest |", "|---|---|---|---|---|---|---|---|"]
    lines.insert(0, "")
    ref = ppl(None)
    for v in VARIANTS:
        s = stats[v]
        k = s["layers"]
        lines.append(f"| {v} | {ppl(deqs[v]):.2f} | {s['w_sse'] / s['n'] * 1e6:.3f} | {s['out_rel'] / k:.4f} | "
                     f"{s['out_mean_part'] / k:.3f} | {s['clipped'] / s['n']:.2%} | {s['top_err'] / k * 1e3:.3f}e-3 | "
                     f"{s['rest_err'] / k * 1e3:.3f}e-3 |")
    lines.append(f"| float | {ref:.2f} | | | | | | |")
    kinds = sorted({k for _, k in per_kind})
    lines += ["", "Mean relative output error by linear:", "", "| variant | " + " | ".join(kinds) + " |",
              "|---|" + "---|" * len(kinds)]
    for v in VARIANTS:
        lines.append(f"| {v} | " + " | ".join(f"{sum(per_kind[(v, k)]) / len(per_kind[(v, k)]):.4f}" for k in kinds) + " |")
    lines += ["", "Of which the inputs' mean (the same shift on every token), relative to the output:", "",
              "| variant | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for v in VARIANTS:
        lines.append(f"| {v} | " + " | ".join(f"{sum(mean_kind[(v, k)]) / len(mean_kind[(v, k)]):.4f}" for k in kinds) + " |")
    text = "\n".join(lines[1:]) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
