"""Run under torchrun by tests/test_distributed.py: RTN and GPTQ of stories260K and an evaluation in
one process group (one launch: starting processes is the slow part); rank 0 writes ``eval.json``.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT TEXT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lowbit import api, distributed
from lowbit.api import EvalSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import STORIES  # noqa: E402
from test_distributed import GPTQ_ARGS, RTN_ARGS, eval_settings  # noqa: E402


def main() -> None:
    out, text = Path(sys.argv[1]), sys.argv[2]
    api.quantize(STORIES, out / "rtn", **RTN_ARGS())
    api.quantize(STORIES, out / "gptq", **GPTQ_ARGS())
    result = api.evaluate(out / "gptq", ref=STORIES, settings=EvalSettings(**eval_settings(text)))
    if distributed.is_main():
        (out / "eval.json").write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
