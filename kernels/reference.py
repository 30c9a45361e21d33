"""Plain-torch reference implementations of diffopt's kernels.

These functions are THE SPEC of the ops in ``torch.ops.diffopt``: every
accelerated kernel is tested against them, and they are also what the ops run
on CPU (including inside ``torch.compile``'d graphs on CPU). They are written
for clarity, not speed: load in the input dtype, do all math in float32, round
once to the output dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["QKNormRopeShape", "apply_rope", "check_qk_norm_rope_args", "output_like", "qk_norm_rope_backward_reference",
           "qk_norm_rope_reference", "rope_tables"]

NORM_OVER = ("head", "hidden")
ROPE_STYLES = ("neox", "interleaved")


@dataclass(frozen=True)
class QKNormRopeShape:
    B: int
    S: int
    Hq: int
    Hk: int
    D: int
    rope_dim: int
    table_len: int  # L: last dim of cos/sin
    per_channel: bool  # True: L == rope_dim (one entry per channel); False: L == rope_dim // 2 (one per pair)


FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)


def output_like(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The op's output buffer for input ``x`` ([B, S, H, D]): x's memory layout (dim order by stride, made
    dense: what stock elementwise code on x produces) when its channels stay innermost, else contiguous."""
    dtype = x.dtype if dtype is None else dtype
    out = torch.empty_like(x, dtype=dtype)
    if x.shape[-1] != 1 and out.stride(-1) != 1:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    return out


