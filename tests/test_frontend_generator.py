"""Random attention front-ends in stock styles through ``qk_norm_rope`` (issue 13).

Each example is one front-end written the way real models write it: an RMSNorm of q
and k (``F.rms_norm``, ``nn.RMSNorm``, by hand with or without a float32 upcast;
per head or across heads before the head split; weights absent or of shape
``[D]``/``[1, D]``/``[1, 1, 1, D]``; its own eps per tensor), then a rotary
embedding (half-split via ``cat`` or via stores into ``empty_like``, interleaved
pairs via ``stack`` or stores into ``out[..., 0::2]``, complex), with tables of
any float or complex dtype and of the shapes models use, GQA, partial rotary,
transposed layouts, dtype exits and round trips, and consumers that depend on
strides. Near-misses (tables that differ between q and k, a product that is no
rotation, a norm over another dim, eps 0, a norm intermediate used elsewhere)
must not be fused.

Each case is compiled with ``backend="diffopt"`` (``qk_norm_rope`` on for CPU,
``strict``), with Inductor on or off, and must

- agree with eager within the tolerance of the lowest precision eager rounds to
  (found by watching eager's ops), and keep each rounding the program asks for
  explicitly (``.to(torch.bfloat16).float()``);
- never be meaningfully less accurate than eager against the same module run in
  float64 (error over the output's scale: rms at most 1.25x eager's, max at most
  2x, each plus 16 fp32 ulps);
- fuse every stock form the pass claims (all but ``NOT_FUSED``), and no near-miss;
- give every output eager's strides.

Cases of the families in ``KNOWN_FAILING`` (wrong today) are left out of the random
tests; each family's example runs as a strict xfail. An offline sweep that runs
uniform random cases, known-failing ones included, and prints every problem:
``python tests/test_frontend_generator.py 2000 [SEED] [skip-known]``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import random
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from diffopt.testing import trace

# --- Known-failing families --------------------------------------------------------
# Cases the current code gets wrong. The random tests skip them; each family's example
# runs as a strict xfail, so a fix shows up as XPASS: then delete the entry.


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    reason: str
    modes: tuple[str, ...]  # where it fails: "aten" (Inductor off), "inductor"
    member: Callable[["Case"], bool]  # which generated cases belong to it
    example: dict  # a member: fields that differ from Case()


KNOWN_FAILING: list[Family] = [
    # none today: the families found so far are fixed, each with its own regression test
    # (tests/test_qk_norm_rope_exactness.py, tests/test_split_contiguous.py)
]

# Stock forms the pass does not fuse (yet). Every other stock case (no near-miss, no known failure)
# must fire; delete an entry when the pass learns the form.
NOT_FUSED: list[tuple[str, Callable[["Case"], bool]]] = [
    # What the fused op cannot compute (it declines, by design: docs/passes.md)
    ("eager rounds to a dtype coarser than its result's before the exit (a rounding the program asks for)",
     lambda c: _EPS[lowest_rounding(c)] > _EPS[rotated_dtype(c)]),
    ("float16 math or a float16 round trip with a bfloat16 result (float16 does not hold bfloat16's range: eager's fp16 rounding "
     "is part of what it computes)",
     lambda c: (c.dtype == "float16" or c.round_trip != "none" and c.round_trip_dtype == "float16")
     and rotated_dtype(c) == torch.bfloat16),
    ("a transposed input whose stock result has another layout (the op writes its input's layout; the pass "
     "declines rather than hand consumers other strides)",
     lambda c: c.layout == "bhsd_input" and not rotated_q(c).transpose(1, 2).is_contiguous()),
    ("the rotation in [B, H, S, D] whose stock result is laid out otherwise than its input (partial rotary's "
     "cat makes it contiguous): the op writes its input's layout",
     lambda c: c.layout in ROTATED_BHSD and not rotated_q(c).transpose(1, 2).is_contiguous()),
    ("float64 math (the op computes in float32)",
     lambda c: c.dtype == "float64" or (c.table_dtype in ("float64", "complex128") and c.table_cast != "to_x")),
    # Forms the pass does not recognise yet (issue 12)
    ("half-split stores with per-channel tables (four table slices)",
     lambda c: c.rope == "neox_stores" and c.table_len == "channel"),
    ("dynamic=True: a hand-written norm's eps (a float attribute) becomes a graph input, packed "
     "tables' length a symbol",
     lambda c: c.dynamic == "all" and (c.norm.startswith("hand") or c.tables_from == "packed")),
]

# --- The cases ---------------------------------------------------------------------

DTYPES = {name: getattr(torch, name) for name in
          ("float16", "bfloat16", "float32", "float64", "complex64", "complex128")}
ROTATED_BHSD = ("transpose_after_norm", "transpose_before_norm")  # rotated as [B, H, S, D]


@dataclasses.dataclass(frozen=True)
class Case:
    """One front-end; ``check_case(Case(...), inductor)`` with these fields is a repro."""

    B: int = 1
    S: int = 4
    Hq: int = 2
    Hk: int = 2
    D: int = 8
    rope_dim: int = 8
    norm_over: str = "head"  # head (over D) | hidden (over H*D, before the head split)
    norm: str = "functional"  # functional | module | hand | hand_upcast (diffusers) | hand_fp32 (llama)
    square: str = "pow"  # hand-written norms: pow | mul
    weight: str = "D"  # none | D | 1D | 111D: [n], [1, n], [1, 1, (1,) n]
    weight_dtype: str = "input"  # input | float32
    q_eps: float = 1e-6
    k_eps: float = 1e-6
    head_split: str = "unflatten"  # unflatten | view (hidden norms and qkv_split)
    rope: str = "neox_cat"  # neox_cat | neox_stores | interleaved_stack | interleaved_stores | complex
    pairs: str = "unbind"  # interleaved: unbind (unflatten(-1, (-1, 2)).unbind(-1)) | slice (0::2, 1::2)
    table_len: str = "pair"  # pair (L = rope_dim / 2) | channel (L = rope_dim)
    table_dtype: str = "float32"
    # cache [S, L] | shared [1, S, 1, L] | batched [B, S, 1, L] (heads at 1) | positions: [P, L] gathered
    table_shape: str = "shared"
    table_cast: str = "none"  # none | to_x (tables .to(x.dtype)) | type_as (rotation's result .type_as(x))
    # input | packed (given as cat([cos, sin], -1), split in forward) | expanded (shared tables given
    # .expand()ed over the batch: stride 0) | built (in forward, from arange and inverse frequencies)
    tables_from: str = "input"
    layout: str = "bshd"  # bshd | bhsd_input | qkv_split | transpose_after_norm | transpose_before_norm
    dtype: str = "float32"  # q/k as given
    upcast: bool = False  # .float() before the norm
    round_trip: str = "none"  # none | after_norm | after_rope
    round_trip_dtype: str = "bfloat16"
    exit: str = "none"  # none | float16 | bfloat16 | float32: cast at the end
    consumer: str = "none"  # none | as_strided | view | transpose_reshape | sdpa
    q_scale: float = 1.0
    k_scale: float = 1.0
    near_miss: str = "none"  # none | different_tables | not_rotation | norm_dim | eps0 | scale_used | normed_used
    dynamic: str = "no"  # no | tokens (token dims marked dynamic; S not 1, 2, 4, 8) | all (dynamic=True)
    seed: int = 0


def _cast(exact: bool, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``; in the float64 reference every cast keeps float64."""
    return x.to(torch.float64 if exact else dtype)


