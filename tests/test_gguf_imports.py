"""lowbit.gguf's modules import each other as a DAG: no cycle, and no module imports a higher layer.

The graph is read from the source with ``ast`` (every ``import``/``from`` statement, also those
inside functions), so a lazy import that would close a cycle counts as much as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

from test_imports import find_cycle

PACKAGE = "lowbit.gguf"
ROOT = Path(__file__).resolve().parents[1] / "src" / "lowbit" / "gguf"

# bottom to top; a module may import its own layer and those below
LAYERS = [
    {"names", "_base", "_blockops", "native", "hparams", "llamacpp"},
    {"quants", "kquants", "iquants", "iq1quants", "iq2quants", "iq3quants", "tquants", "fp4quants",
     "mixes", "reader", "writer", "imatrix"},
    {"sources", "vocab", "plan"},
    {"convert"},
    {"from_quantized", "fastpath"},
]


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(ROOT.glob("*.py")) if p.stem != "__init__"}


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of this package that ``module`` imports (short names)."""
    out: set[str] = set()
    pkg = PACKAGE.split(".")
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t.startswith(PACKAGE + "."):
                name = t[len(PACKAGE) + 1:].split(".")[0]
                if name in known and name != module:
                    out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imported(m, p, set(mods)) for m, p in mods.items()}


def test_graph_is_read():
    g = import_graph()
    assert "quants" in g["writer"] and "sources" in g["convert"] and "convert" in g["from_quantized"]
    assert "iq2quants" in g["iq1quants"]  # a plain ``from .x import y``
    assert "mixes" in g["reader"]  # an import inside a function


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_layers():
    g = import_graph()
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    assert set(rank) == set(g), f"modules missing from LAYERS: {sorted(set(g) - set(rank))}"
    bad = [f"{m} -> {d}" for m, deps in g.items() for d in deps if rank[d] > rank[m]]
    assert not bad, "imports of a higher layer: " + ", ".join(sorted(bad))
