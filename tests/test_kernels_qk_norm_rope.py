"""Tests for ``torch.ops.diffopt.qk_norm_rope`` (fused QK RMSNorm + RoPE).

* The op (on CPU: the plain-torch reference) against independent float64 implementations of the
  *stock* model code forms (F.rms_norm / hand-written RMSNorm, then ``rotate_half``, the Wan
  ``empty_like`` + strided-store form, or the complex ``view_as_complex`` form), on parametrized and
  hypothesis-drawn shapes; its error vs float64 must be within 1 ulp of the output dtype and no
  worse than the stock eager code's error in the same dtype.
* The Triton kernel, run eagerly under ``TRITON_INTERPRET=1`` on CPU (in a subprocess: the variable
  must be set before triton kernels are defined), against the reference.
* The op under ``torch.compile`` (eager / aot_eager backends) and ``torch.library.opcheck``.
* ``@pytest.mark.gpu``: the Triton kernel on CUDA at small and real (anchor) shapes.

Run this file as ``python tests/test_kernels_qk_norm_rope.py --interpret`` to run the interpreter
checks directly.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything defines triton kernels

import dataclasses
import json
import subprocess
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import diffopt.kernels  # noqa: F401  registers torch.ops.diffopt.*
from diffopt.kernels.reference import qk_norm_rope_reference

OP = torch.ops.diffopt.qk_norm_rope
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


# ----------------------------------------------------------------------------------------------
# Stock code forms, as models write them. Run in float64 they are the truth; run in the test dtype
# they are "stock eager", whose error the op must not exceed.
# ----------------------------------------------------------------------------------------------
def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _upcast(dt):
    return torch.promote_types(dt, torch.float32)


def stock_rms_norm(x, w, eps, norm_over, impl):
    """x [B, S, H, D]; "hidden" normalizes the flattened [B, S, H*D] row (the norm before the head split)."""
    B, S, H, D = x.shape
    y = x.flatten(2) if norm_over == "hidden" else x
    if impl == "F":
        y = F.rms_norm(y, (y.shape[-1],), w, eps)
    else:  # hand-written with an upcast (diffusers RMSNorm / Qwen style)
        dt = y.dtype
        yf = y.to(_upcast(dt))
        yf = yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + eps)
        y = yf.to(w.dtype) * w if w is not None else yf.to(dt)
    return y.unflatten(2, (H, D)) if norm_over == "hidden" else y


def stock_rope_rotate_half(x, cos, sin, rd):
    """x*cos + rotate_half(x)*sin on the first rd channels (partial rotary), per-channel tables."""
    if cos.shape[-1] * 2 == rd:  # per-pair table written as cat([c, c])
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    xr, xp = x[..., :rd], x[..., rd:]
    xr = xr * cos + rotate_half(xr) * sin
    return torch.cat([xr.to(x.dtype), xp], -1)


def stock_rope_wan(x, fcos, fsin, rd):
    """diffusers Wan: unflatten/unbind pairs, cos = fcos[..., 0::2], sin = fsin[..., 1::2], strided stores."""
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = fcos[..., 0::2], fsin[..., 1::2]
    out = torch.empty_like(xr)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return torch.cat([out.type_as(x), xp], -1)


def stock_rope_interleaved_channel(x, cos, sin, rd):
    """diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-1): per-channel tables (each
    pair's frequency repeat_interleave(2)'d), x * cos + stack([-x_imag, x_real]) * sin."""
    xr, xp = x[..., :rd], x[..., rd:]
    x_real, x_imag = xr.reshape(*xr.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], -1).flatten(-2)
    return torch.cat([(xr * cos + rotated * sin).to(x.dtype), xp], -1)


def stock_rope_complex(x, freqs, rd):
    """Flux/Lumina-style complex multiply on pairs (2j, 2j+1)."""
    xr, xp = x[..., :rd], x[..., rd:]
    xc = torch.view_as_complex(xr.to(_upcast(x.dtype)).contiguous().reshape(*xr.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs).flatten(-2).type_as(x)
    return torch.cat([out, xp], -1)


# ----------------------------------------------------------------------------------------------
# Test cases: one description -> op inputs + the stock computation on the same values.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    B: int = 2
    S: int = 7
    Hq: int = 4
    Hk: int = 2
    D: int = 16
    rope_dim: int = 16
    norm_over: str = "head"
    form: str = "rotate_half"  # rotate_half | rotate_half_pair | wan | complex | interleaved_channel
    dtype: torch.dtype = F32
    table_dtype: torch.dtype = F32
    tables: str = "bcast"  # bcast [1,S,1,L] | full [B,S,1,L] | expand | seq3 [S,1,L] | pos_s | pos_bs
    layout: str = "contig"  # contig | packed (head slices of qkv) | bhsd (transposed) | strided_d
    weights: bool = True
    norm_impl: str = "F"  # F | manual
    q_eps: float = 1e-6
    k_eps: float = 1e-5
    pass_minus_one: bool = False  # pass rope_dim=-1 (only when rope_dim == D)
    seed: int = 0

    @property
    def style(self):
        return "neox" if self.form.startswith("rotate_half") else "interleaved"


def build(case: Case, device="cpu"):
    """Returns (op_args, op_kwargs, stock) where stock(dtype_or_None) runs the stock form:
    None -> float64 truth, else in the case's own dtypes (stock eager)."""
    g = torch.Generator().manual_seed(case.seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    B, S, Hq, Hk, D, rd, dt = case.B, case.S, case.Hq, case.Hk, case.D, case.rope_dim, case.dtype
    # activations: build the base in the test dtype, then take views (values identical for all paths)
    if case.layout == "contig":
        q, k = rn(B, S, Hq, D).to(dt), rn(B, S, Hk, D).to(dt)
    elif case.layout == "packed":
        qkv = rn(B, S, Hq + 2 * Hk, D).to(dt)
        q, k = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hk]
    elif case.layout == "bhsd":
        q, k = rn(B, Hq, S, D).to(dt).transpose(1, 2), rn(B, Hk, S, D).to(dt).transpose(1, 2)
    elif case.layout == "strided_d":
        q, k = rn(B, S, Hq, D, 2).to(dt)[..., 1], rn(B, S, Hk, D, 2).to(dt)[..., 0]
    else:
        raise ValueError(case.layout)
    nw = (lambda H: D) if case.norm_over == "head" else (lambda H: H * D)
    qw = (1 + 0.5 * rn(nw(Hq))).to(dt) if case.weights else None
    kw = (1 + 0.5 * rn(nw(Hk))).to(dt) if case.weights else None

    # tables: base tensors whose trailing shape is `tail`, in the table dtype
    L = rd if case.form in ("rotate_half", "interleaved_channel") else rd // 2
    tail = {"rotate_half": (rd,), "rotate_half_pair": (L,), "wan": (rd,), "complex": (L, 2),
            "interleaved_channel": (rd,)}[case.form]
    positions = None
    if case.tables.startswith("pos"):
        P = S + 5
        prefix = (P,)
        shape = (S,) if case.tables == "pos_s" else (B, S)
        positions = torch.randint(0, P, shape, generator=g).to(device)
        if case.tables == "pos_bs":
            positions = positions.int()
    else:
        prefix = {"bcast": (1, S, 1), "full": (B, S, 1), "expand": (1, S, 1), "seq3": (S, 1)}[case.tables]

    def table():
        t = rn(*prefix, *tail).to(case.table_dtype)
        return t.expand(B, S, 1, *tail) if case.tables == "expand" else t

    if case.form == "complex":
        ri = table()
        cbase, sbase = ri[..., 0], ri[..., 1]
        cos, sin = cbase, sbase  # views of view_as_real(freqs): stride 2
    else:
        cbase, sbase = table(), table()
        cos, sin = (cbase[..., 0::2], sbase[..., 1::2]) if case.form == "wan" else (cbase, sbase)

    rope_dim_arg = -1 if case.pass_minus_one else rd
    kwargs = dict(norm_over=case.norm_over, rope_style=case.style, rope_dim=rope_dim_arg, q_eps=case.q_eps,
                  k_eps=case.k_eps)
    args = (q, k, qw, kw, cos, sin, positions)

    def stock(to64: bool):
        cv = (lambda t: t.double() if t is not None else None) if to64 else (lambda t: t)
        cb, sb = cv(cbase), cv(sbase)
        if positions is not None:  # gather the cache rows like the model would
            pos = positions.long().reshape(-1, S)
            cb, sb = cb[pos].unsqueeze(2), sb[pos].unsqueeze(2)
        out = []
        for x, w, eps in ((q, qw, case.q_eps), (k, kw, case.k_eps)):
            x = stock_rms_norm(cv(x), cv(w), eps, case.norm_over, case.norm_impl)
            if case.form == "wan":
                x = stock_rope_wan(x, cb, sb, rd)
            elif case.form == "complex":
                x = stock_rope_complex(x, torch.complex(cb, sb), rd)
            elif case.form == "interleaved_channel":
                x = stock_rope_interleaved_channel(x, cb, sb, rd)
            else:
                x = stock_rope_rotate_half(x, cb, sb, rd)
            out.append(x)
        return tuple(out)

    return args, kwargs, stock