class FunctionalNorm(nn.Module):
    def __init__(self, n: int, eps: float, weight: torch.Tensor | None):
        super().__init__()
        self.n, self.eps = n, eps
        self.weight = None if weight is None else nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        return F.rms_norm(x, (self.n,), self.weight, self.eps)


class HandNorm(nn.Module):
    def __init__(self, case: Case, n: int, eps: float, weight: torch.Tensor | None, exact: bool):
        super().__init__()
        self.case, self.eps, self.exact = case, eps, exact
        self.dim = 1 if case.near_miss == "norm_dim" else -1
        self.weight = None if weight is None else nn.Parameter(weight, requires_grad=False)

    def square_mean(self, x):
        square = x.pow(2) if self.case.square == "pow" else x * x
        return square.mean(self.dim, keepdim=True)

    def forward(self, x):
        """(normed x, the rsqrt factor)"""
        w, f32 = self.weight, torch.float32
        if self.case.norm == "hand":  # no upcast: everything in x's dtype
            scale = torch.rsqrt(self.square_mean(x) + self.eps)
            x = x * scale
            return (x if w is None else x * w), scale
        if self.case.norm == "hand_upcast":  # diffusers' RMSNorm
            input_dtype = x.dtype
            scale = torch.rsqrt(self.square_mean(_cast(self.exact, x, f32)) + self.eps)
            x = x * scale
            if w is None:
                return x.to(input_dtype), scale
            if w.dtype in (torch.float16, torch.bfloat16):
                x = x.to(w.dtype)
            return x * w, scale
        # hand_fp32: llama / Qwen
        input_dtype = x.dtype
        x = _cast(self.exact, x, f32)
        scale = torch.rsqrt(self.square_mean(x) + self.eps)
        x = (x * scale).to(input_dtype)
        return (x if w is None else w * x), scale


