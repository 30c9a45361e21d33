"""qk_norm_rope with gradients: the op's backward against float64 autograd, and the pass in training compiles
(it rewrites the forward ATen graph before AOT autograd; the backward graph gets the op's backward)."""
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffopt.kernels  # noqa: F401  registers torch.ops.diffopt.qk_norm_rope
from diffopt.kernels.reference import apply_rope
from diffopt.testing import count_ops, tiny_cosmos3, tiny_diffusers_wan, tiny_wan, trace

sys.path.insert(0, str(Path(__file__).parent))
from test_qk_norm_rope_pass import (  # noqa: E402
    ON_CPU, across_heads, inputs, neox_tables, norm_functional, norm_upcast, per_head, rand, rope_neox, rope_wan,
    wan_tables,
)

FUSED = "diffopt.qk_norm_rope.default"
# training graphs are fused (the pass's option "training", on by default), here on CPU too
TRAIN = {"passes": {"qk_norm_rope": {**ON_CPU["passes"]["qk_norm_rope"], "training": True}}}
TRAIN_CUDA = {"passes": {"qk_norm_rope": {"training": True}}}
BF16, F32 = torch.bfloat16, torch.float32


def norm_rope_float64(q, k, q_weight, k_weight, cos, sin, positions, *, norm_over, rope_style, rope_dim, q_eps,
                      k_eps, out_dtype=None):
    """The op's math (``qk_norm_rope_reference``) in float64, differentiable: the exact gradients."""
    S = q.shape[1]
    c, s = cos.double(), sin.double()
    if positions is not None:
        pos = positions.long().reshape(-1, S)
        c, s = c[pos].unsqueeze(2), s[pos].unsqueeze(2)
    outs = []
    for x, w, eps in ((q, q_weight, q_eps), (k, k_weight, k_eps)):
        H, D = x.shape[-2:]
        dims = (-1,) if norm_over == "head" else (-2, -1)
        xf = x.double()  # one cast: its backward rounds the whole gradient once to x's dtype
        xf = xf * torch.rsqrt(xf.square().mean(dims, keepdim=True) + eps)
        if w is not None:
            xf = xf * w.double().view(-1 if norm_over == "head" else H, D)
        outs.append(apply_rope(xf, c, s, rope_style, rope_dim if rope_dim != -1 else D))
    return outs


def assert_grads_close(got, want, dtype):
    """Each gradient within its dtype's rounding (plus fp32 sums) of the exact one (autograd rounds the float64
    gradient once to the leaf's dtype)."""
    rtol = {F32: 1e-5, BF16: 2**-7, torch.float16: 2**-10}[dtype]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=1e-5 * w.abs().max().item())


# --- the op's backward --------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    norm_over=st.sampled_from(["head", "hidden"]),
    rope_style=st.sampled_from(["neox", "interleaved"]),
    per_channel=st.booleans(),
    partial=st.booleans(),
    cache=st.booleans(),
    weights=st.booleans(),
    heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
    dtypes=st.sampled_from([(F32, None), (BF16, None), (F32, BF16), (BF16, F32)]),
    seed=st.integers(0, 2**16),
)
def test_backward_matches_float64_autograd(norm_over, rope_style, per_channel, partial, cache, weights, heads,
                                           dtypes, seed):
    dtype, out_dtype = dtypes
    (Hq, Hk), B, S, D = heads, 2, 5, 8
    rope_dim = 6 if partial else -1
    L = (rope_dim if partial else D) // (1 if per_channel else 2)
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, table=False):
        return torch.randn(*shape, generator=g).to(F32 if table else dtype).requires_grad_()

    q, k = leaf(B, S, Hq, D), leaf(B, S, Hk, D)
    qw = leaf(D if norm_over == "head" else Hq * D) if weights else None
    kw = leaf(D if norm_over == "head" else Hk * D) if weights else None
    if cache:
        cos, sin, positions = leaf(7, L, table=True), leaf(7, L, table=True), torch.randint(0, 7, (S,), generator=g)
    else:
        cos, sin, positions = leaf(1, S, 1, L, table=True), leaf(1, S, 1, L, table=True), None
    options = dict(norm_over=norm_over, rope_style=rope_style, rope_dim=rope_dim, q_eps=1e-6, k_eps=0.1)
    outs = torch.ops.diffopt.qk_norm_rope(q, k, qw, kw, cos, sin, positions, **options, out_dtype=out_dtype)
    grad_outs = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    leaves = [t for t in (q, k, qw, kw, cos, sin) if t is not None]
    got = torch.autograd.grad(outs, leaves, grad_outs)
    exact = torch.autograd.grad(norm_rope_float64(q, k, qw, kw, cos, sin, positions, **options), leaves,
                                [go.double() for go in grad_outs])
    assert_grads_close(got[:-2], exact[:-2], dtype)
    assert_grads_close(got[-2:], exact[-2:], F32)
    assert all(a.dtype == t.dtype and a.shape == t.shape for a, t in zip(got, leaves))


