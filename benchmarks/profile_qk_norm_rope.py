"""Where the time of one QK-norm + RoPE call goes on CUDA: CPU-side overhead vs GPU kernels.

Profiles the fused op alone and the stock segments compiled with Inductor and with diffopt
(also under CUDA graphs, ``mode="reduce-overhead"``), at the anchor shapes; prints per call the wall time, the CPU time spent launching and
every CUDA kernel with its time. For telling a launch-bound call from a slow kernel.

    python benchmarks/profile_qk_norm_rope.py
"""
import time

import torch
from torch.profiler import ProfilerActivity, profile

import diffopt  # noqa: F401
import diffopt.kernels  # noqa: F401
from bench_qk_norm_rope import cosmos3_stock, make_wan_stock


def report(name, fn, args, calls=20):
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    cpu_us = (time.perf_counter() - start) / calls * 1e6  # launch time per call (no sync inside)
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) / calls * 1e6
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(*args)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"\n{name}: launch {cpu_us:.0f} us/call, wall {wall_us:.0f} us/call")
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:6]:
        print(f"   {e.count // calls:2d}x {e.device_time_total / calls:8.1f} us  {e.key[:90]}")


def inference_mode(fn):
    """``fn`` called under ``torch.inference_mode()``: no autograd dispatch on the way to the kernel."""
    def call(*args):
        with torch.inference_mode():
            return fn(*args)
    return call


def main():
    dev, bf16 = "cuda", torch.bfloat16
    S, H, HKV, D = 28520, 32, 8, 128
    q = torch.randn(1, S, H, D, device=dev, dtype=bf16)
    k = torch.randn(1, S, HKV, D, device=dev, dtype=bf16)
    wq, wk = torch.rand(D, device=dev, dtype=bf16) + 0.5, torch.rand(D, device=dev, dtype=bf16) + 0.5
    ang = torch.rand(1, S, 1, D // 2, device=dev) * 6.28
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(bf16), torch.cat([ang.sin()] * 2, -1).to(bf16)
    args = (q, k, wq, wk, cos, sin)
    op = torch.ops.diffopt.qk_norm_rope
    kw = dict(norm_over="head", rope_style="neox", rope_dim=D, q_eps=1e-6, k_eps=1e-6)
    report("cosmos3 op alone", lambda *a: op(*a, None, **kw), args)
    report("cosmos3 op alone, inference_mode", inference_mode(lambda *a: op(*a, None, **kw)), args)
    report("cosmos3 inductor", torch.compile(cosmos3_stock), args)
    torch._dynamo.reset()
    report("cosmos3 diffopt", torch.compile(cosmos3_stock, backend="diffopt"), args)
    torch._dynamo.reset()
    report("cosmos3 inductor+cudagraphs", torch.compile(cosmos3_stock, mode="reduce-overhead"), args)
    torch._dynamo.reset()
    report("cosmos3 diffopt+cudagraphs", torch.compile(cosmos3_stock, backend="diffopt", mode="reduce-overhead"), args)
    torch._dynamo.reset()
    for tag, heads in (("wan1.3b", 12), ("wan14b", 40)):
        S = 32760
        q = torch.randn(1, S, heads * 128, device=dev, dtype=bf16)
        k = torch.randn(1, S, heads * 128, device=dev, dtype=bf16)
        w = torch.rand(heads * 128, device=dev, dtype=bf16) + 0.5
        ang = torch.rand(1, S, 1, 64, device=dev) * 6.28
        fcos, fsin = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
        stock = make_wan_stock(heads)
        args = (q, k, w, w, fcos, fsin)
        kw = dict(norm_over="hidden", rope_style="interleaved", rope_dim=128, q_eps=1e-6, k_eps=1e-6)
        report(f"{tag} op alone", lambda *a: op(a[0].view(1, S, heads, 128), a[1].view(1, S, heads, 128), a[2], a[3],
                                                a[4][..., 0::2], a[5][..., 1::2], None, **kw), args)
        report(f"{tag} inductor", torch.compile(stock), args)
        torch._dynamo.reset()
        report(f"{tag} diffopt", torch.compile(stock, backend="diffopt"), args)
        torch._dynamo.reset()
        report(f"{tag} diffopt+cudagraphs", torch.compile(stock, backend="diffopt", mode="reduce-overhead"), args)
        torch._dynamo.reset()

if __name__ == "__main__":
    main()
