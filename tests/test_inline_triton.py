"""inline_triton: the fused QK-norm + RoPE op becomes its Triton launch in Inductor's graph (buffers planned
by Inductor, launched from its generated code); on CPU it declines quietly."""
import pytest
import torch
import torch.nn.functional as F

from diffopt.testing import ON_CPU, trace

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def front(q, k, wq, wk, cos, sin):
    q = F.rms_norm(q, (q.shape[-1],), wq, 1e-6)
    k = F.rms_norm(k, (k.shape[-1],), wk, 1e-5)
    # fp32 tables promote the rotation; the result goes back to the input's dtype, as models do
    q_out = (q * cos + rotate_half(q) * sin).to(q.dtype)
    k_out = (k * cos + rotate_half(k) * sin).to(k.dtype)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


def inputs(device, dtype, B=2, S=40, H=8, Hk=2, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g).to(device, dtype)
    k = torch.randn(B, S, Hk, D, generator=g).to(device, dtype)
    wq, wk = (torch.rand(D, generator=g) + 0.5).to(device, dtype), (torch.rand(D, generator=g) + 0.5).to(device, dtype)
    ang = torch.rand(S, D // 2, generator=g) * 6.28
    ang = torch.cat([ang, ang], -1).view(1, S, 1, D)
    return q, k, wq, wk, ang.cos().to(device), ang.sin().to(device)


def test_declines_off_cuda():
    result = trace(front, *inputs("cpu", torch.float32), options={**ON_CPU, "inductor": False})
    assert result.report.matches("qk_norm_rope") == 1 and result.report.matches("inline_triton") == 0
    assert any(d.reason == "inputs are not on CUDA" for d in result.report.declines if d.pass_name == "inline_triton")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_inductor_plans_and_launches_the_kernel(dtype):
    from torch._inductor.utils import run_and_get_code

    args = inputs("cuda", dtype)
    eager = front(*args)
    result = {}

    def run():
        result["trace"] = trace(front, *args, options={"inductor": True})
        return result["trace"].output

    outputs, codes = run_and_get_code(run)
    report = result["trace"].report
    assert report.matches("qk_norm_rope") == 1 and report.matches("inline_triton") == 1, report
    code = "\n".join(codes)
    assert "torch.ops.diffopt.qk_norm_rope" not in code and "_qk_norm_rope_kernel" in code
    for got, want in zip(outputs, eager):
        assert got.stride() == want.stride()
        torch.testing.assert_close(got, want, atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)


@pytest.mark.gpu
@needs_cuda
def test_under_cuda_graphs():
    args = inputs("cuda", torch.bfloat16)
    eager = front(*args)
    compiled = torch.compile(front, backend="diffopt", mode="reduce-overhead")
    for _ in range(3):
        outputs = [o.clone() for o in compiled(*args)]
    for got, want in zip(outputs, eager):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)
