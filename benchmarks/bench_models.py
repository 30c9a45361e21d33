"""Whole stock diffusers models: eager vs Inductor vs diffopt, each configuration cold, in its own process.

    python benchmarks/bench_models.py [--workloads a,b] [--backends eager,inductor,diffopt]
        [--cudagraphs] [--max-autotune] [--regional] [--configs LIST] [--repeats N]
        [--iters N] [--warmup N] [--timeout S] [--cache-dir DIR] [--wan14b-blocks N]
        [--memory-breakdown] [--kernels] [--tiny] [--out DIR]
    python benchmarks/bench_models.py --plot DIR/bench_models.json   # the chart of an earlier run

Workloads: random weights, bf16 on CUDA (cast as ``from_pretrained(torch_dtype=...)`` casts,
float32 modules kept), ``torch.inference_mode()``; see :func:`workloads`. ``--tiny`` swaps
each for a tiny config that runs on the CPU in float32 in seconds (CI, tests).

Configurations: ``eager`` once per workload, then each compiled backend with every
combination of the options asked for: ``--cudagraphs`` adds ``mode="reduce-overhead"``,
``--max-autotune`` adds ``mode="max-autotune-no-cudagraphs"`` (sglang's diffusion default;
with both flags also ``"max-autotune"``), ``--regional`` adds diffusers'
``model.compile_repeated_blocks(...)`` next to whole-model ``torch.compile`` (with CUDA graphs,
each forward marked as one CUDA-graph step: :func:`compiled`). ``--configs``
instead lists configurations by name: ``backend[/regional][/mode]``, for example
``eager,inductor/regional,diffopt/regional/reduce-overhead``.

Each configuration runs in a child process of its own with new, empty
``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR`` folders, so its first call is a cold
compile. The parent runs the whole set ``--repeats`` times in the same order (ABCABC),
so that drift and noise show across repeats. A configuration that fails (compile error, OOM,
CUDA graphs, timeout) is recorded with its error and the run goes on. ``--cache-dir DIR`` gives
every child DIR's caches instead, kept: first calls are then warm once an earlier child (or run)
has filled them (said above the table, and ``cache_dir`` in the JSON's ``meta``). That is how
``max-autotune`` configurations, whose cold compile spends minutes tuning GEMMs, are compared within
one run: the first child tunes, the others reuse its choices.

Per configuration, over all measured iterations of all repeats: median and min ms per
forward (each call timed alone: CUDA events, the host waiting between calls); host ms, the
median time until a call returned to Python (its launches; when it is about the median, the
configuration is launch-bound and runs at its host's speed); the spread of the per-repeat medians
(above 20%, each repeat's median, host and kernel ms are printed under the table; the JSON also
has the machine's load average as each child's timing began, and ``host_probe_ms``, the time of a
fixed pure-Python loop just before and after the timed calls: the host's speed, which on the lent
GPU machines moves by up to 2x between minutes, and which the table names when it moved between
children by more than 30%); steady-state peak memory above the
inputs (max allocated over the measured calls minus what was allocated once weights and inputs
were in place), and the same over the first call and warm-up (compile, autotuning, CUDA-graph
recording); the memory held
between calls after warm-up (reserved by the caching allocator once its free cache is
released, minus the same before compiling: under CUDA graphs, the graphs' private pool, which
the steady-state peak cannot see because replays allocate nothing); the cold first call in
seconds (compile included); the error against eager's output (max abs error over max abs of
eager, and relative L2); diffopt's rewrites per pass (counted per compiled graph: a regional
compile counts one block). Writes ``bench_models.json`` (rewritten after every child),
``bench_models.png`` (needs matplotlib) and one log per child in ``DIR/logs``.

On CUDA (not ``--tiny``), when a diffopt configuration is asked for, ``python -m diffopt.prebuild``
first builds FlashInfer's attention kernels in a process of its own (``kernel_prebuild`` in the JSON's ``meta``: its seconds and what it
built). FlashInfer's cache is not one of the per-child caches, so without it the first diffopt
child alone would pay that once-per-machine build inside its cold compile.

``--memory-breakdown`` (CUDA) also records the allocations of one more call: the blocks live at
its peak, largest first, each with the lines that allocated it (``live_at_peak`` in the JSON);
Inductor's generated modules those lines are in are kept under ``DIR/code``. That is how a peak
difference between two backends is traced to buffers (docs/benchmarks.md, "Where memory goes").

``--kernels`` (CUDA) also profiles three more calls: the device's busy time per call (``kernel ms``
in the table: the kernels' summed time; what the median has above it is host time or waiting),
launches per call, and the top kernels by time (``top_kernels`` in the JSON, the first five
printed under the table). That is how a time difference between two backends is traced to kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

BACKENDS = ("eager", "inductor", "diffopt")
MODES = ("reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


# ---------------------------------------------------------------------------- workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    """A stock model and its inputs. ``build(tiny, device, dtype)`` returns the model (float32,
    on ``device``) and its keyword inputs (``dtype``)."""

    name: str
    description: str
    build: Callable


def _wan(size: str, *, num_layers: int | None = None, latent_frames: int | None = None, batch_size: int = 1):
    def build(tiny, device, dtype):
        from diffopt.models import get_config
        from diffopt.models.diffusers_models import build_diffusers_wan, diffusers_wan_inputs

        config = get_config("wan-tiny") if tiny else get_config(size, num_layers=num_layers)
        if latent_frames is not None:
            config = dataclasses.replace(config, latent_frames=latent_frames)
        model = build_diffusers_wan(config, device=device)
        inputs = diffusers_wan_inputs(config, batch_size=batch_size, dtype=dtype, device=device)
        return model, {**inputs, "return_dict": False}

    return build


# Cosmos3's generation tokens: a latent of 31 x 46 x 80, patchified 2 x 2 to 31 x 23 x 40 = 28520.
COSMOS3_LATENT = {False: (31, 46, 80), True: (2, 4, 12)}


def _cosmos3(num_layers: int):
    def build(tiny, device, dtype):
        from diffopt.models import get_config
        from diffopt.models.diffusers_models import build_diffusers_cosmos3, diffusers_cosmos3_inputs

        config = get_config("cosmos3-tiny" if tiny else "cosmos3")
        frames, height, width = COSMOS3_LATENT[tiny]
        patch = config.latent_patch_size
        assert frames * (height // patch) * (width // patch) == config.gen_seq_len
        model = build_diffusers_cosmos3(config, num_layers=None if tiny else num_layers, device=device)
        inputs = diffusers_cosmos3_inputs(config, latent_shape=COSMOS3_LATENT[tiny], dtype=dtype, device=device)
        return model, {**inputs, "return_dict": False}

    return build


def _flux(tiny, device, dtype):
    from diffopt.models import get_config
    from diffopt.models.diffusers_models import build_diffusers_flux, diffusers_flux_inputs

    config = get_config("flux-tiny" if tiny else "flux-dev")
    model = build_diffusers_flux(config, device=device)
    return model, {**diffusers_flux_inputs(config, dtype=dtype, device=device), "return_dict": False}


def workloads(wan14b_blocks: int = 8) -> dict[str, Workload]:
    """The named workloads (the 14B one is named after its block count)."""
    table = [
        Workload("wan1.3b_480p", "Wan 2.1 1.3B, 480x832 x 81 frames (S=32760), 512 text tokens", _wan("wan-1.3b")),
        Workload("wan1.3b_1frame", "Wan 2.1 1.3B, 480x832 x 1 frame (S=1560)", _wan("wan-1.3b", latent_frames=1)),
        Workload(
            f"wan14b_{wan14b_blocks}blocks",
            f"Wan 2.1 14B dims, {wan14b_blocks} of 40 blocks, 480p x 81 frames (S=32760)",
            _wan("wan-14b", num_layers=wan14b_blocks),
        ),
        Workload("cosmos3", "Cosmos3OmniTransformer, 4 layers, S_gen=28520, 512 text tokens", _cosmos3(4)),
        Workload("flux_1024", "Flux.1-dev dims (19 + 38 blocks), 1024x1024 (4096 image + 512 text tokens)", _flux),
        Workload("wan1.3b_480p_cfg2", "Wan 2.1 1.3B, 480p x 81 frames, batch 2 (CFG)", _wan("wan-1.3b", batch_size=2)),
    ]
    return {workload.name: workload for workload in table}


# ---------------------------------------------------------------------------- configurations


@dataclasses.dataclass(frozen=True)
class Config:
    backend: str
    mode: str | None = None
    regional: bool = False

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; known: {', '.join(BACKENDS)}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.backend == "eager" and (self.mode or self.regional):
            raise ValueError("eager takes no compile options")

    @property
    def name(self) -> str:
        return "/".join([self.backend] + ["regional"] * self.regional + [self.mode] * (self.mode is not None))

    @classmethod
    def parse(cls, name: str) -> Config:
        backend, *options = name.strip().split("/")
        regional = "regional" in options
        modes = [option for option in options if option != "regional"]
        if len(modes) > 1:
            raise ValueError(f"{name!r}: more than one mode")
        return cls(backend, modes[0] if modes else None, regional)


def configurations(backends: Sequence[str], cudagraphs: bool, max_autotune: bool, regional: bool) -> list[Config]:
    """eager (when asked for), then every compiled backend at every combination of the options,
    the backends side by side at each combination."""
    modes = [None] + ["reduce-overhead"] * cudagraphs + ["max-autotune-no-cudagraphs"] * max_autotune
    modes += ["max-autotune"] * (cudagraphs and max_autotune)
    configs = [Config("eager")] if "eager" in backends else []
    for scope in [False] + [True] * regional:
        for mode in modes:
            configs += [Config(backend, mode, scope) for backend in backends if backend != "eager"]
    return configs


def parse_configs(names: str) -> list[Config]:
    """``--configs``: eager first, so that every other configuration has its output to compare to."""
    configs = [Config.parse(name) for name in names.split(",") if name.strip()]
    return sorted(dict.fromkeys(configs), key=lambda config: config.backend != "eager")


def schedule(workload_names: Sequence[str], configs: Sequence[Config], repeats: int) -> list[tuple[int, str, Config]]:
    """``(repeat, workload, config)`` in run order: the whole set, ``repeats`` times over."""
    return [(repeat, workload, config) for repeat in range(repeats) for workload in workload_names for config in configs]


# ---------------------------------------------------------------------------- aggregation


def summarize(runs: Sequence[dict]) -> dict:
    """One configuration over its repeats. A run is a child's result: ``ms`` (per measured
    call), ``compile_s``, ``peak_bytes``, ``rel_err_max``... or ``error``."""
    ok = [run for run in runs if "error" not in run]
    errors = list(dict.fromkeys(run["error"] for run in runs if "error" in run))
    summary: dict = {"failed_repeats": len(runs) - len(ok), "errors": errors}
    if not ok:
        return summary
    calls = [ms for run in ok for ms in run["ms"]]
    repeat_medians = [statistics.median(run["ms"]) for run in ok]
    median = statistics.median(calls)

    def largest(key):
        values = [run[key] for run in ok if run.get(key) is not None]
        return max(values) if values else None

    profiled = [run["kernels"] for run in ok if run.get("kernels")]
    host_calls = [ms for run in ok for ms in run.get("host_ms", ())]
    summary.update(
        median_ms=median,
        min_ms=min(calls),
        repeat_median_ms=repeat_medians,
        spread_pct=100 * (max(repeat_medians) - min(repeat_medians)) / median if len(ok) > 1 else None,
        compile_s=statistics.median(run["compile_s"] for run in ok),
        repeat_compile_s=[run["compile_s"] for run in ok],
        peak_GB=None if largest("peak_bytes") is None else largest("peak_bytes") / 1e9,
        first_calls_peak_GB=None if largest("first_calls_peak_bytes") is None else largest("first_calls_peak_bytes") / 1e9,
        held_GB=None if largest("held_bytes") is None else largest("held_bytes") / 1e9,
        rel_err_max=largest("rel_err_max"),
        rel_err_l2=largest("rel_err_l2"),
        rewrites=ok[0].get("rewrites"),
        graphs=ok[0].get("graphs"),
        host_ms=statistics.median(host_calls) if host_calls else None,
        repeat_host_ms=[statistics.median(run["host_ms"]) if run.get("host_ms") else None for run in ok],
        repeat_host_probe_ms=[statistics.mean(run["host_probe_ms"]) if run.get("host_probe_ms") else None for run in ok],
        kernel_ms=statistics.median(kernels["kernel_ms"] for kernels in profiled) if profiled else None,
        repeat_kernel_ms=[run["kernels"]["kernel_ms"] if run.get("kernels") else None for run in ok],
        launches=statistics.median(kernels["launches"] for kernels in profiled) if profiled else None,
        top_kernels=profiled[0]["top"] if profiled else None,
    )
    return summary


def add_ratios_vs_inductor(results: list[dict]) -> None:
    """``vs_inductor``: median ms over Inductor's at the same options (eager: over plain Inductor)."""
    inductor = {
        (row["workload"], row["mode"], row["regional"]): row.get("median_ms")
        for row in results
        if row["backend"] == "inductor"
    }
    for row in results:
        reference = inductor.get((row["workload"], row["mode"], row["regional"]))
        row["vs_inductor"] = (
            row["median_ms"] / reference if row.get("median_ms") is not None and reference else None
        )


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


