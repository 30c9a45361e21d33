"""Ulysses sequence parallelism, stock vs diffopt vs Inductor's overlap scheduling, under torchrun.

Two workloads (``--model``):

- ``cosmos3`` (default): one ``UlyssesCosmos3GenLayer`` (``diffopt.models.ulysses``: stock
  Ulysses attention over ``cat([K_prefix, K_gen])`` with a replicated, cached prefix) at the
  Cosmos3 generation shape (S_gen=28520, 512-token prefix, 32 q / 8 kv heads, D=128, bf16);
- ``wan``: the stock diffusers ``WanTransformer3DModel`` (``--config``, default ``wan-1.3b``,
  ``--layers`` blocks, default 2) at its config's latent shape (21x60x104, 32760 tokens, bf16)
  with diffusers' own Ulysses (``enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))``;
  its plan without the ``timestep`` entry, as in ``tests/test_ulysses.py``). diffusers shards
  the sequence at the first block and all-gathers it at ``proj_out``, so every rank returns the
  full output.

Each run as:

- ``eager``: the stock code, eager;
- ``inductor``: ``torch.compile`` (Inductor), stock graph;
- ``inductor+overlap``: the same with Inductor's own collective overlap scheduling
  (``aten_distributed_optimizations.enable_overlap_scheduling``);
- ``diffopt-noSP``: ``backend="diffopt"`` with its sequence-parallel passes off
  (``ulysses_prefix``, ``unflatten_all_to_all``, ``pipeline_heads``, ``batch_all_to_all``):
  diffopt's other rewrites only, to isolate those;
- ``diffopt``: ``backend="diffopt"``, default passes; on cosmos3 with the prefix declared
  replicated (``replicated_inputs: ["k_prefix", "v_prefix"]``), on wan nothing to declare
  (its cross-attention has no collective);
- ``diffopt-noreorder``: ``diffopt`` without the Inductor comm reordering the backend turns
  on for graphs with collectives (``reorder_for_compute_comm_overlap=False``);
- ``diffopt-pipelined``, ``diffopt-chunks4``: ``diffopt`` plus the opt-in ``pipeline_heads``
  with up to 2 / 4 chunks;
- ``diffopt-seq<N>`` for each N of ``--seq-chunks`` (e.g. ``--seq-chunks 2,4,8``): ``diffopt``
  plus ``pipeline_heads`` split along the query rows (``split: "queries"``) into up to N chunks,
  appended to the configurations run;
- ``diffopt+inductor-overlap``: ``diffopt`` plus Inductor's overlap scheduling, which runs
  after diffopt's passes (``options={"inductor_config": {...}}``).

Default ``--configs``: cosmos3 ``eager,inductor,inductor+overlap,diffopt-noSP,diffopt,diffopt-pipelined,diffopt-chunks4``;
wan ``eager,inductor,diffopt,diffopt-pipelined,diffopt-chunks4``. Every compile is ``fullgraph=True``.

Per configuration, rank 0 prints:

- time per call and per layer: the median over ``--reps`` calls, each started after a
  barrier, the slowest rank. All configurations stay compiled and are timed in turns
  (5 rounds), so that drift of the GPUs' clocks spreads over all of them; between separate
  runs the same configuration still moves by up to 5%.
- all-to-alls per call and the bytes each rank sends in them, summed over the post-grad
  graphs Dynamo compiled (after diffopt's passes, before Inductor's own; rows without diffopt
  show the stock graphs'; diffusers' output all-gather is not counted);
- peak memory above the inputs; max |error| of the full output vs the same model on one
  device (max over ranks);
- from ``torch.profiler`` over 5 calls, per call: ``comm``, the time NCCL kernels run (union
  of their intervals; it includes a kernel's wait for the other ranks to arrive),
  ``exposed``, the part of it during which no other kernel runs, and ``compute``, the time
  any other kernel runs; ``--top-kernels N`` lists rank 0's N longest kernels.

Memory and the profile are CUDA only (max over ranks), and so are the overlap configurations
(Inductor's overlap scheduling estimates GPU runtimes; on gloo/CPU their rows say so). A
configuration that fails to compile prints the error and the run goes on. Writes
``bench_ulysses_<world>.json`` (wan: ``bench_ulysses_wan_<world>.json``) to ``--out``.

    torchrun --nproc_per_node 4 benchmarks/bench_ulysses.py               # NCCL, GPUs
    torchrun --nproc_per_node 4 benchmarks/bench_ulysses.py --model wan
    torchrun --nproc_per_node 2 benchmarks/bench_ulysses.py --tiny        # gloo, CPU, tiny shapes

``--tiny`` runs the test-sized config (``cosmos3-sp-tiny``, ``wan-tiny``) on gloo/CPU in fp32
(exercises the script; its times mean nothing).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

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
from diffopt.fxpasses.fx_utils import fake_value
from diffopt.pipeline import observing

TINY = dataclasses.replace(get_config("cosmos3-sp-tiny"), gen_seq_len=30)
SP_PASSES = ("ulysses_prefix", "unflatten_all_to_all", "pipeline_heads", "batch_all_to_all")
DECLARED = {"ulysses_prefix": {"replicated_inputs": ["k_prefix", "v_prefix"]}}
OVERLAP = {"aten_distributed_optimizations.enable_overlap_scheduling": True}
NO_REORDER = {"reorder_for_compute_comm_overlap": False}  # diffopt's default for graphs with collectives off
OVERLAP_CONFIGS = ("inductor+overlap", "diffopt+inductor-overlap")
# Its cost model asks Triton for the GPU's memory bandwidth even for CPU graphs.
OVERLAP_NEEDS_GPU = "unavailable: Inductor's overlap scheduling estimates runtimes on a GPU only"
PROFILED_CALLS = 5
TIMING_ROUNDS = 5
# Chrome-trace categories of work on the GPU. Annotations and syncs are on the GPU timeline
# too, and an annotation spans the kernels under it: counting it as compute would hide all
# communication.
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclasses.dataclass
class Workload:
    """A sequence-parallel model with its inputs and the single-device output it must match."""

    title: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict[str, Any]
    layers: int
    expected: torch.Tensor
    full_output: Callable[[Any], torch.Tensor]  # from what the model returns on this rank
    passes: dict[str, Any]  # diffopt's pass options for "diffopt"
    configs: str  # the default --configs
    config: dict[str, Any]


def cosmos3_workload(args, device: torch.device, dtype: torch.dtype) -> Workload:
    config = TINY if args.tiny else get_config(args.config or "cosmos3", num_layers=1)
    torch.manual_seed(0)  # same weights on every rank
    layer = Cosmos3GenLayer(config).to(device, dtype).eval()
    hidden, cos, sin, prefix_kv = cosmos3_example_inputs(config, dtype=dtype, device=device)
    hidden = hidden.to(device)
    k_prefix, v_prefix = prefix_kv[0]
    plan = ulysses_plan(config.gen_seq_len, config.num_heads, config.num_kv_heads)
    sp_layer = UlyssesCosmos3GenLayer.from_layer(layer, config, plan).eval()
    with torch.no_grad():
        expected = layer(hidden, cos, sin, k_prefix, v_prefix)
    return Workload(
        title=f"{config.name}: S_gen={config.gen_seq_len} prefix={config.prefix_len}",
        model=sp_layer,
        args=(shard_sequence(hidden, plan), shard_sequence(cos, plan), shard_sequence(sin, plan), k_prefix, v_prefix),
        kwargs={},
        layers=1,
        expected=expected,
        full_output=lambda out: gather_sequence(out, plan),
        passes=DECLARED,
        configs="eager,inductor,inductor+overlap,diffopt-noSP,diffopt,diffopt-pipelined,diffopt-chunks4",
        config=dataclasses.asdict(config),
    )


def wan_workload(args, device: torch.device, dtype: torch.dtype) -> Workload:
    from diffopt.models.diffusers_models import build_diffusers_wan, diffusers_wan_inputs
    from diffusers import ContextParallelConfig

    config = get_config("wan-tiny" if args.tiny else args.config or "wan-1.3b", num_layers=args.layers)
    model = build_diffusers_wan(config).to(device, dtype)  # seeded: same weights on every rank
    inputs = diffusers_wan_inputs(config, dtype=dtype, device=device)
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
    # diffusers 0.42.1 computes ``rank % torch.accelerator.device_count()``, 0 on a CPU build.
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1
    # Wan's plan splits ``timestep`` only when it is 2-D and otherwise warns through a logger
    # method that does not exist (Dynamo cannot trace it); the 1-D timestep here stays out of it.
    plan = {name: entry for name, entry in type(model)._cp_plan.items() if name != ""}
    _trace_chunk_cat()
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=dist.get_world_size()), cp_plan=plan)
    with torch.no_grad():
        model(**inputs, return_dict=False)  # diffusers' hooks finish setting up on their first call, eager
    frames, height, width = config.latent_shape
    return Workload(
        title=f"{config.name} (diffusers Wan, its Ulysses): {config.num_layers} layers, "
        f"latent {frames}x{height}x{width} = {config.seq_len} tokens",
        model=model,
        args=(),
        kwargs={**inputs, "return_dict": False},
        layers=config.num_layers,
        expected=expected,
        full_output=lambda out: out[0],
        passes={},
        configs="eager,inductor,diffopt,diffopt-pipelined,diffopt-chunks4",
        config=dataclasses.asdict(config),
    )


def _trace_chunk_cat() -> None:
    """Let Dynamo trace ``torch._utils._maybe_view_chunk_cat``, as torch 2.13 does.

    diffusers all-gathers Wan's output along the sequence (``funcol.all_gather_tensor`` with
    ``gather_dim=1``), which calls it; torch 2.11's Dynamo has it on its skip list and fails
    the compile with "Attempted to call function marked as skipped".
    """
    from torch._dynamo import trace_rules
    from torch._dynamo.variables import UserFunctionVariable

    name = "torch._utils._maybe_view_chunk_cat"
    if name not in trace_rules.manual_torch_name_rule_map:
        trace_rules.manual_torch_name_rule_map[name] = UserFunctionVariable
        trace_rules.clear_lru_cache()


WORKLOADS = {"cosmos3": cosmos3_workload, "wan": wan_workload}


def collectives(graphs, world: int) -> tuple[int, int]:
    """(all-to-alls, bytes this rank sends to the others) over post-grad graphs."""
    count = sent = 0
    for graph in graphs:
        for node in graph.nodes:
            if node.op == "call_function" and node.target is torch.ops._c10d_functional.all_to_all_single.default:
                value = fake_value(node.args[0])
                count += 1
                sent += value.numel() * value.element_size() * (world - 1) // world
    return count, sent


def compiled(name: str, workload: Workload):
    """The workload's model compiled for configuration ``name``; for diffopt also the dict that
    will hold, per graph it compiles, [stock graph, final graph], and the observer that fills it."""
    model = workload.model
    if name == "eager":
        return model, None, None
    if name == "inductor":
        return torch.compile(model, fullgraph=True), None, None
    if name == "inductor+overlap":
        return torch.compile(model, fullgraph=True, options=OVERLAP), None, None
    presets = {
        "diffopt-noSP": {"passes": {name: False for name in SP_PASSES}},
        "diffopt": {"passes": workload.passes},
        "diffopt-noreorder": {"passes": workload.passes, "inductor_config": NO_REORDER},
        "diffopt-pipelined": {"passes": {**workload.passes, "pipeline_heads": {"chunks": 2}}},
        "diffopt-chunks4": {"passes": {**workload.passes, "pipeline_heads": {"chunks": 4}}},
        "diffopt+inductor-overlap": {"passes": workload.passes, "inductor_config": OVERLAP},
    }
    seq_chunks = name.removeprefix("diffopt-seq")
    if name.startswith("diffopt-seq") and seq_chunks.isdigit():  # --seq-chunks
        query_rows = {"chunks": int(seq_chunks), "split": "queries"}
        presets[name] = {"passes": {**workload.passes, "pipeline_heads": query_rows}}
    options = presets.get(name)
    if options is None:
        raise ValueError(f"unknown configuration {name!r}")
    graphs = {}

    def observe(pass_name, graph_name, before, after):
        graphs.setdefault(graph_name, [before, after])[1] = after  # first: before the first pass, the stock graph

    backend = functools.partial(diffopt_backend, options=options)
    return torch.compile(model, backend=backend, fullgraph=True), graphs, observe


@contextlib.contextmanager
def caches_off():
    # A cached graph skips the post-grad passes, and with them the observer.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def call_times(run, reps: int, device: torch.device) -> list[float]:
    """ms of each of ``reps`` calls of ``run()``, every one started after a barrier."""
    cuda = device.type == "cuda"
    times = []
    for _ in range(reps):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            run()
            times.append((time.perf_counter() - begin) * 1e3)
    return times


def round_robin_ms(runs: dict[str, Callable[[], Any]], reps: int, device: torch.device) -> dict[str, float]:
    """Median ms per call of each run, timed in turns (``TIMING_ROUNDS`` rounds of ``reps /
    TIMING_ROUNDS`` calls each) so that clock and thermal drift spread over all of them; the
    max over ranks."""
    for run in runs.values():
        for _ in range(3):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    per_round = max(1, reps // TIMING_ROUNDS)
    for _ in range(TIMING_ROUNDS):
        for name, run in runs.items():
            times[name] += call_times(run, per_round, device)
    return {name: _max_over_ranks(statistics.median(values)) for name, values in times.items()}


def peak_bytes(run, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return _max_over_ranks(float(torch.cuda.max_memory_allocated() - base))


def comm_exposure(comm, compute) -> tuple[float, float]:
    """(length of the union of the ``comm`` intervals, the part of it no ``compute`` interval covers).

    Intervals are ``(start, end)`` pairs, in any order, overlapping or not."""
    comm, compute = _union(comm), _union(compute)
    total = sum(end - start for start, end in comm)
    covered, first = 0.0, 0
    for start, end in comm:
        while first < len(compute) and compute[first][1] <= start:
            first += 1
        # compute[first:] ends after ``start``; one of them may reach into the next comm interval too.
        for compute_start, compute_end in compute[first:]:
            if compute_start >= end:
                break
            covered += min(end, compute_end) - max(start, compute_start)
    return total, total - covered


def _union(intervals) -> list[tuple[float, float]]:
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def profiled(run, device: torch.device, top: int) -> dict[str, Any]:
    """Per call, from ``torch.profiler``: NCCL kernel time (``comm_ms``), the part of it no other
    GPU work overlaps (``exposed_comm_ms``) and the time any other GPU work runs
    (``compute_ms``), each the max over ranks; on rank 0 the ``top`` kernels by time."""
    if device.type != "cuda":
        return {"comm_ms": None, "exposed_comm_ms": None, "compute_ms": None}
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(PROFILED_CALLS):
            run()
        torch.cuda.synchronize()
    # The exported trace names each event's kind ("cat"); the in-memory events only expose it
    # (``activity_type``) in recent torch.
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        profile.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    comm, compute, per_kernel = [], [], collections.Counter()
    for event in events:
        if event.get("cat") in DEVICE_WORK:
            interval = (event["ts"], event["ts"] + event["dur"])  # microseconds
            (comm if "nccl" in event["name"].lower() else compute).append(interval)
            per_kernel[event["name"][:60]] += event["dur"] / PROFILED_CALLS / 1e3
    comm_us, exposed_us = comm_exposure(comm, compute)
    compute_us = sum(end - start for start, end in _union(compute))
    return {
        "comm_ms": _max_over_ranks(comm_us / PROFILED_CALLS / 1e3),
        "exposed_comm_ms": _max_over_ranks(exposed_us / PROFILED_CALLS / 1e3),
        "compute_ms": _max_over_ranks(compute_us / PROFILED_CALLS / 1e3),
        "top_kernels_ms_rank0": dict(per_kernel.most_common(top)),
    }


def _max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="cosmos3")
    parser.add_argument("--tiny", action="store_true", help="test-sized config on gloo/CPU, fp32")
    parser.add_argument("--config", default=None, help="model config name (default cosmos3 / wan-1.3b; ignored with --tiny)")
    parser.add_argument("--layers", type=int, default=2, help="wan: transformer blocks")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--configs", default=None, help="comma-separated (default: the model's, see above)")
    parser.add_argument("--seq-chunks", default="", help="comma-separated chunk counts: adds a diffopt-seq<N> "
                        "configuration (pipeline_heads split along the query rows) for each")
    parser.add_argument("--top-kernels", type=int, default=0, help="print each configuration's N longest kernels (rank 0)")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()

    backend = "gloo" if args.tiny or not torch.cuda.is_available() else "nccl"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    device = _device()
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = args.reps or (5 if args.tiny else 50)
    workload = WORKLOADS[args.model](args, device, dtype)

    results = {"model": args.model, "world": world, "backend": backend, "dtype": str(dtype), "layers": workload.layers,
               "config": workload.config, "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    stock = None  # (all-to-alls, bytes) of the stock graphs, measured by the diffopt runs
    names = (args.configs or workload.configs).split(",")
    names += [f"diffopt-seq{int(n)}" for n in args.seq_chunks.split(",") if n.strip()]
    rows = {}
    runs = {}
    with torch.no_grad():
        # diffopt first: its graphs give the collectives of the stock graph too. Every
        # configuration stays compiled (Dynamo keeps one entry per backend) for the timing.
        torch._dynamo.reset()
        for name in sorted(names, key=lambda n: not n.startswith("diffopt")):
            if name in OVERLAP_CONFIGS and device.type != "cuda":
                rows[name] = {"unavailable": OVERLAP_NEEDS_GPU}
                continue
            fn, graphs, observe = compiled(name, workload)
            run = functools.partial(fn, *workload.args, **workload.kwargs)
            try:
                with observing(observe) if graphs is not None else contextlib.nullcontext(), caches_off():
                    run()  # compile (for diffopt recording the stock and the final post-grad graphs)
            except Exception as error:  # a compile error is the same on every rank: report it, go on
                lines = [line for line in str(error).splitlines() if line.strip()][:4]
                rows[name] = {"unavailable": f"failed to compile: {type(error).__name__}: " + " | ".join(lines)[:400]}
                continue
            output = workload.full_output(run())
            error = _max_over_ranks((output.float() - workload.expected.float()).abs().max().item())
            peak = peak_bytes(run, device)
            profile = profiled(run, device, args.top_kernels)
            if graphs:
                stock = stock or collectives([stock_graph for stock_graph, _ in graphs.values()], world)
                count, sent = collectives([final for _, final in graphs.values()], world)
            else:
                count, sent = stock or (None, None)
            rows[name] = {"all_to_alls": count, "bytes_sent_per_rank": sent, "peak_bytes": peak,
                          "max_abs_err": error, **profile}
            runs[name] = run
        for name, ms in round_robin_ms(runs, reps, device).items():
            rows[name].update(ms=ms, ms_per_layer=ms / workload.layers)
    results.update(rows)
    if rank == 0:
        print(f"{workload.title} on {world} ranks ({backend}, {dtype})")
        print(f"{'config':24} {'ms/call':>9} {'ms/layer':>9} {'all-to-alls':>11} {'MB sent/rank':>12} "
              f"{'peak MB':>8} {'max err':>9} {'comm ms':>8} {'exposed':>8} {'compute':>8}")
        for name in names:
            row = rows[name]
            if "unavailable" in row:
                print(f"{name:24} {row['unavailable']}")
                continue
            count = f"{row['all_to_alls']:11d}" if row["all_to_alls"] is not None else f"{'?':>11}"
            sent = row["bytes_sent_per_rank"]
            sent = f"{sent / 1e6:12.3f}" if sent is not None else f"{'?':>12}"
            peak = f"{row['peak_bytes'] / 1e6:8.1f}" if row["peak_bytes"] is not None else f"{'n/a':>8}"
            comm, exposed, compute = (f"{row[key]:8.3f}" if row[key] is not None else f"{'n/a':>8}"
                                      for key in ("comm_ms", "exposed_comm_ms", "compute_ms"))
            print(f"{name:24} {row['ms']:9.3f} {row['ms_per_layer']:9.3f} {count} {sent} {peak} "
                  f"{row['max_abs_err']:9.2e} {comm} {exposed} {compute}", flush=True)
            for kernel, ms in row.get("top_kernels_ms_rank0", {}).items():
                print(f"    {ms:8.3f} ms  {kernel}")
        os.makedirs(args.out, exist_ok=True)
        model = "" if args.model == "cosmos3" else f"{args.model}_"
        path = os.path.join(args.out, f"bench_ulysses_{model}{world}{'_tiny' if args.tiny else ''}.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