def test_backward_with_one_input_requiring_grad():
    q, k, w, _, cos, sin = inputs(1, 4, 2, 2, 8, neox_tables(1, 4, 8))
    q.requires_grad_()
    options = dict(norm_over="head", rope_style="neox", rope_dim=-1, q_eps=1e-6, k_eps=1e-6)
    outs = torch.ops.diffopt.qk_norm_rope(q, k, w, w, cos, sin, **options)
    (got,) = torch.autograd.grad(sum(o.square().sum() for o in outs), [q])
    (want,) = torch.autograd.grad(sum(o.square().sum() for o in norm_rope_float64(q, k, w, w, cos, sin, None, **options)), [q])
    assert_grads_close([got], [want], F32)


# --- the pass in training compiles ---------------------------------------------------------------------------


def wan_like():
    return across_heads(norm_upcast, rope_wan, 3, 3), inputs(1, 6, 3, 3, 8, wan_tables(6, 8), hidden=True)


def cosmos3_like(dtype=F32):
    # per-head norm, half-split RoPE, GQA, unbatched [tokens, H, D], bf16 tables
    cos, sin = (t[0] for t in neox_tables(1, 9, 16, BF16))
    args = (rand(9, 4, 16, dtype=dtype), rand(9, 2, 16, dtype=dtype, seed=1), rand(16, dtype=dtype, seed=2),
            rand(16, dtype=dtype, seed=3), cos, sin)
    return per_head(norm_upcast, rope_neox), args


def gqa_functional():
    return per_head(norm_functional, rope_neox), inputs(2, 7, 4, 2, 16, neox_tables(2, 7, 16))


def train_step(fn, args, options, dtype, differentiable=4):
    """The compiled call and its gradients, eager's gradients, for the first ``differentiable`` args (q, k and
    the norm weights; floating args in ``dtype``)."""
    args = [a.to(dtype) if a.is_floating_point() else a for a in args]
    leaves = [a.detach().requires_grad_() if i < differentiable else a for i, a in enumerate(args)]
    result = trace(fn, *leaves, options=options)
    grad_outs = [rand(*o.shape, seed=7 + i).to(o.device, o.dtype) for i, o in enumerate(result.output)]
    got = torch.autograd.grad(result.output, leaves[:differentiable], grad_outs)
    want = torch.autograd.grad(fn(*leaves), leaves[:differentiable], grad_outs)
    return result, got, want


def fused_before_autograd(result):
    """Op counts of the forward ATen graph after the pass (the before-autograd run)."""
    [run] = [r for r in result.report.runs if r.pass_name == "qk_norm_rope" and r.stage == "before_autograd"]
    return run, count_ops(result.after("qk_norm_rope", 0))


