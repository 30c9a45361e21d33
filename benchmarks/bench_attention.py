"""Every attention candidate at the shapes that matter, side by side (CUDA; bf16, head_dim 128).

Shapes: Wan 1.3B and 14B self-attention at 480p x 81 frames (S=32760), Wan cross-attention over the
text (32760 x 512), Cosmos3 generation (28520 q x 29032 kv, 32 q / 8 kv heads), and an image-size
call (S=1560); batch 1, and batch 2 (classifier-free guidance batched) with ``--batch 1 2``. Inputs
in the layout diffusers hands SDPA: ``[B, S, H, D]`` projections, transposed to ``[B, H, S, D]``.

Per shape:

- ``sdpa``: ``F.scaled_dot_product_attention`` as torch picks its kernel (cuDNN on the H200);
- ``torch.ops.diffopt.attention`` with each backend (ATen's flash / efficient / cuDNN kernels called
  directly, FlashInfer fa3 / fa2 when installed), output in the stock (cuDNN) layout;
- the stock code compiled by Inductor, and by diffopt (its measured choice is reported).

For each: median ms (``triton.testing.do_bench``), TFLOP/s (4 B Hq Sq Skv D flop), and the max abs
error against ``sdpa``. A candidate that fails is recorded with its error and skipped. The first call
of each candidate is timed separately: for FlashInfer it includes the JIT build of the kernel
variant (20-100 s when FlashInfer's cache is cold), which the ``diffopt`` logger also reports.
diffopt's choices are measured into a fresh autotune cache (a temporary ``DIFFOPT_CACHE_DIR``).

    PYTHONPATH=/tmp/site python benchmarks/bench_attention.py [--out DIR] [--batch 1 2] [--shapes NAME ...]

JSON goes to DIR/bench_attention.json (DIR: --out, else $OUT, else ./out), written after each
shape. ``--dry-run`` runs tiny shapes on the CPU with wall-clock timing, to check the script only.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

# name -> (Hq, Hkv, Sq, Skv); D = 128
SHAPES = {
    "wan1.3b_self": (12, 12, 32760, 32760),
    "wan14b_self": (40, 40, 32760, 32760),
    "wan1.3b_cross": (12, 12, 32760, 512),
    "cosmos3_gen": (32, 8, 28520, 29032),
    "image_1560": (12, 12, 1560, 1560),
}
HEAD_DIM = 128


def stock(q, k, v):
    """The stock code: [B, S, H, D] tensors through SDPA and back."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny S, wall-clock timing: checks the script only")
    opts = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    diffopt_log = logging.getLogger("diffopt")
    diffopt_log.setLevel(logging.INFO)
    # the measurements and FlashInfer's builds, not the per-pass summary lines
    diffopt_log.addFilter(lambda record: record.levelno > logging.INFO or "post_grad" not in record.getMessage())
    os.environ["DIFFOPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffopt-autotune-")

    if not torch.cuda.is_available() and not opts.dry_run:
        print("bench_attention: needs CUDA (or --dry-run)", file=sys.stderr)
        return 1
    import diffopt
    from diffopt.kernels import attention as kernels
    from diffopt.report import Report, collecting

    if opts.dry_run:
        def do_bench(fn, warmup=0, rep=0, return_mode=""):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        def sync():
            pass

        device, scale_tokens = torch.device("cpu"), lambda s: max(1, s // 512)
        # the pass acts on CUDA only by default; here it measures on the CPU with the same wall clock
        diffopt_options = {"passes": {"attention": {"devices": ("cpu",), "timer": lambda fn, name: do_bench(fn)}}}
    else:
        from triton.testing import do_bench

        sync = torch.cuda.synchronize
        device, scale_tokens, diffopt_options = torch.device("cuda"), (lambda s: s), {}

    def bench(fn):
        return do_bench(fn, warmup=25, rep=200, return_mode="median")

    backends = {}
    for backend in kernels.BACKENDS:
        why = kernels.backend_unavailable(backend, device)
        backends[backend] = why
        if why:
            print(f"{backend}: unavailable ({why})", flush=True)

    results = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "gpu": "dry-run (cpu)" if opts.dry_run else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "flashinfer": kernels.flashinfer_version(),
        "diffopt": diffopt.__version__,
        "unavailable": {name: why for name, why in backends.items() if why},
        "shapes": {},
    }

    def save():
        os.makedirs(opts.out, exist_ok=True)
        path = os.path.join(opts.out, "bench_attention.json")
        with open(path, "w") as handle:
            json.dump(results, handle, indent=1)
        return path

    dtype = torch.bfloat16
    for batch in opts.batch:
        for name in opts.shapes:
            Hq, Hkv, Sq, Skv = SHAPES[name]
            Sq, Skv = scale_tokens(Sq), scale_tokens(Skv)
            label = f"{name}_b{batch}"
            g = torch.Generator(device).manual_seed(0)
            q = torch.randn(batch, Sq, Hq, HEAD_DIM, generator=g, device=device, dtype=dtype)
            k, v = (torch.randn(batch, Skv, Hkv, HEAD_DIM, generator=g, device=device, dtype=dtype) for _ in range(2))
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            flop = 4 * batch * Hq * Sq * Skv * HEAD_DIM
            expected = stock(q, k, v).transpose(1, 2)
            entry = {"B": batch, "Hq": Hq, "Hkv": Hkv, "Sq": Sq, "Skv": Skv, "D": HEAD_DIM, "candidates": {}}

            def record(candidate, fn, compare=True):
                row = {}
                try:
                    start = time.perf_counter()
                    out = fn()
                    sync()
                    row["first_call_s"] = time.perf_counter() - start
                    if compare:
                        row["max_abs_err"] = (out.double() - expected.double()).abs().max().item()
                    del out
                    row["ms"] = bench(fn)
                    row["tflops"] = flop / (row["ms"] * 1e-3) / 1e12
                except Exception as error:  # a kernel that does not take this problem
                    row = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"}
                entry["candidates"][candidate] = row
                shown = f"{row['ms']:.3f} ms ({row['tflops']:.0f} TFLOP/s), first call {row['first_call_s']:.1f} s" \
                    if "ms" in row else row["error"]
                print(f"{label:22s} {candidate:16s} {shown}", flush=True)

            record("sdpa", lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=Hq != Hkv))
            for backend, why in backends.items():
                if why is None:
                    record(backend, lambda b=backend: kernels.attention(
                        qt, kt, vt, scale=HEAD_DIM**-0.5, backend=b, out_layout="cudnn"))

            torch._dynamo.reset()
            inductor = torch.compile(stock, fullgraph=True)
            record("inductor", lambda: inductor(q, k, v).transpose(1, 2))
            torch._dynamo.reset()
            report = Report()
            compiled = torch.compile(stock, backend="diffopt", fullgraph=True, options=diffopt_options)
            with collecting(report):
                compiled(q, k, v)
            rewrites = [r.by for r in report.rewrites if r.pass_name == "attention"]
            entry["diffopt_choice"] = [by.removeprefix("diffopt.attention[").split("]")[0] for by in rewrites] or ["stock"]
            # per call: the measurements and the choice (a rewrite), or why the call stayed stock
            entry["diffopt_notes"] = rewrites + [d.reason for d in report.declines if d.pass_name == "attention"]
            record("diffopt", lambda: compiled(q, k, v).transpose(1, 2))
            for text in entry["diffopt_notes"]:
                print(f"{label:22s} diffopt: {text}", flush=True)

            results["shapes"][label] = entry
            save()
            del q, k, v, qt, kt, vt, expected, inductor, compiled
            if not opts.dry_run:
                torch.cuda.empty_cache()

    columns = ["sdpa", *[b for b, why in backends.items() if why is None], "inductor", "diffopt"]
    print("\nms (TFLOP/s); max abs error vs sdpa in brackets")
    print(f"{'shape':22s} " + " ".join(f"{c:>22s}" for c in columns) + "  diffopt chose")
    for label, entry in results["shapes"].items():
        cells = []
        for column in columns:
            row = entry["candidates"].get(column, {})
            cells.append(f"{row['ms']:.2f} ({row['tflops']:.0f}) [{row.get('max_abs_err', 0):.1e}]" if "ms" in row else "failed")
        chose = ", ".join(entry["diffopt_choice"])
        print(f"{label:22s} " + " ".join(f"{cell:>22s}" for cell in cells) + f"  {chose}")
    print(f"\nwrote {save()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