def check_outputs(got, truth, stock_out, dtype):
    """got within ~1 ulp (of dtype) of the float64 truth, and its error no worse than stock's."""
    eps = torch.finfo(dtype).eps
    for name, g_, t, s in zip("qk", got, truth, stock_out):
        # laid out like the input (output_like): dense, channels innermost
        assert g_.dtype == dtype and g_.shape == t.shape and g_.stride(-1) == 1, name
        assert torch.empty_like(g_).stride() == g_.stride(), name
        t = t.double()
        scale = t.abs().max().item()
        err = (g_.double() - t).abs()
        tol = 0.5 * eps * t.abs() + 4e-6 * scale + (2.0 ** -24 if dtype == F16 else 0.0)
        excess = (err - tol).max().item()
        assert excess <= 0, f"{name}: error exceeds 1/2 ulp + fp32 slack by {excess:.3g} (max err {err.max():.3g})"
        serr = (s.double() - t).abs()
        slack = 1e-5 * scale
        assert err.max() <= serr.max() + slack, f"{name}: max err {err.max():.3g} > stock {serr.max():.3g}"
        assert err.mean() <= serr.mean() + slack, f"{name}: mean err {err.mean():.3g} > stock {serr.mean():.3g}"


def run_case(case: Case, device="cpu", fn=None):
    args, kwargs, stock = build(case, device)
    before = [a.clone() if a is not None else None for a in args]
    got = (fn or OP)(*args, **kwargs)
    for a, b in zip(args, before):  # functional: nothing mutated
        assert a is None or torch.equal(a, b)
    check_outputs(got, stock(True), stock(False), case.dtype)
    return got


