"""qk_norm_rope on the forms of issue 12 beyond [B, S, H, D]: each fires (op counts before/after), keeps
eager's numerics and strides (fp32 and bf16, Inductor on and off), and its near-misses decline.

- Class C: the rotation in [B, H, S, D] layout (a transpose before or after the norm; CogVideoX, Cosmos,
  CogView4, transformers' models).
- Class B: norm, then cat([text, image], seq), then RoPE of the concatenation (Flux, QwenImage).
- Class E: float64 / complex128 tables (declines quietly).
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffopt.testing import ON_CPU, count_ops, trace

sys.path.insert(0, str(Path(__file__).parent))
from test_qk_norm_rope_pass import rope_neox, rotate_half  # noqa: E402

FUSED = "diffopt.qk_norm_rope.default"
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
INDUCTOR = pytest.mark.parametrize("inductor", [False, True], ids=["aten", "inductor"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) + 0.05).to(dtype)


def check(fn, args, fires=1, inductor=False, dtype=torch.float32, calls=None, plain_norms=0):
    """Compile ``fn``; assert it fired ``fires`` times (``calls`` fused calls in, default one per rewrite, and
    two norms out per call, ``plain_norms`` norms of unrotated tokens back in), agrees with eager and gives
    eager's strides."""
    calls = fires if calls is None else calls
    with torch.no_grad():
        result = trace(fn, *args, options={**ON_CPU, "inductor": inductor})
        want = fn(*args)
    assert result.report.matches("qk_norm_rope") == fires, [d.reason for d in result.report.declines]
    if not any(g[0] == "qk_norm_rope" for g in result.graphs):  # no norm at all: the pass did not apply
        assert fires == 0 and any("not applicable" in (run.note or "") for run in result.report.runs)
        return result
    before, after = count_ops(result.before("qk_norm_rope")), count_ops(result.after("qk_norm_rope"))
    assert after[FUSED] == calls
    if fires:
        assert before["aten.rsqrt.default"] >= 2 * calls and after["aten.rsqrt.default"] == before[
            "aten.rsqrt.default"] - 2 * calls + plain_norms, "the fused norms are gone"
    for got, ref in zip(result.output, want):
        torch.testing.assert_close(got, ref, **TOL[dtype])
        if not inductor:  # Inductor lays out its own outputs; the pass must give eager's
            assert got.stride() == ref.stride()
    return result


def norm(x, w, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def norm_upcast(x, w, eps=1e-6):  # diffusers' RMSNorm
    dtype = x.dtype
    x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (x.to(dtype) * w) if w is not None else x.to(dtype)


def rope_diffusers(x, cos, sin):
    # diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-1): per-channel interleaved tables
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], -1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def tables(S, L, seq_axis=2, dtype=torch.float32, seed=9):
    """cos/sin of shape [1, 1, 1, L] with S tokens at ``seq_axis`` (default [1, 1, S, L]: [B, H, S, D])."""
    shape = [1, 1, 1, L]
    shape[seq_axis] = S
    angle = rand(*shape, seed=seed) * 3
    return angle.cos().to(dtype), angle.sin().to(dtype)


# --- Class C: [B, H, S, D] at the rotation ---------------------------------------------------


def bhsd_transpose_before_norm(rope):
    # Cosmos / CogView4: q.unflatten(2, (H, -1)).transpose(1, 2), then the norm and the rotation
    def front(q, k, wq, wk, cos, sin):
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        return rope(norm_upcast(q, wq), cos, sin), rope(norm_upcast(k, wk), cos, sin)

    return front


def bhsd_transpose_after_norm(rope):
    def front(q, k, wq, wk, cos, sin):
        return rope(norm(q, wq).transpose(1, 2), cos, sin), rope(norm(k, wk).transpose(1, 2), cos, sin)

    return front


