"""Ulysses sequence-parallel Cosmos3 generation layer: stock vs diffopt, under torchrun.

One ``UlyssesCosmos3GenLayer`` (``diffopt.models.ulysses``: stock Ulysses attention over
``cat([K_prefix, K_gen])`` with a replicated, cached prefix) at the Cosmos3 generation
shape (S_gen=28520, 512-token prefix, 32 q / 8 kv heads, D=128, bf16), run as:

- ``eager``: the stock code, eager;
- ``inductor``: ``torch.compile`` (Inductor), stock graph;
- ``diffopt-noSP``: ``backend="diffopt"`` with ``ulysses_prefix`` and ``batch_all_to_all`` off
  (diffopt's other rewrites only, to isolate the Ulysses passes);
- ``diffopt``: ``backend="diffopt"`` with the prefix declared replicated
  (``replicated_inputs: ["k_prefix", "v_prefix"]``).

Per configuration, rank 0 prints: per-layer time (median over ``--reps``, the slowest rank),
all-to-alls per layer and bytes each rank sends in them (from the compiled post-grad
graph; ``eager``/``inductor`` run the stock graph), peak memory above the inputs (CUDA
only, max over ranks), and max |error| of the gathered output vs the same layer on one
device. Writes ``bench_ulysses_<world>.json`` to ``--out``.

    torchrun --nproc_per_node 4 benchmarks/bench_ulysses.py               # NCCL, GPUs
    torchrun --nproc_per_node 2 benchmarks/bench_ulysses.py --tiny        # gloo, CPU, tiny shapes

``--tiny`` runs the test-sized config on gloo/CPU in fp32 (exercises the script; its times
mean nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from diffopt.models import (
    Cosmos3GenLayer,
    cosmos3_example_inputs,
    get_config,
)
from diffopt.models.ulysses import (
    UlyssesCosmos3GenLayer,
    gather_sequence,
    shard_sequence,
    ulysses_plan,
)

from diffopt.backend import diffopt_backend
from diffopt.graph_pass import fake_value
from diffopt.pipeline import observing

TINY = dataclasses.replace(get_config("cosmos3-sp-tiny"), gen_seq_len=30)
ULYSSES_PASSES_OFF = {"ulysses_prefix": False, "batch_all_to_all": False}
DECLARED = {"ulysses_prefix": {"replicated_inputs": ["k_prefix", "v_prefix"]}}


def collectives(graph, world: int) -> tuple[int, int]:
    """(all-to-alls, bytes this rank sends to the others) in a post-grad graph."""
    count = sent = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops._c10d_functional.all_to_all_single.default:
            value = fake_value(node.args[0])
            count += 1
            sent += value.numel() * value.element_size() * (world - 1) // world
    return count, sent


def compiled(layer, options=None):
    """``layer`` compiled with diffopt; also returns the list that will hold (stock graph, final graph)."""
    graphs = []

    def observe(pass_name, graph_name, before, after):
        if not graphs:
            graphs[:] = [before, after]  # before the first pass: the stock graph
        graphs[1] = after

    backend = functools.partial(diffopt_backend, options={"passes": options or {}})
    return torch.compile(layer, backend=backend, fullgraph=True), graphs, observe


def timed(fn, args, reps: int, device: torch.device) -> float:
    """Median ms of ``fn(*args)`` on this rank, then the max over ranks."""
    cuda = device.type == "cuda"
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(reps):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - begin) * 1e3)
    return _max_over_ranks(statistics.median(times))


def peak_bytes(fn, args, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    return _max_over_ranks(float(torch.cuda.max_memory_allocated() - base))


def _max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="test-sized config on gloo/CPU, fp32")
    parser.add_argument("--config", default="cosmos3", help="model config name (ignored with --tiny)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--configs", default="eager,inductor,diffopt-noSP,diffopt")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()

    backend = "gloo" if args.tiny or not torch.cuda.is_available() else "nccl"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    device = _device()
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = TINY if args.tiny else get_config(args.config, num_layers=1)
    reps = args.reps or (5 if args.tiny else 50)

    torch.manual_seed(0)  # same weights on every rank
    layer = Cosmos3GenLayer(config).to(device, dtype).eval()
    hidden, cos, sin, prefix_kv = cosmos3_example_inputs(config, dtype=dtype, device=device)
    hidden = hidden.to(device)
    k_prefix, v_prefix = prefix_kv[0]
    plan = ulysses_plan(config.gen_seq_len, config.num_heads, config.num_kv_heads)
    sp_layer = UlyssesCosmos3GenLayer.from_layer(layer, config, plan).eval()
    inputs = (shard_sequence(hidden, plan), shard_sequence(cos, plan), shard_sequence(sin, plan), k_prefix, v_prefix)

    results = {"world": world, "backend": backend, "dtype": str(dtype), "config": dataclasses.asdict(config),
               "torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    stock = None  # (all-to-alls, bytes) of the stock graph, measured by the diffopt runs
    names = args.configs.split(",")
    rows = {}
    with torch.no_grad():
        expected = layer(hidden, cos, sin, k_prefix, v_prefix)
        del hidden
        # diffopt first: its graphs give the collectives of the stock graph too.
        for name in sorted(names, key=lambda n: not n.startswith("diffopt")):
            torch._dynamo.reset()
            graphs = None
            if name == "eager":
                fn = sp_layer
            elif name == "inductor":
                fn = torch.compile(sp_layer, fullgraph=True)
            elif name in ("diffopt", "diffopt-noSP"):
                fn, graphs, observe = compiled(sp_layer, DECLARED if name == "diffopt" else ULYSSES_PASSES_OFF)
                with observing(observe):
                    fn(*inputs)  # compile, recording the stock and the final post-grad graph
            else:
                raise ValueError(f"unknown configuration {name!r}")
            error = (gather_sequence(fn(*inputs), plan).float() - expected.float()).abs().max().item()
            ms = timed(fn, inputs, reps, device)
            peak = peak_bytes(fn, inputs, device)
            if graphs:
                stock = stock or collectives(graphs[0], world)
                count, sent = collectives(graphs[1], world)
            else:
                count, sent = stock or (None, None)
            rows[name] = {"ms": ms, "all_to_alls": count, "bytes_sent_per_rank": sent, "peak_bytes": peak,
                          "max_abs_err": error}
    results.update(rows)
    if rank == 0:
        print(f"{config.name}: S_gen={config.gen_seq_len} prefix={config.prefix_len} "
              f"on {world} ranks ({backend}, {dtype})")
        print(f"{'config':13} {'ms/layer':>9} {'all-to-alls':>11} {'MB sent/rank':>12} {'peak MB':>8} {'max err':>9}")
        for name in names:
            row = rows[name]
            count = f"{row['all_to_alls']:11d}" if row["all_to_alls"] is not None else f"{'?':>11}"
            sent = row["bytes_sent_per_rank"]
            sent = f"{sent / 1e6:12.3f}" if sent is not None else f"{'?':>12}"
            peak = f"{row['peak_bytes'] / 1e6:8.1f}" if row["peak_bytes"] is not None else f"{'n/a':>8}"
            print(f"{name:13} {row['ms']:9.3f} {count} {sent} {peak} {row['max_abs_err']:9.2e}", flush=True)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"bench_ulysses_{world}{'_tiny' if args.tiny else ''}.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
