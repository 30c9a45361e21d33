"""split_contiguous at full Cosmos3 shape: copies removed, time and peak memory.

Two workloads, bf16, at the Cosmos3 generation shape (S=28520, 32 q / 8 kv heads, D=128):

- ``front``: the attention front of the stock Cosmos3 layer from the packed projection on:
  ``split`` + ``.contiguous().view`` of q/k/v, per-head ``F.rms_norm`` of q and k, and
  consumers that reduce over heads (so nothing but the rewrite differs). Runs on CPU too.
- ``layer``: one whole ``Cosmos3GenLayer`` (``diffopt.models``) with its 512-token cached
  prefix: projection, split, norm, RoPE, GQA cross-attention, MLP. CUDA only (too slow on CPU).

For each: with Inductor off (``options={"inductor": False}``: the rewritten ATen graph runs
as it is), diffopt with the pass off vs on: median time and peak memory; with Inductor on:
the copy kernels and copied bytes in the generated code, pass off vs on, and the time.

    python benchmarks/bench_split_contiguous.py [--device cpu|cuda] [--workloads front,layer] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
import gc

import torch
import torch.nn.functional as F

from diffopt.models import Cosmos3GenLayer, cosmos3_example_inputs, get_config

HEADS, KV_HEADS, HEAD_DIM, SEQ = 32, 8, 128, 28520


def front(qkv, wq, wk):
    B, S, _ = qkv.shape
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    q = q.contiguous().view(B, S, HEADS, HEAD_DIM)
    k = k.contiguous().view(B, S, KV_HEADS, HEAD_DIM)
    v = v.contiguous().view(B, S, KV_HEADS, HEAD_DIM)
    q = F.rms_norm(q, (HEAD_DIM,), wq, 1e-6)
    k = F.rms_norm(k, (HEAD_DIM,), wk, 1e-6)
    return q.sum(2) + k.sum(2) + v.sum(2)


def _rss_kb(field):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])


def _cpu_peak_bytes(fn):
    """Peak resident memory above the level before ``fn`` ran (Linux: VmHWM after resetting it)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark
    before = _rss_kb("VmRSS:")
    fn()
    return (_rss_kb("VmHWM:") - before) * 1024


def measure(fn, args, device, repeats):
    with torch.no_grad():
        fn(*args)  # compile / warm up
        if device == "cuda":
            from measure import cuda_ms_and_peak

            ms, peak = cuda_ms_and_peak(fn, args, rep_ms=max(50, repeats * 10))
        else:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(*args)
                times.append((time.perf_counter() - start) * 1e3)
            ms = statistics.median(times)
            peak = _cpu_peak_bytes(lambda: fn(*args))
    return ms, peak


def generated_copies(fn, args):
    """Copy kernels in Inductor's generated code and the bytes they move (read + write)."""
    from torch._inductor.utils import run_and_get_code

    with torch.no_grad():
        _, sources = run_and_get_code(fn, *args)
    code = "\n".join(sources)
    return sorted(set(re.findall(r"\b(triton_\w*clone\w*|cpp_fused\w*clone\w*)", code)))


def clones_handed_to_inductor(model, args, pass_on):
    """contiguous() copies left in the post-grad graph that Inductor compiles."""
    from diffopt.testing import count_ops, trace

    with torch.no_grad():
        result = trace(model, *args, options={"inductor": True, "passes": {"split_contiguous": pass_on}})
    if not pass_on:
        return None  # the pass did not run: no graph recorded
    before, after = result.before("split_contiguous"), result.after("split_contiguous")
    return count_ops(before)["aten.clone.default"], count_ops(after)["aten.clone.default"]


def compile_with(pass_on, inductor, model):
    options = {"inductor": inductor, "passes": {"split_contiguous": pass_on}}
    return torch.compile(model, backend="diffopt", options=options)


def workload(name, device):
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    if name == "front":
        qkv = torch.randn(1, SEQ, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g).to(device, dtype)
        wq = (torch.rand(HEAD_DIM, generator=g) + 0.5).to(device, dtype)
        wk = (torch.rand(HEAD_DIM, generator=g) + 0.5).to(device, dtype)
        return front, (qkv, wq, wk)
    config = get_config("cosmos3", num_layers=1)
    layer = Cosmos3GenLayer(config).to(device, dtype).eval()
    hidden, cos, sin, prefix_kv = cosmos3_example_inputs(config, dtype=dtype, device=device)
    return layer, (hidden, cos, sin, *prefix_kv[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default=None, help="comma list of front,layer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()
    names = (args.workloads or ("front,layer" if args.device == "cuda" else "front")).split(",")
    results = {"device": args.device, "torch": torch.__version__}
    if args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    for name in names:
        model, inputs = workload(name, args.device)
        row = {}
        with torch.no_grad():
            reference = model(*inputs)
        for inductor in (False, True):
            for pass_on in (False, True):
                torch._dynamo.reset()
                fn = compile_with(pass_on, inductor, model)
                tag = f"{'inductor' if inductor else 'no_inductor'}_{'on' if pass_on else 'off'}"
                ms, peak = measure(fn, inputs, args.device, args.repeats)
                with torch.no_grad():
                    err = (fn(*inputs).float() - reference.float()).abs().max().item()
                row[tag] = {"ms": ms, "peak_MB": peak / 1e6, "max_abs_err_vs_eager": err}
                if inductor:
                    torch._dynamo.reset()
                    row[tag]["copy_kernels"] = generated_copies(compile_with(pass_on, True, model), inputs)
        # The three contiguous() copies read and write all of q, k and v (bf16).
        row["copied_MB_per_call_stock"] = 2 * (HEADS + 2 * KV_HEADS) * HEAD_DIM * SEQ * 2 / 1e6
        torch._dynamo.reset()
        row["post_grad_clones_before_after"] = clones_handed_to_inductor(model, inputs, True)
        results[name] = row
        print(f"\n== {name} ({args.device}, bf16, S={SEQ})")
        print(f"{'config':22} {'ms':>9} {'peak MB':>9} {'err':>9}  copy kernels")
        for tag, r in row.items():
            if isinstance(r, dict):
                kernels = ", ".join(r.get("copy_kernels", [])) if "copy_kernels" in r else "-"
                print(f"{tag:22} {r['ms']:9.2f} {r['peak_MB']:9.1f} {r['max_abs_err_vs_eager']:9.2e}  {kernels}")
        off, on = row["no_inductor_off"], row["no_inductor_on"]
        print(f"inductor off: {off['ms'] / on['ms']:.2f}x faster, {off['peak_MB'] - on['peak_MB']:.0f} MB less peak")
        print(f"contiguous() copies in the post-grad graph (before, after the pass): {row['post_grad_clones_before_after']}")
        print("copy kernels: Inductor kernels whose name says they compute a clone (fused or alone)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_split_contiguous_{args.device}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