def bhsd_across_heads(rope, H, Hk):
    # norm over H*D, the head split, then a transpose to [B, H, S, D] (LTX-like with a [B, H, S, D] rotation)
    def front(q, k, wq, wk, cos, sin):
        q = norm(q, wq).unflatten(-1, (H, -1)).transpose(1, 2)
        k = norm(k, wk).unflatten(-1, (Hk, -1)).transpose(1, 2)
        return rope(q, cos, sin), rope(k, cos, sin)

    return front


def bshd_args(B, S, H, Hk, D, dtype, seed=0):
    return (rand(B, S, H, D, dtype=dtype, seed=seed), rand(B, S, Hk, D, dtype=dtype, seed=seed + 1),
            rand(D, dtype=dtype, seed=seed + 2), rand(D, dtype=dtype, seed=seed + 3))


@INDUCTOR
@DTYPES
@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("rope", [rope_neox, rope_diffusers], ids=["neox", "interleaved_channel"])
def test_class_c_transposed_rotation_fires(order, rope, dtype, inductor):
    front = (bhsd_transpose_before_norm if order == "before" else bhsd_transpose_after_norm)(rope)
    args = bshd_args(2, 5, 4, 2, 16, dtype) + tables(5, 16, dtype=dtype)  # tables [1, 1, S, D]
    check(front, args, inductor=inductor, dtype=dtype)


@INDUCTOR
def test_class_c_across_heads_norm(inductor):
    H, D = 3, 8
    args = (rand(1, 6, H * D), rand(1, 6, H * D, seed=1), rand(H * D, seed=2), rand(H * D, seed=3)) + tables(6, 8)
    check(bhsd_across_heads(rope_diffusers, H, H), args, inductor=inductor)


def test_class_c_unbatched_tables_of_two_dims():
    # tables [S, D] broadcast against [B, H, S, D] (apply_rotary_emb's sequence_dim=2 without the unsqueeze)
    cos, sin = (t[0, 0] for t in tables(5, 16))
    check(bhsd_transpose_before_norm(rope_neox), bshd_args(1, 5, 2, 2, 16, torch.float32) + (cos, sin))


def test_class_c_near_miss_tables_per_head():
    # [B, H, S, D] rotated with tables that vary along H (and broadcast over S): no lead dim is the heads
    # for an across-heads norm, whose head split fixes which dim the heads are.
    H, D = 3, 8
    angle = rand(1, H, 1, D, seed=5) * 3
    args = (rand(1, 6, H * D), rand(1, 6, H * D, seed=1), rand(H * D, seed=2), rand(H * D, seed=3),
            angle.cos(), angle.sin())
    check(bhsd_across_heads(rope_diffusers, H, H), args, fires=0)


def test_class_c_near_miss_transpose_of_the_channels():
    # a transpose that moves the channels off the last dim: the "rotation" then mixes tokens
    def front(q, k, wq, wk, cos, sin):
        q, k = norm(q, wq).transpose(-1, -2), norm(k, wk).transpose(-1, -2)
        return rope_neox(q, cos, sin), rope_neox(k, cos, sin)

    args = bshd_args(1, 8, 8, 8, 8, torch.float32) + tables(8, 8, seq_axis=1)
    check(front, args, fires=0)


def test_class_c_strides_for_consumers_that_read_memory():
    # A consumer that reads memory order must see eager's values: outputs get the stock exit's strides.
    def front(q, k, wq, wk, cos, sin):
        q, k = bhsd_transpose_before_norm(rope_neox)(q, k, wq, wk, cos, sin)
        return q.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1), k.as_strided((k.numel(),), (1,))

    check(front, bshd_args(2, 5, 2, 2, 8, torch.float32) + tables(5, 8))


def test_class_c_near_miss_tables_per_head_in_bhsd():
    # [B, H, S, D] (transposed before a per-head norm) with tables [1, H, S, L]: they vary per head
    angle = rand(1, 2, 5, 8, seed=5) * 3
    check(bhsd_transpose_before_norm(rope_neox), bshd_args(1, 5, 2, 2, 8, torch.float32) + (angle.cos(), angle.sin()),
          fires=0)


