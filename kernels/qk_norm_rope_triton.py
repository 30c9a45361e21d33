"""Triton kernel for ``diffopt::qk_norm_rope``: fused RMSNorm of q and k + RoPE, one read and one write.

Layout of the work: a 1D grid; each program handles one token (b, s) and either

* norm_over="head": one block of ``BH`` heads of q or of k ([BH, D] tile; per-head RMS is a row sum);
* norm_over="hidden": all heads of q or of k for that token (RMS over H*D). If the padded row
  fits one tile it is done in one pass; otherwise it loops over head blocks twice (sum of
  squares, then normalize+rotate+store); the second read of the row hits L2. (The defaults use
  8-head blocks at D=128: measured faster than one pass over the whole row, see choose_config.)

Program ids are ordered token-major (the blocks of one token are adjacent programs), so the token's
cos/sin row is read from DRAM once and reused from cache by all its programs.

Each head's channels are handled as rotation pairs (a, b) plus pass-through channels p:
neox pairs are (j, j+h) loaded as two contiguous halves; interleaved pairs (2j, 2j+1) are loaded as
one contiguous tile and split with reshape/split (stored back with join/reshape), so all global
accesses are contiguous and vectorizable when the channel stride is 1. Everything is loaded in its
own dtype, converted to fp32, computed in fp32 and rounded once on store (this is also what makes
the kernel correct under TRITON_INTERPRET=1). Offsets that can exceed 2**31 are int64.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import check_qk_norm_rope_args, output_like

__all__ = ["OUTPUT_PARAMS", "qk_norm_rope_triton", "qk_norm_rope_traceable", "choose_config"]


@triton.jit
def _load_tile(ptr, s_h, s_d, h0, H: tl.constexpr, BH: tl.constexpr, D: tl.constexpr, ROPE_DIM: tl.constexpr,
               HALF: tl.constexpr, HB: tl.constexpr, PB: tl.constexpr, INTERLEAVED: tl.constexpr,
               HAS_PASS: tl.constexpr, EVICT: tl.constexpr):
    """Load heads [h0, h0+BH) of one token as fp32 (a, b, p): rotation pairs and pass-through channels.
    EVICT: L2 eviction policy hint ("" = default)."""
    hh = h0 + tl.arange(0, BH)
    hm = (hh < H)[:, None]
    row = ptr + hh.to(tl.int64)[:, None] * s_h
    if INTERLEAVED:
        c = tl.arange(0, 2 * HB)
        x = tl.load(row + c[None, :] * s_d, mask=hm & (c < ROPE_DIM)[None, :], other=0.0,
                    eviction_policy=EVICT).to(tl.float32)
        a, b = tl.split(tl.reshape(x, [BH, HB, 2]))
    else:
        j = tl.arange(0, HB)
        m = hm & (j < HALF)[None, :]
        a = tl.load(row + j[None, :] * s_d, mask=m, other=0.0, eviction_policy=EVICT).to(tl.float32)
        b = tl.load(row + (j + HALF)[None, :] * s_d, mask=m, other=0.0, eviction_policy=EVICT).to(tl.float32)
    if HAS_PASS:
        pc = tl.arange(0, PB)
        p = tl.load(row + (ROPE_DIM + pc)[None, :] * s_d, mask=hm & (pc < D - ROPE_DIM)[None, :],
                    other=0.0, eviction_policy=EVICT).to(tl.float32)
    else:
        p = tl.zeros([BH, PB], dtype=tl.float32)
    return a, b, p


@triton.jit
def _to_out(x, dt: tl.constexpr, MANUAL_RNE: tl.constexpr):
    """Round fp32 to the output dtype. MANUAL_RNE (set for CPU tensors, i.e. TRITON_INTERPRET=1 only):
    the interpreter truncates fp32->bf16 instead of rounding to nearest even as the GPU does, so round
    by hand there to keep interpreter results identical to the GPU's."""
    if MANUAL_RNE and dt == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + ((bits >> 16) & 1) + 0x7FFF) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dt)


