"""The reference denoising step on CUDA: per-step time, syncs per step, GPU idle time.

``DenoiseStep`` (``diffopt.models.loop``) reads ``int(timestep.flatten()[0].item())`` every
step and rebuilds its RoPE tables. Configurations: eager, Inductor, diffopt, and both compilers
with ``mode="reduce-overhead"`` (CUDA graphs). Two shapes at Wan 1.3B dims, bf16: an image-size
step (S=1560 tokens, 6 blocks: launch-bound) and a 480p video step (S=32760, 2 blocks).

    python benchmarks/bench_denoise.py [--steps 12] [--shapes ...] [--out DIR]

Per-step time: median over the steps after the first three (compile and CUDA-graph warm-up),
CUDA events around each step. Syncs per step: CUDA synchronizations reported by
``torch.cuda.set_sync_debug_mode("warn")`` during one steady-state step. Idle: step wall time
minus the union of its kernels' busy time (profiler), per step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from diffopt.models import DenoiseStep, get_config
from diffopt.models.loop import loop_example_inputs, make_timesteps

SHAPES = {
    "image_S1560_6blocks": dict(num_layers=6, latent_frames=1),
    "video480p_S32760_2blocks": dict(num_layers=2),
}


def configs(model):
    yield "eager", model
    yield "inductor", torch.compile(model)
    yield "diffopt", torch.compile(model, backend="diffopt")
    yield "inductor+cudagraphs", torch.compile(model, mode="reduce-overhead")
    yield "diffopt+cudagraphs", torch.compile(model, backend="diffopt", mode="reduce-overhead")


def busy_us(events) -> float:
    intervals = sorted((e.time_range.start, e.time_range.end) for e in events)
    total, end = 0.0, float("-inf")
    for start, stop in intervals:
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def run(fn, latents, timesteps, encoder_hidden_states):
    times = []
    for i, t in enumerate(timesteps):
        timestep = t.expand(latents.shape[0])
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(latents, timestep, encoder_hidden_states)
        stop.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(stop))
    timestep = timesteps[-1].expand(latents.shape[0])
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(latents, timestep, encoder_hidden_states)
    torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn(latents, timestep, encoder_hidden_states)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    step_ms = statistics.median(times)
    idle_ms = max(0.0, step_ms - busy_us(kernels) / 1e3)
    return step_ms, syncs, idle_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(f"{'shape':26} {'config':20} {'ms/step':>8} {'syncs':>6} {'idle ms':>8}")
    for shape in args.shapes.split(","):
        overrides = SHAPES[shape]
        base = get_config("wan-1.3b")
        config = dataclasses.replace(base, **overrides)
        model = DenoiseStep(config).to("cuda", torch.bfloat16).eval()
        latents, _, encoder_hidden_states = loop_example_inputs(config, dtype=torch.bfloat16, device="cuda")
        timesteps = make_timesteps(args.steps).to("cuda")
        rows = {}
        with torch.no_grad():
            for name, fn in configs(model):
                torch._dynamo.reset()
                try:
                    step_ms, syncs, idle_ms = run(fn, latents, timesteps, encoder_hidden_states)
                except Exception as error:  # a configuration that does not compile is a result too
                    rows[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
                    print(f"{shape:26} {name:20} failed: {rows[name]['error']}", flush=True)
                    continue
                rows[name] = {"ms_per_step": step_ms, "syncs_per_step": syncs, "idle_ms_per_step": idle_ms}
                print(f"{shape:26} {name:20} {step_ms:8.3f} {syncs:6d} {idle_ms:8.3f}", flush=True)
        results[shape] = rows
        del model
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_denoise.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