# --- Class B: norm, cat([text, image], seq), RoPE of the concatenation ---------------------------


def joint(rope, seq_dim=1, k_order=(0, 1)):
    # Flux's double block: each stream normed with its own weights, concatenated along the tokens, rotated
    def front(q_txt, q_img, k_txt, k_img, wq_txt, wq_img, wk_txt, wk_img, cos, sin):
        q = torch.cat([norm(q_txt, wq_txt, 1e-6), norm_upcast(q_img, wq_img, 1e-5)], seq_dim)
        ks = [norm(k_txt, wk_txt, 1e-6), norm_upcast(k_img, wk_img, 1e-5)]
        k = torch.cat([ks[i] for i in k_order], seq_dim)
        return rope(q, cos, sin), rope(k, cos, sin)

    return front


def joint_args(B, S_txt, S_img, H, Hk, D, dtype=torch.float32, seq_dim=1, seed=0):
    def heads(S, h, s):
        shape = (B, S, h, D) if seq_dim == 1 else (B, h, S, D)
        return rand(*shape, dtype=dtype, seed=seed + s)

    acts = (heads(S_txt, H, 0), heads(S_img, H, 1), heads(S_txt, Hk, 2), heads(S_img, Hk, 3))
    weights = tuple(rand(D, dtype=dtype, seed=seed + 4 + i) for i in range(4))
    return acts + weights


@INDUCTOR
@DTYPES
@pytest.mark.parametrize("rope", [rope_neox, rope_diffusers], ids=["neox", "interleaved_channel"])
def test_class_b_joint_attention_fires_per_segment(rope, dtype, inductor):
    angle = rand(1, 9, 1, 16, seed=7) * 3  # [1, S_txt + S_img, 1, D]
    args = joint_args(2, 4, 5, 4, 2, 16, dtype) + (angle.cos().to(dtype), angle.sin().to(dtype))
    check(joint(rope), args, fires=1, calls=2, inductor=inductor, dtype=dtype)


def test_class_b_one_call_per_segment_and_no_extra_copy():
    angle = rand(9, 16, seed=7) * 3  # [S, D] tables, broadcast
    args = joint_args(1, 4, 5, 2, 2, 16) + (angle.cos()[:, None], angle.sin()[:, None])
    result = check(joint(rope_neox), args, fires=1, calls=2)
    before, after = count_ops(result.before("qk_norm_rope")), count_ops(result.after("qk_norm_rope"))
    # the stock q and k cats (of the normed segments) become the cats of the rotated segments: no more
    # copies than stock, whose rotation writes q and k once more after the cat
    assert after["aten.cat.default"] <= before["aten.cat.default"]


def test_class_b_near_miss_segments_rotated_with_other_tables():
    # q's cat is rotated with one table, k's with another: the segments have no partner reading the same rows
    def front(q_txt, q_img, k_txt, k_img, wq_txt, wq_img, wk_txt, wk_img, cos, sin, cos_k, sin_k):
        q = torch.cat([norm(q_txt, wq_txt), norm(q_img, wq_img)], 1)
        k = torch.cat([norm(k_txt, wk_txt), norm(k_img, wk_img)], 1)
        return rope_neox(q, cos, sin), rope_neox(k, cos_k, sin_k)

    a, b = rand(1, 9, 1, 16, seed=7) * 3, rand(1, 9, 1, 16, seed=8) * 3
    check(front, joint_args(1, 4, 5, 2, 2, 16) + (a.cos(), a.sin(), b.cos(), b.sin()), fires=0)


def test_class_b_near_miss_segments_in_another_order():
    # k's segments concatenated [image, text]: its i-th segment is not q's i-th
    angle = rand(1, 9, 1, 16, seed=7) * 3
    args = joint_args(1, 4, 5, 2, 2, 16) + (angle.cos(), angle.sin())
    check(joint(rope_neox, k_order=(1, 0)), args, fires=0)


