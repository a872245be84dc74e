"""Fuzzing the readers (issue 15): seeded mutations of a small GGUF (stories260K as Q8_0, made by
``lowbit quantize``) and of a safetensors folder (a copy of stories260K).

Two stages, bounded in time:

* **readers, in this process**: many mutants through everything lowbit reads before any work
  (GGUF header, metadata, hyper-parameters, tensor names and shapes, every tensor; safetensors
  headers, every tensor, config.json against the checkpoint). Only :class:`LowbitError` (one line)
  may come out.
* **the command line, in a subprocess** limited to 2 GiB of address space: a sample of the
  mutants through ``lowbit inspect``, ``lowbit quantize --to Q8_0`` and ``lowbit eval --chunks 1``
  (``tests/fuzzing.py`` runs ``lowbit.cli.main`` for each, torch imported once, each command
  limited to 20 s of wall time). Each ends with exit 0 and a correct output, or exit 1 with
  exactly one ``lowbit: error:`` line (warnings, one line each, may precede it); never exit 3,
  never a traceback, never past the limits. A few mutants also run as a whole ``python -m
  lowbit.cli`` process.

``LOWBIT_FUZZ_SCALE=N`` multiplies the number of mutants and ``LOWBIT_FUZZ_SEED=S`` picks another
set of them (for longer runs by hand).
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from fuzzing import mutate_folder, mutate_gguf, read_folder_fully, read_gguf_fully, run_reader
from paths import STORIES

pytestmark = pytest.mark.skipif(not STORIES.exists(), reason="stories260K not available")

HERE = Path(__file__).resolve().parent
SCALE = int(os.environ.get("LOWBIT_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("LOWBIT_FUZZ_SEED", "0"))  # another set of mutants (by hand)
N_READER = 1000 * SCALE  # per input kind, in this process
N_CLI = 20 * SCALE  # per input kind, through the command line
LIMIT_S = 20
LIMIT_BYTES = 2 << 30
TEXT = "Once upon a time there was a little girl named Lily. She liked to play in the park.\n" * 30


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The seeds of every mutant: stories260K as a Q8_0 GGUF (written by the command line) and as
    a safetensors folder, plus a tiny text to evaluate on."""
    from lowbit.cli import main

    d = tmp_path_factory.mktemp("fuzz")
    gguf = d / "stories-q8_0.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--quiet", "quantize", str(STORIES), "--to", "Q8_0", "-o", str(gguf)]) == 0
    text = d / "tiny.txt"
    text.write_text(TEXT)
    return {"gguf": gguf, "folder": STORIES, "text": text, "dir": d}


def _mutants(kind: str, inputs, n: int, first_seed: int, where: Path):
    where.mkdir(parents=True, exist_ok=True)
    src = inputs["gguf"].read_bytes()
    for seed in range(first_seed, first_seed + n):
        rng = random.Random(seed)
        if kind == "gguf":
            yield seed, mutate_gguf(src, rng, where / f"m{seed}.gguf")
        else:
            yield seed, mutate_folder(inputs["folder"], rng, where / f"m{seed}")


@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_readers_refuse_mutants_in_one_line(inputs, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    read = read_gguf_fully if kind == "gguf" else read_folder_fully
    run_reader(read, inputs["gguf"] if kind == "gguf" else inputs["folder"])  # imports paid before timing
    failures, slow, outcomes = [], [], {"read": 0, "refused": 0}
    for seed, m in _mutants(kind, inputs, N_READER, SEED, tmp_path / "m"):
        t0 = time.perf_counter()
        outcome = run_reader(read, m.path)
        dt = time.perf_counter() - t0
        if outcome in outcomes:
            outcomes[outcome] += 1
        else:
            failures.append(f"seed {seed}: {m.what}: {outcome}")
        if dt > 5:
            slow.append(f"seed {seed}: {m.what}: {dt:.1f} s")
    print(f"{kind}: {N_READER} mutants through the readers: {outcomes}")
    assert not failures, "\n".join(failures[:20])
    assert outcomes["read"] and outcomes["refused"]  # both kinds of outcome are exercised
    assert not slow, "\n".join(slow)


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LOWBIT_CACHE=str(tmp / "cache"), PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE)]))
    env.pop("LOWBIT_NO_PROGRESS", None)
    return env


