"""split_contiguous: fires on the stock forms, not on near-misses, and never changes results."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from diffopt.testing import count_ops, trace

CLONE = "aten.clone.default"


@torch.library.custom_op("diffopt_test::opaque_sum", mutates_args=())
def opaque_sum(x: torch.Tensor) -> torch.Tensor:
    # An op the pass knows nothing about: it may depend on memory layout.
    return x.contiguous().sum(dim=-1)


@opaque_sum.register_fake
def _(x):
    return x.new_empty(x.shape[:-1])


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) + 0.1).to(dtype)


def clones(result, when):
    graph = result.before("split_contiguous") if when == "before" else result.after("split_contiguous")
    return count_ops(graph)[CLONE]


def per_head_norm(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, 1e-6)


# --- stock forms ------------------------------------------------------------------


def packed_gqa(x, w, nw, heads, kv_heads, head_dim):
    B, S, _ = x.shape
    q, k, v = F.linear(x, w).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.contiguous().view(B, S, heads, head_dim)
    k = k.contiguous().view(B, S, kv_heads, head_dim)
    v = v.contiguous().view(B, S, kv_heads, head_dim)
    q, k = per_head_norm(q, nw), per_head_norm(k, nw)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)
    return out.transpose(1, 2).flatten(2) * 2


def chunked_mha(x, w):
    B, S, _ = x.shape
    q, k, v = F.linear(x, w).chunk(3, dim=-1)
    q, k, v = (t.contiguous().unflatten(-1, (4, -1)) for t in (q, k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).sum(1)


def view_then_contiguous(x, w):
    B, S, _ = x.shape
    q, k = F.linear(x, w).split([32, 32], dim=-1)
    q = q.view(B, S, 4, 8).contiguous()
    k = k.view(B, S, 4, 8).contiguous()
    return (q * k).sum(-1)


def contiguous_before_sdpa(q, k, v):
    return F.scaled_dot_product_attention(
        q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    ).sum(1)


@torch.no_grad()
def test_fires_on_packed_gqa_projection():
    x, w, nw = rand(2, 10, 48), rand(128, 48) / 7, rand(8, seed=1)
    result = trace(packed_gqa, x, w, nw, 8, 4, 8)
    assert (clones(result, "before"), clones(result, "after")) == (3, 0)
    assert result.report.matches("split_contiguous") == 3
    assert count_ops(result.after("split_contiguous"))["aten.split_with_sizes.default"] == 1
    torch.testing.assert_close(result.output, packed_gqa(x, w, nw, 8, 4, 8), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_fires_on_chunk_and_unflatten():
    x, w = rand(2, 7, 16), rand(96, 16)
    result = trace(chunked_mha, x, w)
    assert (clones(result, "before"), clones(result, "after")) == (3, 0)
    torch.testing.assert_close(result.output, chunked_mha(x, w), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_fires_when_the_view_comes_first():
    x, w = rand(3, 5, 16), rand(64, 16)
    result = trace(view_then_contiguous, x, w)
    assert (clones(result, "before"), clones(result, "after")) == (2, 0)
    assert torch.equal(result.output, view_then_contiguous(x, w))


@torch.no_grad()
def test_fires_on_contiguous_before_a_strided_consumer():
    q, k, v = rand(2, 9, 4, 8), rand(2, 9, 4, 8, seed=1), rand(2, 9, 4, 8, seed=2)
    result = trace(contiguous_before_sdpa, q, k, v)
    assert (clones(result, "before"), clones(result, "after")) == (3, 0)
    torch.testing.assert_close(result.output, contiguous_before_sdpa(q, k, v), rtol=1e-6, atol=1e-6)


# --- near-misses ------------------------------------------------------------------


@torch.no_grad()
def test_not_when_the_layout_does_not_allow_the_view():
    # The packed tensor is sequence-major ([S, B, N] transposed to [B, S, N]); merging
    # B and S into one dim is a view of the copy but not of the strided piece.
    def merge_batch_and_seq(x_sbn):
        x = x_sbn.transpose(0, 1)
        B, S, _ = x.shape
        q, k = x.split([16, 16], dim=-1)
        return q.contiguous().view(B * S, 2, 8).sin(), k.contiguous().view(B * S, 2, 8).cos()

    x = rand(5, 3, 32)
    result = trace(merge_batch_and_seq, x)
    assert (clones(result, "before"), clones(result, "after")) == (2, 2)
    assert result.report.matches("split_contiguous") == 0
    for got, want in zip(result.output, merge_batch_and_seq(x)):
        assert torch.equal(got, want)


@torch.no_grad()
def test_not_when_the_split_is_not_whole_heads():
    # 33 fp32 elements = 132 bytes: k and v would start off 16-byte alignment.
    def odd_split(x):
        B, S, _ = x.shape
        q, k, v = x.split([33, 33, 33], dim=-1)
        return [t.contiguous().view(B, S, 3, 11).exp() for t in (q, k, v)]

    x = rand(2, 4, 99)
    result = trace(odd_split, x)
    assert (clones(result, "before"), clones(result, "after")) == (3, 2)  # only q (offset 0) is dropped
    for got, want in zip(result.output, odd_split(x)):
        assert torch.equal(got, want)


@torch.no_grad()
def test_not_when_a_consumer_needs_the_copy():
    def to_output_and_opaque(x):
        B, S, _ = x.shape
        q, k = x.split([16, 16], dim=-1)
        q = q.contiguous().view(B, S, 2, 8)  # returned: the caller sees its strides
        k = k.contiguous().view(B, S, 2, 8)  # fed to an op that may depend on layout
        return q, opaque_sum(k)

    x = rand(2, 3, 32)
    result = trace(to_output_and_opaque, x)
    assert (clones(result, "before"), clones(result, "after")) == (2, 2)
    got, want = result.output, to_output_and_opaque(x)
    assert got[0].is_contiguous() and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def returned_after_an_input_update(x):
    y = x.t().contiguous().t().reshape(-1)  # the copy's view has x's own layout again
    x.add_(1)  # y keeps x's values from before
    return y


def two_outputs(x):
    y = x * 2
    return y[0], y.t().contiguous().t().reshape(-1)  # two tensors: writing one leaves the other


@torch.no_grad()
@pytest.mark.parametrize("inductor", [True, False], ids=["inductor", "aten"])
@settings(max_examples=8, deadline=None)
@given(rows=st.integers(2, 7), cols=st.integers(2, 7), seed=st.integers(0, 2**16))
def test_not_when_a_view_of_the_copy_escapes(inductor, rows, cols, seed):
    # without the copy its views are the source's memory (found by a fuzzing helper): kept
    x = rand(rows, cols, seed=seed)
    want = returned_after_an_input_update(x.clone())
    result = trace(returned_after_an_input_update, x, options={"inductor": inductor})
    # reshape(-1) of the transposed copy copies again: the first copy may go, not the one y views
    assert clones(result, "after") == clones(result, "before") - 1 >= 1
    assert torch.equal(result.output, want) and result.output.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()

    result = trace(two_outputs, x, options={"inductor": inductor})
    assert clones(result, "after") == clones(result, "before") - 1 >= 1
    first, second = result.output
    assert torch.equal(first, two_outputs(x)[0]) and torch.equal(second, two_outputs(x)[1])
    expected_first = first.clone()
    second.add_(100)
    assert torch.equal(first, expected_first)


def test_not_when_training_saves_the_copy():
    x, w, nw = rand(2, 6, 24), rand(64, 24).requires_grad_(), rand(8, seed=1)
    result = trace(packed_gqa, x, w, nw, 4, 2, 8)
    # The forward graph returns the copies (saved for backward): they stay.
    assert result.report.matches("split_contiguous") == 0
    result.output.sum().backward()
    expected_w = w.grad.clone()
    w.grad = None
    packed_gqa(x, w, nw, 4, 2, 8).sum().backward()
    torch.testing.assert_close(expected_w, w.grad)


# --- numerics over random shapes --------------------------------------------------


@torch.no_grad()
@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 17),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([8, 16, 32]),  # whole heads of >= 16 bytes keep alignment
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_eager(batch, seq, kv_heads, group, head_dim, dtype, seed):
    heads = kv_heads * group
    hidden = 24
    x = rand(batch, seq, hidden, dtype=dtype, seed=seed)
    w = (rand((heads + 2 * kv_heads) * head_dim, hidden, seed=seed + 1) / 5).to(dtype)
    nw = rand(head_dim, seed=seed + 2).to(dtype)
    result = trace(packed_gqa, x, w, nw, heads, kv_heads, head_dim)
    # (With batch = seq = 1 the pieces are already contiguous and there is no copy at all.)
    assert clones(result, "after") == 0
    want = packed_gqa(x.double(), w.double(), nw.double(), heads, kv_heads, head_dim)
    stock = packed_gqa(x, w, nw, heads, kv_heads, head_dim)
    # No worse than the stock code in the same dtype (both against float64).
    err = (result.output.double() - want).abs().max().item()
    stock_err = (stock.double() - want).abs().max().item()
    assert err <= stock_err * 1.5 + (1e-6 if dtype == torch.float32 else 1e-2)


@torch.no_grad()
def test_not_when_a_reshape_would_copy_instead():
    # Inductor turns view into reshape; a reshape of the permuted tensor copies, so
    # dropping the contiguous() copy would only move it (diffusers' Wan unpatchify).
    def unpatchify(x):
        return x.permute(0, 2, 1, 3).contiguous().flatten(1, 2).sin()

    x = rand(2, 3, 4, 5)
    result = trace(unpatchify, x, options={"inductor": True})
    assert result.report.matches("split_contiguous") == 0
    assert count_ops(result.after("split_contiguous"))[CLONE] == 1
    torch.testing.assert_close(result.output, unpatchify(x))


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    seed=st.integers(0, 10_000),
)
def test_viewability_rule_agrees_with_eager(sizes, seed):
    # The pass decides views with ATen's rule, not with fake tensors (which accept some views
    # eager rejects, e.g. [2, 1, 4] with strides (5, 5, 1) as [8]).
    from diffopt.fxpasses.fx_utils import viewable

    g = torch.Generator().manual_seed(seed)
    t = torch.empty(sizes).permute(*torch.randperm(len(sizes), generator=g).tolist())
    t = t[tuple(slice(0, int(torch.randint(1, n + 1, (1,), generator=g))) for n in t.shape)]
    n = t.numel()
    for shape in ([n], [1, n], list(t.shape[::-1]), [t.shape[0], n // t.shape[0]]):
        try:
            t.view(shape)
            eager = True
        except RuntimeError:
            eager = False
        assert viewable(t, torch.empty(shape)) == eager, (t.shape, t.stride(), shape)


def test_as_strided_consumer_keeps_the_copy(inductor):
    # F.rms_norm of a transposed tensor ends in a contiguous copy; as_strided reads that copy's memory
    # order, so the copy must stay (found by the front-end generator, issue 13).
    def fn(x, w):
        y = torch.nn.functional.rms_norm(x.transpose(1, 2), (x.shape[-1],), w, 1e-6)
        return y.as_strided((2, 3 * 6 * 8), (3 * 6 * 8, 1)) * 2

    x, w = torch.randn(2, 6, 3, 8), torch.randn(8)
    result = trace(fn, x, w, options={"inductor": inductor})
    torch.testing.assert_close(result.output, fn(x, w))
