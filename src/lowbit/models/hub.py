"""``hf:org/name`` sources: a Hugging Face hub snapshot (weights, config, tokenizer only)."""

from __future__ import annotations

from pathlib import Path

from ..errors import LowbitError

ALLOW = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.tiktoken"]


def hub_snapshot(repo_id: str) -> Path:
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise LowbitError(f"hf:{repo_id}", "expected hf:ORG/NAME")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=ALLOW))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated...
        raise LowbitError(
            f"hf:{repo_id}",
            f"cannot fetch from the Hugging Face hub (offline or unknown repository?): {exc.__class__.__name__}",
        ) from None
