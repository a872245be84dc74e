"""The linter (ruff) and the type checker (mypy) pass over src/ (configured in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which(tool) is None and tool != "mypy":
        pytest.fail(f"{tool} is not installed: pip install -e '.[test]'")
    cmd = [sys.executable, "-m", tool, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_ruff() -> None:
    r = _run("ruff", "check", "src")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy() -> None:
    r = _run("mypy", "--cache-dir", str(ROOT / ".mypy_cache"))
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
