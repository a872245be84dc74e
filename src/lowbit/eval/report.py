"""Plots of results people compare (matplotlib, written to PNG without a display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fileio import atomic_file


def plot_demo(result: dict[str, Any], path: str | Path) -> Path:
    """KL-divergence and perplexity against bits per weight, one point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["bpw"] < 32]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "osD^vP*X"
    for i, r in enumerate(rows):
        ax1.scatter(r["bpw"], r["kl_mean"], marker=markers[i % len(markers)], s=50, label=r["setting"])
        ax2.scatter(r["bpw"], r["ppl"], marker=markers[i % len(markers)], s=50, label=r["setting"])
    ax1.legend(fontsize=8)
    ref = result["rows"][0]["ppl"]
    ax2.axhline(ref, color="gray", linestyle="--", label=f"float reference {ref:.2f}")
    ax1.set(xlabel="bits per weight (quantized tensors)", ylabel="mean KL-divergence (nats)", yscale="log",
            title="KL-divergence vs size")
    ax2.set(xlabel="bits per weight (quantized tensors)", ylabel="perplexity", title="Perplexity vs size")
    ax2.legend()
    fig.suptitle(f"{result['model']} on {result['text'].split(' (')[0]}, ctx {result['ctx']}")
    fig.tight_layout()
    out = Path(path)
    with atomic_file(out, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


# --- lowbit compare's report -------------------------------------------------------------------

_COLUMNS = (("scheme", "scheme", "{}"), ("method", "method", "{}"), ("format", "format", "{}"),
            ("size MB", "bytes", "{:.2f}"), ("bpw", "bpw", "{:.2f}"), ("PPL", "ppl", "{:.3f}"),
            ("ref PPL", "ppl_ref", "{:.3f}"),
            ("KL mean", "kl_mean", "{:.5f}"), ("KL p99", "kl_p99", "{:.4f}"), ("top-1 %", "top1", "{:.2f}"),
            ("quantize s", "quantize_s", "{:.1f}"), ("eval tok/s", "eval_tokens_per_s", "{:.0f}"),
            ("peak MB", "peak_rss_mb", "{:.0f}"))


def _cell(key: str, fmt: str, row: dict[str, Any]) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if key == "bytes":
        v = v / 1e6
    elif key == "top1":
        v = 100 * v
    return fmt.format(v)


def pareto_front(rows: list[dict[str, Any]]) -> list[str]:
    """Schemes no other scheme beats on both size and mean KL (smaller is better in both)."""
    front = []
    for r in rows:
        if not any(o is not r and o["bytes"] <= r["bytes"] and o["kl_mean"] <= r["kl_mean"]
                   and (o["bytes"] < r["bytes"] or o["kl_mean"] < r["kl_mean"]) for o in rows):
            front.append(r["scheme"])
    return front


def compare_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Header and one line of cells per scheme, the columns of the report's table (a column per task when
    task accuracy was measured: accuracy ± standard error, in %)."""
    tasks = sorted({t for r in rows for t in r.get("tasks", {})})
    head = [c[0] for c in _COLUMNS] + [f"{t} acc %" for t in tasks]
    body = []
    for r in rows:
        cells = [_cell(key, fmt, r) for _, key, fmt in _COLUMNS]
        for t in tasks:
            got = r.get("tasks", {}).get(t)
            m = "acc" if got is None or "acc" in got else "exact_match_flexible"  # gsm8k: exact match
            cells.append("-" if got is None else f"{100 * got[m]:.1f} ± {100 * (got.get(f'{m}_stderr') or 0):.1f}")
        body.append(cells)
    return [head, *body]


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_file(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _figure().close(fig)
    return path


def plot_pareto(result: dict[str, Any], path: str | Path) -> Path:
    """File size against mean KL-divergence, one point per scheme; the Pareto front joined."""
    plt = _figure()
    rows = result["rows"]
    front = set(pareto_front(rows))
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for r in rows:
        on = r["scheme"] in front
        ax.scatter(r["bytes"] / 1e6, max(r["kl_mean"], 1e-7), s=60 if on else 40, marker="o" if on else "x",
                   color="C0" if on else "C3")
        ax.annotate(r["scheme"], (r["bytes"] / 1e6, max(r["kl_mean"], 1e-7)), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    pts = sorted((r["bytes"] / 1e6, max(r["kl_mean"], 1e-7)) for r in rows if r["scheme"] in front)
    if len(pts) > 1:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="C0", linewidth=1, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set(xlabel="file size (MB)", ylabel="mean KL-divergence (nats)", yscale="log",
           title=f"{Path(result['model']).name}: size against KL-divergence")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_sensitivity(result: dict[str, Any], path: str | Path) -> Path:
    """Relative weight error per decoder layer, one line per scheme (where each scheme loses most)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for r in result["rows"]:
        errs = {int(k): v for k, v in r.get("layer_error", {}).items() if k.isdigit()}
        if errs:
            xs = sorted(errs)
            ax.plot(xs, [max(errs[x], 1e-12) for x in xs], marker=".", label=r["scheme"])
    ax.set(xlabel="decoder layer", ylabel="relative weight error  sum|dW|^2 / sum|W|^2", yscale="log",
           title="per-layer sensitivity")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return _save(fig, Path(path))


