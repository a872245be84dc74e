"""Issue 15, items 7-12 and 15: nothing lost, nothing silent, one message style, fast start.

- SIGTERM/SIGHUP remove the output in progress; a killed run's temporaries are removed by the next;
- published outputs get the umask's permissions (not tempfile's 0600/0700);
- no ``torchinductor_*`` folder left in the temporary directory;
- progress lines when stderr is not a terminal, silenced by ``--quiet``;
- ``--help``, ``inspect`` of a GGUF and errors on bad paths answer without importing torch;
- warnings, usage errors and refusals are one line each, ``lowbit: warning|error: ...``.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lowbit.cli import EXIT_INPUT, EXIT_USAGE, main, registry_entries
from lowbit.fileio import atomic_dir, atomic_file

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LOWBIT_NO_PROGRESS"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def tiny_gguf(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("a", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- 7: signals and stale temporaries ---------------------------------------------------------------

SLOW_CONVERSION = """
import sys, time
import lowbit.gguf.convert as c
real = c.quantize_array
def slow(*a, **k):
    print("started", flush=True)
    time.sleep(0.5)
    return real(*a, **k)
c.quantize_array = slow
from lowbit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_removes_the_output_in_progress(stories_dir: Path, tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "s.gguf"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERSION, "--quiet", "quantize", str(stories_dir),
                             "--to", "F16", "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "started"  # the temporary output exists now
    assert [p for p in tmp_path.iterdir() if ".partial" in p.name]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "the .partial output must be removed"


def test_stale_partials_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "model.gguf"
    stale_file = tmp_path / f".model.gguf.{dead.pid}.abcd1234.partial"
    stale_dir = tmp_path / f".model.gguf.{dead.pid}.zz_9wxyz.partial"
    live = tmp_path / f".model.gguf.{os.getpid()}.live0000.partial"  # a run still going: kept
    other = tmp_path / f".other.gguf.{dead.pid}.abcd1234.partial"  # another output's: kept
    stale_file.write_bytes(b"x" * 100)
    stale_dir.mkdir()
    (stale_dir / "shard.safetensors").write_bytes(b"x")
    live.write_bytes(b"x")
    other.write_bytes(b"x")
    with atomic_file(out) as tmp:
        assert re.fullmatch(rf"\.model\.gguf\.{os.getpid()}\.[a-z0-9_]{{8}}\.partial", tmp.name)
        tmp.write_bytes(b"done")
    assert out.read_bytes() == b"done"
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other.exists()


def test_stale_work_folders_of_a_killed_run_are_removed(tmp_path: Path, monkeypatch) -> None:
    """Per-layer results live in <tmp>/lowbit-layers-<pid>.<random> (gigabytes for a big model): a run
    killed outright leaves it, the next one removes it."""
    import tempfile

    from lowbit.fileio import scratch_dir
    from lowbit.models.store import ScratchDir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"lowbit-layers-{dead.pid}.abcd1234"
    stale.mkdir()
    (stale / "layer_00000.safetensors").write_bytes(b"x")
    live = scratch_dir("lowbit-layers-")  # this process: kept
    other = tmp_path / "lowbit-layers-notapid"  # not ours to judge: kept
    other.mkdir()
    s = ScratchDir("lowbit-layers-")
    assert s.path.name.startswith(f"lowbit-layers-{os.getpid()}.")
    assert not stale.exists() and live.exists() and other.exists()


# --- 9: permissions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_are_published_with_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "f.gguf") as tmp:
            tmp.write_bytes(b"x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            (tmp / "sub").mkdir()
            (tmp / "sub" / "x.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.gguf").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "d" / "sub").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "d" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "d" / "sub" / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_cli_output_readable_by_others_under_umask_022(capsys, stories_dir: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        code, _, err = run(capsys, "--quiet", "quantize", str(stories_dir), "--group-size", "-1",
                           "-o", str(tmp_path / "q"))
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "q").stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (tmp_path / "q").iterdir())


# --- 10: nothing left in the temporary directory ---------------------------------------------------


