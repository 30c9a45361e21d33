"""dedupe: a pure op applied twice to the same inputs is computed once; random and mutating ops never."""
import pytest
import torch

from diffopt.testing import check_passes, count_ops, only, trace


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


@torch.no_grad()
def test_the_same_rotation_twice_is_computed_once():
    # diffusers Cosmos3 rotates k_und and its alias k_und_for_gen with the same tables.
    def twice(k, cos, sin):
        a = k * cos + rotate_half(k) * sin
        b = k * cos + rotate_half(k) * sin
        return a.sum(-1), b.amax(-1)

    k, cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    result = trace(twice, k, cos, sin)
    before, after = count_ops(result.before("dedupe")), count_ops(result.after("dedupe"))
    assert before["aten.cat.default"] == 2 and after["aten.cat.default"] == 1
    assert after["aten.mul.Tensor"] == before["aten.mul.Tensor"] // 2
    for got, want in zip(result.output, twice(k, cos, sin)):
        assert torch.equal(got, want)


@torch.no_grad()
def test_random_ops_and_different_constants_are_kept():
    def draws(x):
        return x + torch.rand_like(x), x + torch.rand_like(x), x * 2.0, x * 3.0

    x = torch.randn(4, 4)
    result = trace(draws, x)
    after = count_ops(result.after("dedupe"))
    assert result.report.matches("dedupe") == 0
    assert after["aten.mul.Tensor"] == 2
    a, b, _, _ = result.output
    assert not torch.equal(a, b)


def signed_zeros(x):
    # equal as Python floats, different as constants: the sign of a zero decides an infinity's
    return (1 / (x * 0.0), 1 / (x * -0.0), torch.where(x > 0, x, 0.0), torch.where(x > 0, x, -0.0),
            x.clamp(max=0.0), x.clamp(max=-0.0), x.new_full((3,), 0.0), x.new_full((3,), -0.0))


@torch.no_grad()
@pytest.mark.parametrize("inductor", [False, True], ids=["aten", "inductor"])
def test_constants_that_differ_only_in_a_zeros_sign_are_kept(inductor):
    x = torch.randn(3, generator=torch.Generator().manual_seed(1))
    x[1] = -x[1].abs()
    result = trace(signed_zeros, x, options=only("dedupe", inductor=inductor))
    before, after = count_ops(result.before("dedupe")), count_ops(result.after("dedupe"))
    assert before["aten.gt.Scalar"] == 2 and after["aten.gt.Scalar"] == 1  # the one real duplicate: x > 0
    assert result.report.matches("dedupe") == 1
    for got, want in zip(result.output, signed_zeros(x)):
        assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))


@torch.no_grad()
@pytest.mark.parametrize("inductor", [False, True], ids=["aten", "inductor"])
def test_complex_constants_that_differ_only_in_a_zeros_sign_are_kept(inductor):
    # against the same compile without the pass (torch's own tracing rounds some complex zeros' signs)
    def products(z):
        return (z * complex(0.0, 0.0)).imag.signbit(), (z * complex(0.0, -0.0)).imag.signbit()

    z = torch.randn(6, dtype=torch.complex64, generator=torch.Generator().manual_seed(2))
    result = check_passes(products, z, passes=["dedupe"], inductor=inductor)
    assert result.report.matches("dedupe") == 0
    assert not torch.equal(*result.output)  # the two signs differ somewhere, so a merge would show


@torch.no_grad()
def test_allocations_are_not_shared():
    # diffusers Wan's RoPE writes into torch.empty_like(x) in every block: one shared empty would keep a
    # buffer alive from the first block to the last. Allocations are never merged.
    def rope_like(q, k):
        out_q = torch.empty_like(q)
        out_q[..., 0::2] = q[..., 0::2] * 2
        out_q[..., 1::2] = q[..., 1::2] * 3
        out_k = torch.empty_like(k)
        out_k[..., 0::2] = k[..., 0::2] * 2
        out_k[..., 1::2] = k[..., 1::2] * 3
        return out_q, out_k

    q, k = torch.randn(4, 6), torch.randn(4, 6)
    result = trace(rope_like, q, k)
    before, after = count_ops(result.before("dedupe")), count_ops(result.after("dedupe"))
    empties = [name for name in before if name.startswith("aten.empty")]
    assert empties and all(after[name] == before[name] == 2 for name in empties), (before, after)
    for got, want in zip(result.output, rope_like(q, k)):
        assert torch.equal(got, want)
