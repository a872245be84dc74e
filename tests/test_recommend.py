"""``lowbit recommend``: the decision tree, the memory estimate (weights + KV cache + overhead), the
commands, ``--measure`` on stories260K."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lowbit.cli import build_parser, main
from lowbit.errors import LowbitError
from lowbit.recommend import DEVICES, RUNTIMES, parse_memory, recommend

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
pytestmark = pytest.mark.skipif(not STORIES.exists(), reason="stories260K not present")
GB = 10**9


def test_parse_memory() -> None:
    assert parse_memory("8GB") == 8 * GB and parse_memory("7.5 GiB") == int(7.5 * 2**30)
    assert parse_memory("512mb") == 512 * 10**6 and parse_memory("16g") == 16 * GB
    for bad in ("8", "lots", "8XB", ""):
        with pytest.raises(LowbitError, match="expected a size"):
            parse_memory(bad)


def test_the_budget_picks_the_bits_with_the_kv_cache_counted() -> None:
    r = recommend(STORIES, "100GB", device="cpu", ctx=512)
    assert r["runtime"] == "llama.cpp" and r["choice"]["scheme"] == "Q8_0"
    assert r["kv_cache_bytes"] == 2 * 5 * 4 * 8 * 512 * 2  # K and V, layers, KV heads, head size, ctx, F16
    rows = {c["scheme"]: c for c in r["candidates"]}
    q4 = rows["Q4_K_M"]
    assert q4["total_bytes"] == q4["weights_bytes"] + q4["kv_cache_bytes"] + q4["overhead_bytes"]
    assert recommend(STORIES, q4["total_bytes"], ctx=512)["choice"]["scheme"] == "Q4_K_M"
    assert recommend(STORIES, q4["total_bytes"] - 1, ctx=512)["choice"]["scheme"] == "IQ4_XS"
    longer = recommend(STORIES, q4["total_bytes"], ctx=4096)  # a longer context leaves less for the weights
    assert (longer["choice"] or {}).get("scheme") != "Q4_K_M"
    nothing = recommend(STORIES, "1MB")
    assert nothing["choice"] is None and "nothing fits" in nothing["notes"][-1]


def _cuda_budget(c: dict) -> int:
    """The least memory in which candidate ``c`` fits on CUDA (the overhead there grows with the budget)."""
    return math.ceil((c["weights_bytes"] + c["kv_cache_bytes"] + 300_000_000) / 0.9) + 2


def test_gpu_branch_follows_compute_capability() -> None:
    h100 = recommend(STORIES, "1GB", device="cuda", gpu="H100", runtime="vllm")
    assert h100["compute_capability"] == 9.0
    schemes = [c["scheme"] for c in h100["candidates"]]
    assert schemes == ["BF16", "FP8_DYNAMIC", "W8A16", "W4A16-awq"]
    fp8 = h100["candidates"][1]
    at8 = recommend(STORIES, _cuda_budget(h100["candidates"][2]), device="cuda", gpu="h100")
    assert at8["choice"]["scheme"] == ("FP8_DYNAMIC" if fp8["lowbit_writes"] else "W8A16")  # skipped until written
    t4 = recommend(STORIES, "1GB", device="cuda", gpu="t4")
    assert [c["scheme"] for c in t4["candidates"]] == ["BF16", "W8A16", "W4A16-gptq"] and t4["runtime"] == "vllm"
    tight = recommend(STORIES, _cuda_budget(h100["candidates"][3]), device="cuda", gpu="a100")
    assert tight["choice"]["scheme"] == "W4A16-awq"
    assert tight["commands"][0].startswith(f"lowbit quantize {STORIES} --scheme W4A16 --method awq --calib")


def test_commands_and_refusals() -> None:
    r = recommend(STORIES, "100GB", device="apple", runtime="ollama")
    assert r["commands"][0] == f"lowbit quantize {STORIES} --to Q8_0 -o stories260K-Q8_0.gguf"
    assert r["commands"][-1].startswith("ollama create")
    iq = next(c for c in r["candidates"] if c["scheme"] == "IQ3_M")
    low = recommend(STORIES, iq["total_bytes"], device="cpu")
    assert low["choice"]["scheme"] == "IQ3_M" and low["commands"][0].startswith(f"lowbit imatrix {STORIES}")
    assert "--imatrix stories260K-imatrix.gguf" in low["commands"][1]
    with pytest.raises(LowbitError, match="vLLM runs"):
        recommend(STORIES, "8GB", device="cpu", runtime="vllm")
    with pytest.raises(LowbitError, match="unknown GPU"):
        recommend(STORIES, "8GB", device="cuda", gpu="voodoo2")


def test_cli_choices_and_measure(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["recommend"]
    choices = {a.dest: a.choices for a in sub._actions if a.choices}
    assert tuple(choices["device"]) == DEVICES and tuple(choices["runtime"]) == RUNTIMES
    q4 = next(c for c in recommend(STORIES, "100GB", ctx=512)["candidates"] if c["scheme"] == "Q4_K_M")
    assert main(["--quiet", "recommend", str(STORIES), "--memory", f"{q4['total_bytes']}B", "--ctx", "512",
                 "--measure", "--chunks", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["choice"]["scheme"] == "Q4_K_M"
    assert [m["scheme"] for m in r["measured"]] == ["Q5_K_M", "Q4_K_M", "IQ4_XS"]
    assert all(m["kl_mean"] >= 0 and m["bytes"] > 0 for m in r["measured"])