def test_class_b_near_miss_cat_of_a_normed_and_a_raw_segment():
    # one segment is not normed: the cat is no joint attention of norms
    def front(q_txt, q_img, k_txt, k_img, wq_txt, wq_img, wk_txt, wk_img, cos, sin):
        q = torch.cat([q_txt, norm(q_img, wq_img)], 1)
        k = torch.cat([k_txt, norm(k_img, wk_img)], 1)
        return rope_neox(q, cos, sin), rope_neox(k, cos, sin)

    angle = rand(1, 9, 1, 16, seed=7) * 3
    check(front, joint_args(1, 4, 5, 2, 2, 16) + (angle.cos(), angle.sin()), fires=0)


@pytest.mark.parametrize("S_txt, S_img, H", [(4, 5, 2), (3, 7, 3)])
def test_class_b_near_miss_joint_attention_in_bhsd_says_why(S_txt, S_img, H):
    # the older Flux form: heads transposed first, cat along [B, H, S, D]'s tokens (dim 2), which in
    # [B, S, H, D] would be the heads; not matched, and explain says so (once, not per segment)
    angle = rand(1, 1, S_txt + S_img, 16, seed=S_img) * 3
    args = joint_args(1, S_txt, S_img, H, H, 16, seq_dim=2) + (angle.cos(), angle.sin())
    result = check(joint(rope_neox, seq_dim=2), args, fires=0)
    reasons = [d.reason for d in result.report.declines if d.pass_name == "qk_norm_rope"]
    assert reasons.count("normed segments joined along dim 2 of a 4-d tensor: joint attention is matched for a "
                         "cat along a dim before the last two (the tokens of [B, S, H, D])") == 2  # q's and k's


# --- Token slice: norm over all tokens, RoPE of one run of them (CogVideoX/CogView4's processors, HunyuanVideo) -


def sliced_in_place(rope, T, q_rows=None, k_rows=None, put_back=None):
    # CogVideoX's processor: q[:, :, T:] = rope(q[:, :, T:]) after norm_q, [B, H, S, D] (post-grad: slice_scatter)
    q_rows, k_rows = q_rows or slice(T, None), k_rows or slice(T, None)

    def front(q, k, wq, wk, cos, sin):
        B, S, H, D = q.shape
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = norm_upcast(q, wq), norm(k, wk, 1e-5)
        q[:, :, put_back or q_rows] = rope(q[:, :, q_rows], cos, sin)
        k[:, :, put_back or k_rows] = rope(k[:, :, k_rows], cos, sin)
        return q, k

    return front


def sliced_cat(rope, T, order=(0, 1)):
    # HunyuanVideo's single block: the image tokens rotated, the T text tokens after them concatenated unrotated
    def front(q, k, wq, wk, cos, sin):
        q, k = norm(q, wq), norm(k, wk)
        outs = []
        for x in (q, k):
            parts = [rope(x[:, :-T], cos, sin), x[:, -T:]]
            outs.append(torch.cat([parts[i] for i in order], 1))
        return tuple(outs)

    return front


def slice_args(B, S, H, D, L, dtype=torch.float32, seq_axis=1, seed=0):
    q, k = rand(B, S, H, D, dtype=dtype, seed=seed), rand(B, S, H, D, dtype=dtype, seed=seed + 1)
    wq, wk = rand(D, dtype=dtype, seed=seed + 2), rand(D, dtype=dtype, seed=seed + 3)
    angle = rand(L, D, seed=seed + 4) * 3
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    if seq_axis == 1:  # [B, S, H, D] heads: tables [L, 1, D]
        cos, sin = cos[:, None], sin[:, None]
    return q, k, wq, wk, cos, sin


def slice_counts(result):
    return count_ops(result.before("qk_norm_rope")), count_ops(result.after("qk_norm_rope"))