def test_failed_eval_leaves_nothing_in_the_temp_dir(stories_dir: Path, tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = _env(TMPDIR=str(tmpdir), LOWBIT_CACHE=str(tmp_path / "cache"))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "--quiet", "eval", str(stories_dir),
                        "--text", str(tmp_path / "missing.txt")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == EXIT_INPUT, r.stderr
    assert list(tmpdir.iterdir()) == []


# --- 11: progress when stderr is not a terminal ----------------------------------------------------

PROGRESS = re.compile(r"^lowbit: [^:]+: \d+/\d+ \w+(, [\d.]+ (\w+/s|s/\w+))?(, ETA [\d:]+( s)?)?$")
PROGRESS_END = re.compile(r"^lowbit: [^:]+: \d+/\d+ \w+ in [\d:]+( s)?( \(.*\))?$")


def test_progress_lines_when_stderr_is_a_pipe(stories_dir: Path, wikitext: Path, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "lowbit.cli", "eval", str(stories_dir), "--text", str(wikitext),
            "--chunks", "3", "--batch-size", "1", "--ctx", "64"]
    r = subprocess.run(args, capture_output=True, text=True, env=_env(LOWBIT_PROGRESS_INTERVAL="0"), timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert sum(bool(PROGRESS.match(x)) for x in lines) >= 2, lines  # 1/3, 2/3
    assert any(PROGRESS_END.match(x) for x in lines), lines
    assert "\r" not in r.stderr  # no bar drawing
    quiet = subprocess.run([*args, "--quiet"], capture_output=True, text=True,
                           env=_env(LOWBIT_PROGRESS_INTERVAL="0"), timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_terminal_without_width_gets_lines_not_an_invisible_bar(tmp_path: Path) -> None:
    """Some remote shells give a pseudo-terminal that reports 0 columns, where tqdm draws nothing."""
    import pty

    master, slave = pty.openpty()  # a new pty has no size (0 x 0)
    code = ("from lowbit.progress import bar\n"
            "b = bar(3, 'step', 'chunk')\n"
            "[b.update(1) for _ in range(3)]\n"
            "b.close()\n")
    proc = subprocess.run([sys.executable, "-c", code], stderr=slave, stdout=subprocess.DEVNULL,
                          env=_env(LOWBIT_PROGRESS_INTERVAL="0"), timeout=60)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.returncode == 0
    text = out.decode(errors="replace")
    assert "lowbit: step: 1/3 chunk" in text and "lowbit: step: 3/3 chunk in" in text, text


def test_line_progress_is_periodic(monkeypatch) -> None:
    import io

    from lowbit.progress import LineProgress

    out = io.StringIO()
    p = LineProgress(100, "step", "it", interval=3600, stream=out)
    for _ in range(100):
        p.update(1)
    p.close()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]  # only the closing line
    assert re.match(r"lowbit: step: 100/100 it in \d+ s", out.getvalue())
    out = io.StringIO()
    p = LineProgress(4, "slow", "layer", interval=0.05, stream=out)  # one slow item still reports
    time.sleep(0.3)
    p.update(1)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("lowbit: slow: 0/4 layer") and len(lines) >= 3


def test_demo_reports_progress(monkeypatch, capsys, stories_dir: Path, wikitext: Path) -> None:
    monkeypatch.delenv("LOWBIT_NO_PROGRESS", raising=False)
    monkeypatch.setenv("LOWBIT_PROGRESS_INTERVAL", "0")
    code, out, err = run(capsys, "demo", "--model", str(stories_dir), "--text", str(wikitext), "--chunks", "2",
                         "--ctx", "64")
    assert code == 0, err
    lines = err.splitlines()
    assert any(re.match(r"lowbit: demo: \d/4 setting", x) for x in lines), lines
    assert any(PROGRESS_END.match(x) and "kl-divergence" in x or "reference" in x for x in lines), lines


# --- 12: start-up without torch ---------------------------------------------------------------------

NO_TORCH = """
import sys, time
t = time.perf_counter()
from lowbit.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "transformers", "safetensors.torch", "tqdm") if m in sys.modules)
print("HEAVY", ",".join(heavy), "CODE", code, file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["quantize", "--help"], ["inspect", "{gguf}"], ["inspect", "{gguf}", "--json"],
                                  ["inspect", "{missing}"], ["quantize", "{missing}", "-o", "{out}"],
                                  ["eval", "{missing}"], ["quantize", "--method", "nope"]])
def test_fast_paths_do_not_import_torch(tmp_path: Path, argv: list[str]) -> None:
    gguf_file = tiny_gguf(tmp_path / "tiny.gguf")
    argv = [a.format(gguf=gguf_file, missing=tmp_path / "nope", out=tmp_path / "o") for a in argv]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, env=_env(), timeout=60)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tail = r.stderr.strip().splitlines()[-1]
    assert tail.startswith("HEAVY  CODE"), r.stderr  # nothing heavy imported
    # CPU time, not wall time: on a loaded machine (the suite shares 2 cores) wall time measures the
    # neighbours; importing torch alone costs 1.5-2 s of CPU, so this still catches any heavy import
    assert cpu < 1.5, f"{argv}: {cpu:.2f} s of CPU ({wall:.2f} s wall)"


def test_help_choices_read_from_source_match_the_registries() -> None:
    from lowbit.core.presets import PRESETS
    from lowbit.formats import FORMATS
    from lowbit.methods import METHODS

    for kind, reg in (("method", METHODS), ("format", FORMATS), ("scheme", PRESETS)):
        live = [(n, reg._help[n.lower()]) for n in reg.names()]
        read = [(n, h) for n, h, _ in registry_entries(kind)]
        if kind == "format":
            assert read == live  # the same order: the default first
        else:
            assert sorted(read) == sorted(live)


def test_help_choices_fall_back_to_the_registries_without_source(monkeypatch) -> None:
    import lowbit.cli as cli

    read = {kind: [(n, h) for n, h, _ in registry_entries(kind)] for kind in ("method", "format", "scheme")}
    monkeypatch.setattr(cli, "source_entries", lambda *a: [])
    for kind, entries in read.items():
        assert sorted((n, h) for n, h, _ in cli.registry_entries(kind)) == sorted(entries)


# --- 15: one message style ---------------------------------------------------------------------------


def test_warnings_are_one_line_without_source(capsys, stories_dir: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, "--quiet", "quantize", str(stories_dir), "--group-size", "-1", "-o", str(tmp_path / "q"))
    assert code == 0
    lines = err.splitlines()
    assert lines and all(x.startswith("lowbit: warning: ") for x in lines), lines
    assert "UserWarning" not in err and "warnings.warn" not in err and ".py:" not in err


def test_usage_errors_are_one_line(capsys, stories_dir: Path, tmp_path: Path) -> None:
    for argv, cmd in ((["quantize", str(stories_dir)], "quantize"),
                      (["quantize", str(stories_dir), "-o", "x", "--method", "nope"], "quantize"),
                      (["eval"], "eval"), (["frobnicate"], "")):
        code, out, err = run(capsys, *argv)
        assert code == EXIT_USAGE, err
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("lowbit: error: ") and f"(see lowbit{' ' + cmd if cmd else ''} --help)" in err
        assert "usage:" not in err


def test_internal_errors_and_interrupts_keep_the_style(capsys, monkeypatch, tmp_path: Path) -> None:
    import lowbit.cli as cli

    def boom(args):
        raise RuntimeError("something broke")

    def interrupted(args):
        raise KeyboardInterrupt

    gguf_file = str(tiny_gguf(tmp_path / "t.gguf"))
    monkeypatch.setitem(cli.COMMANDS, "inspect", boom)
    code, _, err = run(capsys, "inspect", gguf_file)
    assert code == cli.EXIT_INTERNAL
    assert err.splitlines() == ["lowbit: error: internal error: RuntimeError: something broke "
                                "(run with --debug for a traceback)"]
    monkeypatch.setitem(cli.COMMANDS, "inspect", interrupted)
    code, _, err = run(capsys, "inspect", gguf_file)
    assert code == 130 and err.startswith("lowbit: error: interrupted")


def test_pickled_bin_refused_without_torch_noise(capsys, stories_dir: Path, tmp_path: Path) -> None:
    import shutil

    import torch

    folder = tmp_path / "pk"
    folder.mkdir()
    shutil.copy(stories_dir / "config.json", folder)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil(), "w": torch.zeros(2)}, folder / "pytorch_model.bin", pickle_protocol=4)
    code, out, err = run(capsys, "--quiet", "inspect", str(folder))
    assert code == EXIT_INPUT
    assert err.splitlines() == [err.strip()] and err.startswith("lowbit: error: ") and "pytorch_model.bin" in err
    assert "pwned" not in out + err and "protocol" not in err


def test_errors_about_a_converted_gguf_name_the_users_file(capsys, monkeypatch, stories_dir: Path,
                                                           tmp_path: Path) -> None:
    """A problem found in the cache's conversion of a GGUF is reported against the user's file."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))  # no earlier conversion to reuse (that is announced)
    import lowbit.api as api
    from lowbit.errors import LowbitError
    from lowbit.models import resolve

    gguf_path = tmp_path / "mine.gguf"
    code, _, err = run(capsys, "--quiet", "quantize", str(stories_dir), "--to", "F32", "-o", str(gguf_path))
    assert code == 0, err

    def evaluate(model, ref=None, settings=None):
        src = resolve(model)
        raise LowbitError(src.hf_dir / "model.safetensors", "tensor x: shape (2, 3) does not match the config")

    monkeypatch.setattr(api, "evaluate", evaluate)
    code, _, err = run(capsys, "--quiet", "eval", str(gguf_path))
    assert code == EXIT_INPUT
    assert err.strip() == f"lowbit: error: {gguf_path}: tensor x: shape (2, 3) does not match the config"


def test_demo_note_claims_a_4bit_grid_only_for_quantized_gguf_sources(stories_dir: Path, wikitext: Path) -> None:
    from lowbit.api import EvalSettings, demo
    from lowbit.core import QuantScheme

    r = demo(str(stories_dir), EvalSettings(text=wikitext, ctx=64, max_chunks=1),
             schemes=(("int8 per-channel", QuantScheme(8, -1, True), False),))
    assert "4-bit grid" not in r["note"]


# --- 14: the demo holds one model at a time ---------------------------------------------------------


def test_demo_holds_one_model_at_a_time(monkeypatch, stories_dir: Path, wikitext: Path) -> None:
    import gc
    import weakref

    import lowbit.api as api
    import lowbit.runtime.qlinear as qlinear

    alive: weakref.WeakSet = weakref.WeakSet()
    seen: list[int] = []
    real_load, real_load_quantized = api.load, qlinear.load_quantized

    def before() -> None:
        gc.collect()
        seen.append(len(alive))  # models still alive when another is loaded

    def load(source):
        before()
        loaded = real_load(source)
        alive.add(loaded.model)
        return loaded

    def load_quantized(path, *a, **k):
        before()
        model, tok = real_load_quantized(path, *a, **k)
        alive.add(model)
        return model, tok

    monkeypatch.setattr(api, "load", load)
    monkeypatch.setattr(qlinear, "load_quantized", load_quantized)
    r = api.demo(str(stories_dir), api.EvalSettings(text=wikitext, ctx=64, max_chunks=2))
    assert len(seen) == 1 + len(api.DEMO_SETTINGS) and len(r["rows"]) == 1 + len(api.DEMO_SETTINGS)
    assert seen == [0] * len(seen), f"models alive at each load: {seen}"


def test_scores_against_kept_reference_equal_compare_models(stories_dir: Path, wikitext: Path, tmp_path: Path) -> None:
    """The demo's one-model-at-a-time scoring gives exactly the numbers of the all-at-once comparison."""
    from dataclasses import replace

    import torch

    from lowbit.eval import chunk_bos, compare_models, read_text, tokenize
    from lowbit.eval.perplexity import reference_scores, score_against
    from lowbit.models import load

    ref = load(stories_dir)
    tokens = tokenize(ref.tokenizer, read_text(wikitext)[:20000])
    bos = chunk_bos(ref.tokenizer, tokens)
    other = load(stories_dir).model
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.01, alpha=1.0) if p.ndim == 2 else None
    kw = dict(ctx=64, batch_size=3, bos_id=bos, max_chunks=5)
    together = compare_models(ref.model, {"other": other}, tokens, **kw)["other"]
    for folder in (None, tmp_path):
        kept = reference_scores(ref.model, tokens, folder=folder, **kw)
        for _ in range(2):  # the kept scores are not consumed by a comparison
            alone = score_against(kept, other)
            assert replace(alone, seconds=0.0, tokens_per_s=0.0) == replace(together, seconds=0.0, tokens_per_s=0.0)
