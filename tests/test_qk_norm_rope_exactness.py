"""qk_norm_rope computes what the stock code computes: its exit dtype, the roundings the program asks for,
its output strides; and it declines quietly (reason in the report) where the op cannot (issue 13, 1, 2, 7)."""
import pytest
import torch
import torch.nn.functional as F

from diffopt.testing import ON_CPU, trace


def rand(*shape, scale=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(*shape, generator=g) + 0.05) * scale).to(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def tables(S, D, dtype=torch.float32, shape="bs1d", seed=7):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(S, D // 2, generator=g, dtype=torch.float64) * 6.28
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    if shape == "bs1d":
        return cos.view(1, S, 1, D), sin.view(1, S, 1, D)
    return cos, sin


def compile_and_run(fn, args, inductor, **inductor_config):
    return trace(fn, *args, options={**ON_CPU, "inductor": inductor, "inductor_config": inductor_config})


def fired(result):
    return result.report.matches("qk_norm_rope")


def declines(result):
    return [d.reason for d in result.report.declines if d.pass_name == "qk_norm_rope"]


def as_float64(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


# --- 1. an fp32 rotation rounded to fp16/bf16 at its exit ---------------------------------------


def fp32_then_half(q, k, wq, wk, cos, sin, exit_dtype):
    q = F.rms_norm(q, (q.shape[-1],), wq, 1e-6)
    k = F.rms_norm(k, (k.shape[-1],), wk, 1e-6)
    return (q * cos + rotate_half(q) * sin).to(exit_dtype), (k * cos + rotate_half(k) * sin).to(exit_dtype)


@pytest.mark.parametrize("scale", [1.0, 3e5, 2e-6], ids=["ordinary", "beyond_fp16", "near_subnormal"])
@pytest.mark.parametrize("exit_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp32_rotation_rounded_once_at_the_exit(inductor, scale, exit_dtype):
    # The fused result is computed in fp32 from the fp32 input and rounded once at the exit: finite
    # where eager is, and no further from the float64 result than eager.
    B, S, H, D = 2, 6, 4, 16
    q, k = rand(B, S, H, D, scale=scale, seed=1), rand(B, S, 2, D, scale=scale, seed=2)
    wq, wk = rand(D, seed=3), rand(D, seed=4)
    cos, sin = tables(S, D)
    args = (q, k, wq, wk, cos, sin, exit_dtype)
    eager = fp32_then_half(*args)
    exact = fp32_then_half(*as_float64(args[:-1]), torch.float64)
    result = compile_and_run(fp32_then_half, args, inductor)
    assert fired(result) == 1
    for got, want, ref in zip(result.output, eager, exact):
        assert got.dtype == want.dtype == exit_dtype and torch.isfinite(got).all()
        ulp = torch.finfo(exit_dtype).eps * ref.abs().max().item()
        assert (got.double() - ref).abs().max().item() <= (want.double() - ref).abs().max().item() + ulp / 2
        torch.testing.assert_close(got, want)


def roundtrip_between(q, k, cos, sin):
    q = F.rms_norm(q, (q.shape[-1],), None, 1e-6).to(torch.bfloat16).float()
    k = F.rms_norm(k, (k.shape[-1],), None, 1e-6).to(torch.bfloat16).float()
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def roundtrip_inside(q, k, cos, sin):
    q = F.rms_norm(q, (q.shape[-1],), None, 1e-6)
    k = F.rms_norm(k, (k.shape[-1],), None, 1e-6)
    rq = (rotate_half(q) * sin).to(torch.bfloat16).float()
    rk = (rotate_half(k) * sin).to(torch.bfloat16).float()
    return q * cos + rq, k * cos + rk


def roundtrip_after(q, k, cos, sin):
    q = F.rms_norm(q, (q.shape[-1],), None, 1e-6)
    k = F.rms_norm(k, (k.shape[-1],), None, 1e-6)
    q = (q * cos + rotate_half(q) * sin).to(torch.bfloat16).float()
    k = (k * cos + rotate_half(k) * sin).to(torch.bfloat16).float()
    return q * 2, k * 2


@pytest.mark.parametrize("fn", [roundtrip_between, roundtrip_inside, roundtrip_after])
def test_a_rounding_the_program_asks_for_is_kept(inductor, fn):
    # ``.to(bf16).float()`` in fp32 code is part of what it computes: the rotation region that would skip
    # it is not fused (the reason is in the report); a shorter region that ends before it may be.
    B, S, H, D = 1, 5, 2, 16
    args = (rand(B, S, H, D, seed=5), rand(B, S, H, D, seed=6), *tables(S, D))
    eager = fn(*args)
    # Inductor drops such round trips itself unless told to emulate them; with that, eager's rounding holds.
    result = compile_and_run(fn, args, inductor, emulate_precision_casts=True)
    for got, want in zip(result.output, eager):
        torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)
    if fn is roundtrip_after:
        assert fired(result) == 1  # the fp32 rotation fuses; the stock round trip after it stays
    else:
        assert fired(result) == 0
        assert any("bfloat16" in reason for reason in declines(result)), result.report


# --- 2. output strides ---------------------------------------------------------------------------


def hand_norm(x):
    # elementwise, so it keeps x's layout (F.rms_norm's CPU kernel returns contiguous)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def rope_wan(x, cos, sin):
    # diffusers' Wan rotation: stores into empty_like(x), which keeps x's layout
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


def transposed_then_viewed(q, k, cos, sin):
    # q/k arrive as [B, S, H, D] views of [B, H, S, D] memory; the stock code keeps that layout, so the
    # consumer's transpose(1, 2).view(...) works and as_strided reads it as such.
    q = rope_wan(hand_norm(q.transpose(1, 2)), cos, sin)
    k = rope_wan(hand_norm(k.transpose(1, 2)), cos, sin)
    B, S, H, D = q.shape
    return q.transpose(1, 2).view(B, H, S * D), k.as_strided((B, 2, S * D), (H * S * D, S * D, 1))


def test_consumers_see_the_stock_strides(inductor):
    B, S, H, D = 2, 5, 3, 16
    q, k = rand(B, H, S, D, seed=8), rand(B, H, S, D, seed=9)
    g = torch.Generator().manual_seed(1)
    ang = torch.rand(S, D // 2, generator=g) * 6.28
    args = (q, k, ang.cos().view(1, S, 1, D // 2), ang.sin().view(1, S, 1, D // 2))
    eager = transposed_then_viewed(*args)
    result = compile_and_run(transposed_then_viewed, args, inductor)
    assert fired(result) == 1
    for got, want in zip(result.output, eager):
        assert got.stride() == want.stride()
        torch.testing.assert_close(got, want)


def rotate_into_contiguous_from_transposed(q, k, cos, sin):
    # The stock exit is contiguous (rotate_half's cat, the sum's first operand, decides its layout) while
    # the input is transposed; the fused op would follow the input's layout, so it declines rather than
    # hand the consumers other strides.
    q, k = hand_norm(q.transpose(1, 2)), hand_norm(k.transpose(1, 2))
    q, k = rotate_half(q) * sin + q * cos, rotate_half(k) * sin + k * cos
    return q.as_strided((2, 30), (30, 1)), k.view(2, -1)


def test_a_layout_the_op_cannot_write_declines(inductor):
    B, S, H, D = 2, 5, 3, 16
    args = (rand(B, H, S, D, seed=10), rand(B, H, S, D, seed=11), *tables(S, D))
    eager = rotate_into_contiguous_from_transposed(*args)
    result = compile_and_run(rotate_into_contiguous_from_transposed, args, inductor)
    assert fired(result) == 0 and any("strides" in reason for reason in declines(result)), result.report
    for got, want in zip(result.output, eager):
        torch.testing.assert_close(got, want)


# --- 7. inputs the op's checks refuse: fused after an exact reshape, or declined quietly -----------


def norm_weight_shaped(q, k, wq, wk, cos, sin):
    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    q, k = norm(q, wq), norm(k, wk)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@pytest.mark.parametrize("weight_shape", [(16,), (1, 16), (1, 1, 1, 16)], ids=["D", "1xD", "1x1x1xD"])
def test_norm_weights_of_any_broadcast_shape_fuse(inductor, weight_shape):
    B, S, H, D = 2, 4, 4, 16
    args = (rand(B, S, H, D, seed=12), rand(B, S, 2, D, seed=13), rand(*weight_shape, seed=14),
            rand(*weight_shape, seed=15), *tables(S, D))
    eager = norm_weight_shaped(*args)
    result = compile_and_run(norm_weight_shaped, args, inductor)  # strict: a raising pass fails here
    assert fired(result) == 1 and not result.report.failures()
    for got, want in zip(result.output, eager):
        torch.testing.assert_close(got, want)


def float64_everywhere(q, k, cos, sin):
    q = F.rms_norm(q, (q.shape[-1],), None, 1e-6)
    k = F.rms_norm(k, (k.shape[-1],), None, 1e-6)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def upcast_to_float64_tables(q, k, cos, sin):
    q = F.rms_norm(q, (q.shape[-1],), None, 1e-6)
    k = F.rms_norm(k, (k.shape[-1],), None, 1e-6)
    return ((q.double() * cos + rotate_half(q.double()) * sin).float(),
            (k.double() * cos + rotate_half(k.double()) * sin).float())


def complex128_tables(q, k, freqs):
    q = F.rms_norm(q, (q.shape[-1],), None, 1e-6)
    k = F.rms_norm(k, (k.shape[-1],), None, 1e-6)

    def rot(x):
        xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs).flatten(-2).float()

    return rot(q), rot(k)


def _complex_freqs(S, D):
    ang = torch.rand(S, D // 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 6.28
    return torch.polar(torch.ones_like(ang), ang).view(1, S, 1, D // 2)


@pytest.mark.parametrize("case", ["float64", "float64_tables", "complex128_tables"])
def test_float64_math_declines_quietly(inductor, case):
    B, S, H, D = 1, 4, 2, 8
    if case == "float64":
        fn, args = float64_everywhere, (rand(B, S, H, D, dtype=torch.float64), rand(B, S, H, D, seed=1, dtype=torch.float64),
                                        *tables(S, D, torch.float64))
    elif case == "float64_tables":
        fn, args = upcast_to_float64_tables, (rand(B, S, H, D), rand(B, S, H, D, seed=1), *tables(S, D, torch.float64))
    else:
        fn, args = complex128_tables, (rand(B, S, H, D), rand(B, S, H, D, seed=1), _complex_freqs(S, D))
    eager = fn(*args)
    result = compile_and_run(fn, args, inductor)  # strict: "pass raised" would fail the test
    assert fired(result) == 0 and not result.report.failures()
    assert any("float64" in reason or "complex128" in reason for reason in declines(result)), result.report
    for got, want in zip(result.output, eager):
        torch.testing.assert_close(got, want)


def test_off_on_this_device_is_reported():
    B, S, H, D = 1, 4, 2, 8
    args = (rand(B, S, H, D), rand(B, S, H, D, seed=1), *tables(S, D))
    result = trace(float64_everywhere, *args)  # default devices: CUDA only
    note = [run.note for run in result.report.runs if run.pass_name == "qk_norm_rope"][0]
    assert fired(result) == 0 and note == "off on cpu (option devices: ['cuda'])"
    assert "off on cpu" in str(result.report)


# --- stock forms found on the way ------------------------------------------------------------------


def own_gathered_tables(q, k, cos_cache, sin_cache, positions):
    # q and k each gather their rows of the same cache with the same positions
    q = F.rms_norm(q, (q.shape[-1],), None, 1e-6)
    k = F.rms_norm(k, (k.shape[-1],), None, 1e-6)
    qc, qs = cos_cache[positions].unsqueeze(2), sin_cache[positions].unsqueeze(2)
    kc, ks = cos_cache[positions].unsqueeze(2), sin_cache[positions].unsqueeze(2)
    return q * qc + rotate_half(q) * qs, k * kc + rotate_half(k) * ks


def normed_from_one_tensor(x, wq, wk, cos, sin, k_eps):
    # q and k normed from the same tensor, with their own weights (and eps): dedupe shares the statistics
    q = F.rms_norm(x, (x.shape[-1],), wq, 1e-6)
    k = F.rms_norm(x, (x.shape[-1],), wk, k_eps)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def other_positions(q, k, cos_cache, sin_cache, positions):
    # near-miss: k gathers other rows than q
    q = F.rms_norm(q, (q.shape[-1],), None, 1e-6)
    k = F.rms_norm(k, (k.shape[-1],), None, 1e-6)
    qc, qs = cos_cache[positions].unsqueeze(2), sin_cache[positions].unsqueeze(2)
    kc, ks = cos_cache[positions + 1].unsqueeze(2), sin_cache[positions + 1].unsqueeze(2)
    return q * qc + rotate_half(q) * qs, k * kc + rotate_half(k) * ks


@pytest.mark.parametrize("case", ["own_tables", "one_tensor", "one_tensor_same_eps", "other_positions"])
def test_more_stock_forms(inductor, case):
    B, S, H, D = 2, 5, 4, 16
    g = torch.Generator().manual_seed(21)
    ang = torch.rand(12, D, generator=g) * 6.28
    positions = torch.randint(0, 10, (B, S), generator=g)
    if case in ("own_tables", "other_positions"):
        fn = own_gathered_tables if case == "own_tables" else other_positions
        args = (rand(B, S, H, D, seed=1), rand(B, S, 2, D, seed=2), ang.cos(), ang.sin(), positions)
    else:
        cos, sin = tables(S, D)
        fn = normed_from_one_tensor
        args = (rand(B, S, H, D, seed=3), rand(D, seed=4), rand(D, seed=5), cos, sin,
                1e-6 if case == "one_tensor_same_eps" else 1e-3)
    eager = fn(*args)
    result = compile_and_run(fn, args, inductor)
    assert fired(result) == (0 if case == "other_positions" else 1), result.report
    for got, want in zip(result.output, eager):
        assert got.stride() == want.stride()
        torch.testing.assert_close(got, want)


# --- interleaved pairs with per-channel tables (issue 12, class A) ------------------------------------


def diffusers_interleaved(q, k, wq, wk, cos, sin):
    # diffusers' shared apply_rotary_emb(use_real=True, use_real_unbind_dim=-1, sequence_dim=1) (Flux,
    # CogVideoX, HunyuanDiT): [S, D] tables, each pair's frequency repeat_interleave(2)'d
    from diffusers.models.embeddings import apply_rotary_emb

    q = F.rms_norm(q, (q.shape[-1],), wq, 1e-6)
    k = F.rms_norm(k, (k.shape[-1],), wk, 1e-6)
    return apply_rotary_emb(q, (cos, sin), sequence_dim=1), apply_rotary_emb(k, (cos, sin), sequence_dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_interleaved_pairs_with_per_channel_tables(inductor, dtype):
    pytest.importorskip("diffusers")
    B, S, H, D = 2, 6, 4, 16
    g = torch.Generator().manual_seed(5)
    freqs = torch.rand(S, D // 2, generator=g, dtype=torch.float64) * 6.28
    cos, sin = freqs.cos().repeat_interleave(2, -1).float(), freqs.sin().repeat_interleave(2, -1).float()
    args = (rand(B, S, H, D, seed=1, dtype=dtype), rand(B, S, 2, D, seed=2, dtype=dtype), rand(D, seed=3, dtype=dtype),
            rand(D, seed=4, dtype=dtype), cos, sin)
    eager = diffusers_interleaved(*args)
    exact = diffusers_interleaved(*as_float64(args))
    result = compile_and_run(diffusers_interleaved, args, inductor)
    assert fired(result) == 1, result.report
    assert [r.replaced for r in result.report.rewrites if r.pass_name == "qk_norm_rope"] == [
        "RMSNorm (head) + interleaved RoPE (rope_dim 16) on q and k"]
    for got, want, ref in zip(result.output, eager, exact):
        assert got.dtype == want.dtype and got.stride() == want.stride()
        # one rounding (the fused op) against eager's several: within an ulp of the output's scale, and no
        # further from the float64 result than eager
        ulp = torch.finfo(dtype).eps * ref.abs().max().item()
        torch.testing.assert_close(got, want, atol=2 * ulp, rtol=torch.finfo(dtype).eps)
        assert (got.double() - ref).abs().max().item() <= (want.double() - ref).abs().max().item() + ulp / 2


def test_per_channel_tables_that_are_not_a_rotation_decline():
    # near-miss: the odd channel's sin term uses the even channel's table entry with the wrong sign
    def not_rotation(q, k, cos, sin):
        def rot(x):
            x = F.rms_norm(x, (x.shape[-1],), None, 1e-6)
            x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
            return x * cos + torch.stack([x_imag, x_real], -1).flatten(-2) * sin
        return rot(q), rot(k)

    S, D = 5, 8
    args = (rand(1, S, 2, D, seed=1), rand(1, S, 2, D, seed=2), rand(1, S, 1, D, seed=3), rand(1, S, 1, D, seed=4))
    result = compile_and_run(not_rotation, args, False)
    assert fired(result) == 0
    for got, want in zip(result.output, not_rotation(*args)):
        torch.testing.assert_close(got, want)