@INDUCTOR
@DTYPES
@pytest.mark.parametrize("rope", [rope_neox, rope_diffusers], ids=["neox", "interleaved_channel"])
def test_token_slice_in_place_fires(rope, dtype, inductor):
    T = 3
    args = slice_args(2, 9, 4, 16, 9 - T, dtype, seq_axis=2)
    result = check(sliced_in_place(rope, T), args, fires=1, inductor=inductor, dtype=dtype, plain_norms=2)
    before, after = slice_counts(result)
    assert before["aten.slice_scatter.default"] == 2 and after["aten.slice_scatter.default"] == 0
    # the rotations' own cats are gone; q and k are each assembled by one cat along the tokens
    assert after["aten.cat.default"] == 2


@INDUCTOR
@DTYPES
def test_token_slice_cat_fires(dtype, inductor):
    T = 4
    args = slice_args(1, 10, 2, 16, 10 - T, dtype)
    check(sliced_cat(rope_diffusers, T), args, fires=1, inductor=inductor, dtype=dtype, plain_norms=2)


def test_token_slice_unrotated_rows_are_the_stock_norm_bitwise():
    # the unrotated tokens keep a plain norm: the stock ops on those rows (not a rotation by cos 1, sin 0,
    # which would turn -0.0 into 0.0 and inf into nan), so eager's values exactly
    T = 3
    q, k, wq, wk, cos, sin = slice_args(2, 9, 2, 16, 9 - T, seq_axis=2)
    q[0, 0, 0, :] = 0.0
    q[0, 0, 0, 1] = -0.0
    fn = sliced_in_place(rope_neox, T)
    result = check(fn, (q, k, wq, wk, cos, sin), plain_norms=2)
    with torch.no_grad():
        want = fn(q, k, wq, wk, cos, sin)
    for got, ref in zip(result.output, want):
        assert torch.equal(got[:, :, :T], ref[:, :, :T])
        assert torch.equal(got[:, :, :T].signbit(), ref[:, :, :T].signbit())


def test_token_slice_rows_in_the_middle():
    # only tokens [2, 7) of 9 rotated: two runs of plain norm around the fused rows
    args = slice_args(1, 9, 2, 16, 5, seq_axis=2)
    check(sliced_in_place(rope_neox, 2, q_rows=slice(2, 7), k_rows=slice(2, 7)), args, plain_norms=4)


def declines(fn, args):
    with torch.no_grad():
        result = trace(fn, *args, options=ON_CPU)
    assert result.report.matches("qk_norm_rope") == 0
    torch.testing.assert_close(result.output, fn(*args))
    return [d.reason for d in result.report.declines if d.pass_name == "qk_norm_rope"]


def test_token_slice_near_miss_q_and_k_rotate_other_tokens():
    # q rotates tokens 3:8, k tokens 4:9 (the same tables, the same count): no pairing
    args = slice_args(1, 9, 2, 16, 5, seq_axis=2)
    reasons = declines(sliced_in_place(rope_neox, 3, q_rows=slice(3, 8), k_rows=slice(4, 9)), args)
    assert any("rotating the same tokens" in r for r in reasons), reasons


def test_token_slice_near_miss_strided_tokens():
    # every other token rotated: not one run of the sequence
    args = slice_args(1, 9, 2, 16, 3, seq_axis=2)
    reasons = declines(sliced_in_place(rope_neox, 3, q_rows=slice(3, None, 2), k_rows=slice(3, None, 2)), args)
    assert any("slice step" in r for r in reasons), reasons


def test_token_slice_near_miss_rows_put_back_elsewhere():
    # the rotation of tokens 3: written to tokens :6
    args = slice_args(1, 9, 2, 16, 6, seq_axis=2)
    reasons = declines(sliced_in_place(rope_neox, 3, put_back=slice(None, 6)), args)
    assert any("other tokens" in r for r in reasons), reasons