# Representative cases (also run through the Triton kernel on GPU and, smaller, in the interpreter).
CASES = [
    Case(),  # per-head, neox, per-channel fp32 tables
    Case(Hq=8, Hk=1, S=13, D=24, rope_dim=24, form="rotate_half", table_dtype=BF16, tables="full", layout="packed"),
    Case(Hq=5, Hk=1, D=40, rope_dim=20, form="rotate_half_pair", tables="expand", layout="bhsd"),  # ratio 5, partial
    Case(Hq=4, Hk=4, form="rotate_half", layout="strided_d", tables="pos_s", weights=False),
    Case(Hq=6, Hk=3, D=32, rope_dim=32, norm_over="hidden", form="wan", tables="bcast"),  # Wan form
    Case(Hq=7, Hk=7, D=16, rope_dim=8, norm_over="hidden", form="wan", tables="seq3", layout="packed",
         norm_impl="manual"),
    Case(Hq=4, Hk=1, D=16, rope_dim=16, form="complex", tables="pos_bs", pass_minus_one=True),
    Case(Hq=15, Hk=3, D=8, rope_dim=6, norm_over="hidden", form="rotate_half", table_dtype=F16, tables="full",
         layout="bhsd", norm_impl="manual"),
    Case(Hq=16, Hk=2, D=64, rope_dim=32, form="wan", table_dtype=BF16, tables="expand", layout="packed",
         q_eps=1e-2, k_eps=1e-3),  # eps large enough to matter; each its own
    Case(Hq=6, Hk=2, D=32, rope_dim=24, form="interleaved_channel", table_dtype=BF16, tables="full"),
    Case(Hq=4, Hk=4, D=16, rope_dim=16, norm_over="hidden", form="interleaved_channel", tables="pos_bs"),
]
ALL_DTYPES = [F32, BF16, F16]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_op_cpu_vs_float64_stock(case, dtype):
    case = dataclasses.replace(case, dtype=dtype)
    got = run_case(case)
    args, kwargs, _ = build(case)
    for g_, r in zip(got, qk_norm_rope_reference(*args, **kwargs)):  # on CPU the op IS the reference
        assert torch.equal(g_, r)


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    @st.composite
    def random_cases(draw):
        form = draw(st.sampled_from(["rotate_half", "rotate_half_pair", "wan", "complex", "interleaved_channel"]))
        D = draw(st.sampled_from([8, 16, 24, 40, 64]))
        rd = draw(st.sampled_from([D, D, 2 * draw(st.integers(1, D // 2))]))
        Hk = draw(st.integers(1, 3))
        return Case(
            B=draw(st.integers(1, 2)), S=draw(st.integers(1, 13)), Hk=Hk,
            Hq=Hk * draw(st.sampled_from([1, 2, 4, 5, 8])),
            D=D, rope_dim=rd, norm_over=draw(st.sampled_from(["head", "hidden"])), form=form,
            dtype=draw(st.sampled_from(ALL_DTYPES)),
            table_dtype=F32 if form == "complex" else draw(st.sampled_from(ALL_DTYPES)),
            tables=draw(st.sampled_from(["bcast", "full", "expand", "seq3", "pos_s", "pos_bs"])),
            layout=draw(st.sampled_from(["contig", "packed", "bhsd", "strided_d"])),
            weights=draw(st.booleans()), norm_impl=draw(st.sampled_from(["F", "manual"])),
            q_eps=draw(st.sampled_from([1e-6, 1e-5, 1e-3, 0.3])), k_eps=draw(st.sampled_from([1e-6, 1e-2, 0.5])),
            seed=draw(st.integers(0, 2**16)))

    @settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(random_cases())
    def test_op_cpu_random_shapes(case):
        run_case(case)


def test_checker_catches_wrong_rotation():
    """The numeric checker must reject a plausible bug: sin with the wrong sign."""
    case = Case(dtype=BF16, Hq=4, Hk=2, S=9)
    args, kwargs, stock = build(case)
    q, k, qw, kw, cos, sin, pos = args
    wrong = OP(q, k, qw, kw, cos, -sin, pos, **kwargs)
    with pytest.raises(AssertionError):
        check_outputs(wrong, stock(True), stock(False), case.dtype)


def test_table_layout_matters():
    """Per-channel neox tables whose halves differ are not the same as per-pair tables."""
    case = Case(form="rotate_half", D=16, rope_dim=16)
    args, kwargs, _ = build(case)
    q, k, qw, kw, cos, sin, pos = args
    full = OP(*args, **kwargs)
    halves = OP(q, k, qw, kw, cos[..., :8].contiguous(), sin[..., :8].contiguous(), pos, **kwargs)
    assert not torch.allclose(full[0], halves[0])
    same = OP(q, k, qw, kw, torch.cat([cos[..., :8]] * 2, -1), torch.cat([sin[..., :8]] * 2, -1), pos, **kwargs)
    torch.testing.assert_close(same, halves, rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["rope_dim_odd", "rope_dim_big", "table_len", "weight_shape", "style", "table_shape"])
def test_bad_arguments_raise(bad):
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8)
    c = s = torch.randn(1, 3, 1, 4)
    kw = dict(norm_over="head", rope_style="neox", rope_dim=8, q_eps=1e-6, k_eps=1e-6)
    w = None
    if bad == "rope_dim_odd":
        kw["rope_dim"] = 7
    elif bad == "rope_dim_big":
        kw["rope_dim"] = 10
    elif bad == "table_len":
        c = s = torch.randn(1, 3, 1, 6)
    elif bad == "weight_shape":
        w = torch.randn(16)  # per-head norm wants [D]
    elif bad == "style":
        kw["rope_style"] = "gptj"
    elif bad == "table_shape":
        c = s = torch.randn(2, 3, 1, 4)  # B=1
    with pytest.raises((ValueError, RuntimeError)):
        OP(q, k, w, None, c, s, None, **kw)


# ----------------------------------------------------------------------------------------------
# torch.compile and opcheck (CPU: the op runs its reference kernel)
# ----------------------------------------------------------------------------------------------
def _fn(q, k, qw, kw, cos, sin, pos, kwargs):
    def f(q, k, qw, kw, cos, sin, pos):
        qo, ko = OP(q * 1.5, k, qw, kw, cos, sin, pos, **kwargs)
        return qo + 1, ko.sum(-1)
    return f


@pytest.mark.parametrize("backend,dynamic", [("eager", False), ("aot_eager", False), ("aot_eager", True)])
def test_op_under_torch_compile(backend, dynamic):
    torch._dynamo.reset()
    for case in (CASES[2], CASES[4], CASES[6]):
        case = dataclasses.replace(case, dtype=BF16)
        args, kwargs, _ = build(case)
        f = _fn(*args, kwargs)
        expect = f(*args)
        got = torch.compile(f, backend=backend, fullgraph=True, dynamic=dynamic)(*args)
        torch.testing.assert_close(got, expect, rtol=0, atol=0)


@pytest.mark.parametrize("i", [0, 4, 6, 8])
def test_opcheck(i):
    args, kwargs, _ = build(dataclasses.replace(CASES[i], B=1, S=3))
    torch.library.opcheck(OP.default, args, kwargs)


# ----------------------------------------------------------------------------------------------
# Triton kernel in the interpreter (CPU), in a subprocess
# ----------------------------------------------------------------------------------------------
INTERP_CASES = [  # (case, config override); small: the interpreter runs each program in numpy
    (Case(B=1, S=3, Hq=4, Hk=2, D=16, rope_dim=12, form="interleaved_channel", dtype=BF16, table_dtype=BF16,
          layout="packed"), None),
    (Case(B=1, S=3, Hq=4, Hk=2, D=16, rope_dim=16, q_eps=0.1, k_eps=0.5), None),
    (Case(B=2, S=3, Hq=5, Hk=1, D=24, rope_dim=12, form="rotate_half_pair", dtype=BF16, table_dtype=BF16,
          tables="expand", layout="packed"), None),
    (Case(B=1, S=3, Hq=8, Hk=1, D=16, rope_dim=16, form="rotate_half", dtype=F16, table_dtype=F16, tables="pos_bs",
          layout="bhsd", weights=False), dict(block_hq=2, block_hk=1)),
    (Case(B=1, S=3, Hq=6, Hk=2, D=40, rope_dim=32, form="wan", dtype=BF16, tables="full", layout="strided_d"), None),
    (Case(B=1, S=2, Hq=6, Hk=3, D=16, rope_dim=16, norm_over="hidden", form="wan", dtype=BF16, layout="packed",
          q_eps=0.25, k_eps=0.05), None),  # eps large enough that using the wrong one shows
    (Case(B=1, S=2, Hq=6, Hk=3, D=16, rope_dim=8, norm_over="hidden", form="complex", dtype=BF16, tables="pos_s",
          q_eps=1e-2), dict(block_hq=4, block_hk=2, hints=True)),  # two-pass hidden norm, partial rope
    (Case(B=2, S=2, Hq=5, Hk=5, D=16, rope_dim=16, norm_over="hidden", form="rotate_half", dtype=F32,
          table_dtype=BF16, tables="seq3", layout="strided_d", norm_impl="manual"), dict(block_hq=1, block_hk=2)),
    (Case(B=1, S=3, Hq=16, Hk=2, D=64, rope_dim=64, form="wan", dtype=BF16, table_dtype=F32, layout="packed"), None),
]


def _interpret_main():
    import triton

    from diffopt.kernels.qk_norm_rope_triton import qk_norm_rope_triton as launcher
    from diffopt.kernels.qk_norm_rope_triton import _qk_norm_rope_kernel

    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert "Interpret" in type(_qk_norm_rope_kernel).__name__, type(_qk_norm_rope_kernel)
    stats = []
    for case, cfg in INTERP_CASES:
        args, kwargs, stock = build(case)
        got = launcher(*args, **kwargs, config=cfg)
        ref = qk_norm_rope_reference(*args, **kwargs)
        eps = torch.finfo(case.dtype).eps
        for g_, r in zip(got, ref):
            assert g_.shape == r.shape and g_.dtype == r.dtype and g_.stride() == r.stride()
            diff = (g_.double() - r.double()).abs()
            scale = r.abs().max().item()
            assert (diff <= eps * r.double().abs() + 4e-6 * scale).all(), (case, cfg, diff.max().item())
            exact = (g_ == r).double().mean().item()
            if case.dtype != F32:
                assert exact >= 0.99, (case, cfg, exact)
            stats.append(exact)
        check_outputs(got, stock(True), stock(False), case.dtype)
    print(json.dumps({"checked": len(INTERP_CASES), "triton": triton.__version__,
                      "min_exact_fraction": min(stats)}))


def test_triton_kernel_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpret"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["checked"] == len(INTERP_CASES)


# ----------------------------------------------------------------------------------------------
# GPU (Triton on CUDA)
# ----------------------------------------------------------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES + [c for c, _ in INTERP_CASES],
                         ids=[f"case{i}" for i in range(len(CASES) + len(INTERP_CASES))])
def test_gpu_small(case, dtype):
    run_case(dataclasses.replace(case, dtype=dtype), device="cuda")


ANCHORS = {  # name: (case, description)
    "cosmos3": Case(B=1, S=28520, Hq=32, Hk=8, D=128, rope_dim=128, form="rotate_half", dtype=BF16,
                    table_dtype=BF16, q_eps=1e-6, k_eps=1e-6),
    "wan1.3b": Case(B=1, S=32760, Hq=12, Hk=12, D=128, rope_dim=128, norm_over="hidden", form="wan", dtype=BF16,
                    q_eps=1e-6, k_eps=1e-6),
    "wan14b": Case(B=1, S=32760, Hq=40, Hk=40, D=128, rope_dim=128, norm_over="hidden", form="wan", dtype=BF16,
                   q_eps=1e-6, k_eps=1e-6),
}


@gpu
@needs_cuda
@pytest.mark.parametrize("name", list(ANCHORS))
def test_gpu_anchor_shapes(name):
    got = run_case(ANCHORS[name], device="cuda")
    # the CUDA kernel agrees with the reference run on the GPU (identical up to fp32 ordering)
    args, kwargs, _ = build(ANCHORS[name], device="cuda")
    ref = qk_norm_rope_reference(*args, **kwargs)
    for g_, r in zip(got, ref):
        assert (g_ != r).double().mean().item() < 0.01


@gpu
@needs_cuda
def test_gpu_inductor_and_int64_offsets():
    case = dataclasses.replace(CASES[1], dtype=BF16)
    args, kwargs, _ = build(case, device="cuda")
    f = _fn(*args, kwargs)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(*args), f(*args), rtol=0, atol=0)
    # q larger than 2**31 elements: offsets must be 64-bit; check rows at both ends
    S, H, D = (2**31) // (32 * 128) + 3, 32, 128
    q = torch.randn(1, S, H, D, device="cuda", dtype=BF16)
    k = torch.randn(1, S, 1, D, device="cuda", dtype=BF16)
    cos, sin = torch.randn(2, 1, S, 1, 64, device="cuda").unbind(0)
    kw = dict(norm_over="head", rope_style="interleaved", rope_dim=128, q_eps=1e-6, k_eps=1e-6)
    qo, ko = OP(q, k, None, None, cos, sin, None, **kw)
    for sl in (slice(0, 3), slice(S - 3, S)):
        rq, rk = qk_norm_rope_reference(q[:, sl], k[:, sl], None, None, cos[:, sl], sin[:, sl], None, **kw)
        torch.testing.assert_close(qo[:, sl], rq, rtol=0.01, atol=0.02)
        torch.testing.assert_close(ko[:, sl], rk, rtol=0.01, atol=0.02)


if __name__ == "__main__" and "--interpret" in sys.argv:
    _interpret_main()


def test_a_second_import_of_the_kernel_module_does_not_register_twice():
    # A source checkout on sys.path next to the installed package imports the file again as
    # ``kernels.qk_norm_rope``; the operator must stay registered once and keep working.
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = (
        "import sys, torch, diffopt.kernels; sys.path.insert(0, %r); import kernels.qk_norm_rope as again; "
        "x = torch.randn(1, 3, 2, 8); c = torch.randn(1, 3, 1, 8); "
        "out = again.qk_norm_rope(x, x, None, None, c, c, norm_over='head', rope_style='neox', rope_dim=8, "
        "q_eps=1e-6, k_eps=1e-6); print(out[0].shape)" % str(repo)
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "torch.Size([1, 3, 2, 8])" in run.stdout


@pytest.mark.parametrize("layout", ["contig", "bhsd", "packed"])
def test_outputs_follow_the_input_layout(layout):
    # Stock elementwise code keeps its input's dim order; so does the op (strides are part of the result).
    args, kwargs, _ = build(Case(B=2, S=5, Hq=4, Hk=2, D=16, rope_dim=16, layout=layout))
    q, k = args[0], args[1]
    qo, ko = OP(*args, **kwargs)
    assert qo.stride() == torch.empty_like(q).stride() and ko.stride() == torch.empty_like(k).stride()
    if layout == "bhsd":
        assert not qo.is_contiguous() and qo.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_out_dtype_rounds_once_from_fp32(out_dtype):
    # fp32 q/k with magnitudes past fp16's range before the norm: computing in fp32 and rounding once at the
    # exit is finite and within half an ulp of the float64 result; casting first would overflow.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 4, 16, generator=g) * 3e5
    k = torch.randn(1, 6, 2, 16, generator=g) * 3e5
    ang = torch.rand(6, 8, generator=g) * 6.28
    cos, sin = ang.cos().view(1, 6, 1, 8), ang.sin().view(1, 6, 1, 8)
    kw = dict(norm_over="head", rope_style="neox", rope_dim=16, q_eps=1e-6, k_eps=1e-6)
    qo, ko = OP(q, k, None, None, cos, sin, **kw, out_dtype=out_dtype)
    q64, k64 = OP(q, k, None, None, cos, sin, **kw)
    for got, ref in ((qo, q64), (ko, k64)):
        assert got.dtype == out_dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got, ref.to(out_dtype), rtol=0, atol=0)
