"""Atomic output: write under a temporary name beside the target, rename when complete.

Temporaries are named ``.<output name>.<pid>.<random>.partial``: a run killed without a chance to
clean up (``kill -9``, a power cut) leaves one behind, and the next run writing the same output
removes those whose process is gone (on this machine: the pid is checked here). Work folders in the
system's temporary directory (:func:`scratch_dir`) are named and cleaned up the same way. What is published gets the permissions of an ordinary new
file (``0666``/``0777`` less the umask), not the ``0600``/``0700`` of :mod:`tempfile`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import LowbitError


def check_output_path(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing output (unless ``overwrite``) or an unwritable parent folder."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise LowbitError(out, "output already exists (pass --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise LowbitError(out, f"parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise LowbitError(out, f"parent folder {parent} is not writable")
    return out


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_permissions(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes a new file gets: 0666/0777 less the umask."""
    mask = current_umask()
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)  # os.walk does not follow links to folders
            for f in files:
                p = os.path.join(root, f)
                if not os.path.islink(p):
                    os.chmod(p, 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


_TMP_TAIL = re.compile(r"(\d+)\.[a-z0-9_]{8}\.partial")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's live process
        return True
    except OSError:
        return False
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove temporaries of ``out`` left by runs that no longer exist; returns what was removed."""
    parent = out.parent if str(out.parent) else Path(".")
    prefix = f".{out.name}."
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        m = _TMP_TAIL.fullmatch(p.name[len(prefix):])
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def scratch_dir(prefix: str) -> Path:
    """A new folder ``<tmp>/<prefix><pid>.<random>`` for work files; the caller removes it. Folders
    of the same ``prefix`` whose process is gone (killed outright, so nothing removed them) are
    removed first: per-layer results of a big model can be gigabytes."""
    base = Path(tempfile.gettempdir())
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.[a-z0-9_]{8}")
    try:
        entries = [p for p in base.iterdir() if p.name.startswith(prefix)]
    except OSError:
        entries = []
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m is not None and not _pid_alive(int(m.group(1))) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}."))


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """:func:`scratch_dir` as a context: the folder is removed on the way out, whatever happens."""
    path = scratch_dir(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _tmp_prefix(out: Path) -> str:
    return f".{out.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_file(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path; on success it is renamed to ``path``, on failure removed."""
    out = check_output_path(path, overwrite)
    remove_stale_partials(out)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(out), suffix=".partial", dir=out.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        publish_permissions(tmp_path)
        os.replace(tmp_path, out)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path``, on failure it is removed."""
    out = check_output_path(path, overwrite)
    remove_stale_partials(out)
    tmp_path = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out), suffix=".partial", dir=out.parent or "."))
    try:
        yield tmp_path
        publish_permissions(tmp_path)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            os.replace(out, old)
            os.replace(tmp_path, out)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp_path, out)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path, ignore_errors=True)