def check_qk_norm_rope_args(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                            cos: Tensor, sin: Tensor, positions: Optional[Tensor], norm_over: str,
                            rope_style: str, rope_dim: int,
                            out_dtype: Optional[torch.dtype] = None) -> QKNormRopeShape:
    """Validate the arguments of ``diffopt::qk_norm_rope`` and return the problem's shape.

    Raises ``ValueError`` on anything outside the op's contract (see ``qk_norm_rope_reference``).
    """
    def need(cond, msg):
        if not cond:
            raise ValueError(f"diffopt.qk_norm_rope: {msg}")

    need(norm_over in NORM_OVER, f"norm_over must be one of {NORM_OVER}, got {norm_over!r}")
    need(rope_style in ROPE_STYLES, f"rope_style must be one of {ROPE_STYLES}, got {rope_style!r}")
    need(q.dim() == 4 and k.dim() == 4, f"q and k must be [B, S, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, S, Hq, D = q.shape
    need(k.shape[0] == B and k.shape[1] == S and k.shape[3] == D,
         f"k {tuple(k.shape)} must match q {tuple(q.shape)} in B, S and D")
    Hk = k.shape[2]
    float_types = FLOAT_TYPES
    need(q.dtype in float_types and k.dtype in float_types,
         f"q/k dtype must be fp32/bf16/fp16, got {q.dtype}/{k.dtype}")
    need(out_dtype is None or out_dtype in float_types, f"out_dtype must be fp32/bf16/fp16, got {out_dtype}")
    if rope_dim == -1:
        rope_dim = D
    need(2 <= rope_dim <= D and rope_dim % 2 == 0, f"rope_dim must be even and in [2, D={D}], got {rope_dim}")
    for name, w, H in (("q_weight", q_weight, Hq), ("k_weight", k_weight, Hk)):
        if w is not None:
            n = D if norm_over == "head" else H * D
            need(w.numel() == n and w.dim() == 1, f"{name} must have shape [{n}] for norm_over={norm_over!r}, "
                 f"got {tuple(w.shape)}")
            need(w.dtype in float_types, f"{name} dtype must be fp32/bf16/fp16, got {w.dtype}")
    need(cos.shape == sin.shape, f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    need(cos.dtype in float_types and sin.dtype in float_types, "cos/sin must be fp32/bf16/fp16")
    L = cos.shape[-1] if cos.dim() > 0 else -1
    per_channel = L == rope_dim
    need(L == rope_dim // 2 or per_channel,
         f"cos/sin last dim must be rope_dim/2={rope_dim // 2} (one entry per pair) or rope_dim={rope_dim} "
         f"(one per channel), got {L}")
    if positions is not None:
        need(cos.dim() == 2, f"with positions, cos/sin must be [P, L] caches, got {tuple(cos.shape)}")
        need(not positions.is_floating_point() and not positions.is_complex(), "positions must be an integer tensor")
        need(tuple(positions.shape) in ((B, S), (S,)) or (positions.dim() == 2 and positions.shape[0] == 1
                                                           and positions.shape[1] == S),
             f"positions must be [B, S] or [S], got {tuple(positions.shape)}")
    else:
        need(cos.dim() <= 4, f"cos/sin must broadcast to [B, S, 1, L], got {tuple(cos.shape)}")
        try:
            ok = torch.broadcast_shapes(tuple(cos.shape), (B, S, 1, L)) == (B, S, 1, L)
        except RuntimeError:
            ok = False
        need(ok, f"cos/sin {tuple(cos.shape)} must broadcast to [B, S, 1, L]=[{B}, {S}, 1, {L}]")
    return QKNormRopeShape(B, S, Hq, Hk, D, rope_dim, L, per_channel)


def rope_tables(cos: Tensor, sin: Tensor, positions: Optional[Tensor], B: int, S: int) -> tuple[Tensor, Tensor]:
    """cos/sin as float32 tensors broadcastable to [B, S, 1, L] (their values unchanged: a bf16 table's
    values are the bf16 values). With ``positions``, rows of the [P, L] caches are gathered."""
    if positions is not None:
        pos = positions.long().reshape(-1, S)  # [B or 1, S]
        cos, sin = cos[pos].unsqueeze(2), sin[pos].unsqueeze(2)  # [B|1, S, 1, L]
    return cos.float(), sin.float()


def _norm_rope_one(x: Tensor, w: Optional[Tensor], eps: float, cos: Tensor, sin: Tensor,
                   norm_over: str, rope_style: str, rope_dim: int, out_dtype: Optional[torch.dtype]) -> Tensor:
    B, S, H, D = x.shape
    xf = x.float()
    # RMSNorm, fp32: per head (over D) or over the whole token (over H*D, the Wan form).
    dims = (-1,) if norm_over == "head" else (-2, -1)
    xf = xf * torch.rsqrt(xf.square().mean(dims, keepdim=True) + eps)
    if w is not None:
        xf = xf * w.float().view(-1 if norm_over == "head" else H, D)
    out = output_like(x, out_dtype)
    return out.copy_(apply_rope(xf, cos, sin, rope_style, rope_dim))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, rope_style: str, rope_dim: int) -> Tensor:
    """The rotation alone, in x's dtype: the first rope_dim channels of each head rotate, the
    rest pass through. cos/sin broadcast to x[..., :L] with L = rope_dim (per channel) or
    rope_dim / 2 (per pair). The rewrite pass checks stock code against this."""
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    half = rope_dim // 2
    if rope_style == "neox":
        if cos.shape[-1] == half:  # one entry per pair: channel j and j + half share it
            cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        x1, x2 = rot[..., :half], rot[..., half:]
        rot = torch.cat([x1 * cos[..., :half] - x2 * sin[..., :half],
                         x2 * cos[..., half:] + x1 * sin[..., half:]], -1)
    else:  # interleaved pairs (2j, 2j+1): one table entry per pair, or per channel (2j's and 2j+1's)
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        if cos.shape[-1] == half:
            c1 = c2 = cos
            s1 = s2 = sin
        else:  # diffusers' apply_rotary_emb(use_real_unbind_dim=-1): tables repeat_interleave(2)'d
            c1, c2, s1, s2 = cos[..., 0::2], cos[..., 1::2], sin[..., 0::2], sin[..., 1::2]
        rot = torch.stack([x1 * c1 - x2 * s1, x1 * s2 + x2 * c2], -1).flatten(-2)
    return torch.cat([rot, rest], -1)


def qk_norm_rope_reference(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                           cos: Tensor, sin: Tensor, positions: Optional[Tensor] = None, *,
                           norm_over: str, rope_style: str, rope_dim: int, q_eps: float,
                           k_eps: float, out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Reference for ``torch.ops.diffopt.qk_norm_rope``: RMSNorm of q and of k, then RoPE.

    q [B, S, Hq, D], k [B, S, Hk, D] (any strides, Hq != Hk allowed), fp32/bf16/fp16.
    norm_over "head": RMS over D of each head, weight [D]; "hidden": RMS over all H*D channels of
    the token (the norm before the head split), weight [H*D]. Weights may be None (no affine).
    Each tensor uses its own eps. rope_dim (-1 = D): only the first rope_dim channels of each head
    rotate, the others pass through normed.
    rope_style "neox" (half split, h = rope_dim/2): out[i] = x[i]*cos[i] - x[i+h]*sin[i] (i < h),
    out[i] = x[i]*cos[i] + x[i-h]*sin[i] (h <= i < rope_dim); with per-pair tables (L = h) entry j
    serves channels j and j+h. "interleaved": out[2j] = x[2j]*c[j] - x[2j+1]*s[j],
    out[2j+1] = x[2j]*s[j] + x[2j+1]*c[j] with per-pair tables (L = h); with per-channel tables (L = rope_dim)
    out[2j] = x[2j]*cos[2j] - x[2j+1]*sin[2j], out[2j+1] = x[2j]*sin[2j+1] + x[2j+1]*cos[2j+1].
    cos/sin broadcast to [B, S, 1, L] (L = rope_dim or rope_dim/2), or are [P, L] caches indexed by
    ``positions`` ([B, S] or [S] integers). Returns new tensors (q_out, k_out) in ``out_dtype`` (default:
    q's/k's dtype), each laid out like its input (``output_like``): the math is fp32 from the inputs'
    values and each output is rounded once.
    """
    info = check_qk_norm_rope_args(q, k, q_weight, k_weight, cos, sin, positions, norm_over, rope_style, rope_dim,
                                   out_dtype)
    c, s = rope_tables(cos, sin, positions, info.B, info.S)
    args = (c, s, norm_over, rope_style, info.rope_dim, out_dtype)
    return _norm_rope_one(q, q_weight, q_eps, *args), _norm_rope_one(k, k_weight, k_eps, *args)


def qk_norm_rope_backward_reference(
    grad_q: Optional[Tensor], grad_k: Optional[Tensor], q: Tensor, k: Tensor, q_weight: Optional[Tensor],
    k_weight: Optional[Tensor], cos: Tensor, sin: Tensor, positions: Optional[Tensor] = None, *, norm_over: str,
    rope_style: str, rope_dim: int, q_eps: float, k_eps: float, needs_input_grad: tuple[bool, ...] = (True,) * 6,
) -> tuple[Optional[Tensor], ...]:
    """Reference for the gradients of ``qk_norm_rope``: (q, k, q_weight, k_weight, cos, sin), each None where
    ``needs_input_grad`` says it is not needed (or the input is None).

    Recomputes the forward from the inputs (the op saves no intermediates) and applies the transposed
    rotation, then RMSNorm's backward, in fp32 from the gradients' and the inputs' values; each gradient is
    rounded once to its input's dtype. The rounding of the forward output to ``out_dtype`` passes the
    gradient through unchanged, as eager autograd's cast does. Written in differentiable torch ops, so
    AOT autograd traces it into the backward graph and Inductor fuses it.
    """
    info = check_qk_norm_rope_args(q, k, q_weight, k_weight, cos, sin, positions, norm_over, rope_style, rope_dim)
    c, s = rope_tables(cos, sin, positions, info.B, info.S)
    need_x, need_w, need_tables = needs_input_grad[:2], needs_input_grad[2:4], any(needs_input_grad[4:6])
    grads = [None] * 6
    table_grads = []
    for i, (g, x, w, eps) in enumerate(((grad_q, q, q_weight, q_eps), (grad_k, k, k_weight, k_eps))):
        if g is None or not (need_x[i] or (need_w[i] and w is not None) or need_tables):
            continue
        g_x, g_w, g_tables = _norm_rope_one_backward(
            g, x, w, eps, c, s, norm_over, rope_style, info.rope_dim, need_x[i], need_w[i] and w is not None,
            need_tables)
        grads[i], grads[2 + i] = g_x, g_w
        if g_tables is not None:
            table_grads.append(g_tables)
    if table_grads:
        g_c = sum(t[0] for t in table_grads)
        g_s = sum(t[1] for t in table_grads)
        for index, (g_table, table) in enumerate(((g_c, cos), (g_s, sin))):
            if needs_input_grad[4 + index]:
                grads[4 + index] = _table_grad(g_table, table, positions, info.S).to(table.dtype)
    return tuple(grads)


def _norm_rope_one_backward(g: Tensor, x: Tensor, w: Optional[Tensor], eps: float, cos: Tensor, sin: Tensor,
                            norm_over: str, rope_style: str, rope_dim: int, need_x: bool, need_w: bool,
                            need_tables: bool):
    H, D = x.shape[-2:]
    dims = (-1,) if norm_over == "head" else (-2, -1)
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(dims, keepdim=True) + eps)
    normed = xf * rstd
    wf = None if w is None else w.float().view(-1 if norm_over == "head" else H, D)
    g = g.float()
    g_y = apply_rope(g, cos, _transposed_sin(sin, rope_style, rope_dim), rope_style, rope_dim)
    g_tables = None
    if need_tables:
        y = normed if wf is None else normed * wf
        g_tables = _rope_table_grads(g[..., :rope_dim], y[..., :rope_dim], cos.shape[-1], rope_style)
    g_w = None
    if need_w:
        g_w = (g_y * normed).sum((0, 1, 2) if norm_over == "head" else (0, 1)).reshape(-1).to(w.dtype)
    g_x = None
    if need_x:
        g_n = g_y if wf is None else g_y * wf
        g_x = (rstd * (g_n - normed * (g_n * normed).mean(dims, keepdim=True))).to(x.dtype)
    return g_x, g_w, g_tables


def _transposed_sin(sin: Tensor, rope_style: str, rope_dim: int) -> Tensor:
    """The sin table whose rotation (``apply_rope`` with the same cos) is the transpose of ``sin``'s.

    Each pair's rotation is [[c_a, -s_a], [s_b, c_b]] (a, b its channels; per-pair tables have
    s_a = s_b); its transpose [[c_a, s_b], [-s_a, c_b]] is the same form with s'_a = -s_b, s'_b = -s_a:
    per-channel tables swap the pair's entries and negate, per-pair tables negate."""
    if sin.shape[-1] != rope_dim:
        return -sin
    if rope_style == "neox":
        half = rope_dim // 2
        return -torch.cat([sin[..., half:], sin[..., :half]], -1)
    return -sin.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def _rope_table_grads(g: Tensor, y: Tensor, table_len: int, rope_style: str) -> tuple[Tensor, Tensor]:
    """d(loss)/d(cos), d(loss)/d(sin) of the rotation of y (its rotated channels) given the output's gradient g,
    summed over heads: [..., 1, table_len]."""
    half = y.shape[-1] // 2
    if rope_style == "neox":
        g_c = g * y
        g_s = g * torch.cat([-y[..., half:], y[..., :half]], -1)
        if table_len == half:  # per pair: channels j and j + half read entry j
            g_c, g_s = g_c[..., :half] + g_c[..., half:], g_s[..., :half] + g_s[..., half:]
    else:
        y1, y2, g1, g2 = y[..., 0::2], y[..., 1::2], g[..., 0::2], g[..., 1::2]
        c1, c2, s1, s2 = g1 * y1, g2 * y2, -g1 * y2, g2 * y1
        if table_len == half:
            g_c, g_s = c1 + c2, s1 + s2
        else:
            g_c, g_s = torch.stack([c1, c2], -1).flatten(-2), torch.stack([s1, s2], -1).flatten(-2)
    return g_c.sum(-2, keepdim=True), g_s.sum(-2, keepdim=True)


def _table_grad(g: Tensor, table: Tensor, positions: Optional[Tensor], S: int) -> Tensor:
    """The [B, S, 1, L] gradient of the tables as the op read them, reduced to the table's own shape."""
    if positions is None:
        return g.sum_to_size(table.shape)
    pos = positions.long().reshape(-1, S).expand(g.shape[0], S).reshape(-1)
    return torch.zeros(table.shape, dtype=g.dtype, device=g.device).index_add(0, pos, g.reshape(-1, table.shape[-1]))