def tolerance(dtype, grads):
    scale = max(g.abs().max().item() for g in grads)
    return dict(rtol=1e-5, atol=1e-5 * scale) if dtype == F32 else dict(rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("inductor", [False, True], ids=["aten", "inductor"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", [wan_like, cosmos3_like, gqa_functional], ids=lambda f: f.__name__)
def test_fires_in_training_and_gradients_match_eager(form, dtype, inductor):
    if inductor and dtype == BF16 and form is gqa_functional:
        pytest.skip("covered by the other forms (keeps the CPU suite short)")
    fn, args = form()
    result, got, want = train_step(fn, args, {**TRAIN, "inductor": inductor}, dtype)
    run, after = fused_before_autograd(result)
    assert run.matches == 1 and after[FUSED] == 1 and after["aten.rsqrt.default"] == 0
    # the post-grad forward graph calls the op (AOT autograd kept it), with no stock norm left (so the
    # post-grad qk_norm_rope finds nothing to do there: not applicable, no rsqrt)
    post = result.after("fold_gathers", 0)
    assert count_ops(post)[FUSED] == 1 and count_ops(post)["aten.rsqrt.default"] == 0
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tolerance(dtype, want))


def test_near_miss_still_declines_in_training():
    def seq_norm(x, w, eps):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps) * w

    result, got, want = train_step(per_head(seq_norm, rope_neox), inputs(1, 4, 2, 2, 8, neox_tables(1, 4, 8)),
                                   TRAIN, F32)
    assert result.report.matches("qk_norm_rope") == 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_training_graphs_are_fused_by_default_and_not_with_the_option_off():
    fn, args = gqa_functional()
    result, got, want = train_step(fn, args, ON_CPU, F32)  # the option "training" left at its default
    assert result.report.matches("qk_norm_rope") == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    off = {"passes": {"qk_norm_rope": {**ON_CPU["passes"]["qk_norm_rope"], "training": False}}}
    result, got, want = train_step(fn, args, off, F32)
    assert result.report.matches("qk_norm_rope") == 0
    assert all(run.stage != "before_autograd" for run in result.report.runs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_inference_compile_is_unchanged():
    fn, args = gqa_functional()
    with torch.no_grad():
        result = trace(fn, *args, options=TRAIN)
    assert result.report.matches("qk_norm_rope") == 1
    assert all(run.stage != "before_autograd" for run in result.report.runs)


def _note(result):
    return [r.note for r in result.report.runs if r.pass_name == "qk_norm_rope" and r.stage == "before_autograd"]


def test_declines_a_graph_that_switches_grad_mode():
    front = per_head(norm_functional, rope_neox)

    def fn(q, k, wq, wk, cos, sin):
        with torch.no_grad():
            scale = q.abs().amax()  # no gradient flows through the scale: a trace would lose that
        out_q, out_k = front(q / scale, k, wq, wk, cos, sin)
        return out_q, out_k

    result, got, want = train_step(fn, gqa_functional()[1], TRAIN, F32)
    assert result.report.matches("qk_norm_rope") == 0
    assert _note(result) == ["not run: the graph switches autograd state (_set_grad_enabled)"]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_declines_a_graph_that_mutates_an_input():
    front = per_head(norm_functional, rope_neox)

    def fn(q, k, wq, wk, cos, sin, counter):
        counter.add_(1)
        return front(q, k, wq, wk, cos, sin)

    result, got, want = train_step(fn, (*gqa_functional()[1], torch.zeros(3)), TRAIN, F32)
    [note] = _note(result)
    assert note.startswith("not run: the graph mutates its input") and "counter" in note
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_a_trace_that_raises_compiles_the_graph_unfused(monkeypatch, caplog):
    from diffopt import training

    def broken(gm, example_inputs):
        raise RuntimeError("injected")

    monkeypatch.setattr(training, "forward_aten_graph", broken)
    fn, args = gqa_functional()
    with caplog.at_level("WARNING", logger="diffopt"):
        result, got, want = train_step(fn, args, {**TRAIN, "strict": False}, F32)
    assert result.report.matches("qk_norm_rope") == 0
    assert _note(result) == ["not run: the trace raised RuntimeError (a bug in diffopt)"]
    assert any("before-autograd passes raised (RuntimeError: injected)" in r.getMessage() for r in caplog.records)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    with pytest.raises(Exception, match="injected"):  # strict: a bug in diffopt is an error
        train_step(fn, args, TRAIN, F32)


def test_a_graph_without_a_norm_is_not_traced(monkeypatch):
    """Training compiles of models with nothing to fuse pay no extra trace (the pass's anchor ops)."""
    from diffopt import training

    def untraceable(gm, example_inputs):
        raise AssertionError("traced a graph with no rsqrt or rms_norm")

    monkeypatch.setattr(training, "forward_aten_graph", untraceable)

    def rope_only(q, k, wq, wk, cos, sin):  # scaled by the weights, rotated, never normed
        return rope_neox(q * wq, cos, sin), rope_neox(k * wk, cos, sin)

    result, got, want = train_step(rope_only, gqa_functional()[1], TRAIN, F32)  # strict: raising fails
    assert result.report.matches("qk_norm_rope") == 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_off_device_is_reported_without_tracing():
    fn, args = gqa_functional()
    result, _, _ = train_step(fn, args, TRAIN_CUDA, F32)  # default devices: CUDA only
    assert result.report.matches("qk_norm_rope") == 0
    assert "off on cpu" in _note(result)[0]


# --- whole stock blocks, loss.backward() ----------------------------------------------------------------------


def _loss(output):
    output = output[0] if isinstance(output, (tuple, list)) else output
    return output.float().square().mean()


@pytest.mark.parametrize(
    "builder,inductor",
    [(tiny_wan, False), (tiny_cosmos3, False), (tiny_diffusers_wan, False), (tiny_cosmos3, True)],
    ids=["wan-aten", "cosmos3-aten", "diffusers_wan-aten", "cosmos3-inductor"],
)
def test_stock_block_parameter_gradients_match_eager(builder, inductor):
    torch.manual_seed(0)
    model, args, kwargs = builder(F32)
    result = trace(model, *args, options={**TRAIN, "inductor": inductor}, **kwargs)
    assert result.report.matches("qk_norm_rope") >= 1
    _loss(result.output).backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    _loss(model(*args, **kwargs)).backward()
    want = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any("norm" in name for name in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * want[name].abs().max().item())


# --- CUDA: the forward's op becomes its Triton launch (inline_triton), autograd intact -------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("form", [wan_like, cosmos3_like], ids=lambda f: f.__name__)
def test_cuda_training_compile_inlines_the_kernel_and_keeps_gradients(form, dtype):
    fn, args = form()
    args = [a.cuda() for a in args]
    result, got, want = train_step(fn, args, {**TRAIN_CUDA, "inductor": True}, dtype)
    assert result.report.matches("qk_norm_rope") == 1 and result.report.matches("inline_triton") == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tolerance(dtype, want))
