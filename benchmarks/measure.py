"""Timing and peak memory of one call on CUDA, shared by the benchmarks (run them from this folder's parent)."""
import torch
from triton.testing import do_bench


def cuda_ms_and_peak(fn, args, rep_ms: int = 100) -> tuple[float, int]:
    """Median ms of ``fn(*args)`` (``do_bench``) and its peak memory in bytes above what was allocated before."""
    fn(*args)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return do_bench(lambda: fn(*args), warmup=10, rep=rep_ms, return_mode="median"), peak
