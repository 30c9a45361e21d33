"""Whole stock blocks on CUDA: eager vs Inductor vs diffopt, time and peak memory, bf16.

Workloads (480p, 81 frames: S=32760 video tokens, 512 text tokens):

- ``wan-1.3b``, ``wan-14b``: one stock diffusers ``WanTransformerBlock`` at those dims;
- ``cosmos3``: one ``Cosmos3GenLayer`` of ``diffopt.models`` at the Cosmos3 generation shape
  (S=28520, 512-token cached prefix).

Prints one row per workload and configuration (median ms of ``triton.testing.do_bench``,
peak memory above the inputs, max |error| vs eager, how often each diffopt pass matched) and
writes JSON.

    python benchmarks/bench_blocks.py [--workloads wan-1.3b,wan-14b,cosmos3] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from measure import cuda_ms_and_peak

import diffopt
from diffopt.models import Cosmos3GenLayer, cosmos3_example_inputs, get_config, wan_example_inputs


def workload(name: str):
    dtype, device = torch.bfloat16, "cuda"
    config = get_config(name, num_layers=1)
    if name.startswith("wan"):
        from diffopt.models.diffusers_models import build_diffusers_wan_block

        block = build_diffusers_wan_block(config).to(device, dtype).eval()
        return block, wan_example_inputs(config, dtype=dtype, device=device)
    layer = Cosmos3GenLayer(config).to(device, dtype).eval()
    hidden, cos, sin, prefix_kv = cosmos3_example_inputs(config, dtype=dtype, device=device)
    return layer, (hidden, cos, sin, *prefix_kv[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="wan-1.3b,wan-14b,cosmos3")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(f"{'workload':10} {'config':9} {'ms':>8} {'peak GB':>8} {'max err':>9}  matches")
    for name in args.workloads.split(","):
        model, inputs = workload(name)
        rows = {}
        with torch.no_grad():
            eager_out = model(*inputs)
            report = diffopt.explain(model, *inputs)
            matches = {run.pass_name: report.matches(run.pass_name) for run in report.runs}
            torch._dynamo.reset()
            for tag, fn in (
                ("eager", model),
                ("inductor", torch.compile(model)),
                ("diffopt", torch.compile(model, backend="diffopt")),
            ):
                ms, peak = cuda_ms_and_peak(fn, inputs)
                err = (fn(*inputs).float() - eager_out.float()).abs().max().item()
                rows[tag] = {"ms": ms, "peak_GB": peak / 1e9, "max_abs_err_vs_eager": err}
                print(f"{name:10} {tag:9} {ms:8.2f} {peak / 1e9:8.2f} {err:9.2e}  {matches if tag == 'diffopt' else ''}",
                      flush=True)
        rows["diffopt_matches"] = matches
        rows["speedup_vs_inductor"] = rows["inductor"]["ms"] / rows["diffopt"]["ms"]
        results[name] = rows
        del model, inputs, eager_out
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_blocks.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
