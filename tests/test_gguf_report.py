"""Issue 15, items 5-6: a GGUF file says what it holds.

5. a mix whose types cannot hold some rows falls back (as llama.cpp does): one warning per
   fallback class, and ``lowbit quantize`` reports the fallbacks and the real bits per weight;
6. with an importance matrix the file records ``quantize.imatrix.file``, ``.dataset``,
   ``.entries_count`` and ``.chunks_count`` as llama-quantize writes them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from paths import STORIES

from lowbit.gguf import mixes
from lowbit.gguf.reader import GGUFFile, inspect_gguf

pytestmark = pytest.mark.skipif(not STORIES.exists(), reason="stories260K not available")


@pytest.fixture(scope="module")
def stories_f16(tmp_path_factory) -> Path:
    from lowbit.gguf.convert import quantize_to_gguf

    return quantize_to_gguf(STORIES, tmp_path_factory.mktemp("g") / "stories-f16.gguf", "F16")


def _imatrix(src: Path, out: Path, datasets: list[str], chunks: int) -> Path:
    from lowbit.gguf.imatrix import IMatrix, save_imatrix

    im = IMatrix(datasets=datasets, chunk_count=chunks, chunk_size=64)
    for t in GGUFFile(src).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            im.sums[t.name] = np.full((1, t.shape[-1]), 3.0)
            im.counts[t.name] = np.array([64.0 * max(chunks, 1)])
    return save_imatrix(im, out)


# --- 5: fallbacks and the real bits per weight -------------------------------------------------------


def test_fallbacks_are_reported_by_class():
    fb: dict[str, tuple[T, T]] = {}
    shapes = {"blk.0.ffn_down.weight": (64, 172), "blk.0.ffn_up.weight": (172, 64), "blk.0.attn_q.weight": (64, 64),
              "blk.1.attn_q.weight": (256, 256), "blk.0.attn_norm.weight": (64,)}
    hp = mixes.ModelHParams("llama", 2, 8, 8)
    types = mixes.tensor_types(shapes, hp, "Q4_K_S", source_types=None, fallbacks=fb)
    assert types["blk.1.attn_q.weight"] == T.Q4_K and "blk.1.attn_q.weight" not in fb
    assert fb["blk.0.attn_q.weight"] == (T.Q4_K, T.Q5_0) and fb["blk.0.ffn_up.weight"] == (T.Q4_K, T.Q5_0)
    assert fb["blk.0.ffn_down.weight"][1] == T.F16
    from lowbit.gguf.plan import fallback_report

    report = fallback_report(fb, shapes)
    assert report[0] == {"from": "Q4_K", "to": "Q5_0", "tensors": 2, "row_lengths": [64]}
    assert sum(c["tensors"] for c in report) == len(fb)


def test_quantize_reports_fallbacks_and_bits_per_weight(tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "k.gguf"
    rc = main(["--quiet", "quantize", str(STORIES), "--to", "Q4_K_M", "-o", str(out), "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    classes = {(c["from"], c["to"]): c for c in result["fallbacks"]}
    # stories260K: rows of 64 and 172 values, none a multiple of 256: no tensor is Q4_K at all
    assert classes[("Q4_K", "Q5_0")]["tensors"] == 28 and classes[("Q4_K", "Q5_0")]["row_lengths"] == [64]
    assert ("Q4_K", "F16") in classes
    info = inspect_gguf(out)
    assert "Q4_K" not in info["per_type"] and info["file_type"] == "Q4_K_M"
    assert result["bits_per_weight"] == pytest.approx(info["bits_per_weight"], abs=1e-3)
    assert result["bits_per_weight"] > 8  # far from the ~4.9 that Q4_K_M promises
    lines = [ln for ln in captured.err.splitlines() if "fell back" in ln]
    assert len(lines) == len(result["fallbacks"])  # one line per class, not per tensor
    assert f"lowbit: warning: {out}: 28 of 47 tensors fell back from Q4_K to Q5_0 (rows of 64 values do not fill " \
           "Q4_K's blocks of 256)" in lines, lines


def test_no_fallback_no_warning(tmp_path):
    from lowbit.gguf.convert import quantize_to_gguf

    report: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_to_gguf(STORIES, tmp_path / "f.gguf", "F16", report=report)
    assert report["fallbacks"] == [] and report["bits_per_weight"] == pytest.approx(
        inspect_gguf(tmp_path / "f.gguf")["bits_per_weight"], abs=1e-3)


# --- 6: importance-matrix provenance -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_imatrix_provenance_keys_as_llama_quantize(stories_f16, tmp_path, suffix):
    from lowbit.gguf.convert import quantize_to_gguf

    imp = _imatrix(stories_f16, tmp_path / f"im{suffix}", ["calib/wiki.train.raw"], chunks=42)
    out = quantize_to_gguf(stories_f16, tmp_path / "q.gguf", "Q4_0", imatrix_path=imp)
    f = GGUFFile(out)
    keys = [k for k in f.kv if k.startswith("quantize.")]
    assert keys == ["quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                    "quantize.imatrix.chunks_count"]  # llama-quantize's order, after general.file_type
    assert list(f.kv).index("general.file_type") < list(f.kv).index("quantize.imatrix.file")
    types = f.header.kv_types
    assert [types[k] for k in keys] == ["STRING", "STRING", "UINT32", "UINT32"]
    assert f.kv["quantize.imatrix.file"] == str(imp)
    assert f.kv["quantize.imatrix.dataset"] == "calib/wiki.train.raw"
    assert f.kv["quantize.imatrix.entries_count"] == 35  # 5 layers x 7 matrices
    assert f.kv["quantize.imatrix.chunks_count"] == 42


def test_imatrix_provenance_strings_are_cut_like_strncpy(stories_f16, tmp_path):
    from lowbit.gguf.convert import quantize_to_gguf

    long_dir = tmp_path / ("d" * 150)
    long_dir.mkdir()
    imp = _imatrix(stories_f16, long_dir / "im.gguf", ["x" * 200, "second"], chunks=0)
    out = quantize_to_gguf(stories_f16, tmp_path / "q.gguf", "Q4_0", imatrix_path=imp)
    f = GGUFFile(out)
    assert f.kv["quantize.imatrix.file"] == str(imp)[:127]
    assert f.kv["quantize.imatrix.dataset"] == "x" * 127  # the first dataset only
    assert "quantize.imatrix.chunks_count" not in f.kv  # written only when positive


def test_requantizing_replaces_the_provenance(stories_f16, tmp_path):
    from lowbit.gguf.convert import quantize_to_gguf

    a = _imatrix(stories_f16, tmp_path / "a.gguf", ["first.txt"], chunks=3)
    b = _imatrix(stories_f16, tmp_path / "b.gguf", ["second.txt"], chunks=7)
    q8 = quantize_to_gguf(stories_f16, tmp_path / "q8.gguf", "Q8_0", imatrix_path=a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # re-quantizing warns
        out = quantize_to_gguf(q8, tmp_path / "q4.gguf", "Q4_0", imatrix_path=b)
    f = GGUFFile(out)
    assert f.kv["quantize.imatrix.dataset"] == "second.txt" and f.kv["quantize.imatrix.chunks_count"] == 7
    assert sum(k.startswith("quantize.imatrix.") for k in f.kv) == 4
