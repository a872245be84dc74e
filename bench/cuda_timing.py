"""Timing of CUDA work for the kernel benches: a CUDA graph of calls, replayed (what a decode step pays
per call when launches cost what a graph's cost, as in a CUDA-graph decode loop)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def graph_time(calls: list[Callable[[], object]], reps: int = 20) -> float:
    """Seconds per call: one CUDA graph holding ``calls`` in sequence, replayed ``reps`` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:  # warm-up: allocations, cuBLAS handles, lowbit's per-layer weight views
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (reps * len(calls))
