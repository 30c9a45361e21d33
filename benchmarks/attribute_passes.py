"""Where diffopt's time and memory differ from Inductor's: one workload, each diffopt pass turned off in turn.

For a workload of ``bench_models.py`` (or ``--tiny``), in one process: Inductor, diffopt, diffopt with every
pass off (the backend alone), and diffopt with one pass off for each pass that fired. Prints median ms per
forward (CUDA events, host launch cost included), peak GB above the inputs, and the rewrite counts, and writes
JSON. Compile caches are left on (compile time is not measured here; ``bench_models.py`` measures it cold).

    python benchmarks/attribute_passes.py --workload wan1.3b_1frame [--tiny] [--iters 20] [--out DIR]
    python benchmarks/attribute_passes.py --wan-layers 2      # Wan 1.3B at 480p, its first 2 blocks
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import _wan, workloads  # noqa: E402
from measure import cuda_peak_above, time_calls  # noqa: E402

import diffopt  # noqa: E402
from diffopt.backend import diffopt_backend  # noqa: E402
from diffopt.models.diffusers_models import cast_like_from_pretrained  # noqa: E402
from diffopt.pipeline import registered_passes  # noqa: E402
from diffopt.report import Report, collecting  # noqa: E402


def measure(model, inputs, compiled, iters: int) -> dict:
    device = torch.device("cuda")
    with torch.inference_mode():
        report = Report()
        with collecting(report):
            compiled(**inputs)
        compiled(**inputs)
        with cuda_peak_above() as peak:
            compiled(**inputs)
        times = time_calls(lambda: compiled(**inputs), iters, device).ms
    fired = {run.pass_name: report.matches(run.pass_name) for run in report.runs if report.matches(run.pass_name)}
    return {"median_ms": statistics.median(times), "min_ms": min(times), "peak_GB": peak.bytes / 1e9, "fired": fired}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="wan1.3b_1frame")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--wan-layers", type=int, help="Wan 1.3B at 480p with this many blocks (overrides --workload)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.wan_layers:
        args.workload = f"wan1.3b_480p_{args.wan_layers}blocks"
        build = _wan("wan-1.3b", num_layers=args.wan_layers)
    else:
        build = workloads()[args.workload].build
    model, inputs = build(args.tiny, "cuda", torch.bfloat16)
    cast_like_from_pretrained(model, torch.bfloat16)
    model = model.eval()

    def compile_with(options):
        torch._dynamo.reset()
        return torch.compile(model, backend=functools.partial(diffopt_backend, options=options))

    rows = {}
    torch._dynamo.reset()
    rows["inductor"] = measure(model, inputs, torch.compile(model), args.iters)
    rows["diffopt"] = measure(model, inputs, compile_with({}), args.iters)
    rows["diffopt, every pass off"] = measure(
        model, inputs, compile_with({"passes": {name: False for name in registered_passes()}}), args.iters
    )
    for name in rows["diffopt"]["fired"]:
        rows[f"diffopt, {name} off"] = measure(model, inputs, compile_with({"passes": {name: False}}), args.iters)

    base = rows["inductor"]
    print(f"{args.workload}{' (tiny)' if args.tiny else ''}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"| configuration | median ms | vs inductor | peak GB | rewrites |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['median_ms']:.3f} | {row['median_ms'] / base['median_ms']:.3f} | "
              f"{row['peak_GB']:.3f} | {row['fired']} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"attribute_{args.workload}{'_tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps({"workload": args.workload, "tiny": args.tiny, "torch": torch.__version__,
                                "gpu": torch.cuda.get_device_name(), "diffopt": diffopt.__version__, "rows": rows},
                               indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
