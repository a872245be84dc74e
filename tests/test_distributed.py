"""Several processes through torch.distributed (gloo, 2 processes on the CPU) give the same bytes as one.

One torchrun launch (tests/distributed_worker.py) quantizes stories260K with RTN (layers split
across the ranks) and GPTQ (calibration batches split, lm_head calibrated on the gathered final
hidden states) and evaluates the GPTQ output against the float model (chunks split); the same
calls in this process, with one thread as each worker has, must give byte-identical files and
equal numbers. NCCL runs the same code on GPUs (``--device cuda``: one GPU per rank); no GPU here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from paths import STORIES, WIKITEXT  # noqa: E402


def RTN_ARGS() -> dict[str, Any]:  # noqa: N802 - shared with the worker
    from lowbit.core.scheme import QuantScheme
    from lowbit.recipe import Recipe

    return {"recipe": Recipe(scheme=QuantScheme(4, -1, True))}


def GPTQ_ARGS() -> dict[str, Any]:  # noqa: N802
    from lowbit.core.scheme import QuantScheme
    from lowbit.recipe import Recipe, parse_override

    scheme = QuantScheme(4, -1, False)
    # 40 samples in batches of 8: 5 batches, 3 on rank 0 and 2 on rank 1 (an uneven last round)
    return {"method": "gptq", "recipe": Recipe(scheme=scheme, overrides=(parse_override("lm_head=bits:8", scheme),)),
            "calib": "pydoc", "samples": 40, "seq_len": 32}


def eval_settings(text: str) -> dict[str, Any]:
    return {"text": text, "ctx": 64, "max_chunks": 7, "batch_size": 2}  # 4 batches, the last one short


def _text(tmp: Path) -> str:
    if WIKITEXT.exists():
        return str(WIKITEXT)
    import pydoc_data.topics as t

    p = tmp / "text.txt"
    p.write_text("\n".join(str(v) for v in t.topics.values()))
    return str(p)


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    if not STORIES.exists():
        pytest.skip("../shared/models/stories260K is not available")
    out = tmp_path_factory.mktemp("dist")
    text = _text(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWBIT_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(HERE / "distributed_worker.py"), str(out), text]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    return out, text


@pytest.fixture()
def one_thread() -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        if n.endswith(".safetensors"):
            assert (a / n).read_bytes() == (b / n).read_bytes(), n
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    for c in (ca, cb):
        c.get("lowbit", {}).pop("seconds", None)
    assert ca == cb


def test_rtn_two_processes_same_bytes(two_procs: tuple[Path, str], tmp_path: Path, one_thread: Any) -> None:
    from lowbit import api

    api.quantize(STORIES, tmp_path / "rtn", **RTN_ARGS())
    _same_files(two_procs[0] / "rtn", tmp_path / "rtn")


def test_gptq_two_processes_same_bytes(two_procs: tuple[Path, str], tmp_path: Path, one_thread: Any) -> None:
    from lowbit import api

    api.quantize(STORIES, tmp_path / "gptq", **GPTQ_ARGS())
    _same_files(two_procs[0] / "gptq", tmp_path / "gptq")


def test_eval_two_processes_same_numbers(two_procs: tuple[Path, str], one_thread: Any) -> None:
    from lowbit import api
    from lowbit.api import EvalSettings

    out, text = two_procs
    two = json.loads((out / "eval.json").read_text())
    one = json.loads(json.dumps(api.evaluate(out / "gptq", ref=STORIES, settings=EvalSettings(**eval_settings(text))),
                                default=str))
    for key in ("ppl", "ppl_ref", "kl_mean", "kl_median", "kl_p99", "kl_max", "top1_agreement", "n_tokens"):
        assert two[key] == one[key], key


def test_helpers_in_one_process() -> None:
    from lowbit import distributed as d

    assert (d.size(), d.rank(), d.is_main(), d.active()) == (1, 0, True, False)
    assert d.mine([1, 2, 3]) == [1, 2, 3] and d.gather(5) == [5] and d.broadcast("x") == "x"
    assert d.interleave([[0, 2, 4], [1, 3]]) == [0, 1, 2, 3, 4]


def test_nproc_launches_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    """``lowbit quantize ... --nproc 2`` runs the same command under torchrun, without --nproc."""
    import subprocess as sp

    from lowbit import cli

    seen: list[list[str]] = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(sp, "call", lambda cmd: seen.append(cmd) or 0)
    assert cli.main(["quantize", "m", "-o", "x", "--nproc", "2", "--bits", "4"]) == 0
    assert seen[0][1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert seen[0][6:] == ["lowbit.cli", "quantize", "m", "-o", "x", "--bits", "4"]