def test_token_slice_near_miss_cat_reorders_the_tokens():
    # cat([text, rotated image]) of x[:, :-T] and x[:, -T:]: the tokens come back in another order
    args = slice_args(1, 10, 2, 16, 6)
    reasons = declines(sliced_cat(rope_neox, 4, order=(1, 0)), args)
    assert any("order" in r for r in reasons), reasons


def test_token_slice_near_miss_tables_per_head():
    # tables that vary per head over the rotated tokens: the op takes one table for all heads
    q, k, wq, wk, _, _ = slice_args(1, 9, 2, 16, 6, seq_axis=2)
    angle = rand(2, 6, 16, seed=5) * 3  # [H, L, D]
    declines(sliced_in_place(rope_neox, 3), (q, k, wq, wk, angle.cos(), angle.sin()))


# --- Class E: float64 / complex128 tables, q/k in float64 -------------------------------------------
# The op computes in float32; the stock code rotates in float64 (and rounds once from there): not the same
# values, so the pass declines, quietly (strict mode: a raising pass would fail the compile), saying why.


def rope_complex(x, freqs):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(-2).type_as(x)


def class_e_cases():
    q, k, wq, wk = bshd_args(1, 5, 2, 2, 8, torch.float32)
    angle = rand(1, 5, 1, 8, seed=5).double() * 3
    per_head = lambda rope: lambda q, k, wq, wk, *t: (rope(norm(q, wq), *t), rope(norm(k, wk), *t))  # noqa: E731
    type_as = lambda rope: lambda x, *t: rope(x, *t).type_as(x)  # noqa: E731
    freqs = torch.polar(torch.ones(1, 5, 1, 4, dtype=torch.float64), angle[..., :4])
    return {
        "float64 tables": (per_head(rope_neox), (q, k, wq, wk, angle.cos(), angle.sin())),
        "float64 tables, .type_as(x)": (per_head(type_as(rope_neox)), (q, k, wq, wk, angle.cos(), angle.sin())),
        "float64 q/k": (per_head(rope_neox), (q.double(), k.double(), wq.double(), wk.double(), angle.cos(),
                                              angle.sin())),
        "complex128 freqs (Lumina2)": (per_head(rope_complex), (q, k, wq, wk, freqs)),
    }


@pytest.mark.parametrize("name", list(class_e_cases()))
def test_class_e_float64_declines_quietly(name):
    fn, args = class_e_cases()[name]
    result = check(fn, args, fires=0)
    reasons = [d.reason for d in result.report.declines if d.pass_name == "qk_norm_rope"]
    assert reasons and all("float64" in r or "complex128" in r for r in reasons), reasons


# --- GPU: the forms through the Triton kernel, Inductor on, at real sizes ---------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["bhsd_before", "bhsd_after", "joint"])
def test_gpu_forms_against_eager(form):
    B, H, D = 1, 24, 128
    dtype = torch.bfloat16

    def cuda(args):
        return tuple(a.cuda() for a in args)

    if form == "joint":  # Flux double block: 512 text + 4096 image tokens
        angle = rand(1, 4608, 1, D, seed=7) * 3
        args = joint_args(B, 512, 4096, H, H, D, dtype) + (angle.cos(), angle.sin())
        fn, calls = joint(rope_diffusers), 2
    else:  # Cosmos-like [B, H, S, D] rotation, tables [1, 1, S, D] in the activations' dtype (with fp32
        # tables the stock code rounds the normed q to bf16 before an fp32 result: a designed decline)
        args = bshd_args(B, 4096, H, H, D, dtype) + tables(4096, D, dtype=dtype)
        fn = (bhsd_transpose_before_norm if form == "bhsd_before" else bhsd_transpose_after_norm)(rope_neox)
        calls = 1
    args = cuda(args)
    with torch.no_grad():
        result = trace(fn, *args, options={"inductor": True})
        want = fn(*args)
        exact = fn(*(a.double() for a in args))
    assert result.report.matches("qk_norm_rope") == 1
    assert count_ops(result.after("qk_norm_rope"))[FUSED] == calls
    for got, ref, ref64 in zip(result.output, want, exact):
        assert got.dtype == ref.dtype and got.stride() == ref.stride()
        # stock eager rounds every bf16 intermediate: at these sizes its own error is the yardstick
        stock_error = (ref.double() - ref64).abs().max()
        assert (got.double() - ref64).abs().max() <= 1.25 * stock_error + 1e-3  # never less accurate
        assert (got.double() - ref.double()).abs().max() <= 2.25 * stock_error + 1e-3


