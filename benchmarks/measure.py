"""Timing and peak memory of calls, shared by the benchmarks (run them from this folder's parent)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
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


def cuda_reserved() -> int:
    """Bytes the caching allocator holds from the device once its unused cached blocks are released: what
    stays between calls (live tensors, and the private pools CUDA graphs replay in, which
    ``memory_allocated`` does not count once a replay has returned)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved()


@dataclasses.dataclass
class CallTimes:
    """Per call, in milliseconds: ``ms`` until the device finished it, ``host_ms`` until it returned to
    the caller (launching its kernels; on CUDA the device may still be running them). When ``host_ms``
    is about ``ms`` the calls are launch-bound: the host's speed sets the time, not the kernels'."""

    ms: list[float]
    host_ms: list[float]


def host_probe_ms(repeats: int = 3) -> float:
    """Milliseconds a fixed pure-Python loop takes (the fastest of ``repeats``): the host CPU's speed at
    this moment, which sets the time of a launch-bound call. On the lent GPU machines it moved by 2x
    within a minute, in processes pinned to one core of an otherwise idle host (eleventh session)."""
    fastest = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        total = 0
        for i in range(100_000):
            total += i * i
        fastest = min(fastest, (time.perf_counter() - start) * 1e3)
    return fastest


def time_calls(fn: Callable[[], object], iters: int, device: torch.device) -> CallTimes:
    """Times of each of ``iters`` calls of ``fn()``, each call timed on its own.

    On CUDA, events around each call, with the host waiting for the device before the next
    one: host-side launch cost counts whenever the device would wait for it. Elsewhere, wall
    clock (and ``host_ms`` is ``ms``).
    """
    times = CallTimes([], [])
    for _ in range(iters):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            start_s = time.perf_counter()
            fn()
            times.host_ms.append((time.perf_counter() - start_s) * 1e3)
            stop.record()
            stop.synchronize()
            times.ms.append(start.elapsed_time(stop))
        else:
            start_s = time.perf_counter()
            fn()
            times.ms.append((time.perf_counter() - start_s) * 1e3)
            times.host_ms.append(times.ms[-1])
    return times


def kernel_time(fn: Callable[[], object], calls: int = 3, top: int = 15) -> dict:
    """The device's side of ``calls`` calls of ``fn()`` on CUDA, per call (:func:`per_call_kernels`): the
    kernels' summed time is the device's busy time, so what a call's wall time has above it is the
    host's (launches, Python, the allocator) or waiting."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return per_call_kernels(profiler.key_averages(), calls, top)


def per_call_kernels(averages, calls: int, top: int) -> dict:
    """From the profiler's averages per name (``key_averages()``) over ``calls`` calls, of the events
    that ran on the device (kernels, copies, sets): ``kernel_ms``, their summed time per call;
    ``launches`` per call; ``top``, the ``top`` names by time, each with its ms and count per call."""
    from torch.autograd import DeviceType

    kernels = sorted((event for event in averages if event.device_type == DeviceType.CUDA),
                     key=lambda event: -event.self_device_time_total)
    return {
        "calls": calls,
        "kernel_ms": sum(event.self_device_time_total for event in kernels) / calls / 1e3,
        "launches": sum(event.count for event in kernels) / calls,
        "top": [{"name": event.key, "ms": event.self_device_time_total / calls / 1e3, "per_call": event.count / calls}
                for event in kernels[:top]],
    }


def cuda_ms_and_peak(fn, args, rep_ms: int = 100) -> tuple[float, int]:
    """Median ms of ``fn(*args)`` (``do_bench``) and its peak memory in bytes above what was allocated before."""
    fn(*args)
    with cuda_peak_above() as peak:
        fn(*args)
    return do_bench(lambda: fn(*args), warmup=10, rep=rep_ms, return_mode="median"), peak.bytes


def live_at_peak(fn: Callable[[], object], top: int = 25, keep_code: str | None = None) -> dict:
    """What is allocated at the CUDA memory peak of one call of ``fn()``, largest first.

    Records the allocator's trace for the call, replays its allocations and frees to the moment
    the most bytes were live, and lists those blocks with the source lines that allocated them
    (for compiled code: the line of Inductor's generated module, read while it still exists).
    Blocks allocated before the call count in the base, not in the list; the current device only.
    A call that allocates nothing (a CUDA-graph replay) has an empty list. ``keep_code``: a folder
    to copy the generated modules named in the list into (they live in a cache that is deleted).
    """
    import linecache
    import shutil
    from pathlib import Path

    max_entries = 1_000_000
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=max_entries)
    try:
        fn()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    live: dict[int, dict] = {}
    current = peak = 0
    peak_blocks: list[dict] = []
    peak_at = None
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            event["index"] = index
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, peak_blocks, peak_at = current, list(live.values()), index
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]

    modules = set()

    def where(event) -> list[str]:
        lines = []
        for frame in event.get("frames", []):
            name = frame["filename"]
            if name.startswith("??") or "/torch/" in name and "torchinductor" not in name:
                continue
            if "inductor" in name and name.endswith(".py"):
                modules.add(name)
            text = linecache.getline(name, frame["line"]).strip()
            lines.append(f"{name.rsplit('/', 1)[-1]}:{frame['line']} {text[:120]}")
            if len(lines) == 3:
                break
        return lines

    blocks = sorted(peak_blocks, key=lambda event: -event["size"])
    result = {
        "peak_bytes_in_call": peak,
        "peak_at_event": peak_at,
        "events": len(trace),
        "peak_allocation": where(trace[peak_at]) if peak_at is not None else [],  # none: nothing allocated
        "truncated": len(trace) >= max_entries,  # the earliest events were dropped: the peak may be low
        "blocks": [{"bytes": e["size"], "allocated_at_event": e["index"], "where": where(e)} for e in blocks[:top]],
        "other_blocks": len(blocks) - top if len(blocks) > top else 0,
    }
    if keep_code:
        Path(keep_code).mkdir(parents=True, exist_ok=True)
        for name in modules:
            shutil.copy(name, Path(keep_code) / Path(name).name)
    return result
