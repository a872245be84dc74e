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