# --- Class D: 2x2 rotation-matrix tables (HiDream, PRX) ------------------------------------------------
# freqs = stack([cos, -sin, sin, cos], -1).view(..., D/2, 2, 2), applied as freqs[..., 0] * x_[..., 0] +
# freqs[..., 1] * x_[..., 1]: fused once the matrix is proven a rotation, with its cos and sin entries as tables.


def rope_matrix(pos, dim, theta=10000.0, entries=None, dtype=torch.float64):
    # HiDream's rope(): angles in float64, the matrix rounded to float32
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype) / dim)
    angle = pos.to(dtype)[..., None] * omega
    cos, sin = angle.cos(), angle.sin()
    stacked = torch.stack(entries(cos, sin) if entries else [cos, -sin, sin, cos], -1)
    return stacked.view(*angle.shape, 2, 2).float()


def hidream_matrix(pos, axes=(4, 6, 6)):  # HiDreamImageEmbedND: per-axis matrices concatenated, [B, S, 1, L, 2, 2]
    return torch.cat([rope_matrix(pos[..., i], d) for i, d in enumerate(axes)], -3).unsqueeze(2)


def apply_rope_matrix(x, freqs):  # HiDream's apply_rope, one tensor
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def matrix_front(make=hidream_matrix, apply=apply_rope_matrix, normed=True):
    def front(q, k, wq, wk, pos):
        freqs = make(pos)
        nq, nk = (norm(q, wq), norm(k, wk)) if normed else (q, k)
        return apply(nq, freqs), apply(nk, freqs)

    return front


def positions(B, S, seed=4):
    return (rand(B, S, 3, seed=seed) * 8).round()


@INDUCTOR
@DTYPES
def test_class_d_rotation_matrix_fires(dtype, inductor):
    args = bshd_args(2, 5, 4, 2, 16, dtype) + (positions(2, 5),)
    check(matrix_front(), args, inductor=inductor, dtype=dtype)


@INDUCTOR
def test_class_d_across_heads_norm(inductor):
    # HiDream's attention: nn.RMSNorm over H*D, .to(dtype), the head split, then apply_rope
    H, D = 2, 16

    def front(q, k, wq, wk, pos):
        freqs = hidream_matrix(pos)
        q = norm_upcast(q, wq).view(q.shape[0], -1, H, D)
        k = norm_upcast(k, wk).view(k.shape[0], -1, H, D)
        return apply_rope_matrix(q, freqs), apply_rope_matrix(k, freqs)

    args = (rand(1, 6, H * D), rand(1, 6, H * D, seed=1), rand(H * D, seed=2), rand(H * D, seed=3), positions(1, 6))
    check(front, args, inductor=inductor)


def test_class_d_constant_matrix_fires():
    # positions built in the graph: fold_invariant folds the matrix into a constant, checked on its values
    def front(q, k, wq, wk):
        pos = torch.arange(q.shape[1], dtype=torch.float32)[None, :, None].expand(1, -1, 3)
        return matrix_front()(q, k, wq, wk, pos)

    check(front, bshd_args(1, 5, 2, 2, 16, torch.float32))


