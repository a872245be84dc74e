"""Markdown table and KLD-vs-bpw plot from the JSON written by bench/gguf_quality.py.

Run:  python bench/gguf_quality_report.py bench/results/gguf_quality_smollm2.json \\
          --header header.md --md bench/results/gguf_quality_smollm2.md --png bench/results/gguf_quality_smollm2.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NA = "n/a (llama.cpp requires an imatrix)"


def _f(x, fmt):
    return "nan" if x is None else format(x, fmt)


def table(rows) -> str:
    out = ["| mix | imatrix | size MiB | bpw | PPL llama.cpp file | PPL lowbit file | KLD llama.cpp file | KLD lowbit file "
           "| tensor bytes equal |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        im = "yes" if r["imatrix"] else "no"
        if "na" in r:
            lb = "lowbit refuses too" if r.get("lowbit_refused") else "lowbit wrote a file" if "lowbit_refused" in r else ""
            out.append(f"| {r['mix']} | {im} | {NA} | | | | | | {lb} |")
            continue
        ll, o = r["llama"], r.get("ours") or {}
        eq = r.get("bytes_equal", "n/a")
        if eq is False:
            eq = f"**False** ({len(r.get('mismatched_tensors', [])) + len(r.get('mismatched_types', []))} tensors)"
        elif eq is True and r.get("bytes_check"):  # sampled: all types + the first rows of every tensor
            eq = "True ‡"
        kll = "0" if r["mix"].startswith("F16") else _f(ll.get("kld"), ".5f")
        klo = "0" if r["mix"].startswith("F16") else _f(o.get("kld"), ".5f")
        dag = " †" if o.get("note") else ""  # lowbit file not evaluated: its tensor bytes equal llama.cpp's
        out.append(f"| {r['mix']} | {im} | {r['size_mib']:.1f} | {r['bpw']:.3f} | {ll['ppl']:.4f} ± {ll['ppl_se']:.3f} | "
                   f"{_f(o.get('ppl'), '.4f')}{dag} | {kll} | {klo}{dag} | {eq} |")
    return "\n".join(out)


def plot(rows, title, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for use_im, marker, color, label in ((False, "o", "tab:blue", "no imatrix"), (True, "s", "tab:red", "imatrix")):
        pts = [(r["bpw"], r["llama"]["kld"], r["mix"]) for r in rows
               if "na" not in r and r["imatrix"] == use_im and "kld" in r.get("llama", {})]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                   label=f"{label} (llama.cpp file)", alpha=0.8)
        ours = [(r.get("ours_bpw", r["bpw"]), r["ours"]["kld"]) for r in rows
                if "na" not in r and r["imatrix"] == use_im and "kld" in (r.get("ours") or {}) and not r["ours"].get("note")]
        if ours:
            ax.scatter([p[0] for p in ours], [p[1] for p in ours], marker="x", s=18, color="k", linewidths=0.8,
                       label="lowbit file (evaluated by llama.cpp)" if not use_im else None)
        labels = {}
        for x, y, m in pts:  # mixes that give the same file share one label
            labels.setdefault((round(x, 4), round(y, 6)), []).append(m)
        for (x, y), ms in labels.items():
            ax.annotate("/".join(ms), (x, y), fontsize=7, color=color, xytext=(3, 3 if use_im else -9),
                        textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (whole file)")
    ax.set_ylabel("mean KL divergence to F16 base (WikiText-2)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json")
    ap.add_argument("--header", help="Markdown put before the table")
    ap.add_argument("--md")
    ap.add_argument("--png")
    ap.add_argument("--title", default="")
    ap.add_argument("--order", help="comma-separated mixes: the table's row order (base first, then these)")
    a = ap.parse_args(argv)
    rows = json.loads(Path(a.json).read_text())
    if a.order:
        order = [m.strip().upper() for m in a.order.split(",")]
        rows.sort(key=lambda r: (-1 if r["mix"].startswith("F16") else order.index(r["mix"]) if r["mix"] in order
                                 else len(order), r["imatrix"]))
    text = (Path(a.header).read_text().rstrip() + "\n\n" if a.header else "") + table(rows) + "\n"
    if a.md:
        Path(a.md).write_text(text)
    else:
        print(text)
    if a.png:
        plot(rows, a.title, a.png)


if __name__ == "__main__":
    main()
