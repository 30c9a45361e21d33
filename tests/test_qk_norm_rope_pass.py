"""qk_norm_rope pass: fires on the ways QK-norm + RoPE is written, not on near-misses, holds numerics."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from diffopt.testing import ON_CPU, count_ops, trace

FUSED = "diffopt.qk_norm_rope.default"
# The pass fires on CUDA by default; these CPU tests turn it on for CPU tensors too.


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) + 0.05).to(dtype)


# --- norms, written the common ways -------------------------------------------------


def norm_functional(x, w, eps):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def norm_upcast(x, w, eps):
    # diffusers' RMSNorm: statistics in fp32, cast back before the weight.
    var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(var + eps)
    return x.to(w.dtype) * w


def norm_plain(x, w, eps):
    # hand-written, no upcast, square as a product
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def norm_nemotron(x, w, eps):
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (w.float() * x).to(dtype)


NORMS = [norm_functional, norm_upcast, norm_plain, norm_nemotron]

# --- rotations, written the common ways --------------------------------------------


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_neox(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def rope_wan(x, fcos, fsin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = fcos[..., 0::2], fsin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def rope_stack(x, cos, sin):
    # Flux-like interleaved pairs through stack, per-pair tables
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


def rope_complex(x, freqs):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(-2).type_as(x)


def partial(rope, rope_dim):
    def rotate_prefix(x, *tables):
        return torch.cat([rope(x[..., :rope_dim], *tables), x[..., rope_dim:]], dim=-1)

    return rotate_prefix


# --- models made of them ------------------------------------------------------------


def per_head(norm, rope, eps_q=1e-6, eps_k=1e-6):
    def attention_front(q, k, wq, wk, *tables):
        return rope(norm(q, wq, eps_q), *tables), rope(norm(k, wk, eps_k), *tables)

    return attention_front


def across_heads(norm, rope, heads, kv_heads):
    def attention_front(q, k, wq, wk, *tables):
        q = norm(q, wq, 1e-6).unflatten(2, (heads, -1))
        k = norm(k, wk, 1e-6).unflatten(2, (kv_heads, -1))
        return rope(q, *tables), rope(k, *tables)

    return attention_front


def inputs(B, S, H, Hk, D, tables, dtype=torch.float32, hidden=False, seed=0):
    q = rand(B, S, H * D if hidden else H, *(() if hidden else (D,)), dtype=dtype, seed=seed)
    k = rand(B, S, Hk * D if hidden else Hk, *(() if hidden else (D,)), dtype=dtype, seed=seed + 1)
    wq = rand(H * D if hidden else D, dtype=dtype, seed=seed + 2)
    wk = rand(Hk * D if hidden else D, dtype=dtype, seed=seed + 3)
    return (q, k, wq, wk, *tables)


def neox_tables(B, S, L, dtype=torch.float32, seed=9):
    angle = rand(B, S, 1, L, seed=seed) * 3
    return angle.cos().to(dtype), angle.sin().to(dtype)


def wan_tables(S, D, seed=9):
    angle = (rand(1, S, 1, D // 2, seed=seed) * 3).repeat_interleave(2, -1)
    return angle.cos(), angle.sin()


def check(fn, args, fires=1, rtol=1e-5, atol=1e-5, options=ON_CPU):
    with torch.no_grad():
        result = trace(fn, *args, options=options)
        want = fn(*args)
    assert result.report.matches("qk_norm_rope") == fires
    after = count_ops(result.after("qk_norm_rope"))
    assert after[FUSED] == fires
    if fires:
        assert after["aten.rsqrt.default"] == 0, "the norms are gone"
    for got, ref in zip(result.output, want):
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    return result


# --- fires on the stock forms -------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS, ids=lambda f: f.__name__)
def test_per_head_norm_neox_gqa(norm):
    check(per_head(norm, rope_neox), inputs(2, 7, 4, 2, 16, neox_tables(2, 7, 16)))


@pytest.mark.parametrize("norm", [norm_functional, norm_upcast], ids=lambda f: f.__name__)
def test_across_heads_norm_wan_interleaved(norm):
    check(across_heads(norm, rope_wan, 3, 3), inputs(1, 6, 3, 3, 8, wan_tables(6, 8), hidden=True))


def test_stack_interleaved_and_complex():
    cos, sin = neox_tables(1, 5, 4)
    check(per_head(norm_plain, rope_stack), inputs(1, 5, 2, 2, 8, (cos, sin)))
    freqs = torch.polar(torch.ones(1, 5, 1, 4), rand(1, 5, 1, 4, seed=4))
    check(per_head(norm_upcast, rope_complex), inputs(1, 5, 2, 2, 8, (freqs,)))


def test_partial_rotary():
    result = check(per_head(norm_functional, partial(rope_neox, 8)), inputs(2, 3, 2, 1, 16, neox_tables(2, 3, 8)))
    [fused] = [n for n in result.after("qk_norm_rope").nodes if n.op == "call_function" and "qk_norm_rope" in str(n.target)]
    assert fused.kwargs["rope_dim"] == 8 and fused.kwargs["rope_style"] == "neox"


def test_three_dim_tokens_and_bf16_tables():
    # diffusers Cosmos3: unbatched [tokens, H, D], tables [tokens, 1, D] in bf16
    cos, sin = (t[0] for t in neox_tables(1, 9, 16, torch.bfloat16))
    args = (rand(9, 4, 16, dtype=torch.bfloat16), rand(9, 1, 16, dtype=torch.bfloat16, seed=1),
            rand(16, dtype=torch.bfloat16, seed=2), rand(16, dtype=torch.bfloat16, seed=3), cos, sin)
    check(per_head(norm_upcast, rope_neox), args, rtol=2e-2, atol=2e-2)


def test_each_eps_is_kept():
    result = check(per_head(norm_functional, rope_neox, eps_q=1e-6, eps_k=0.25), inputs(1, 4, 2, 2, 8, neox_tables(1, 4, 8)))
    [fused] = [n for n in result.after("qk_norm_rope").nodes if "qk_norm_rope" in str(n.target)]
    assert fused.kwargs["q_eps"] == pytest.approx(1e-6) and fused.kwargs["k_eps"] == pytest.approx(0.25)


# --- near-misses ----------------------------------------------------------------------


def test_not_a_norm_over_the_sequence():
    def seq_norm(x, w, eps):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps) * w

    check(per_head(seq_norm, rope_neox), inputs(1, 4, 2, 2, 8, neox_tables(1, 4, 8)), fires=0)


def test_not_without_eps():
    def no_eps(x, w, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * w

    check(per_head(no_eps, rope_neox), inputs(1, 4, 2, 2, 8, neox_tables(1, 4, 8)), fires=0)


def test_not_with_tables_that_vary_per_head_or_have_the_wrong_length():
    per_head_tables = neox_tables(1, 4, 8)
    per_head_tables = tuple(t.expand(1, 4, 2, 8).contiguous() * rand(1, 1, 2, 1) for t in per_head_tables)
    check(per_head(norm_functional, rope_neox), inputs(1, 4, 2, 2, 8, per_head_tables), fires=0)
    one_wide = tuple(t[..., :1] for t in neox_tables(1, 4, 8))
    check(per_head(norm_functional, rope_neox), inputs(1, 4, 2, 2, 8, one_wide), fires=0)


def test_not_when_the_normed_q_is_also_used_elsewhere():
    def leaky(q, k, wq, wk, cos, sin):
        qn = norm_functional(q, wq, 1e-6)
        return rope_neox(qn, cos, sin), rope_neox(norm_functional(k, wk, 1e-6), cos, sin), qn.sum()

    check(leaky, inputs(1, 4, 2, 2, 8, neox_tables(1, 4, 8)), fires=0)


def test_not_when_it_is_not_a_rotation():
    def wrong_sign(x, cos, sin):
        return x * cos - rotate_half(x) * sin

    def same_table_twice(x, cos, sin):
        return x * cos + rotate_half(x) * cos

    for rope in (wrong_sign, same_table_twice):
        check(per_head(norm_functional, rope), inputs(1, 4, 2, 2, 8, neox_tables(1, 4, 8)), fires=0)


def test_not_when_q_and_k_use_different_tables():
    def two_tables(q, k, wq, wk, cq, sq, ck, sk):
        return rope_neox(norm_functional(q, wq, 1e-6), cq, sq), rope_neox(norm_functional(k, wk, 1e-6), ck, sk)

    check(two_tables, inputs(1, 4, 2, 2, 8, neox_tables(1, 4, 8) + neox_tables(1, 4, 8, seed=3)), fires=0)


def test_not_when_the_tables_differ_in_a_zeros_sign():
    # the same ops on the same inputs, but 0.0 and -0.0 (equal as Python floats) as the masked value:
    # k's sin table holds -0 where q's holds +0, and rotated k's zeros take that sign
    def masked_tables(q, k, wq, wk, cos, sin, mask):
        cos = torch.where(mask, cos, 0.0)
        q = rope_neox(norm_functional(q, wq, 1e-6), cos, torch.where(mask, sin, 0.0))
        return q, rope_neox(norm_functional(k, wk, 1e-6), cos, torch.where(mask, sin, -0.0))

    mask = rand(1, 4, 1, 8, seed=5) > 0.3
    args = inputs(1, 4, 2, 2, 8, neox_tables(1, 4, 8) + (mask,))
    check(masked_tables, args, fires=0)
    # the pass's own comparison of the tables, with dedupe (which compares constants the same way) off
    check(masked_tables, args, fires=0, options={"passes": {**ON_CPU["passes"], "dedupe": False}})


# --- numerics over random shapes, against float64 -------------------------------------

FORMS = {
    "cosmos3": lambda H, Hk: per_head(norm_functional, rope_neox),
    "wan": lambda H, Hk: across_heads(norm_functional, rope_wan, H, Hk),
    "complex": lambda H, Hk: per_head(norm_upcast, rope_complex),
}


@settings(max_examples=15, deadline=None)
@given(
    form=st.sampled_from(sorted(FORMS)),
    B=st.integers(1, 2),
    S=st.integers(1, 13),
    Hk=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4, 5, 8]),
    D=st.sampled_from([8, 16, 32]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 1000),
)
def test_random_shapes_error_no_worse_than_stock(form, B, S, Hk, group, D, dtype, seed):
    H = Hk * group
    if form == "wan":
        Hk = H  # Wan's across-heads norm has as many K heads as Q heads
        args = inputs(B, S, H, Hk, D, wan_tables(S, D, seed), dtype=dtype, hidden=True, seed=seed)
    elif form == "complex":
        freqs = torch.polar(torch.ones(1, S, 1, D // 2), rand(1, S, 1, D // 2, seed=seed) * 3)
        args = inputs(B, S, H, Hk, D, (freqs,), dtype=dtype, seed=seed)
    else:
        args = inputs(B, S, H, Hk, D, neox_tables(B, S, D, dtype, seed), dtype=dtype, seed=seed)
    fn = FORMS[form](H, Hk)
    with torch.no_grad():
        result = trace(fn, *args, options=ON_CPU)
        stock = fn(*args)
        exact = fn(*[a.to(torch.complex128 if a.is_complex() else torch.float64) for a in args])
    assert result.report.matches("qk_norm_rope") == 1
    for got, eager, ref in zip(result.output, stock, exact):
        ours = (got.double() - ref).abs().max().item()
        theirs = (eager.double() - ref).abs().max().item()
        assert ours <= theirs * 1.25 + (1e-5 if dtype == torch.float32 else 1e-3), (ours, theirs)


def test_not_when_a_norm_intermediate_is_used_elsewhere():
    # The rsqrt factor also leaves the graph: fusing would keep the norm's reduction anyway.
    def exposes_scale(q, k, wq, wk, cos, sin):
        scale = torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
        qn = q * scale * wq
        return rope_neox(qn, cos, sin), rope_neox(norm_functional(k, wk, 1e-6), cos, sin), scale

    check(exposes_scale, inputs(1, 4, 2, 2, 8, neox_tables(1, 4, 8)), fires=0)


@pytest.mark.parametrize("form", ["cosmos3", "wan"])
def test_fires_with_a_dynamic_sequence_length(form):
    # A pipeline that changes resolution: batch and tokens are symbolic, heads and channels not.
    import functools

    import diffopt

    report = diffopt.Report()
    fn = FORMS[form](4, 4)
    compiled = torch.compile(fn, backend=functools.partial(diffopt.diffopt_backend, options={"inductor": False, "strict": True, **ON_CPU}))
    with diffopt.report.collecting(report), torch.no_grad():
        for S in (5, 9, 12):
            if form == "wan":
                args = inputs(2, S, 4, 4, 8, wan_tables(S, 8), hidden=True, seed=S)
            else:
                args = inputs(2, S, 4, 4, 8, neox_tables(2, S, 8), seed=S)
            for t in args[:2] + args[4:]:
                torch._dynamo.mark_dynamic(t, 1)
            for got, want in zip(compiled(*args), fn(*args)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(report.graphs) == 1, "one graph serves every sequence length"
    assert report.matches("qk_norm_rope") == 1


def test_not_on_cpu_by_default():
    # On CPU the op would run its reference, slower than Inductor's own fused code.
    with torch.no_grad():
        result = trace(per_head(norm_functional, rope_neox), *inputs(1, 4, 2, 2, 8, neox_tables(1, 4, 8)))
    assert result.report.matches("qk_norm_rope") == 0