# Repeat medians further apart than this are printed one by one under the table: more than the
# 5-20% the same configuration moves between processes on these machines deserves a look at which
# side (host or kernels) moved.
NOISY_SPREAD_PCT = 20.0
# Children whose host probes (measure.host_probe_ms) differ by more than this factor ran on a host of
# different speed, which the table says: beyond the probe's own jitter of a few percent.
HOST_SPEED_MOVED = 1.3


def table(results: Sequence[dict]) -> str:
    """The results as an aligned Markdown table."""
    header = ("workload", "config", "median ms", "min ms", "host ms", "kernel ms", "spread %", "vs inductor", "peak GB",
              "held GB", "compile s", "rel err max", "rel L2", "rewrites / error")
    rows = [header]
    for row in results:
        start = (row["workload"], row["config"])
        if row.get("median_ms") is None:
            rows.append(start + ("failed",) + ("",) * 10 + (row["errors"][0][:160] if row["errors"] else "not run",))
            continue
        rewrites = ", ".join(f"{name} {count}" for name, count in (row.get("rewrites") or {}).items() if count)
        failed = f" ({row['failed_repeats']} failed)" if row["failed_repeats"] else ""
        rows.append(start + (
            _fmt(row["median_ms"], ".2f") + failed,
            _fmt(row["min_ms"], ".2f"),
            _fmt(row.get("host_ms"), ".2f"),
            _fmt(row.get("kernel_ms"), ".2f"),
            _fmt(row["spread_pct"], ".1f"),
            _fmt(row["vs_inductor"], ".3f"),
            _fmt(row["peak_GB"], ".3f"),
            _fmt(row.get("held_GB"), ".3f"),
            _fmt(row["compile_s"], ".1f"),
            _fmt(row["rel_err_max"], ".2e"),
            _fmt(row["rel_err_l2"], ".2e"),
            rewrites or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    probes = [probe for row in results for probe in row.get("repeat_host_probe_ms") or () if probe is not None]
    if probes and max(probes) > HOST_SPEED_MOVED * min(probes):
        lines += ["", f"The host's speed moved between children: a fixed pure-Python loop took {min(probes):.1f} to "
                      f"{max(probes):.1f} ms (host_probe_ms in the JSON). Launch-bound rows (host ms near the median) "
                      "move with it; kernel ms does not."]
    for row in results:
        if (row.get("spread_pct") or 0) > NOISY_SPREAD_PCT:
            lines += ["", f"{row['workload']} {row['config']}: the repeats disagree by {row['spread_pct']:.0f}%; per repeat:"]
            lines += [f"  median {ms:.2f} ms, host {_fmt(host, '.2f')} ms, kernels {_fmt(kernels, '.2f')} ms, "
                      f"host probe {_fmt(probe, '.1f')} ms"
                      for ms, host, kernels, probe in zip(row["repeat_median_ms"], row["repeat_host_ms"],
                                                          row["repeat_kernel_ms"],
                                                          row.get("repeat_host_probe_ms") or [None] * len(row["repeat_median_ms"]))]
    for row in results:
        if row.get("top_kernels"):
            lines += ["", f"{row['workload']} {row['config']}: {row['launches']:.0f} launches per call, top kernels:"]
            lines += [f"  {kernel['ms']:8.3f} ms  x{kernel['per_call']:<5.0f} {kernel['name'][:110]}"
                      for kernel in row["top_kernels"][:5]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- chart


BACKEND_COLORS = {"eager": "#9e9e9e", "inductor": "#1f77b4", "diffopt": "#ff7f0e"}


def plot(results: Sequence[dict], meta: dict, path: Path) -> Path | None:
    """Median ms (whiskers: min and max of the repeat medians; a black tick: kernel ms, where
    profiled) and steady-state peak GB per
    workload and configuration (under CUDA graphs, where replays allocate nothing, the memory held
    between calls instead); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(dict.fromkeys(row["workload"] for row in results))
    groups = [[row for row in results if row["workload"] == name][::-1] for name in names]  # first on top
    figure, axes = plt.subplots(
        len(names), 2, figsize=(13, 1 + sum(0.5 + 0.28 * len(rows) for rows in groups)), squeeze=False,
        gridspec_kw={"height_ratios": [len(rows) + 1 for rows in groups]},
    )
    for (time_axis, memory_axis), name, rows in zip(axes, names, groups):
        labels = [row["config"] for row in rows]
        colors = [BACKEND_COLORS[row["backend"]] for row in rows]
        medians = [row.get("median_ms") or 0 for row in rows]
        spread = [(m - min(row.get("repeat_median_ms") or [m]), max(row.get("repeat_median_ms") or [m]) - m)
                  for m, row in zip(medians, rows)]
        graphed = [row.get("mode") in CUDA_GRAPH_MODES for row in rows]
        peaks = [row.get("held_GB") if cuda_graphs else row.get("peak_GB") for row, cuda_graphs in zip(rows, graphed)]
        time_axis.barh(labels, medians, color=colors, xerr=list(zip(*spread)), capsize=2)
        # the device's busy time (--kernels): where the bar runs past it, the host set the time
        profiled = [(y, row["kernel_ms"]) for y, row in enumerate(rows) if row.get("kernel_ms")]
        if profiled:
            time_axis.scatter([ms for _, ms in profiled], [y for y, _ in profiled], marker="|", s=160, color="black",
                              zorder=3)
        memory_axis.barh(labels, [peak or 0 for peak in peaks], color=colors)
        for axis, values in ((time_axis, medians), (memory_axis, peaks)):
            for y, (row, value, cuda_graphs) in enumerate(zip(rows, values, graphed)):
                if row.get("median_ms") is None:
                    text = "failed"
                else:  # 1050, not 1.05e+03
                    text = "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.3g}"
                if axis is memory_axis and cuda_graphs and row.get("median_ms") is not None:
                    text += " held (CUDA graphs' pool)" if value is not None else " (CUDA graphs: pool not measured)"
                axis.text(value or 0, y, " " + text, va="center", fontsize=7)
            axis.tick_params(labelsize=7)
            axis.margins(x=0.15)
        ticks = "; black ticks: kernel ms" if profiled else ""
        time_axis.set_title(f"{name}: ms per forward (median; whiskers: repeat medians{ticks})", fontsize=9, loc="left")
        memory_axis.set_title(f"{name}: peak GB above inputs (CUDA graphs: GB held)", fontsize=9, loc="left")
        memory_axis.set_yticks(range(len(rows)), [""] * len(rows))
    env = meta.get("env") or {}
    figure.suptitle(f"{meta.get('date', '')[:10]}  {env.get('gpu') or env.get('device', '')}  torch {env.get('torch', '')}",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------- child


def compiled(model, config: Config):
    """``model`` as ``config`` runs it. Regional with CUDA graphs, each forward begins a CUDA-graph
    step (``torch.compiler.cudagraph_mark_step_begin``): otherwise every block's call starts a new
    generation of torch's CUDA-graph trees, which overwrites the previous block's output while the
    next block reads it (pytorch/pytorch#152887); this is the recipe docs/benchmarks.md gives."""
    import torch

    mode = {"mode": config.mode} if config.mode else {}
    if config.backend == "eager":
        return model
    if not config.regional:
        return torch.compile(model, backend=config.backend, **mode)
    model.compile_repeated_blocks(backend=config.backend, **mode)
    if config.mode in CUDA_GRAPH_MODES:
        model.register_forward_pre_hook(lambda module, args: torch.compiler.cudagraph_mark_step_begin())
    return model


def run_child(spec: dict) -> dict:
    """Build, compile and time one configuration (in a process of its own)."""
    import torch
    from measure import Peak, cuda_peak_above, cuda_reserved, host_probe_ms, kernel_time, live_at_peak, time_calls
    from torch.utils._pytree import tree_leaves

    from diffopt.models.diffusers_models import cast_like_from_pretrained
    from diffopt.report import Report, collecting

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    cuda = device.type == "cuda"
    result: dict = {"env": _environment(torch, device)}
    workload = workloads(spec["wan14b_blocks"])[spec["workload"]]
    config = Config(spec["backend"], spec["mode"], spec["regional"])

    start = time.perf_counter()
    model, inputs = workload.build(spec["tiny"], device, dtype)
    cast_like_from_pretrained(model, dtype)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    result["build_s"] = time.perf_counter() - start
    base = torch.cuda.memory_allocated() if cuda else None
    base_reserved = cuda_reserved() if cuda else None

    fn = compiled(model, config)

    def peak_above_base():
        return cuda_peak_above(base) if cuda else contextlib.nullcontext(Peak())

    report = Report()
    with torch.inference_mode(), collecting(report):
        with peak_above_base() as first_calls_peak:
            start = time.perf_counter()
            fn(**inputs)
            if cuda:
                torch.cuda.synchronize()
            result["compile_s"] = time.perf_counter() - start
            for _ in range(spec["warmup"]):
                fn(**inputs)
        # held between calls; under CUDA graphs this is the graphs' memory pool, which the steady-state
        # peak (replays allocate nothing) does not see
        result["held_bytes"] = cuda_reserved() - base_reserved if cuda else None
        # the machine's load as the timing starts: a launch-bound child is as fast as its host
        result["load_avg_1min"] = os.getloadavg()[0]
        probe_before = host_probe_ms()
        with peak_above_base() as peak:
            times = time_calls(lambda: fn(**inputs), spec["iters"], device)
        result["ms"], result["host_ms"] = times.ms, times.host_ms
        # the host's speed just before and after the timed calls: what a launch-bound median moves with
        result["host_probe_ms"] = [probe_before, host_probe_ms()]
        if spec.get("kernels") and cuda:
            result["kernels"] = kernel_time(lambda: fn(**inputs))
        if spec.get("memory_breakdown") and cuda:
            result["live_at_peak"] = live_at_peak(lambda: fn(**inputs), keep_code=spec["memory_breakdown"])
        leaves = [leaf for leaf in tree_leaves(fn(**inputs)) if isinstance(leaf, torch.Tensor)]
        output = torch.cat([leaf.detach().flatten().float().cpu() for leaf in leaves])
    result["peak_bytes"], result["first_calls_peak_bytes"] = peak.bytes, first_calls_peak.bytes
    if config.backend == "diffopt":
        result["rewrites"] = {}
        for run in report.runs:
            result["rewrites"][run.pass_name] = result["rewrites"].get(run.pass_name, 0) + run.matches
        result["diffopt_pass_s"] = sum(run.seconds for run in report.runs)
        result["pass_errors"] = [f"{run.pass_name} on {run.graph}: {run.error}" for run in report.failures()]
    if config.backend != "eager":
        result["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        # graphs Inductor's FX graph cache served: 0 in a cold child, all of them in a warm one (--cache-dir)
        result["fx_graph_cache_hits"] = torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]

    reference = Path(spec["reference"])
    if reference.exists():
        result["rel_err_max"], result["rel_err_l2"] = relative_errors(output, torch.load(reference))
    elif config.backend == "eager":
        torch.save(output, reference)
    return result


def relative_errors(output, reference) -> tuple[float, float]:
    """(max |output - reference| / max |reference|, ||output - reference|| / ||reference||), in float64."""
    output, reference = output.double(), reference.double()
    diff = output - reference
    return (diff.abs().max() / reference.abs().max()).item(), (diff.norm() / reference.norm()).item()


def _environment(torch, device) -> dict:
    import platform

    import diffusers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def _child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        result = run_child(spec)
    except Exception as error:  # a configuration that fails is a result too
        import traceback

        traceback.print_exc()
        message = str(error).strip().splitlines()
        result = {"error": f"{type(error).__name__}: {message[0][:300] if message else ''}"}
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------- parent


def run_configuration(spec: dict, run_dir: Path, log_path: Path, timeout_s: float,
                      shared_caches: Path | None = None) -> dict:
    """One child with fresh compile caches (or ``shared_caches``, kept); its result, or what went wrong with it."""
    caches = shared_caches or Path(tempfile.mkdtemp(prefix="caches-", dir=run_dir))
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "TRITON_CACHE_DIR": str(caches / "triton"),
        "PYTHONUNBUFFERED": "1",
    }
    result_path = Path(spec["result"])
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            returncode = child.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # The child's session: it and the compile workers it started.
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
    wall_s = time.perf_counter() - start
    if shared_caches is None:
        shutil.rmtree(caches, ignore_errors=True)
    if timed_out:
        result = {"error": f"timeout: killed after {timeout_s:g} s"}
    elif result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        result = {"error": f"child exited with {returncode} without a result: {tail[0][:200]}"}
    result["wall_s"] = wall_s
    result["log"] = str(log_path)
    return result


# A fresh build of fa3 and fa2 took 82-107 s on an H200, plus about 12 s of start-up.
PREBUILD_TIMEOUT_S = 900


def prebuild_kernels(log_path: Path, timeout_s: float = PREBUILD_TIMEOUT_S) -> dict:
    """Build FlashInfer's attention kernels once, before any configuration runs
    (``python -m diffopt.prebuild``; every workload's attention is bf16 with head dim 128, its
    defaults). FlashInfer's cache outlives the per-child compile caches, so without this the
    first diffopt child alone would pay a one-time-per-machine build of 20-100 s per kernel in
    its cold compile. Its time is recorded on its own."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            returncode = subprocess.run([sys.executable, "-m", "diffopt.prebuild"], stdout=log, stderr=subprocess.STDOUT,
                                        timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            returncode = None
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.startswith(("FlashInfer", "diffopt.prebuild"))]
    return {"seconds": round(time.perf_counter() - start, 1), "returncode": returncode, "kernels": lines,
            "log": str(log_path)}


def collect(runs: dict[tuple[str, Config], list[dict]]) -> list[dict]:
    results = []
    for (workload, config), config_runs in runs.items():
        row = {"workload": workload, "config": config.name, **dataclasses.asdict(config)}
        results.append({**row, **summarize(config_runs), "runs": config_runs})
    add_ratios_vs_inductor(results)
    return results


def _progress(index: int, total: int, repeat: int, workload: str, config: Config, result: dict) -> str:
    head = f"[{index}/{total}] r{repeat} {workload:18} {config.name:36}"
    if "error" in result:
        return f"{head} FAILED ({result['wall_s']:.0f} s): {result['error']}"
    return (f"{head} median {statistics.median(result['ms']):9.2f} ms  first call {result['compile_s']:6.1f} s"
            f"  ({result['wall_s']:.0f} s in all)")


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", help="comma list (default: all); see workloads()")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--cudagraphs", action="store_true", help='add mode="reduce-overhead"')
    parser.add_argument("--max-autotune", action="store_true", help='add mode="max-autotune-no-cudagraphs"')
    parser.add_argument("--regional", action="store_true", help="add model.compile_repeated_blocks(...)")
    parser.add_argument("--configs", help="explicit configurations, backend[/regional][/mode], comma-separated "
                        "(instead of --backends and the option flags)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10, help="measured calls per child")
    parser.add_argument("--warmup", type=int, default=3, help="calls after the first, before measuring")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per child")
    parser.add_argument("--cache-dir", type=Path,
                        help="every child compiles with this folder's Inductor and Triton caches, kept between "
                             "children and runs: first calls are then warm, not cold (max-autotune's GEMM tuning "
                             "is done once and reused)")
    parser.add_argument("--wan14b-blocks", type=int, default=8)
    parser.add_argument("--memory-breakdown", action="store_true",
                        help="also record one call's allocations: what is live at its peak, which lines allocated it "
                        "(Inductor's generated modules are kept under OUT/code)")
    parser.add_argument("--kernels", action="store_true",
                        help="also profile three calls: the device's busy time per call, launches, the top kernels")
    parser.add_argument("--tiny", action="store_true", help="tiny configs, float32, on the CPU")
    parser.add_argument("--device", help="default: cuda, or cpu with --tiny")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--plot", metavar="JSON", help="only draw the chart of an earlier run's JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child_main(args.child)
    if args.plot:
        data = json.loads(Path(args.plot).read_text())
        path = plot(data["results"], data["meta"], Path(args.plot).with_suffix(".png"))
        print(f"wrote {path}" if path else "no chart: matplotlib is not installed")
        return

    table_of_workloads = workloads(args.wan14b_blocks)
    names = args.workloads.split(",") if args.workloads else list(table_of_workloads)
    unknown = [name for name in names if name not in table_of_workloads]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(table_of_workloads)}")
    try:
        if args.configs:
            configs = parse_configs(args.configs)
        else:
            configs = configurations(args.backends.split(","), args.cudagraphs, args.max_autotune, args.regional)
    except ValueError as error:
        parser.error(str(error))
    device = args.device or ("cpu" if args.tiny else "cuda")
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/bench_models.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": device,
        "dtype": "float32" if args.tiny else "bfloat16",
        "tiny": args.tiny,
        "repeats": args.repeats,
        "iters": args.iters,
        "warmup": args.warmup,
        "cache_dir": str(args.cache_dir) if args.cache_dir else None,
        "workloads": {name: table_of_workloads[name].description for name in names},
        "env": None,
    }
    plan = schedule(names, configs, args.repeats)
    runs: dict[tuple[str, Config], list[dict]] = {(name, config): [] for name in names for config in configs}
    json_path = out / "bench_models.json"
    print(f"{len(plan)} children: {len(names)} workload(s) x {len(configs)} configuration(s) x {args.repeats} repeat(s)",
          flush=True)
    if device.startswith("cuda") and not args.tiny and any(config.backend == "diffopt" for config in configs):
        meta["kernel_prebuild"] = prebuild_kernels(out / "logs" / "prebuild.log")
        print(f"FlashInfer's kernels, once per machine, before the children ({meta['kernel_prebuild']['seconds']:.1f} s): "
              + ("; ".join(meta["kernel_prebuild"]["kernels"]) or f"exit {meta['kernel_prebuild']['returncode']}"), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_models-") as run_dir:
        for index, (repeat, name, config) in enumerate(plan, 1):
            tag = f"{name}.{config.name.replace('/', '+')}.r{repeat}"
            spec = {
                "workload": name, "backend": config.backend, "mode": config.mode, "regional": config.regional,
                "tiny": args.tiny, "device": device, "dtype": meta["dtype"], "iters": args.iters,
                "warmup": args.warmup, "wan14b_blocks": args.wan14b_blocks,
                "memory_breakdown": str(out / "code" / tag) if args.memory_breakdown else None,
                "kernels": args.kernels,
                "reference": str(Path(run_dir) / f"{name}.eager.pt"), "result": str(Path(run_dir) / f"{tag}.json"),
            }
            result = run_configuration(spec, Path(run_dir), out / "logs" / f"{tag}.log", args.timeout, args.cache_dir)
            meta["env"] = meta["env"] or result.pop("env", None)
            result.pop("env", None)
            runs[(name, config)].append({"repeat": repeat, **result})
            print(_progress(index, len(plan), repeat, name, config, result), flush=True)
            json_path.write_text(json.dumps({"meta": meta, "results": collect(runs)}, indent=1))
    results = collect(runs)
    print()
    if args.cache_dir:
        print(f"compile s is warm: every child compiled with the caches in {args.cache_dir}")
    print(table(results))
    print("wrote", json_path)
    chart = plot(results, meta, out / "bench_models.png")
    print(f"wrote {chart}" if chart else "no chart: matplotlib is not installed (draw it elsewhere with --plot)")


if __name__ == "__main__":
    main()
