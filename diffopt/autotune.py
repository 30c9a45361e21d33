"""Choosing among kernels by measuring them while compiling, with the choice cached on disk.

A pass with several implementations of one call (today ``attention``) hands :func:`select` a key
(what determines the choice: shapes, strides, dtype and the like, plus :func:`environment`) and a
function that builds, on real tensors of the call's own shapes, dtypes and strides with random
values, the stock call and each candidate as functions of no arguments. As Inductor's max-autotune
chooses among its kernels:

1. The key is looked up in the cache; a hit is the choice, nothing runs.
2. On a miss, with the call's device current (:func:`on_device`), the stock call runs once, then
   each candidate: one that raises (fails to build or to run, or runs out of memory) or whose
   result differs from the stock call's by more than the dtype's rounding is out, with the reason.
   Where the device has no room for the measurement's tensors, or the stock call itself fails,
   nothing is chosen (and nothing cached).
3. The stock call and the remaining candidates are timed (default: :func:`cuda_timer`, the median
   by ``triton.testing.do_bench``'s method with an L2-sized flush; tests inject a timer).
4. The fastest candidate is chosen if it beats the stock call by more than :data:`MIN_GAIN`;
   otherwise the stock call stays (``Selection.choice`` is None).

The cache is one JSON file, ``$DIFFOPT_CACHE_DIR/autotune.json`` (default: ``diffopt/`` in
Inductor's cache directory, so clearing Inductor's cache for a cold compile clears this too). The
key includes the device name and the torch, CUDA, cuDNN and diffopt versions, so a new GPU or a new
library measures again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import statistics
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ContextManager

import torch

log = logging.getLogger("diffopt")

STOCK = "stock"
# A candidate must be this much faster than the stock call to replace it: within timing noise a
# near-tie says nothing, and the stock call has no wrapper on the host path.
MIN_GAIN = 0.01
# Timed calls per measurement at most (a call of a microsecond would otherwise be timed 10^5 times).
MAX_TIMED_CALLS = 1000
# Elements per float64 slice when :func:`mismatch` compares outputs: 32 MiB.
COMPARE_CHUNK = 1 << 22

Run = Callable[[], torch.Tensor]
# (the function to time, its name) -> milliseconds
Timer = Callable[[Run, str], float]


@dataclasses.dataclass
class Selection:
    choice: str | None  # the winning candidate; None: the stock call stays
    times_ms: dict[str, float]  # the stock call's and each candidate's that ran
    failures: dict[str, str]  # candidate (or the stock call) -> why it was not timed
    cached: bool = False

    def summary(self) -> str:
        """``stock 11.90 ms, flashinfer_fa3 10.33 ms, ...; x failed (...) -> choice``."""
        times = ", ".join(f"{name} {ms:.3g} ms" for name, ms in sorted(self.times_ms.items(), key=lambda item: item[1]))
        failed = "; ".join(f"{name}: {why}" for name, why in self.failures.items())
        chosen = self.choice or "stock call kept"
        return f"{times or 'nothing timed'}{'; ' + failed if failed else ''} -> {chosen}{' (cached)' if self.cached else ''}"


def cache_file() -> Path:
    directory = os.environ.get("DIFFOPT_CACHE_DIR")
    if not directory:
        from diffopt import compat

        directory = os.path.join(compat.inductor_cache_dir(), "diffopt")
    return Path(directory) / "autotune.json"


def environment(device: torch.device) -> dict[str, Any]:
    """What a measured choice depends on besides the call itself: the device and the library versions."""
    from diffopt.graph_pass import code_digest

    env: dict[str, Any] = {"torch": torch.__version__, "diffopt": code_digest(), "device": device.type}
    if device.type == "cuda":
        env.update(
            device=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def cuda_timer(fn: Run, name: str) -> float:
    """Median milliseconds of ``fn`` on the current CUDA device, each timed call after an L2 flush."""
    device = torch.cuda.current_device()
    # A flush buffer of the L2's size, as Inductor's benchmarker has (and, like it, 256 MiB where
    # the device does not say): triton's do_bench allocates 256 MiB on every GPU, which was most of
    # the first call's peak on small models (Wan at one frame).
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 256 << 20
    flush = torch.empty(l2_bytes // 4, dtype=torch.int, device=device)
    return median_ms(fn, flush.zero_, lambda: torch.cuda.Event(enable_timing=True), torch.cuda.synchronize)


def median_ms(
    fn: Run,
    flush: Callable[[], Any],
    event: Callable[[], Any],
    synchronize: Callable[[], None],
) -> float:
    """``triton.testing.do_bench``'s method, with its default warm-up and repetition times, over
    the device primitives given: one call, an estimate over five, 25 ms of untimed calls, then
    100 ms of calls (at most :data:`MAX_TIMED_CALLS`), each after ``flush()`` and timed alone
    between two events; their median."""
    fn()
    synchronize()
    start, end = event(), event()
    start.record()
    for _ in range(5):
        flush()
        fn()
    end.record()
    synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(25 / estimate_ms))):
        fn()
    pairs = [(event(), event()) for _ in range(max(1, min(MAX_TIMED_CALLS, int(100 / estimate_ms))))]
    for begin, finish in pairs:
        flush()
        begin.record()
        fn()
        finish.record()
    synchronize()
    return statistics.median(begin.elapsed_time(finish) for begin, finish in pairs)


def on_device(device: torch.device) -> ContextManager:
    """``device`` as the current CUDA device (nothing for other devices), for measuring a call on
    it: :func:`cuda_timer` flushes, records its events and synchronizes on the current device, so a
    call on cuda:1 timed with cuda:0 current would be timed by events that never see its kernels."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def select(
    key: Mapping[str, Any],
    build: Callable[[], tuple[Run, dict[str, Run]]],
    timer: Timer,
    what: str,
    device: torch.device,
) -> Selection:
    """The measured choice for ``key`` (see the module docstring); ``build`` is called on a cache
    miss only, and it and the measurement run with ``device`` (the call's) current; ``what``
    names the call in the log."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    entry = _read().get(digest)
    if entry is not None:
        selection = Selection(entry["choice"], entry["times_ms"], entry["failures"], cached=True)
        log.debug("diffopt: %s: %s", what, selection.summary())
        return selection
    with on_device(device):
        try:
            stock, candidates = build()
        except torch.OutOfMemoryError as error:  # the device is too full to measure: the stock call stays
            selection = Selection(None, {}, {STOCK: _error(error)})
            log.info("diffopt: could not measure %s: %s", what, selection.summary())
            return selection
        selection = _measure(stock, candidates, timer)
    log.info("diffopt: measured %s: %s", what, selection.summary())
    if STOCK in selection.times_ms:  # a stock call that failed here (out of memory?) decides nothing for later
        _write(digest, {"key": key, "choice": selection.choice, "times_ms": selection.times_ms,
                        "failures": selection.failures})
    return selection


def check(stock: Run, candidates: Mapping[str, Run]) -> tuple[torch.Tensor | None, dict[str, str]]:
    """Run the stock call and each candidate once: the stock output (None if the stock call
    failed) and, per candidate that raised or disagrees with it, why."""
    failures: dict[str, str] = {}
    try:
        expected = stock()
    except Exception as error:
        return None, {STOCK: _error(error)}
    for name, run in candidates.items():
        try:
            why = mismatch(run(), expected)
        except Exception as error:
            why = _error(error)
        if why:
            failures[name] = why
    return expected, failures


def mismatch(got: torch.Tensor, expected: torch.Tensor) -> str | None:
    """Why ``got`` is not ``expected`` up to the dtype's rounding (None: it is).

    The tolerance, 4 units of the dtype's epsilon (at least 2^-12) of the largest expected
    magnitude, passes two correct kernels that round differently and fails a wrong one (a wrong
    head mapping or scale is off by about the output's own magnitude).

    The comparison runs in float64, slice by slice (:data:`COMPARE_CHUNK` elements at most).
    Whole-output float64 copies, three at once (24 bytes per element), were the peak of the first
    call on Wan, Cosmos3 and Flux, above the model's own.
    """
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return f"returned {tuple(got.shape)} {got.dtype}, the stock call {tuple(expected.shape)} {expected.dtype}"
    if expected.numel() == 0:
        return None
    error = magnitude = torch.zeros((), dtype=torch.float64, device=expected.device)
    for got_part, expected_part in zip(_slices(got), _slices(expected)):
        expected_part = expected_part.double()
        # torch.maximum keeps a NaN (Python's max would drop it)
        error = torch.maximum(error, (got_part.double() - expected_part).abs().max())
        magnitude = torch.maximum(magnitude, expected_part.abs().max())
    error, tolerance = error.item(), max(4 * torch.finfo(expected.dtype).eps, 2**-12) * magnitude.item()
    if not error <= tolerance:  # NaN fails too
        return f"wrong result: max error {error:.3g} vs the stock call (tolerance {tolerance:.3g})"
    return None


def _slices(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """Views covering ``x`` once each, in a fixed order (two tensors of one shape give matching
    slices), of at most :data:`COMPARE_CHUNK` elements. Split along the largest dimension, so any
    strides work and no slice is copied."""
    if x.numel() <= COMPARE_CHUNK:
        yield x
        return
    dim = max(range(x.dim()), key=lambda d: x.shape[d])
    step = max(1, COMPARE_CHUNK * x.shape[dim] // x.numel())
    for part in x.split(step, dim):
        yield from _slices(part)


def _measure(stock: Run, candidates: Mapping[str, Run], timer: Timer) -> Selection:
    failures = check(stock, candidates)[1]  # the stock output is not kept through the timing
    if STOCK in failures:
        return Selection(None, {}, failures)
    times: dict[str, float] = {}
    for name, run in {STOCK: stock, **candidates}.items():
        if name in failures:
            continue
        try:
            times[name] = float(timer(run, name))
        except Exception as error:
            failures[name] = _error(error)
    if STOCK not in times:
        return Selection(None, times, failures)
    timed = {name: ms for name, ms in times.items() if name != STOCK}
    best = min(timed, key=timed.__getitem__, default=None)
    choice = best if best is not None and timed[best] < times[STOCK] * (1 - MIN_GAIN) else None
    return Selection(choice, times, failures)


def _error(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"failed ({type(error).__name__}: {text[0][:200] if text else ''})"


def _read() -> dict[str, Any]:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write(digest: str, entry: dict[str, Any]) -> None:
    """Add one entry, replacing the file atomically (a concurrent writer may win; then the loser's
    call is measured again next time)."""
    path = cache_file()
    entries = _read()
    entries[digest] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            json.dump(entries, handle, indent=1, sort_keys=True, default=str)
        os.replace(handle.name, path)
    except OSError as error:
        log.warning("diffopt: could not write the autotune cache %s: %s", path, error)