@triton.jit
def _finish_tile(o_ptr, s_oh, w_ptr, h0, rstd, a, b, p, c1, s1, c2, s2,
                 H: tl.constexpr, BH: tl.constexpr, D: tl.constexpr, ROPE_DIM: tl.constexpr, HALF: tl.constexpr,
                 HB: tl.constexpr, PB: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_PASS: tl.constexpr,
                 HIDDEN: tl.constexpr, HAS_W: tl.constexpr, RNE: tl.constexpr, EV_W: tl.constexpr):
    """Scale by rstd (and the weight), rotate, round once and store heads [h0, h0+BH) of the token's
    output row o_ptr (head stride s_oh, channel stride 1)."""
    a = a * rstd
    b = b * rstd
    p = p * rstd
    if HAS_W:
        if HIDDEN:  # weight [H*D]: its own value per head and channel
            wa, wb, wp = _load_tile(w_ptr, D, 1, h0, H, BH, D, ROPE_DIM, HALF, HB, PB, INTERLEAVED, HAS_PASS,
                                    EV_W)
        else:  # weight [D]: one row, broadcast over the heads
            wa, wb, wp = _load_tile(w_ptr, 0, 1, 0, 1, 1, D, ROPE_DIM, HALF, HB, PB, INTERLEAVED, HAS_PASS,
                                    EV_W)
        a = a * wa
        b = b * wb
        p = p * wp
    oa = a * c1 - b * s1
    ob = b * c2 + a * s2
    dt = o_ptr.dtype.element_ty
    hh = h0 + tl.arange(0, BH)
    hm = (hh < H)[:, None]
    row = o_ptr + hh.to(tl.int64)[:, None] * s_oh
    if INTERLEAVED:
        c = tl.arange(0, 2 * HB)
        x = tl.reshape(tl.join(oa, ob), [BH, 2 * HB])
        tl.store(row + c[None, :], _to_out(x, dt, RNE), mask=hm & (c < ROPE_DIM)[None, :])
    else:
        j = tl.arange(0, HB)
        m = hm & (j < HALF)[None, :]
        tl.store(row + j[None, :], _to_out(oa, dt, RNE), mask=m)
        tl.store(row + (j + HALF)[None, :], _to_out(ob, dt, RNE), mask=m)
    if HAS_PASS:
        pc = tl.arange(0, PB)
        tl.store(row + (ROPE_DIM + pc)[None, :], _to_out(p, dt, RNE), mask=hm & (pc < D - ROPE_DIM)[None, :])


