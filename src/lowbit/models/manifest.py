"""The finished-layer record of a run: one result file per layer and a manifest with a hash of the
whole request, so an interrupted run resumes at the first unfinished layer."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from .layers import LayerResult
from .store import read_result_file, write_result_file

# --- the manifest --------------------------------------------------------------------------------


def request_hash(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines the result."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def layer_path(workdir: Path, i: int) -> Path:
    """The result file of layer ``i`` (see :mod:`lowbit.models.store` for its layout)."""
    return workdir / f"layer_{i:03d}.safetensors"


def outer_path(workdir: Path) -> Path:
    """The result file of the tensors outside the decoder layers (``lm_head``), by full name."""
    return workdir / "outer.safetensors"


def save_layer_result(workdir: Path, i: int, result: LayerResult) -> None:
    write_result_file(layer_path(workdir, i), result.weights, result.float_overrides, result.info)


def load_layer_result(workdir: Path, i: int) -> LayerResult:
    weights, floats, info = read_result_file(layer_path(workdir, i))
    return LayerResult(weights, floats, info)


def read_manifest(workdir: Path, digest: str) -> int:
    """How many layers of this exact request are already finished in ``workdir``."""
    path = workdir / "manifest.json"
    if not path.exists():
        return 0
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError:
        return 0
    if man.get("hash") != digest:
        warnings.warn(f"{workdir}: results of a different request found; starting over", stacklevel=3)
        return 0
    done = int(man.get("layers_done", 0))
    while done > 0 and not layer_path(workdir, done - 1).exists():
        done -= 1
    return done


def finished_layers(workdir: Path, digest: str, n_layers: int) -> set[int]:
    """The layers of this exact request whose result files are in ``workdir`` (each is written
    atomically, so a file present is complete, whichever process wrote it and whenever it was
    killed). Results of another request (or of no manifest at all) are removed: none is mixed in."""
    path = workdir / "manifest.json"
    man: Any = None
    if path.exists():
        try:
            man = json.loads(path.read_text())
        except json.JSONDecodeError:
            man = None
    if not isinstance(man, dict) or man.get("hash") != digest:
        if isinstance(man, dict):
            warnings.warn(f"{workdir}: results of a different request found; starting over", stacklevel=3)
        clear_results(workdir)
        return set()
    return {i for i in range(n_layers) if layer_path(workdir, i).exists()}


def clear_results(workdir: Path) -> None:
    """Remove the result files (and their temporaries) of an earlier run from ``workdir``."""
    for p in list(workdir.glob("layer_*.safetensors")) + list(workdir.glob("layer_*.partial")):
        p.unlink(missing_ok=True)
    for p in (outer_path(workdir), outer_path(workdir).with_suffix(".partial")):
        p.unlink(missing_ok=True)


def write_manifest(workdir: Path, digest: str, done: int, n_layers: int, request: dict[str, Any]) -> None:
    path = workdir / "manifest.json"
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps({"hash": digest, "layers_done": done, "n_layers": n_layers, "request": request}, indent=1, default=str))
    os.replace(tmp, path)
