"""Several processes through ``torch.distributed``: the few collectives lowbit uses, no-ops in one process.

A run started by ``torchrun --nproc-per-node N lowbit ...`` (or ``lowbit ... --nproc N``, which
starts torchrun itself) has ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in its environment;
:func:`setup` joins the process group (``gloo`` on the CPU, ``nccl`` when the run's device is
CUDA: each rank then takes GPU ``LOCAL_RANK``). Everything else here works the same with or
without it, so the engine, the statistics and the evaluation call these helpers unconditionally:

* :func:`size`, :func:`rank`, :func:`is_main`: the world;
* :func:`mine`: a rank's share of a sequence (round-robin: item ``k`` belongs to rank ``k % size``);
* :func:`gather`: every rank's object, in rank order, on every rank; :func:`broadcast` rank 0's;
  :func:`interleave`: round-robin shares put back into the one-process order;
* :func:`barrier`.

Objects travel pickled (``all_gather_object``): activations and results are small next to the
model, and this keeps one code path for gloo and NCCL. Results do not depend on the number of
processes: work is split, never re-associated (no floating-point sum changes order).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def active() -> bool:
    """Whether this process belongs to a process group of more than one process."""
    if _env_world() <= 1:
        return False
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def setup(device: str | Any = "cpu") -> str:
    """Join the process group torchrun described in the environment (once); returns the device
    this rank should use (``cuda:LOCAL_RANK`` for a CUDA run, else ``device`` unchanged)."""
    if _env_world() <= 1:
        return str(device)
    dist = _dist()
    cuda = str(device).startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        import torch

        torch.cuda.set_device(local)
    if not dist.is_initialized():
        # rank 0 writes the output while the others wait: hours for a big model, not the default 30 minutes
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=24))
    return f"cuda:{local}" if cuda else str(device)


def size() -> int:
    return _dist().get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (from the environment before :func:`setup`, so a rank can stay quiet early)."""
    if active():
        return int(_dist().get_rank())
    return int(os.environ.get("RANK", "0")) if _env_world() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def mine(items: Sequence[T]) -> list[T]:
    """This rank's round-robin share of ``items`` (all of them in one process)."""
    return list(items[rank() :: size()])


def owns(k: int) -> bool:
    """Whether item ``k`` of a round-robin split is this rank's."""
    return k % size() == rank()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * size()
    _dist().all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def interleave(shares: Sequence[Sequence[T]]) -> list[T]:
    """Round-robin shares (one list per rank, as :func:`mine` cut them) back in the original order."""
    n = sum(len(s) for s in shares)
    w = len(shares)
    return [shares[k % w][k // w] for k in range(n)]


_sharded = [False]


@contextlib.contextmanager
def sharded_inputs(on: bool = True) -> Iterator[None]:
    """Within this block each rank holds only its round-robin share of the calibration batches
    (:func:`lowbit.models.statistics.observe` then gathers the linears' inputs in one-process order)."""
    before = _sharded[0]
    _sharded[0] = on and active()
    try:
        yield
    finally:
        _sharded[0] = before


def inputs_sharded() -> bool:
    return _sharded[0]


def barrier() -> None:
    if active():
        _dist().barrier()


@contextlib.contextmanager
def rank0_writes() -> Iterator[None]:
    """Around rank 0 writing an output: every rank leaves the block once it is written (the
    others may read it next). An error on rank 0 is not waited for (torchrun stops the others)."""
    yield
    barrier()


def world_note() -> dict[str, int]:
    """``{"processes": N}`` for a result's metadata when several processes ran, else empty."""
    return {"processes": size()} if active() else {}
