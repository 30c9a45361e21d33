"""Benchmark ``torch.ops.diffopt.qk_norm_rope`` against the stock QK-norm + RoPE code on CUDA.

For each anchor shape (DESIGN.md "Measured anchors") prints and records: stock eager, inductor
(``torch.compile`` of the stock code), diffopt (our op), and the bandwidth floor (bytes that must
move: read q,k + write q,k + tables, over the measured device copy bandwidth); medians of
``triton.testing.do_bench``; ratios; relative errors vs a float64 evaluation of the stock code.

    python benchmarks/bench_qk_norm_rope.py [--out DIR] [--sweep] [--no-inductor]

JSON goes to DIR/bench_qk_norm_rope.json (DIR: --out, else $OUT, else ./out).
``--sweep`` also times a few launcher configs (block sizes, warps) per shape, for tuning
``choose_config``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def cosmos3_stock(q, k, wq, wk, cos, sin):
    """Per-head RMSNorm, then half-split RoPE with per-channel [B,S,1,D] tables (Qwen3 / Cosmos3)."""
    q = F.rms_norm(q, (q.shape[-1],), wq, 1e-6)
    k = F.rms_norm(k, (k.shape[-1],), wk, 1e-6)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def wan_rope(x, fcos, fsin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = fcos[..., 0::2], fsin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def make_wan_stock(heads):
    def wan_stock(q, k, wq, wk, fcos, fsin):
        """RMSNorm across all heads (before the head split), interleaved RoPE, fp32 tables (diffusers Wan)."""
        q = F.rms_norm(q, (q.shape[-1],), wq, 1e-6).unflatten(2, (heads, -1))
        k = F.rms_norm(k, (k.shape[-1],), wk, 1e-6).unflatten(2, (heads, -1))
        return wan_rope(q, fcos, fsin), wan_rope(k, fcos, fsin)
    return wan_stock


def rel_err(got, truth):
    return max(((g.double() - t).norm() / t.norm()).item() for g, t in zip(got, truth))


def max_abs_err(got, truth):
    return max((g.double() - t).abs().max().item() for g, t in zip(got, truth))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--sweep", action="store_true", help="also time launcher configs for tuning")
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny S, wall-clock timing: checks the script only")
    opts = ap.parse_args()

    import triton
    from triton.testing import do_bench
    if opts.dry_run:
        def do_bench(fn, warmup, rep, return_mode):  # noqa: F811
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3

    import diffopt
    import diffopt.kernels  # noqa: F401  registers torch.ops.diffopt.qk_norm_rope
    from diffopt.kernels.qk_norm_rope_triton import choose_config, qk_norm_rope_triton

    def save(res):
        os.makedirs(opts.out, exist_ok=True)
        path = os.path.join(opts.out, "bench_qk_norm_rope.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        return path

    if not torch.cuda.is_available() and not opts.dry_run:
        print("bench_qk_norm_rope: needs CUDA", file=sys.stderr)
        return 1
    dev = "cpu" if opts.dry_run else "cuda"
    t_start = time.perf_counter()
    n_tok = (lambda s: 37) if opts.dry_run else (lambda s: s)
    torch.manual_seed(0)
    res = {"torch": torch.__version__, "triton": triton.__version__,
           "gpu": "dry-run" if opts.dry_run else torch.cuda.get_device_name(),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}

    def bench(fn, rep=200):
        return do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3  # us

    x = torch.empty(2 * 1024**3 // 2 if not opts.dry_run else 2**20, dtype=torch.bfloat16, device=dev).normal_()
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 2 / (bench(lambda: y.copy_(x), rep=300) * 1e-6)  # bytes/s
    del x, y
    res["copy_bw_TBps"] = bw / 1e12
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)

    shapes = []
    # Cosmos3 generation: S=28520, 32 q / 8 kv heads, D=128, per-head norm, neox, bf16 [1,S,1,128] tables
    S, H, HKV, D = n_tok(28520), 32, 8, 128
    for packed in (False, True):
        if packed:  # head slices of a packed qkv: the strided input that rewrite 1 produces
            qkv = torch.randn(1, S, H + 2 * HKV, D, device=dev, dtype=torch.bfloat16)
            q, k = qkv[:, :, :H], qkv[:, :, H:H + HKV]
        else:
            q = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, S, HKV, D, device=dev, dtype=torch.bfloat16)
        wq = torch.rand(D, device=dev, dtype=torch.bfloat16) + 0.5
        wk = torch.rand(D, device=dev, dtype=torch.bfloat16) + 0.5
        ang = torch.rand(1, S, 1, D // 2, device=dev) * 6.28
        cos = torch.cat([ang.cos()] * 2, -1).bfloat16()
        sin = torch.cat([ang.sin()] * 2, -1).bfloat16()
        nb = 2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 2
        shapes.append(dict(
            name="cosmos3_qknorm_rope" + ("_packed" if packed else ""), stock=cosmos3_stock, no_inductor=packed,
            stock_args=(q, k, wq, wk, cos, sin), op_args=(q, k, wq, wk, cos, sin, None),
            op_kwargs=dict(norm_over="head", rope_style="neox", rope_dim=D, q_eps=1e-6, k_eps=1e-6), nbytes=nb,
            sweep=[dict(block_hq=bq, block_hk=bk, num_warps=w) for bq, bk, w in (
                (8, 8, 2), (8, 8, 1), (4, 4, 1), (16, 8, 2), (32, 8, 4), (16, 8, 4), (8, 8, 4))
                if not packed or (bq, bk, w) in ((8, 8, 2), (16, 8, 4))]
            + [dict(block_hq=8, block_hk=8, num_warps=2, hints=True)][:0 if packed else 1]))
    # Wan 1.3B / 14B 480p: S=32760, across-heads norm, interleaved, fp32 tables used as strided views
    for tag, heads in (("wan1.3b", 12), ("wan14b", 40)):
        S, dim = n_tok(32760), heads * 128
        q = torch.randn(1, S, dim, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, S, dim, device=dev, dtype=torch.bfloat16)
        wq = torch.rand(dim, device=dev, dtype=torch.bfloat16) + 0.5
        wk = torch.rand(dim, device=dev, dtype=torch.bfloat16) + 0.5
        ang = torch.rand(1, S, 1, 64, device=dev) * 6.28
        fcos = ang.cos().repeat_interleave(2, -1)
        fsin = ang.sin().repeat_interleave(2, -1)
        nb = 2 * (q.numel() + k.numel()) * 2 + 2 * fcos.numel() * 4
        hp = triton.next_power_of_2(heads)
        shapes.append(dict(
            name=f"{tag}_qknorm_rope_480p", stock=make_wan_stock(heads), stock_args=(q, k, wq, wk, fcos, fsin),
            op_args=(q.view(1, S, heads, 128), k.view(1, S, heads, 128), wq, wk, fcos[..., 0::2], fsin[..., 1::2],
                     None),
            op_kwargs=dict(norm_over="hidden", rope_style="interleaved", rope_dim=128, q_eps=1e-6, k_eps=1e-6),
            nbytes=nb,
            sweep=[dict(block_hq=b, block_hk=b, num_warps=w) for b, w in
                   ((8, 4), (8, 2), (4, 2), (4, 1), (16, 4), (16, 2), (hp, 4))]
            + [dict(block_hq=8, block_hk=8, num_warps=4, hints=True)]))

    op = torch.ops.diffopt.qk_norm_rope
    for sh in shapes:
        name, stock, sargs, oargs, okw = sh["name"], sh["stock"], sh["stock_args"], sh["op_args"], sh["op_kwargs"]
        torch._dynamo.reset()  # each shape compiles static: the model dims differ between shapes
        out = {"floor_us": sh["nbytes"] / bw * 1e6, "bytes": sh["nbytes"]}
        truth = stock(*[a.double() for a in sargs])
        eager_out = stock(*sargs)
        ours = op(*oargs, **okw)
        assert all(o.shape == t.shape for o, t in zip(ours, truth))
        out["eager_us"] = bench(lambda: stock(*sargs))
        out["eager_rel_err"] = rel_err(eager_out, truth)
        out["eager_max_abs_err"] = max_abs_err(eager_out, truth)
        del eager_out
        if not opts.no_inductor and not sh.get("no_inductor"):
            comp = torch.compile(stock)
            ind = comp(*sargs)
            out["inductor_us"] = bench(lambda: comp(*sargs))
            out["inductor_rel_err"] = rel_err(ind, truth)
            out["inductor_max_abs_err"] = max_abs_err(ind, truth)
            del ind
        if not sh.get("no_inductor"):
            # The stock code compiled with backend="diffopt": the rewrite must fire and call the op.
            report = diffopt.explain(stock, *sargs)
            out["diffopt_compiled_matches"] = report.matches("qk_norm_rope")
            comp_d = torch.compile(stock, backend="diffopt")
            got = comp_d(*sargs)
            out["diffopt_compiled_us"] = bench(lambda: comp_d(*sargs))
            out["diffopt_compiled_rel_err"] = rel_err(got, truth)
            del got, report
        out["diffopt_us"] = bench(lambda: op(*oargs, **okw))
        out["diffopt_rel_err"] = rel_err(ours, truth)
        out["diffopt_max_abs_err"] = max_abs_err(ours, truth)
        out["diffopt_config"] = choose_config(oargs[0].shape[2], oargs[1].shape[2], oargs[0].shape[3],
                                              okw["norm_over"])
        out["diffopt_over_floor"] = out["diffopt_us"] / out["floor_us"]
        if "inductor_us" in out:
            out["inductor_over_floor"] = out["inductor_us"] / out["floor_us"]
            out["speedup_vs_inductor"] = out["inductor_us"] / out["diffopt_us"]
        out["speedup_vs_eager"] = out["eager_us"] / out["diffopt_us"]
        del truth
        if opts.sweep:
            sweep = []
            for cfg in sh["sweep"] if not opts.dry_run else []:
                got = qk_norm_rope_triton(*oargs, **okw, config=cfg)
                diff = max((g.float() - r.float()).abs().max().item() for g, r in zip(got, ours))
                del got
                t = bench(lambda: qk_norm_rope_triton(*oargs, **okw, config=cfg), rep=100)
                sweep.append(dict(cfg, us=t, over_floor=t / out["floor_us"], max_diff_vs_default=diff))
                print(f"  sweep {name} {cfg} {t:.1f} us ({t / out['floor_us']:.3f}x floor) diff {diff:.3g}",
                      flush=True)
            out["sweep"] = sweep
            best = min(sweep, key=lambda r: r["us"])
            print(f"  sweep {name} best {best}", flush=True)
        del ours
        res[name] = out
        out["elapsed_s"] = time.perf_counter() - t_start
        print(name, json.dumps(out), flush=True)
        save(res)  # after each shape, so a run cut short still leaves its numbers
        if not opts.dry_run:
            torch.cuda.empty_cache()

    hdr = f"{'shape':28s} {'eager':>9s} {'inductor':>9s} {'diffopt':>9s} {'compiled':>9s} {'floor':>8s} {'ours/floor':>10s} " \
          f"{'vs ind':>7s} {'err eager':>10s} {'err ind':>9s} {'err ours':>9s}"
    print("us, medians of do_bench; diffopt = the op alone, compiled = the stock code under backend=\"diffopt\"")
    print(hdr)
    for sh in shapes:
        o = res[sh["name"]]
        print(f"{sh['name']:28s} {o['eager_us']:9.1f} {o.get('inductor_us', float('nan')):9.1f} "
              f"{o['diffopt_us']:9.1f} {o.get('diffopt_compiled_us', float('nan')):9.1f} {o['floor_us']:8.1f} "
              f"{o['diffopt_over_floor']:10.3f} "
              f"{o.get('speedup_vs_inductor', float('nan')):7.2f} {o['eager_rel_err']:10.2e} "
              f"{o.get('inductor_rel_err', float('nan')):9.2e} {o['diffopt_rel_err']:9.2e}")
    print("wrote", save(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