def _check(result: dict, what: str, out: Path | None) -> str | None:
    """The rule every command keeps; ``None`` when kept, else what went wrong."""
    code, err, stdout = result["code"], result["stderr"], result["stdout"]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code == "timeout":
        return f"ran past {LIMIT_S} s"
    if "Traceback" in err or "Traceback" in stdout:
        return f"traceback: {err[-300:]}"
    if code == 0:
        if any(not ln.startswith("lowbit: warning: ") for ln in lines):
            return f"exit 0 with other stderr lines: {lines[:3]}"
        if result["argv"][1] == "quantize":
            from lowbit.gguf.reader import validate_gguf

            validate_gguf(out)  # a correct output: a GGUF file that reads back
            if "output: " not in stdout:
                return "exit 0 without the output's name"
        elif result["argv"][1] == "eval":
            ppl = [float(ln.split()[1]) for ln in stdout.splitlines() if ln.startswith("ppl: ")]
            if not ppl or not math.isfinite(ppl[0]):
                return f"exit 0 with perplexity {ppl}"
        elif "path: " not in stdout:
            return "inspect printed no summary"
        return None
    if code != 1:
        return f"exit {code}: {lines[-2:]}"
    errors = [ln for ln in lines if ln.startswith("lowbit: error: ")]
    others = [ln for ln in lines if not ln.startswith(("lowbit: error: ", "lowbit: warning: "))]
    if len(errors) != 1 or others or lines[-1] != errors[0]:
        return f"exit 1 without exactly one error line: {lines[-3:]}"
    return None


def _jobs(kind: str, inputs, tmp: Path, n: int, first_seed: int) -> list[dict]:
    src = inputs["gguf"] if kind == "gguf" else inputs["folder"]
    jobs: list[dict] = [{"warmup": True, "argv": ["--quiet", "eval", str(src), "--text", str(inputs["text"]),
                                                  "--chunks", "1", "--ctx", "32"]},
                        {"warmup": True, "argv": ["--quiet", "quantize", str(src), "--to", "Q8_0", "-o",
                                                  str(tmp / "warmup.gguf")]}]
    for seed, m in _mutants(kind, inputs, n, first_seed, tmp / "cli"):
        out = tmp / "out" / f"{seed}.gguf"
        base = {"seed": seed, "what": m.what, "limit_s": LIMIT_S}
        jobs.append({**base, "argv": ["--quiet", "inspect", str(m.path)]})
        jobs.append({**base, "argv": ["--quiet", "quantize", str(m.path), "--to", "Q8_0", "-o", str(out)],
                     "out": str(out)})
        if seed % 3 == 0:  # evaluation converts and runs the model: a third of the mutants
            jobs.append({**base, "argv": ["--quiet", "eval", str(m.path), "--text", str(inputs["text"]),
                                          "--chunks", "1", "--ctx", "32"]})
    return jobs


@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_command_line_on_mutants(inputs, kind, tmp_path):
    first_seed = 10_000 + SEED  # not the readers' mutants
    jobs = _jobs(kind, inputs, tmp_path, N_CLI, first_seed)
    (tmp_path / "out").mkdir()
    jobs_path, results_path = tmp_path / "jobs.json", tmp_path / "results.json"
    jobs_path.write_text(json.dumps(jobs))
    budget = LIMIT_S * len(jobs) + 600
    proc = subprocess.run([sys.executable, str(HERE / "fuzzing.py"), str(jobs_path), str(results_path)],
                          env=_env(tmp_path), preexec_fn=_limits, capture_output=True, text=True, timeout=budget)
    current = results_path.with_name(results_path.name + ".current")
    if proc.returncode != 0:
        job = current.read_text() if current.exists() else "?"
        pytest.fail(f"the CLI process died (exit {proc.returncode}) in job {job}: {proc.stderr[-1500:]}")
    results = json.loads(results_path.read_text())
    failures = []
    for r in results:
        problem = _check(r, r["what"], Path(r["out"]) if "out" in r else None)
        if problem:
            failures.append(f"seed {r['seed']} ({r['what']}): lowbit {' '.join(r['argv'][1:3])}: {problem}")
    assert max(r["max_rss"] for r in results) < LIMIT_BYTES
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[f"{r['argv'][1]} exit {r['code']}"] = outcomes.get(f"{r['argv'][1]} exit {r['code']}", 0) + 1
    print(f"{kind}: {len(results)} commands on {N_CLI} mutants: {dict(sorted(outcomes.items()))}; "
          f"slowest {max(r['seconds'] for r in results):.1f} s")
    assert not failures, "\n".join(failures[:20])


def test_whole_processes_on_a_few_mutants(inputs, tmp_path):
    """The real entry point, one process per command (interpreter start, import, exit code)."""
    cases = [m for _, m in _mutants("gguf", inputs, 1, 20_000, tmp_path / "g")]
    cases += [m for _, m in _mutants("safetensors", inputs, 1, 20_001, tmp_path / "s")]
    for m in cases:
        out = tmp_path / f"{m.path.name}.out.gguf"
        argv = ["--quiet", "quantize", str(m.path), "--to", "Q8_0", "-o", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lowbit.cli", *argv], env=_env(tmp_path), preexec_fn=_limits,
                              capture_output=True, text=True, timeout=120)
        result = {"code": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout, "argv": argv}
        problem = _check(result, m.what, out)
        assert problem is None, f"{m.what}: {problem}"
        assert time.perf_counter() - t0 < 120
