"""lowbit.models.architectures: the one table of supported families, and its users in gguf/ and models/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.models import architectures as A

SRC = Path(__file__).resolve().parents[1] / "src" / "lowbit"


def test_lookups():
    llama = A.by_model_type("mistral")
    assert llama is A.by_model_type("llama") is A.by_gguf_arch("llama") is A.by_gguf_arch("mistral")
    assert llama.gguf_arch == "llama" and llama.rotary_permute and not llama.norm_plus_one
    gemma = A.by_gguf_arch("gemma3")
    assert gemma.model_types[0] == "gemma3_text" and gemma.hf_class == "Gemma3ForCausalLM" and gemma.norm_plus_one
    assert A.by_model_type("qwen3", gguf=True).gguf_arch == "qwen3" and not A.by_model_type("qwen3").rotary_permute
    assert A.by_model_type("mixtral").moe and A.by_model_type("mixtral").gguf_arch is None
    assert A.find_model_type("gpt2") is None and A.find_gguf_arch(None) is None
    # every family the layer engine quantizes names an adapter family
    assert {a.adapter for a in A.ARCHITECTURES} >= {"llama", "gemma3", "qwen2_moe", "mixtral"}


def test_lists():
    assert A.MODEL_TYPES == ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "qwen2_moe", "qwen3_moe", "mixtral")
    assert A.GGUF_MODEL_TYPES == ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
    assert A.GGUF_ARCHS == ("llama", "mistral", "qwen2", "qwen3", "gemma3")
    from lowbit.models.loader import SUPPORTED_MODEL_TYPES

    assert SUPPORTED_MODEL_TYPES == A.MODEL_TYPES


def test_errors_list_the_supported_ones():
    with pytest.raises(LowbitError, match=r"^cfg: unsupported architecture 'gpt2' \(supported: llama, mistral,"):
        A.by_model_type("gpt2", "cfg")
    with pytest.raises(LowbitError, match=r"GGUF conversion does not support architecture 'mixtral' "
                                          r"\(supported: llama, mistral, qwen2, qwen3, gemma3_text\)"):
        A.by_model_type("mixtral", gguf=True)
    with pytest.raises(LowbitError, match=r"x\.gguf: unsupported architecture 'phi3' \(supported: llama,") as e:
        A.by_gguf_arch("phi3", "x.gguf")
    assert "\n" not in str(e.value)


def test_pure_data():
    """The registry imports nothing heavy (no torch, no transformers): only the standard library and lowbit.errors."""
    tree = ast.parse((SRC / "models" / "architectures.py").read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add("." * node.level + (node.module or ""))
    assert mods <= {"__future__", "dataclasses", "pathlib", "..errors"}, mods


def test_no_other_architecture_lists():
    """The supported families are listed once: no module keeps its own table of them."""
    for path in [*(SRC / "gguf").glob("*.py"), SRC / "models" / "gguf_source.py", SRC / "models" / "loader.py"]:
        text = path.read_text()
        for name in ("ARCH_OF_MODEL_TYPE", "SUPPORTED_ARCHS", '"LlamaForCausalLM"', '"Qwen2ForCausalLM"'):
            assert name not in text, f"{path.name} still lists architectures ({name})"
