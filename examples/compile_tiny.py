"""The main job: compile small stock models with ``backend="diffopt"``.

For each model it prints the explain report (what was rewritten, where), then
the max error against eager and the median call time of eager, Inductor and
diffopt side by side.

    python examples/compile_tiny.py [--dtype bf16] [--device cuda] [--layers 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import diffopt
from diffopt.models import Cosmos3GenStack, WanStack, cosmos3_example_inputs, get_config, wan_example_inputs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def median_ms(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def max_error(out, ref) -> float:
    if isinstance(out, (tuple, list)):
        return max(max_error(o, r) for o, r in zip(out, ref))
    return (out.float() - ref.float()).abs().max().item()


def stock_models(dtype: torch.dtype, device: str, layers: int):
    wan = get_config("wan-tiny", num_layers=layers)
    yield "WanStack (ours, wan-tiny)", WanStack(wan), wan_example_inputs(wan, dtype=dtype, device=device), {}
    cosmos = get_config("cosmos3-tiny", num_layers=layers)
    hidden, cos, sin, prefix_kv = cosmos3_example_inputs(cosmos, dtype=dtype, device=device)
    yield "Cosmos3GenStack (ours, cosmos3-tiny)", Cosmos3GenStack(cosmos), (hidden, cos, sin, prefix_kv), {}
    try:
        from diffopt.models.diffusers_models import build_diffusers_wan, diffusers_wan_inputs
    except ImportError:
        print("(diffusers not installed: skipping the stock diffusers model)")
        return
    model = build_diffusers_wan(wan, num_layers=layers)
    inputs = {**diffusers_wan_inputs(wan, dtype=dtype, device=device), "return_dict": False}
    yield "diffusers WanTransformer3DModel (wan-tiny)", model, (), inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]

    if args.device == "cpu":
        print("note: qk_norm_rope rewrites on CUDA only by default (on CPU its op runs a plain-torch\n"
              "reference, slower than Inductor's own fused code); see it on CPU with\n"
              "options={'passes': {'qk_norm_rope': {'devices': ['cpu']}}}")
    rows = []
    with torch.no_grad():
        for name, model, inputs, kwargs in stock_models(dtype, args.device, args.layers):
            model = model.to(device=args.device, dtype=dtype).eval()
            print(f"\n=== {name}, {args.dtype} on {args.device}")
            report = diffopt.explain(model, *inputs, **kwargs)
            print(report)

            eager = model(*inputs, **kwargs)
            inductor = torch.compile(model)
            ours = torch.compile(model, backend="diffopt")
            result = {"model": name}
            for label, fn in (("eager", model), ("inductor", inductor), ("diffopt", ours)):
                out = fn(*inputs, **kwargs)  # also compiles
                result[f"{label}_err"] = max_error(out, eager)
                result[f"{label}_ms"] = median_ms(lambda: fn(*inputs, **kwargs), args.device, args.repeats)
            rows.append(result)

    print(f"\nmax |error| vs eager and median ms per call ({args.dtype}, {args.device})")
    header = f"{'model':44} {'inductor err':>12} {'diffopt err':>12} {'eager ms':>9} {'inductor ms':>11} {'diffopt ms':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:44} {r['inductor_err']:12.2e} {r['diffopt_err']:12.2e} "
            f"{r['eager_ms']:9.3f} {r['inductor_ms']:11.3f} {r['diffopt_ms']:10.3f}"
        )


if __name__ == "__main__":
    main()
