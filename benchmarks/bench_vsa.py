"""Video sparse attention: the Wan-style VSA block and its tile/untile index work, stock vs diffopt.

Workloads (default: CUDA, bf16, Wan 1.3B dims, 480p 81 frames: token grid 21x30x52 = 32760
tokens, 624 tiles of 4x4x4, 39936 padded rows):

- ``tile``: the index work of one VSA attention call alone: ``tile`` of q, k and v
  ``[1, S, heads, head_dim]`` (zeros + scatter of a gather; the tiles are outputs, so
  materialized as they are for an attention kernel) and ``untile`` of a tiled attention
  output ``[1, P, heads, head_dim]`` (two gathers);
- ``block``: one ``VSAWanBlock`` (``diffopt.models.vsa``): Wan block whose self-attention
  is VSA (top-k tiles at ``--sparsity``; plain-torch block-sparse attention, gathered K/V
  tiles + one SDPA call).

Configurations: ``eager``; ``inductor`` (``torch.compile`` default backend); ``diffopt``
(all passes); ``diffopt-noidx`` (diffopt with ``padded_buffer`` and ``fold_gathers``
off: what the two VSA index passes add on their own). Prints one row per workload and
configuration (median ms, peak memory above the inputs on CUDA, max |error| vs eager,
how often the two passes matched) and writes JSON.

    python benchmarks/bench_vsa.py [--workloads tile,block] [--index-form buffers|per_call] [--out DIR]
    python benchmarks/bench_vsa.py --cpu-tiny        # CPU, fp32, a 5x6x7 grid at wan-tiny dims: exercises it

Reference: sglang's hand-written VSA tile/untile reported about 0.3 s less per 5 s video
(81 frames, 50 steps x 30 blocks of Wan 1.3B, i.e. ~0.2 ms per block call) and 0.4 GiB
less peak memory.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time

import torch

import diffopt
from diffopt.models import get_config, wan_example_inputs
from diffopt.models.vsa import VSAWanBlock, padded_len, tile, untile, vsa_config, vsa_indices

GRID_480P = (21, 30, 52)
GRID_TINY = (5, 6, 7)
OURS = ("padded_buffer", "fold_gathers")


class TileUntile(torch.nn.Module):
    """The index work of one VSA call: tile q, k, v; untile one output (stock forms)."""

    def __init__(self, grid, index_form: str):
        super().__init__()
        self.grid, self.index_form, self.padded = grid, index_form, padded_len(grid)
        if index_form == "buffers":
            for name, value in vsa_indices(grid).items():
                self.register_buffer(name, value, persistent=False)

    def forward(self, q, k, v, out_tiled):
        """q, k, v ``[1, S, heads, D]``; ``out_tiled`` ``[1, P, heads, D]`` (an attention output)."""
        if self.index_form == "per_call":
            idx = vsa_indices(self.grid, device=q.device)
        else:
            idx = {n: getattr(self, n) for n in ("tile_partition_indices", "reverse_tile_partition_indices", "non_pad_index")}
        tidx, npi = idx["tile_partition_indices"], idx["non_pad_index"]
        # The tiles are returned, so they are materialized, as they are for an attention kernel.
        tq, tk, tv = (tile(t, tidx, npi, self.padded) for t in (q, k, v))
        return tq, tk, tv, untile(out_tiled, idx["reverse_tile_partition_indices"], npi)


def workload(name: str, args):
    device, dtype = args.device, args.dtype
    config = get_config("wan-tiny" if args.cpu_tiny else "wan-1.3b", num_layers=1)
    config = vsa_config(config, args.grid)
    if name == "tile":
        seq = math.prod(args.grid)
        g = torch.Generator().manual_seed(0)
        qkv = [torch.randn(1, seq, config.num_heads, config.head_dim, generator=g).to(device, dtype) for _ in range(3)]
        out_tiled = torch.randn(1, padded_len(args.grid), config.num_heads, config.head_dim, generator=g)
        return TileUntile(args.grid, args.index_form).to(device), [*qkv, out_tiled.to(device, dtype)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = VSAWanBlock(config, sparsity=args.sparsity, index_form=args.index_form)
    return block.to(device, dtype).eval(), wan_example_inputs(config, dtype=dtype, device=device)


def measure(fn, inputs, device):
    fn(*inputs)
    if device == "cuda":
        from triton.testing import do_bench

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*inputs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return do_bench(lambda: fn(*inputs), warmup=10, rep=100, return_mode="median"), peak
    for _ in range(5):
        fn(*inputs)
    times = []
    for _ in range(50):
        start = time.perf_counter()
        fn(*inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), None


def max_error(got, want) -> float:
    if isinstance(got, (tuple, list)):
        return max(max_error(g, w) for g, w in zip(got, want))
    return (got.float() - want.float()).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="tile,block")
    parser.add_argument("--index-form", default="buffers", choices=("buffers", "per_call"))
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--cpu-tiny", action="store_true", help="CPU, fp32, 5x6x7 grid at wan-tiny dims")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()
    if args.cpu_tiny:
        args.device, args.dtype, args.grid = "cpu", torch.float32, GRID_TINY
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    else:
        if not torch.cuda.is_available():
            parser.error("needs CUDA (or --cpu-tiny)")
        args.device, args.dtype, args.grid = "cuda", torch.bfloat16, GRID_480P

    results = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "grid": list(args.grid),
        "tokens": math.prod(args.grid),
        "padded": padded_len(args.grid),
        "index_form": args.index_form,
        "sparsity": args.sparsity,
    }
    print(f"grid {args.grid}: {math.prod(args.grid)} tokens, {padded_len(args.grid)} padded rows, "
          f"index form {args.index_form}, {args.device} {args.dtype}")
    print(f"{'workload':8} {'config':13} {'ms':>9} {'peak GB':>8} {'max err':>9}  matches")
    for name in args.workloads.split(","):
        model, inputs = workload(name, args)
        rows = {}
        with torch.no_grad():
            eager_out = model(*inputs)
            report = diffopt.explain(model, *inputs)
            matches = {p: report.matches(p) for p in OURS}
            torch._dynamo.reset()
            configs = (
                ("eager", model),
                ("inductor", torch.compile(model)),
                ("diffopt", torch.compile(model, backend="diffopt")),
                (
                    "diffopt-noidx",
                    torch.compile(
                        model,
                        backend=functools.partial(
                            diffopt.diffopt_backend, options={"passes": {p: False for p in OURS}}
                        ),
                    ),
                ),
            )
            for tag, fn in configs:
                ms, peak = measure(fn, inputs, args.device)
                err = max_error(fn(*inputs), eager_out)
                rows[tag] = {"ms": ms, "peak_GB": None if peak is None else peak / 1e9, "max_abs_err_vs_eager": err}
                peak_text = "-" if peak is None else f"{peak / 1e9:8.3f}"
                print(f"{name:8} {tag:13} {ms:9.3f} {peak_text:>8} {err:9.2e}  {matches if tag == 'diffopt' else ''}",
                      flush=True)
        rows["diffopt_matches"] = matches
        rows["saved_ms_vs_noidx"] = rows["diffopt-noidx"]["ms"] - rows["diffopt"]["ms"]
        results[name] = rows
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_vsa_{'cpu_tiny' if args.cpu_tiny else 'cuda'}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
