"""Resume across failures: a run killed outright in the middle of a layer (SIGKILL, no clean-up; the
whole job or one rank of two) resumes from its finished layers with identical output; a full disk
is a one-line error and leaves no partial output.

The kill comes from the engine's fault point (``LOWBIT_TEST_KILL_LAYER=i``: SIGKILL after layer
``i``'s work, before its result is written), so the test does not race the run. The full disk is a
256 KiB tmpfs when this test may mount one (root), and a writer that raises ENOSPC otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from paths import STORIES  # noqa: E402

SLOW = os.environ.get("LOWBIT_SLOW_TESTS") == "1"
ARGS = ["--method", "gptq", "--samples", "16", "--seq-len", "32", "--group-size", "-1", "--calib", "pydoc"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LOWBIT_NO_PROGRESS": "1"}


@pytest.fixture(autouse=True)
def _stories() -> None:
    if not STORIES.exists():
        pytest.skip("../shared/models/stories260K is not available")


def _lowbit(*args: str, env: dict[str, str] | None = None, nproc: int = 1) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lowbit.cli", "--quiet", "quantize", str(STORIES), *ARGS, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd[1:]]
    return subprocess.run(cmd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same command run whole, in this process with one thread (as the subprocesses run)."""
    import torch

    from lowbit import cli

    out = tmp_path_factory.mktemp("whole") / "out"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["--quiet", "quantize", str(STORIES), *ARGS, "-o", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    return out


def _same_output(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()


def _killed_then_resumed(tmp_path: Path, uninterrupted: Path, nproc: int, kill_env: dict[str, str]) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    res = _lowbit("--workdir", str(work), "-o", str(out), env={"LOWBIT_TEST_KILL_LAYER": "2", **kill_env},
                  nproc=nproc)
    if nproc == 1:
        assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    else:
        assert res.returncode != 0
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # no output, no partial one
    done = json.loads((work / "manifest.json").read_text())["layers_done"]
    # rank 0 writes: with rank 1 killed it may finish layer 2 (its own work needs no other rank) first
    assert done == 2 if nproc == 1 else done in (2, 3)
    assert sorted(p.name for p in work.glob("layer_*")) == [f"layer_{i:03d}.safetensors" for i in range(done)]
    first = (work / "layer_000.safetensors").stat().st_mtime_ns
    res = _lowbit("--workdir", str(work), "-o", str(out), nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (work / "layer_000.safetensors").stat().st_mtime_ns == first  # resumed: finished layers not redone
    assert json.loads((work / "manifest.json").read_text())["layers_done"] == 5
    _same_output(uninterrupted, out)


def test_sigkill_mid_layer_resumes_with_identical_output(tmp_path: Path, uninterrupted: Path) -> None:
    _killed_then_resumed(tmp_path, uninterrupted, 1, {})


@pytest.mark.skipif(not SLOW, reason="two more torchrun launches: LOWBIT_SLOW_TESTS=1")
def test_one_rank_killed_resumes_with_identical_output(tmp_path: Path, uninterrupted: Path) -> None:
    """Rank 1 of 2 is killed mid-layer; torchrun stops rank 0; the rerun (2 processes) resumes."""
    _killed_then_resumed(tmp_path, uninterrupted, 2, {"LOWBIT_TEST_KILL_RANK": "1"})


def _rtn(out: Path, **kw: Any) -> Path:
    from lowbit import api
    from lowbit.core.scheme import QuantScheme
    from lowbit.recipe import Recipe

    return api.quantize(STORIES, out, recipe=Recipe(scheme=QuantScheme(4, -1, True)), **kw)


def test_disk_full_while_writing_output_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import SafetensorError

    import lowbit.formats._common as common
    from lowbit.errors import LowbitError

    def full(*_a: Any, **_k: Any) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(common, "save_file", full)
    out = tmp_path / "out"
    with pytest.raises(LowbitError, match="no space left on device while writing; nothing was written"):
        _rtn(out)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a partial one


def test_disk_full_for_layer_results_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbit.models.store as store
    from lowbit.errors import LowbitError

    def full(*_a: Any, **_k: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "save_file", full)
    work = tmp_path / "work"
    with pytest.raises(LowbitError, match="no space left on device for the per-layer results") as e:
        _rtn(tmp_path / "out", workdir=work)
    assert str(e.value.where) == str(work)
    assert not (tmp_path / "out").exists() and not list(work.glob("*.partial"))


@pytest.fixture()
def small_disk(tmp_path: Path) -> Any:
    """A 256 KiB tmpfs: less than the stories260K checkpoint written as compressed-tensors needs."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_tmpfs_through_the_cli(small_disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lowbit import cli

    out = small_disk / "out"
    rc = cli.main(["--quiet", "quantize", str(STORIES), "--group-size", "-1", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1] == f"lowbit: error: {out}: no space left on device while writing; nothing was written " \
                      "(free some space or write to another disk)"
    assert list(small_disk.iterdir()) == []