@triton.jit
def _norm_rope_heads(x_ptr, o_ptr, s_oh, w_ptr, s_h, s_d, h0, eps, c1, s1, c2, s2,
                     H: tl.constexpr, BH: tl.constexpr, D: tl.constexpr, ROPE_DIM: tl.constexpr,
                     HALF: tl.constexpr, HB: tl.constexpr, PB: tl.constexpr, INTERLEAVED: tl.constexpr,
                     HAS_PASS: tl.constexpr, HIDDEN: tl.constexpr, HAS_W: tl.constexpr, RNE: tl.constexpr,
                     EV_X: tl.constexpr, EV_X1: tl.constexpr, EV_W: tl.constexpr):
    """EV_*: L2 eviction hints for x loads (EV_X1: first pass of the two-pass loop) and weights."""
    if HIDDEN:
        if (H + BH - 1) // BH == 1:  # the whole token row in one tile: one pass
            a, b, p = _load_tile(x_ptr, s_h, s_d, 0, H, BH, D, ROPE_DIM, HALF, HB, PB, INTERLEAVED, HAS_PASS,
                                 EV_X)
            ss = tl.sum(a * a) + tl.sum(b * b)
            if HAS_PASS:
                ss += tl.sum(p * p)
            rstd = tl.rsqrt(ss / (H * D) + eps)
            _finish_tile(o_ptr, s_oh, w_ptr, 0, rstd, a, b, p, c1, s1, c2, s2, H, BH, D, ROPE_DIM, HALF, HB, PB,
                         INTERLEAVED, HAS_PASS, HIDDEN, HAS_W, RNE, EV_W)
        else:  # two passes over head blocks: sum of squares, then normalize + rotate + store
            ss = tl.zeros([BH], dtype=tl.float32)
            for i in tl.static_range((H + BH - 1) // BH):
                a, b, p = _load_tile(x_ptr, s_h, s_d, i * BH, H, BH, D, ROPE_DIM, HALF, HB, PB, INTERLEAVED,
                                     HAS_PASS, EV_X1)
                ss += tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)
                if HAS_PASS:
                    ss += tl.sum(p * p, axis=1)
            rstd = tl.rsqrt(tl.sum(ss) / (H * D) + eps)
            for i in tl.static_range((H + BH - 1) // BH):
                a, b, p = _load_tile(x_ptr, s_h, s_d, i * BH, H, BH, D, ROPE_DIM, HALF, HB, PB, INTERLEAVED,
                                     HAS_PASS, EV_X)
                _finish_tile(o_ptr, s_oh, w_ptr, i * BH, rstd, a, b, p, c1, s1, c2, s2, H, BH, D, ROPE_DIM, HALF, HB,
                             PB, INTERLEAVED, HAS_PASS, HIDDEN, HAS_W, RNE, EV_W)
    else:  # per-head RMS over D: a row sum of the tile
        a, b, p = _load_tile(x_ptr, s_h, s_d, h0, H, BH, D, ROPE_DIM, HALF, HB, PB, INTERLEAVED, HAS_PASS, EV_X)
        ss = tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)
        if HAS_PASS:
            ss += tl.sum(p * p, axis=1)
        rstd = tl.rsqrt(ss / D + eps)[:, None]
        _finish_tile(o_ptr, s_oh, w_ptr, h0, rstd, a, b, p, c1, s1, c2, s2, H, BH, D, ROPE_DIM, HALF, HB, PB,
                     INTERLEAVED, HAS_PASS, HIDDEN, HAS_W, RNE, EV_W)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr,
    qo_off, ko_off, S, s_qb, s_qs, s_qh, s_qd, s_kb, s_ks, s_kh, s_kd,
    s_qob, s_qos, s_qoh, s_kob, s_kos, s_koh,
    s_cb, s_cs, s_cl, s_sb, s_ss, s_sl, s_pb, s_ps,
    q_eps, k_eps,
    HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, ROPE_DIM: tl.constexpr, HALF: tl.constexpr,
    HB: tl.constexpr, PB: tl.constexpr, BHQ: tl.constexpr, BHK: tl.constexpr, NQB: tl.constexpr,
    NB: tl.constexpr, HIDDEN: tl.constexpr, INTERLEAVED: tl.constexpr, PER_CHANNEL: tl.constexpr,
    HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, HAS_POS: tl.constexpr, HAS_PASS: tl.constexpr, RNE: tl.constexpr,
    EV_X: tl.constexpr, EV_X1: tl.constexpr, EV_W: tl.constexpr,
):
    # The norm is fp32 math whoever launches: Inductor types a Python float argument fp64 (Triton's launcher,
    # fp32), and an fp64 eps made the statistic and its rsqrt fp64 (10-15% slower, other roundings).
    q_eps = tl.cast(q_eps, tl.float32)
    k_eps = tl.cast(k_eps, tl.float32)
    pid = tl.program_id(0).to(tl.int64)
    t = pid // NB  # token index b*S + s
    blk = (pid - t * NB).to(tl.int32)  # which head block of q (blk < NQB) or of k
    bi = t // S
    si = t - bi * S
    if HAS_POS:  # [P, L] cache rows picked by positions[b, s]; the launcher puts P's stride in s_cs/s_ss
        prow = tl.load(pos_ptr + bi * s_pb + si * s_ps).to(tl.int64)
        crow = cos_ptr + prow * s_cs
        srow = sin_ptr + prow * s_ss
    else:
        crow = cos_ptr + bi * s_cb + si * s_cs
        srow = sin_ptr + bi * s_sb + si * s_ss
    j = tl.arange(0, HB)
    jm = j < HALF
    # Pair j's table entries: with one per pair, entry j (for both its channels); with one per channel,
    # neox: entries j and j + HALF, interleaved: entries 2j and 2j + 1.
    if PER_CHANNEL and INTERLEAVED:
        first = 2 * j
        second = 2 * j + 1
    else:
        first = j
        second = j + HALF
    c1 = tl.load(crow + first * s_cl, mask=jm, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(srow + first * s_sl, mask=jm, other=0.0).to(tl.float32)[None, :]
    if PER_CHANNEL:
        c2 = tl.load(crow + second * s_cl, mask=jm, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(srow + second * s_sl, mask=jm, other=0.0).to(tl.float32)[None, :]
    else:
        c2 = c1
        s2 = s1
    if blk < NQB:
        _norm_rope_heads(q_ptr + bi * s_qb + si * s_qs, qo_ptr + qo_off + bi * s_qob + si * s_qos, s_qoh, qw_ptr, s_qh, s_qd, blk * BHQ,
                         q_eps, c1, s1, c2, s2, HQ, BHQ, D, ROPE_DIM, HALF, HB, PB, INTERLEAVED, HAS_PASS, HIDDEN,
                         HAS_QW, RNE, EV_X, EV_X1, EV_W)
    else:
        _norm_rope_heads(k_ptr + bi * s_kb + si * s_ks, ko_ptr + ko_off + bi * s_kob + si * s_kos, s_koh, kw_ptr, s_kh, s_kd,
                         (blk - NQB) * BHK, k_eps, c1, s1, c2, s2, HK, BHK, D, ROPE_DIM, HALF, HB, PB,
                         INTERLEAVED, HAS_PASS, HIDDEN, HAS_KW, RNE, EV_X, EV_X1, EV_W)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def choose_config(Hq: int, Hk: int, D: int, norm_over: str) -> dict:
    """Block sizes and warps by formula (no autotuning), from a sweep on H200
    (docs/bench_qk_norm_rope_h200.md): for this memory-bound op, small programs (tiles of about
    1024 elements, 16 bytes per thread per load) at high occupancy beat big ones.

    "head": block = the largest power of two <= 1024/D that divides the head count or pads at most
    25% of its heads; tiles of 1024 elements run on 2 warps (Cosmos3 [8, 128]: 149 us vs 166-204 us
    for [16|32, 128] tiles on 4-8 warps).
    "hidden": head blocks of about 1024 elements, two passes over the token's heads (sum of squares,
    then normalize + rotate + store; the second read hits L2); a row that fits one block is done in
    one pass. 2 warps when a row has at most 2 blocks, else 4 (Wan 1.3B, 2 blocks: 117.6 us on 2
    warps vs 126.7 on 4; Wan 14B, 5 blocks: 336.0 on 4 vs 346.0 on 2). One-pass [16|64, 128] tiles
    measured 1.0-2x slower.
    """
    dp = _pow2(D)
    cap = max(1, 1024 // dp)

    def bh(H):
        best = 1
        for c in (1, 2, 4, 8, 16, 32):
            if c > cap:
                break
            if H % c == 0 or c <= H and (-H % c) * 4 <= H:  # no padding, or at most 25% padded heads
                best = c
        return best

    if norm_over == "hidden":
        bq, bk = min(_pow2(Hq), cap), min(_pow2(Hk), cap)
        elems = max(bq, bk) * dp
        blocks = max(-(-Hq // bq), -(-Hk // bk))
        warps = 1 if elems < 512 else 2 if elems < 1024 or blocks <= 2 else 4
    else:
        bq, bk = bh(Hq), bh(Hk)
        elems = max(bq, bk) * dp
        warps = 2 if elems >= 1024 else 1
    return dict(block_hq=bq, block_hk=bk, num_warps=warps)


def qk_norm_rope_triton(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                        cos: Tensor, sin: Tensor, positions: Optional[Tensor] = None, *, norm_over: str,
                        rope_style: str, rope_dim: int, q_eps: float, k_eps: float,
                        out_dtype: Optional[torch.dtype] = None,
                        config: Optional[dict] = None) -> tuple[Tensor, Tensor]:
    """Launch the fused kernel directly (same arguments and result as ``torch.ops.diffopt.qk_norm_rope``).

    Works on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before triton kernels
    were defined. ``config`` overrides ``choose_config`` (keys block_hq, block_hk, num_warps, and
    hints: L2 eviction hints, evict_first on streamed q/k loads, evict_last on weights).
    """
    return _launch(_qk_norm_rope_kernel, q, k, q_weight, k_weight, cos, sin, positions, norm_over=norm_over,
                   rope_style=rope_style, rope_dim=rope_dim, q_eps=q_eps, k_eps=k_eps, out_dtype=out_dtype,
                   config=config)


# The launch's output pointers, by kernel parameter name (what ``inline_triton`` makes functional).
OUTPUT_PARAMS = ("qo_ptr", "ko_ptr")


def qk_norm_rope_traceable(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                           cos: Tensor, sin: Tensor, positions: Optional[Tensor] = None, *, norm_over: str,
                           rope_style: str, rope_dim: int, q_eps: float, k_eps: float,
                           out_dtype: Optional[torch.dtype] = None, in_place: tuple[bool, bool] = (False, False),
                           into: tuple[Optional[tuple[Tensor, int]], Optional[tuple[Tensor, int]]] = (None, None),
                           ) -> tuple[Tensor, Tensor]:
    """The same launch through ``torch.library.wrap_triton``: traced (make_fx), it becomes Inductor's
    user-defined Triton kernel node writing into output buffers the graph allocates
    (``fxpasses/inline_triton.py``); called eagerly, it launches the kernel.

    ``in_place``: write q's (k's) result over q (k) itself. Safe for this kernel: each program reads the
    rows it writes before writing them, and no program reads another's rows. The caller must own the
    input (nothing reads it afterwards) and it must already have the output's layout and dtype.

    ``into``: for q (k), ``(buffer, offset)``: write the result into ``buffer`` from element ``offset`` on,
    laid out as the op's own output would be (which must then be dense: one block of ``buffer``), and
    return ``buffer``. That is how a result whose only reader is a ``cat`` is written straight into the
    cat's buffer."""
    from torch.library import wrap_triton

    return _launch(wrap_triton(_qk_norm_rope_kernel), q, k, q_weight, k_weight, cos, sin, positions,
                   norm_over=norm_over, rope_style=rope_style, rope_dim=rope_dim, q_eps=q_eps, k_eps=k_eps,
                   out_dtype=out_dtype, in_place=in_place, into=into)


def _launch(kernel, q, k, q_weight, k_weight, cos, sin, positions, *, norm_over, rope_style, rope_dim, q_eps, k_eps,
            out_dtype=None, config=None, in_place=(False, False), into=(None, None)):
    info = check_qk_norm_rope_args(q, k, q_weight, k_weight, cos, sin, positions, norm_over, rope_style, rope_dim,
                                   out_dtype)
    B, S, Hq, Hk, D, rd, L = info.B, info.S, info.Hq, info.Hk, info.D, info.rope_dim, info.table_len
    qo = q if in_place[0] else output_like(q, out_dtype)
    ko = k if in_place[1] else output_like(k, out_dtype)
    # where each result goes: (tensor the kernel writes, element offset); strides stay the output's
    (qo_dst, qo_off), (ko_dst, ko_off) = (dst if dst is not None else (out, 0) for dst, out in zip(into, (qo, ko)))
    if B * S == 0 or Hq * Hk == 0:
        return qo_dst, ko_dst
    hidden = norm_over == "hidden"
    cfg = dict(choose_config(Hq, Hk, D, norm_over))
    cfg.update(config or {})
    bhq, bhk = int(cfg["block_hq"]), int(cfg["block_hk"])
    nqb = 1 if hidden else triton.cdiv(Hq, bhq)
    nb = 2 if hidden else nqb + triton.cdiv(Hk, bhk)

    # Absent weights and positions are passed as None (a constexpr: the kernel never reads them). A tensor
    # standing in would cost a copy under Inductor, which realizes each argument of a user-defined kernel
    # on its own: a table passed twice was computed into two buffers.
    if positions is not None:
        pos = positions.reshape(-1, S).expand(B, S)
        s_pb, s_ps = pos.stride()
        cs = (0, cos.stride(0), cos.stride(1))
        ss = (0, sin.stride(0), sin.stride(1))
    else:
        pos, s_pb, s_ps = None, 0, 0
        ce, se = cos.expand(B, S, 1, L), sin.expand(B, S, 1, L)
        cs = (ce.stride(0), ce.stride(1), ce.stride(3))
        ss = (se.stride(0), se.stride(1), se.stride(3))
    qw = q_weight.contiguous() if q_weight is not None else None
    kw = k_weight.contiguous() if k_weight is not None else None
    half = rd // 2
    ev = ("evict_first", "evict_last", "evict_last") if cfg.get("hints") else ("", "", "")
    grid = (B * S * nb,)
    kernel[grid](
        q, k, qo_dst, ko_dst, qw, kw, cos, sin, pos,
        qo_off, ko_off, S, *q.stride(), *k.stride(), *qo.stride()[:3], *ko.stride()[:3], *cs, *ss, s_pb, s_ps,
        float(q_eps), float(k_eps),
        HQ=Hq, HK=Hk, D=D, ROPE_DIM=rd, HALF=half, HB=_pow2(half), PB=_pow2(D - rd), BHQ=bhq, BHK=bhk,
        NQB=nqb, NB=nb, HIDDEN=hidden, INTERLEAVED=rope_style == "interleaved", PER_CHANNEL=info.per_channel,
        HAS_QW=q_weight is not None, HAS_KW=k_weight is not None, HAS_POS=positions is not None,
        HAS_PASS=rd < D, RNE=q.device.type == "cpu", EV_X=ev[0], EV_X1=ev[1], EV_W=ev[2],
        num_warps=int(cfg["num_warps"]),
    )
    return qo_dst, ko_dst