class FrontEnd(nn.Module):
    """q/k norm + RoPE (+ consumer) for one ``Case``; ``exact=True``: the float64 reference."""

    def __init__(self, case: Case, exact: bool = False):
        super().__init__()
        self.case, self.exact = case, exact
        self.view_transposed = False  # the "view" consumer: which view eager's layout allows
        g = torch.Generator().manual_seed(case.seed + 1)
        norms = []
        for heads, eps in ((case.Hq, case.q_eps), (case.Hk, case.k_eps)):
            n = case.D if case.norm_over == "head" else heads * case.D
            weight = None
            if case.weight != "none":
                rank = 4 if case.norm_over == "head" else 3  # the normed tensor's
                shape = {"D": (n,), "1D": (1, n), "111D": (1,) * (rank - 1) + (n,)}
                dtype = torch.float32 if case.weight_dtype == "float32" else DTYPES[case.dtype]
                weight = (1 + 0.5 * torch.randn(shape[case.weight], generator=g, dtype=torch.float64)).to(dtype)
                if exact:
                    weight = weight.double()
            if case.norm == "functional":
                norms.append(FunctionalNorm(n, eps, weight))
            elif case.norm == "module":
                norm = nn.RMSNorm(n, eps=eps, elementwise_affine=weight is not None)
                if weight is not None:
                    norm.weight = nn.Parameter(weight, requires_grad=False)
                norms.append(norm)
            else:
                norms.append(HandNorm(case, n, eps, weight, exact))
        self.q_norm, self.k_norm = norms

    def cast(self, x, dtype_name):
        return _cast(self.exact, x, DTYPES[dtype_name])

    # the rotation ------------------------------------------------------------------
    def table(self, t, x, positions):
        if positions is not None:  # each rotation gathers its rows itself
            t = t[positions]
        if self.case.table_shape in ("cache", "positions") and self.case.layout not in ROTATED_BHSD:
            t = t.unsqueeze(1)  # [S, L] -> [S, 1, L], broadcast over heads
        if self.case.table_cast == "to_x" and not t.is_complex():
            t = t.to(x.dtype)
        return t

    def rotate(self, x, tables, positions):
        c = self.case
        if c.rope == "complex":
            (freqs,) = (self.table(t, x, positions) for t in tables)
            xc = torch.view_as_complex(self.cast(x, "float32").reshape(*x.shape[:-1], -1, 2))
            out = torch.view_as_real(xc * (freqs.real if c.near_miss == "not_rotation" else freqs)).flatten(-2)
        else:
            cos, sin = (self.table(t, x, positions) for t in tables)
            # the near-miss x*cos + rotate_half(x)*cos: the same table (node) twice is no rotation
            twice = c.near_miss == "not_rotation"
            h = x.shape[-1] // 2
            if c.rope == "neox_cat":
                if cos.shape[-1] == h:
                    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
                sin = cos if twice else sin
                out = x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin
            elif c.rope == "neox_stores":
                x1, x2 = x[..., :h], x[..., h:]
                c1, c2 = (cos, cos) if cos.shape[-1] == h else (cos[..., :h], cos[..., h:])
                s1, s2 = (sin, sin) if sin.shape[-1] == h else (sin[..., :h], sin[..., h:])
                s1, s2 = (c1, c2) if twice else (s1, s2)
                out = torch.empty_like(x)
                out[..., :h] = x1 * c1 - x2 * s1
                out[..., h:] = x2 * c2 + x1 * s2
            else:
                if c.pairs == "unbind":
                    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
                else:
                    x1, x2 = x[..., 0::2], x[..., 1::2]
                if cos.shape[-1] == 2 * h:  # per-channel tables (repeat_interleave(2)): Wan
                    cos, sin = cos[..., 0::2], sin[..., 1::2]
                sin = cos if twice else sin
                if c.rope == "interleaved_stack":
                    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
                else:
                    out = torch.empty_like(x)
                    out[..., 0::2] = x1 * cos - x2 * sin
                    out[..., 1::2] = x1 * sin + x2 * cos
        return out.type_as(x) if c.table_cast == "type_as" else out

    def round_trip(self, x, where):
        if self.case.round_trip == where:
            x = self.cast(x, self.case.round_trip_dtype).to(x.dtype)
        return x

    def one(self, x, norm, heads, tables, positions):
        c = self.case
        if c.layout == "bhsd_input":  # given as [B, H, S, D] ([S, B, H*D] before an across-heads norm)
            x = x.transpose(1, 2) if c.norm_over == "head" else x.transpose(0, 1)
        if c.upcast:
            x = self.cast(x, "float32")
        if c.layout == "transpose_before_norm":
            x = x.transpose(1, 2)
        x = norm(x)
        x, scale = x if isinstance(x, tuple) else (x, None)
        normed = x
        if c.norm_over == "hidden":
            x = x.unflatten(-1, (heads, c.D)) if c.head_split == "unflatten" else x.view(*x.shape[:-1], heads, c.D)
        if c.layout == "transpose_after_norm":
            x = x.transpose(1, 2)
        x = self.round_trip(x, "after_norm")
        if c.rope_dim < c.D:
            x = torch.cat([self.rotate(x[..., : c.rope_dim], tables, positions), x[..., c.rope_dim :]], -1)
        else:
            x = self.rotate(x, tables, positions)
        x = self.round_trip(x, "after_rope")
        if c.exit != "none":
            x = self.cast(x, c.exit)
        return x, normed, scale

    def built_tables(self, scale):
        """The stock form that builds its tables every call: positions x inverse frequencies."""
        c, f32 = self.case, torch.float64 if self.exact else torch.float32
        rows = c.S + 3 if c.table_shape == "positions" else c.S
        inv_freq = 1.0 / 10000 ** (torch.arange(0, c.rope_dim, 2, dtype=f32) / c.rope_dim)
        angle = torch.outer(torch.arange(rows, dtype=f32) * scale, inv_freq)
        if c.table_shape in ("shared", "batched"):
            angle = angle[None].expand(c.B if c.table_shape == "batched" else 1, -1, -1)
        return tables_from_angle(c, angle, self.exact)

    def forward(self, q, k, v, tables, k_tables, positions):
        c = self.case
        if c.tables_from == "packed":
            tables, k_tables = tables[0].chunk(2, -1), k_tables[0].chunk(2, -1)
        elif c.tables_from == "built":
            tables, k_tables = self.built_tables(1.0), self.built_tables(0.5)
        if c.layout == "qkv_split":
            q, k, v = q.split([c.Hq * c.D, c.Hk * c.D, c.Hk * c.D], -1)
            if c.norm_over == "head":
                split = (lambda t, h: t.unflatten(-1, (h, c.D))) if c.head_split == "unflatten" else (
                    lambda t, h: t.view(*t.shape[:-1], h, c.D))
                q, k, v = split(q, c.Hq), split(k, c.Hk), split(v, c.Hk)
            else:
                v = v.unflatten(-1, (c.Hk, c.D))
        q, q_normed, q_scale = self.one(q, self.q_norm, c.Hq, tables, positions)
        k_tables = k_tables if c.near_miss == "different_tables" else tables
        k, _, _ = self.one(k, self.k_norm, c.Hk, k_tables, positions)
        extra = ()
        if c.near_miss == "normed_used":
            extra = (q_normed,)
        elif c.near_miss == "scale_used":
            extra = (q_scale,)
        bhsd = c.layout in ROTATED_BHSD
        if c.consumer == "as_strided":  # reads memory order
            outs = tuple(t.as_strided((t.numel(),), (1,)) for t in (q, k))
        elif c.consumer == "view":
            if self.view_transposed:  # memory is [B, H, S, D]: heads first
                outs = tuple(t.transpose(1, 2).view(-1, *t.shape[1:2], t.shape[3]) for t in (q, k))
            else:
                outs = tuple(t.view(*t.shape[:2], -1) for t in (q, k))
        elif c.consumer == "transpose_reshape":
            outs = tuple(t.transpose(1, 2).flatten(0, 1) for t in (q, k))
        elif c.consumer == "sdpa":
            if not bhsd:
                q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = v.transpose(1, 2).to(q.dtype)
            outs = (F.scaled_dot_product_attention(q, k, v, enable_gqa=c.Hq != c.Hk),)
        else:
            outs = (q, k)
        return outs + extra


