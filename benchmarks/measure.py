"""Timing and peak memory of calls, shared by the benchmarks (run them from this folder's parent)."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from triton.testing import do_bench


class Peak:
    """Peak memory in bytes above a base, filled in when its :func:`cuda_peak_above` block ends."""

    bytes: int | None = None


@contextlib.contextmanager
def cuda_peak_above(base: int | None = None) -> Iterator[Peak]:
    """Peak CUDA memory allocated inside the block, minus ``base`` (default: what was allocated on entry)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() if base is None else base
    torch.cuda.reset_peak_memory_stats()
    peak = Peak()
    yield peak
    torch.cuda.synchronize()
    peak.bytes = torch.cuda.max_memory_allocated() - base


def ms_per_call(fn: Callable[[], object], iters: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn()``, each call timed on its own.

    On CUDA, events around each call, with the host waiting for the device before the next
    one: host-side launch cost counts whenever the device would wait for it. Elsewhere, wall
    clock.
    """
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return times


def cuda_ms_and_peak(fn, args, rep_ms: int = 100) -> tuple[float, int]:
    """Median ms of ``fn(*args)`` (``do_bench``) and its peak memory in bytes above what was allocated before."""
    fn(*args)
    with cuda_peak_above() as peak:
        fn(*args)
    return do_bench(lambda: fn(*args), warmup=10, rep=rep_ms, return_mode="median"), peak.bytes
