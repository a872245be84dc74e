"""Shared fixtures: the real tiny model, the WikiText-2 text, the GGUF demo models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from paths import STORIES, WIKITEXT

os.environ.setdefault("LOWBIT_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not STORIES.exists():
        pytest.skip("../shared/models/stories260K is not available")
    return STORIES


@pytest.fixture(scope="session")
def wikitext() -> Path:
    if not WIKITEXT.exists():
        pytest.skip("../shared/data/wikitext-2-raw is not available")
    return WIKITEXT


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from lowbit.models.demo import demo_gguf

    try:
        return demo_gguf("smollm2-135m")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"SmolLM2 GGUF not available: {exc}")


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    from lowbit.models.demo import demo_gguf

    try:
        return demo_gguf("gemma3-270m")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Gemma-3 GGUF not available: {exc}")


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (tiny matmuls: threads only contend on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