def tables_from_angle(case: Case, angle: torch.Tensor, exact: bool = False) -> tuple:
    """(cos, sin), or (freqs,) for complex RoPE, from angles [lead..., rope_dim / 2] with the lead
    dims of ``case.table_shape``, in the case's table dtype, length and shape."""
    c = case
    if c.table_len == "channel":
        angle = angle.repeat_interleave(2, -1) if c.rope.startswith("interleaved") else torch.cat([angle, angle], -1)
    if c.table_shape in ("shared", "batched"):  # heads at dim 2 ([B, S, 1, L]) or 1 ([B, 1, S, L])
        angle = angle.unsqueeze(1 if c.layout in ROTATED_BHSD else 2)
    dtype = DTYPES[c.table_dtype]
    if dtype.is_complex:
        return (torch.polar(torch.ones_like(angle), angle).to(torch.complex128 if exact else dtype),)
    return _cast(exact, angle.cos(), dtype), _cast(exact, angle.sin(), dtype)


def make_inputs(case: Case, exact: bool = False):
    """(q, k, v, tables, k_tables, positions) for ``FrontEnd(case).forward``; float64 ones for the reference."""
    c = case
    g = torch.Generator().manual_seed(c.seed)
    dtype = DTYPES[c.dtype]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    def heads(h, scale):
        if c.norm_over == "hidden":
            shape = (c.S, c.B, h * c.D) if c.layout == "bhsd_input" else (c.B, c.S, h * c.D)
        else:
            shape = (c.B, h, c.S, c.D) if c.layout == "bhsd_input" else (c.B, c.S, h, c.D)
        return randn(*shape, scale=scale)

    if c.layout == "qkv_split":
        parts = [randn(c.B, c.S, c.Hq * c.D, scale=c.q_scale), randn(c.B, c.S, c.Hk * c.D, scale=c.k_scale),
                 randn(c.B, c.S, c.Hk * c.D)]
        q, k, v = torch.cat(parts, -1), None, None
    else:
        q, k = heads(c.Hq, c.q_scale), heads(c.Hk, c.k_scale)
        v = randn(c.B, c.S, c.Hk, c.D) if c.consumer == "sdpa" else None

    def tables():
        if c.tables_from == "built":
            return ()
        lead = {"cache": (c.S,), "shared": (1, c.S), "batched": (c.B, c.S), "positions": (c.S + 3,)}[c.table_shape]
        tables = tables_from_angle(c, 3 * torch.randn(*lead, c.rope_dim // 2, generator=g, dtype=torch.float64))
        if c.tables_from == "packed":
            return (torch.cat(tables, -1),)
        if c.tables_from == "expanded":
            return tuple(t.expand(c.B, *t.shape[1:]) for t in tables)
        return tables

    positions = torch.randperm(c.S + 3, generator=g)[: c.S] if c.table_shape == "positions" else None
    result = [q, k, v, tables(), tables(), positions]
    if exact:
        def up(t):
            return None if t is None else t.to(torch.complex128 if t.is_complex() else torch.float64)
        result = [up(q), up(k), up(v), tuple(map(up, result[3])), tuple(map(up, result[4])), positions]
    return tuple(result)


def eager_model(case: Case, exact: bool = False) -> tuple[FrontEnd, tuple]:
    """The module and its inputs (float64 twins with ``exact``). Picks the view eager's layout allows."""
    model, inputs = FrontEnd(case, exact), make_inputs(case, exact)
    if case.consumer == "view":
        with torch.no_grad():
            try:
                FrontEnd(case)(*make_inputs(case))
            except RuntimeError:
                model.view_transposed = True
    return model, inputs


# --- Checking one case ---------------------------------------------------------------

_EPS = {dtype: torch.finfo(dtype).eps for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
# agreement with eager, relative to the output's scale, by the lowest precision eager rounds to
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 8 * _EPS[torch.float16],
             torch.bfloat16: 8 * _EPS[torch.bfloat16]}
_EXACT_OPS = {  # ops that move values without rounding them
    "view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "expand", "permute", "transpose", "t", "slice",
    "select", "unbind", "split", "split_with_sizes", "cat", "stack", "neg", "clone", "alias", "detach",
    "empty_like", "empty", "empty_strided", "view_as_real", "view_as_complex", "as_strided", "unflatten",
    "flatten", "contiguous", "_reshape_alias", "lift_fresh", "real", "imag", "repeat_interleave",
}


def _real(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


def _lower(a: torch.dtype | None, b: torch.dtype) -> torch.dtype:
    return b if a is None or _EPS[b] > _EPS[a] else a


class _LowestRounding(TorchDispatchMode):
    """The lowest precision any op rounds to (arithmetic, or a cast or copy to fewer bits)."""

    lowest: torch.dtype | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__.rstrip("_")
        tensors = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        for t in tensors:
            dtype = _real(t.dtype)
            if dtype not in _EPS:
                continue
            if name in ("_to_copy", "to", "copy", "_copy_from"):
                source = [_real(i.dtype) for i in ins if _real(i.dtype) in _EPS]
                if not source or _EPS[dtype] <= min(_EPS[s] for s in source):
                    continue
            elif name in _EXACT_OPS:
                continue
            self.lowest = _lower(self.lowest, dtype)
        return out


def lowest_rounding(case: Case) -> torch.dtype:
    """The lowest precision eager rounds to in ``case``."""
    model, inputs = eager_model(case)
    with torch.no_grad(), _LowestRounding() as mode:
        model(*inputs)
    return mode.lowest or torch.float32


def asks_rounding(case: Case) -> bool:
    """Whether the case's round trip rounds to fewer bits than eager otherwise would."""
    if case.round_trip == "none":
        return False
    return _EPS[DTYPES[case.round_trip_dtype]] > _EPS[lowest_rounding(dataclasses.replace(case, round_trip="none"))]


@functools.lru_cache(maxsize=256)
def rotated_q(case: Case) -> torch.Tensor:
    """Eager's rotated q (the pass's exit), without the case's consumer."""
    plain = dataclasses.replace(case, consumer="none", near_miss="none")
    model, inputs = eager_model(plain)
    with torch.no_grad():
        return model(*inputs)[0]


def rotated_dtype(case: Case) -> torch.dtype:
    """The dtype of eager's rotated q (the pass's exit)."""
    return rotated_q(case).dtype


def lossy(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether casting source to target can change a value."""
    return source != target and not (target in (torch.float32, torch.float64) and _EPS[target] <= _EPS[source])


def _options(case: Case, inductor: bool) -> dict:
    options = {"passes": {"qk_norm_rope": {"devices": ("cpu",)}}, "strict": True, "inductor": inductor}
    if inductor and case.round_trip != "none":
        # Inductor itself drops `.to(bf16).float()` unless asked to keep eager's roundings.
        options["inductor_config"] = {"emulate_precision_casts": True}
    return options


def _stride(t: torch.Tensor) -> tuple:
    return tuple(step if size > 1 else None for size, step in zip(t.shape, t.stride()))


def _last_line(exc: Exception) -> str:
    """The error itself, without the compiler's wrapping."""
    text = str(exc).split("raised:", 1)[-1].strip()
    return text.splitlines()[0] if text else repr(exc)


def check_case(case: Case, inductor: bool) -> tuple[int, list[str]]:
    """Compile and run ``case``; (how often qk_norm_rope fired, what went wrong)."""
    model, inputs = eager_model(case)
    exact, exact_inputs = eager_model(case, exact=True)
    with torch.no_grad():
        want = model(*inputs)
        ref = exact(*exact_inputs)
        if case.dynamic == "tokens":  # a pipeline that changes resolution
            for t in (t for t in torch.utils._pytree.tree_leaves(inputs) if t is not None):
                for dim, size in enumerate(t.shape):
                    if size == case.S:
                        torch._dynamo.maybe_mark_dynamic(t, dim)
        try:
            result = trace(model, *inputs, options=_options(case, inductor),
                           dynamic=True if case.dynamic == "all" else None)
        except Exception as exc:  # under strict, a raising pass too
            return 0, [f"raised {type(exc).__name__}: {_last_line(exc)}"]
    got, fired = result.output, result.report.matches("qk_norm_rope")
    problems = []
    if case.near_miss != "none" and fired:
        problems.append(f"fused a near-miss ({case.near_miss})")
    if case.near_miss == "none" and fired != 1 and not any(member(case) for _, member in NOT_FUSED):
        problems.append(f"a stock form the pass claims: fired {fired} times, not once")
    tol_dtype = lowest_rounding(dataclasses.replace(case, round_trip="none"))
    asked = DTYPES[case.round_trip_dtype]
    keeps_rounding = case.round_trip != "none" and _EPS[asked] > _EPS[tol_dtype]
    for index, (g, w, r) in enumerate(zip(got, want, ref)):
        name = f"output {index}"
        if g.dtype != w.dtype or g.shape != w.shape:
            problems.append(f"{name}: {g.dtype}{tuple(g.shape)} vs eager {w.dtype}{tuple(w.shape)}")
            continue
        if _stride(g) != _stride(w):
            problems.append(f"{name}: strides {g.stride()} vs eager {w.stride()}")
        g64, w64, r = (torch.view_as_real(t) if t.is_complex() else t for t in (g, w, r))
        g64, w64 = g64.double(), w64.double()
        scale = r.abs().max().item() or 1.0
        finite = torch.isfinite(w64)
        if not torch.equal(torch.isfinite(g64), finite):
            problems.append(f"{name}: {(~torch.isfinite(g64)).sum().item()} non-finite values of {g.numel()}, "
                            f"eager {(~finite).sum().item()}")
            continue
        if not finite.all():  # eps 0 and underflow: eager's own inf/nan, compared where finite
            g64, w64, r = g64[finite], w64[finite], r[finite]
            if not g64.numel():
                continue
        diff = (g64 - w64).abs() / scale
        tol = TOLERANCE[tol_dtype]
        if keeps_rounding:
            off = (diff > tol).float().mean().item()
            if off > 0.05 or diff.max().item() > TOLERANCE[asked]:
                problems.append(f"{name}: the {case.round_trip_dtype} rounding asked for is not kept: "
                                f"{off:.0%} of values differ from eager by > {tol:.1e}, max {diff.max().item():.2e}")
        elif diff.max().item() > tol:
            problems.append(f"{name}: differs from eager by {diff.max().item():.2e} of the scale "
                            f"(tolerance {tol:.1e} for {tol_dtype})")
        if inductor and (not fired or case.consumer == "sdpa"):
            continue  # Inductor's own roundings (its attention, bf16 chains) are not the pass's
        err, eager_err = ((t - r).abs() / scale for t in (g64, w64))
        worst, eager_worst = err.max().item(), eager_err.max().item()
        rms, eager_rms = err.square().mean().sqrt().item(), eager_err.square().mean().sqrt().item()
        slack = 16 * _EPS[torch.float32]
        if worst > 2 * eager_worst + slack or rms > 1.25 * eager_rms + slack:
            problems.append(f"{name}: error vs float64 (of the scale) max {worst:.2e}, rms {rms:.2e}; "
                            f"eager's max {eager_worst:.2e}, rms {eager_rms:.2e}")
    return fired, problems


# --- Strategies ------------------------------------------------------------------------


def draw_case(pick: Callable, integer: Callable, real: Callable, near_miss: str = "none") -> Case:
    """One case from three choosers: ``pick(options)``, ``integer(lo, hi)``, ``real(lo, hi)``."""
    Hk = pick([1, 2])
    Hq = Hk * pick([1, 2])
    D = pick([8, 16])
    rope_dim = pick([D, D // 2])
    norm_over = pick(["head", "hidden"])
    hand = ["hand", "hand_upcast", "hand_fp32"]
    norm = pick(hand if near_miss in ("norm_dim", "scale_used") else ["functional", "module"] + hand)
    weight = pick(["D", "none"] if norm in ("functional", "module") else ["D", "none", "1D", "111D"])
    rope = pick(["neox_cat", "interleaved_stores", "interleaved_stack", "neox_stores", "complex"])
    complex_tables = rope == "complex"
    dtype = pick(["float32", "bfloat16", "float16", "float64"])
    layout = pick(["bshd", "bhsd_input", "qkv_split", "transpose_after_norm"]
                  + (["transpose_before_norm"] if norm_over == "head" else []))
    # fp16 inputs stay within fp16's range: its squares would overflow in eager
    magnitude = pick(["normal", "large", "tiny"] if dtype != "float16" else ["normal", "tiny"])
    if near_miss == "eps0":
        magnitude = "normal"  # tiny values with eps 0 make eager's own fp16 norms inf
    exponent = {"normal": (-1, 1), "large": (4, math.log10(6e4)), "tiny": (-7, -5)}[magnitude]
    eps = [1e-6, 1e-5, 1e-3]
    table_shape = pick(["shared", "cache", "batched", "positions"])
    dynamic = pick(["no", "no", "tokens", "all"])
    tokens = pick([3, 5, 6, 7]) if dynamic == "tokens" else integer(1, 6)  # dynamic: S unlike other sizes
    return Case(
        B=integer(1, 2), S=tokens, Hq=Hq, Hk=Hk, D=D, rope_dim=rope_dim, norm_over=norm_over, norm=norm,
        square=pick(["pow", "mul"]), weight=weight, weight_dtype=pick(["input", "float32"]),
        q_eps=0.0 if near_miss == "eps0" else pick(eps), k_eps=pick(eps), head_split=pick(["unflatten", "view"]),
        rope=rope, pairs=pick(["unbind", "slice"]),
        table_len="pair" if complex_tables else pick(["pair", "channel"]),
        table_dtype=pick(["complex64", "complex128"] if complex_tables
                         else ["float32", "bfloat16", "float16", "float64"]),
        table_shape=table_shape,
        tables_from=pick(["input", "built"] + ([] if complex_tables else ["packed"])
                         + (["expanded"] if table_shape == "shared" else [])),
        table_cast=pick(["none", "type_as"] if complex_tables else ["none", "to_x", "type_as"]),
        layout=layout, dtype=dtype, upcast=pick([False, True]),
        round_trip=pick(["none", "none", "after_norm", "after_rope"]), round_trip_dtype=pick(["bfloat16", "float16"]),
        exit=pick(["none", "none", "float16", "bfloat16", "float32"]),
        consumer=pick(["none", "sdpa", "view", "transpose_reshape", "as_strided"]),
        q_scale=float(f"{10 ** real(*exponent):.3g}"), k_scale=float(f"{10 ** real(*exponent):.3g}"),
        near_miss=near_miss, dynamic=dynamic, seed=integer(0, 2**16),
    )


@st.composite
def cases(draw, near_miss: str = "none") -> Case:
    return draw_case(lambda options: draw(st.sampled_from(options)), lambda lo, hi: draw(st.integers(lo, hi)),
                     lambda lo, hi: draw(st.floats(lo, hi)), near_miss)


def random_case(rng: random.Random, near_miss: str = "none") -> Case:
    """Uniform draws, for offline sweeps (hypothesis favours the first options)."""
    return draw_case(rng.choice, rng.randint, rng.uniform, near_miss)


def known_failure(case: Case, mode: str) -> Family | None:
    return next((f for f in KNOWN_FAILING if mode in f.modes and f.member(case)), None)


# --- Tests ------------------------------------------------------------------------------

_RAN: dict[str, list[int]] = {}  # mode -> [cases run, cases fused]


def _run(case: Case, mode: str) -> None:
    fired, problems = check_case(case, inductor=mode == "inductor")
    counts = _RAN.setdefault(mode, [0, 0])
    counts[0] += 1
    counts[1] += bool(fired)
    assert not problems, f"{case}\n" + "\n".join(problems)


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None and _RAN:
        with capture.global_and_fixture_disabled():
            reporter.write("\n")
            reporter.write_line("front-end generator: " + ", ".join(
                f"{mode}: {ran} cases, qk_norm_rope fired on {fused}" for mode, (ran, fused) in sorted(_RAN.items())))


def _examples(n: int):
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])


@_examples(200)
@given(case=cases())
def test_generated_front_ends_inductor_off(case):
    assume(known_failure(case, "aten") is None)
    _run(case, "aten")


@_examples(40)
@given(case=cases())
def test_generated_front_ends_inductor_on(case):
    assume(known_failure(case, "inductor") is None)
    _run(case, "inductor")


NEAR_MISSES = ["different_tables", "not_rotation", "norm_dim", "eps0", "scale_used", "normed_used"]


@pytest.mark.parametrize("near_miss", NEAR_MISSES)
@_examples(8)
@given(data=st.data())
def test_near_misses_are_not_fused(near_miss, data):
    case = data.draw(cases(near_miss=near_miss))
    assume(known_failure(case, "aten") is None)
    _run(case, "aten")


@pytest.mark.parametrize(
    "family, mode",
    [pytest.param(f, mode, id=f"{f.name}-{mode}",
                  marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=f.reason))
     for f in KNOWN_FAILING for mode in f.modes],
)
def test_known_failing_family(family, mode):
    _run(Case(**family.example), mode)


@pytest.mark.parametrize("family", KNOWN_FAILING, ids=lambda f: f.name)
def test_known_failing_examples_are_members(family):
    assert family.member(Case(**family.example))


def sweep(count: int, seed: int = 0, known: bool = True) -> None:
    """Run ``count`` uniform random cases (every fourth also with Inductor) and print every problem
    with its case: ``python tests/test_frontend_generator.py COUNT [SEED] [skip-known]``. With
    ``known=False`` cases of the known-failing families are drawn again (to look past them)."""
    import collections
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("diffopt").setLevel(logging.ERROR)
    rng = random.Random(seed)
    tally = collections.Counter()
    for index in range(count):
        case = random_case(rng, near_miss=rng.choice(["none"] * 4 + NEAR_MISSES))
        while not known and known_failure(case, "aten"):
            case = random_case(rng, near_miss=case.near_miss)
        for mode in ("aten", "inductor") if index % 4 == 0 else ("aten",):
            family = known_failure(case, mode)
            fired, problems = check_case(case, inductor=mode == "inductor")
            label = family.name if family else ("FAILS" if problems else "ok")
            tally[mode, label, bool(fired)] += 1
            if problems:
                print(f"[{mode}] [{label}] {case}\n    " + "\n    ".join(problems), flush=True)
    for (mode, label, fired), n in sorted(tally.items()):
        print(f"{mode:9s} {label:24s} fired={fired!s:5s} {n}")


if __name__ == "__main__":
    sweep(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0, "skip-known" not in sys.argv)
