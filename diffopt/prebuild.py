"""Build the FlashInfer attention kernels diffopt may choose, ahead of any compile.

    python -m diffopt.prebuild [--dtype bfloat16 ...] [--head-dim 128 ...] [--device cuda:0]

FlashInfer ships its attention kernels as sources and builds each one on first use: 20-100 s per
kernel (dtype, head dim, fa2/fa3), after which it loads from its cache
(``~/.cache/flashinfer``, or ``$FLASHINFER_WORKSPACE_BASE/.cache/flashinfer``) in about a second.
Without this command, the first ``torch.compile(..., backend="diffopt")`` on a machine pays that
build inside the compile. Run it once per machine, or once where that cache folder is shared (a
volume, an image layer built on a GPU host). It needs the GPU: the device decides which kernels
the attention pass would measure (fa3 on Hopper only), and FlashInfer builds for the GPUs it sees
(or ``$FLASHINFER_CUDA_ARCH_LIST``).

The defaults are what the supported diffusion transformers use (bf16, head dim 128). Prints one
line per kernel as it is done and exits non-zero if any failed to build.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

import torch


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16"])
    parser.add_argument("--head-dim", nargs="+", type=int, default=[128])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    from diffopt.kernels import attention

    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print(f"diffopt.prebuild: no CUDA device ({args.device}); the kernels are built for the GPU they run on")
        return 2
    unavailable = attention.backend_unavailable("flashinfer_fa2", device)
    if unavailable:
        print(f"diffopt.prebuild: nothing to build: {unavailable}")
        return 0
    failed = False
    for record in attention.prebuild([getattr(torch, name) for name in args.dtype], args.head_dim, device):
        if "skipped" in record:
            print(f"{record['kernel']}: skipped ({record['skipped']})", flush=True)
        elif "error" in record:
            failed = True
            print(f"{record['kernel']}: FAILED after {record['seconds']:.1f} s: {record['error']}", flush=True)
        else:
            # FlashInfer still checks a kernel found on disk against its sources, and rebuilds a stale one
            how = "on disk before, ready" if record["built_before"] else "built"
            print(f"{record['kernel']}: {how} in {record['seconds']:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