def _summary_lines(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    s = result["settings"]
    first = rows[0] if rows else {}
    lines = [f"model: {result['model']}",
             f"text: {first.get('text', s.get('text'))}, ctx {s['ctx']}, {s['max_chunks'] or 'all'} chunks, "
             f"{first.get('tokens_scored', '?')} tokens scored",
             f"numerics: {first.get('numerics', '?')}",
             "ref PPL: the reference's perplexity on the chunks of each scheme's tokenizer (a GGUF output is "
             "tokenized by llama.cpp's tokenizer of it, so its chunks may differ)" if rows else "no scheme measured"]
    if rows:
        lines.append(f"Pareto front (size against KL mean): {', '.join(pareto_front(rows))}")
        best = min(rows, key=lambda r: r["kl_mean"])
        lines.append(f"lowest KL: {best['scheme']} ({best['kl_mean']:.5f} nats, {best['bytes'] / 1e6:.1f} MB)")
    lines.append("bpw: 8 x file bytes / parameters of the reference (the whole file, embeddings and metadata "
                 "included); peak MB: the scheme's process (quantize + evaluate)")
    return lines


def compare_markdown(result: dict[str, Any]) -> str:
    table = compare_table(result["rows"])
    md = ["# lowbit compare", ""] + [f"- {line}" for line in _summary_lines(result)] + [""]
    md.append("| " + " | ".join(table[0]) + " |")
    md.append("| " + " | ".join("---" for _ in table[0]) + " |")
    md += ["| " + " | ".join(r) + " |" for r in table[1:]]
    md += ["", "![size against KL-divergence](pareto.png)", "", "![per-layer sensitivity](sensitivity.png)", ""]
    return "\n".join(md)


def compare_html(result: dict[str, Any], images: dict[str, Path]) -> str:
    """One self-contained page: the summary, the table, the plots embedded as data URIs."""
    import base64
    import html

    table = compare_table(result["rows"])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table[1:])
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in _summary_lines(result))
    figures = ""
    for alt, p in images.items():
        data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
        figures += (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(alt)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}td:first-child,th:first-child"
             "{text-align:left}th{background:#eee}figure{display:inline-block;margin:1em 1em 0 0}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>lowbit compare: "
            f"{html.escape(Path(result['model']).name)}</title><style>{style}</style></head><body>"
            f"<h1>lowbit compare: {html.escape(result['model'])}</h1><ul>{summary}</ul>"
            f"<table id=\"results\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"{figures}</body></html>\n")


def write_compare_report(result: dict[str, Any], folder: str | Path) -> list[Path]:
    """``results.json``, ``report.md``, ``report.html`` (plots embedded), ``pareto.png``, ``sensitivity.png``."""
    import json

    out = Path(folder)
    images = {"size against KL-divergence": plot_pareto(result, out / "pareto.png"),
              "per-layer sensitivity": plot_sensitivity(result, out / "sensitivity.png")}
    files = list(images.values())
    for name, text in (("results.json", json.dumps(result, indent=2, default=str) + "\n"),
                       ("report.md", compare_markdown(result)), ("report.html", compare_html(result, images))):
        with atomic_file(out / name, overwrite=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
        files.append(out / name)
    return files
