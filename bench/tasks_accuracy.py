"""Task accuracy of quantized models (``lowbit eval --tasks``) with standard errors, in one table.

Runs lm-evaluation-harness (an optional extra) through lowbit's loader on each model given (any source
lowbit loads: the demo GGUF, GGUF files of other types, quantized HF folders), the same documents for
every model (the first ``--limit`` of each task's split: validation, test for mmlu/lambada/gsm8k).
Needs lm-eval and the offline data, e.g. the virtualenv of tests/reference/make_tasks.py:

    OMP_NUM_THREADS=2 /work/venvs/lmeval/bin/python bench/tasks_accuracy.py \\
        --models smollm2-135m smol-Q3_K_M.gguf smol-auto-Q3_K_M.gguf --tasks arc_easy,piqa,boolq,lambada \\
        --limit 200 --out bench/results/tasks_smollm2

Writes OUT.jsonl (one row per model, rewritten after each) and OUT.md (accuracy ± standard error in %).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def table(rows: list[dict], tasks: list[str]) -> str:
    from lowbit.eval.tasks import PRIMARY

    head = "| model | " + " | ".join(f"{t} ({PRIMARY[t]}, {rows[0]['tasks'][t]['split']}) %" for t in tasks) + " |"
    out = [head, "|---|" + "---:|" * len(tasks)]
    for r in rows:
        cells = []
        for t in tasks:
            got = r["tasks"][t]
            m = PRIMARY[t]
            cells.append(f"{100 * got[m]:.1f} ± {100 * (got.get(m + '_stderr') or 0):.1f}")
        out.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    from lowbit.eval.tasks import evaluate_tasks, parse_tasks

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--labels", nargs="*", default=None, help="names in the table (default: the model arguments)")
    ap.add_argument("--tasks", default="arc_easy,piqa,boolq,lambada")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", required=True, help="path without suffix: OUT.jsonl and OUT.md")
    a = ap.parse_args(argv)
    tasks = parse_tasks(a.tasks)
    labels = a.labels or a.models
    out = Path(a.out)
    jsonl = out.with_suffix(".jsonl")
    done = {r["model"]: r for r in (json.loads(x) for x in jsonl.read_text().splitlines())} if jsonl.exists() else {}
    rows = []
    for model, label in zip(a.models, labels, strict=True):
        r = done.get(model)
        if r is None or r["limit"] != a.limit or any(t not in r["tasks"] for t in tasks):
            t0 = time.perf_counter()
            r = evaluate_tasks(model, tasks, limit=a.limit, batch_size=a.batch_size)
            r["seconds"] = round(time.perf_counter() - t0, 1)
        r["label"] = label
        rows.append(r)
        jsonl.write_text("".join(json.dumps(x) + "\n" for x in rows))
        print(json.dumps(r), flush=True)
    out.with_suffix(".md").write_text(
        f"# Task accuracy (lm-evaluation-harness through lowbit's loader), first {a.limit} documents a task\n\n"
        + table(rows, tasks) + "\n\nCommand: `" + " ".join(["python", "bench/tasks_accuracy.py", *(argv or sys.argv[1:])])
        + "`\n", encoding="utf-8")


if __name__ == "__main__":
    main()