def test_class_d_cos_sin_tables_placed_as_a_matrix():
    # the graph's own cos/sin tables (inputs) placed with the right signs and positions
    def front(q, k, wq, wk, cos, sin):
        freqs = torch.stack([cos, -sin, sin, cos], -1).view(*cos.shape, 2, 2)
        return apply_rope_matrix(norm(q, wq), freqs), apply_rope_matrix(norm(k, wk), freqs)

    angle = rand(1, 5, 1, 8, seed=5) * 3
    check(front, bshd_args(1, 5, 2, 2, 16, torch.float32) + (angle.cos(), angle.sin()))


def apply_rope_matrix_sum(x, freqs):  # Kandinsky 5's apply_rotary: the matrix times the pair, summed
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    return (freqs * x_).sum(-1).reshape(*x.shape).type_as(x)


@INDUCTOR
@DTYPES
def test_class_d_matrix_applied_as_a_sum_fires(dtype, inductor):
    args = bshd_args(2, 5, 4, 2, 16, dtype) + (positions(2, 5),)
    check(matrix_front(apply=apply_rope_matrix_sum), args, inductor=inductor, dtype=dtype)


def matrix_near_misses():
    def angles(entries):
        return lambda pos: rope_matrix(pos[..., 0], 16, entries=entries).unsqueeze(2)

    def transposed(x, freqs):  # x @ M instead of M @ x: the rotation by minus the angle
        x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        out = freqs[..., 0, :] * x_[..., 0] + freqs[..., 1, :] * x_[..., 1]
        return out.reshape(*x.shape).type_as(x)

    return {
        "wrong sign": (matrix_front(angles(lambda c, s: [c, s, s, c])), "rotation"),
        "swapped entries": (matrix_front(angles(lambda c, s: [c, s, -s, c])), "rotation"),
        "cos and sin swapped": (matrix_front(angles(lambda c, s: [s, -c, c, s])), "rotation"),
        "different angles": (matrix_front(angles(lambda c, s: [c, -(2 * s.asin()).sin(), (2 * s.asin()).sin(), c])),
                             "rotation"),
        "scaled matrix": (matrix_front(lambda pos: 2 * hidream_matrix(pos)), "rotation"),
        "applied transposed": (matrix_front(apply=transposed), None),
        "summed over the wrong dim": (matrix_front(apply=lambda x, f: (f * x.float().reshape(
            *x.shape[:-1], -1, 1, 2)).sum(-2).reshape(*x.shape).type_as(x)), None),
        "summed with a wrong-sign matrix": (matrix_front(angles(lambda c, s: [c, s, s, c]), apply=apply_rope_matrix_sum),
                                            "rotation"),
        "no norm": (matrix_front(normed=False), None),
    }


@pytest.mark.parametrize("name", list(matrix_near_misses()))
def test_class_d_near_misses_decline(name):
    fn, reason = matrix_near_misses()[name]
    result = check(fn, bshd_args(1, 5, 2, 2, 16, torch.float32) + (positions(1, 5),), fires=0)
    if reason:
        reasons = [d.reason for d in result.report.declines if d.pass_name == "qk_norm_rope"]
        assert any(reason in r for r in reasons), reasons


def test_class_d_matrix_as_graph_input_declines():
    def front(q, k, wq, wk, freqs):
        return apply_rope_matrix(norm(q, wq), freqs), apply_rope_matrix(norm(k, wk), freqs)

    result = check(front, bshd_args(1, 5, 2, 2, 16, torch.float32) + (hidream_matrix(positions(1, 5)),), fires=0)
    assert any("graph input" in d.reason for d in result.report.declines), result.report.declines


def test_class_d_constant_scaled_matrix_declines():
    def front(q, k, wq, wk):
        pos = torch.arange(q.shape[1], dtype=torch.float32)[None, :, None].expand(1, -1, 3)
        return matrix_front(lambda p: 2 * hidream_matrix(p))(q, k, wq, wk, pos)

    result = check(front, bshd_args(1, 5, 2, 2, 16, torch.float32), fires=0)
    assert any("rotation" in d.reason for d in result.report.declines), result.report.declines
