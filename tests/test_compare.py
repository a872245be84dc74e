"""``lowbit compare``: scheme names from the registries, the report's files, the cache, the HTML in Chromium.

Everything runs on stories260K (ctx 64, 2 chunks) so that the file stays fast; the browser check
is skipped where no Chromium is installed (``apt-get install chromium``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.eval.compare import compare, parse_scheme, parse_schemes
from lowbit.eval.report import pareto_front

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
pytestmark = pytest.mark.skipif(not STORIES.exists(), reason="stories260K not present")


def test_scheme_names_come_from_the_registries() -> None:
    q = parse_scheme("q4_k_m")
    assert (q.mix, q.method, q.is_gguf) == ("Q4_K_M", "rtn", True)
    g = parse_scheme("W4A16-gptq")
    assert (g.preset, g.method, g.format) == ("W4A16", "gptq", "compressed-tensors")
    c = parse_scheme("W8A16-rtn-clip")  # a method whose name holds a dash
    assert (c.preset, c.method) == ("W8A16", "rtn-clip")
    assert parse_scheme("W4A16").method == "rtn"


@pytest.mark.parametrize("bad, words", [("Q9_K", "unknown scheme 'Q9_K'"), ("W4A16-nomethod", "unknown scheme"),
                                        ("W8A8", "activations")])
def test_bad_schemes_are_one_line_errors(bad: str, words: str) -> None:
    with pytest.raises(LowbitError) as e:
        parse_schemes(f"Q8_0,{bad}")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_duplicates_and_empty_lists_are_refused() -> None:
    with pytest.raises(LowbitError, match="twice"):
        parse_schemes("Q8_0,q8_0")
    with pytest.raises(LowbitError, match="no scheme"):
        parse_schemes(" , ")


def test_pareto_front() -> None:
    rows = [{"scheme": "a", "bytes": 10, "kl_mean": 0.1}, {"scheme": "b", "bytes": 20, "kl_mean": 0.05},
            {"scheme": "c", "bytes": 20, "kl_mean": 0.2}, {"scheme": "d", "bytes": 5, "kl_mean": 0.5}]
    assert pareto_front(rows) == ["a", "b", "d"]


def test_compare_writes_the_report_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = dict(ctx=64, max_chunks=2, isolate=False)
    r = compare(str(STORIES), "Q8_0,W4A16", out, **args)
    names = {p.name for p in out.iterdir()}
    assert {"report.html", "report.md", "results.json", "pareto.png", "sensitivity.png", "cache"} <= names
    assert "work" not in names  # quantized models removed unless --keep-models
    rows = {row["scheme"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"Q8_0", "W4A16"}
    for row in rows.values():
        assert row["bytes"] > 0 and 0 < row["bpw"] < 32 and row["ppl"] > 1 and row["kl_mean"] >= 0
        assert 0 < row["top1"] <= 1 and row["quantize_s"] > 0 and row["eval_tokens_per_s"] > 0
        assert row["peak_rss_mb"] > 0 and set(row["layer_error"]) >= {"0", "4"}
    assert rows["Q8_0"]["kl_mean"] < rows["W4A16"]["kl_mean"]  # 8 bits lose less than 4
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 2 and "W4A16" in html
    assert "| Q8_0 | rtn | gguf |" in (out / "report.md").read_text()
    again = compare(str(STORIES), "W4A16,Q8_0", out, **args)  # same settings: both reused
    assert sorted(again["reused"]) == ["Q8_0", "W4A16"] and again["rows"][0] == r["rows"][1]


def test_cli_refuses_bad_schemes_before_any_work(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "lowbit.cli", "compare", str(STORIES), "-o", str(tmp_path / "r")]
    bad = subprocess.run([*cmd, "--schemes", "Q8_0,nope"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "unknown scheme 'nope'" in bad.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(os.environ.get("LOWBIT_SLOW_TESTS") != "1", reason="a process per scheme: LOWBIT_SLOW_TESTS=1")
def test_each_scheme_in_its_own_process(tmp_path: Path) -> None:
    r = compare(str(STORIES), "Q8_0", tmp_path / "r", ctx=64, max_chunks=1, isolate=True)
    row = r["rows"][0]
    assert row["scheme"] == "Q8_0" and row["peak_rss_mb"] > 50 and row["kl_mean"] < 0.01  # its own process's peak


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="no Chromium (apt-get install chromium)")
def test_report_renders_in_chromium(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from report_screenshot import check_report

    out = tmp_path / "report"
    compare(str(STORIES), "Q8_0", out, ctx=64, max_chunks=1, isolate=False)
    found = check_report(out / "report.html", tmp_path / "shot.png")
    assert found["images"] == 2 and found["broken_images"] == [] and found["broken_links"] == []
    assert found["rows"] == 1 and (tmp_path / "shot.png").stat().st_size > 10_000


def test_calibration_settings_key_only_calibrated_schemes() -> None:
    from lowbit.eval.compare import CompareSettings, _cache_key

    a, b = CompareSettings("m", samples=8, seq_len=256), CompareSettings("m", samples=32, seq_len=512)
    rtn, gptq = parse_scheme("Q4_K_M"), parse_scheme("W4A16-gptq")
    assert _cache_key(a, rtn) == _cache_key(b, rtn)  # RTN is the same whatever the calibration settings
    assert _cache_key(a, gptq) != _cache_key(b, gptq)
