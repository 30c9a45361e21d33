"""QK RMSNorm + RoPE -> one fused kernel.

Stock form: RMSNorm of q and of k, then a rotary embedding of each by the same
cos/sin tables, as separate ops. The norm may be per head (over D; Cosmos3,
Qwen3, Flux-like) or across heads (over H*D, before the head split; Wan), and
written as ``F.rms_norm``, ``nn.RMSNorm``, or by hand as
``x * rsqrt(mean(x^2) + eps) * w`` with or without a float32 upcast. The
rotation may be half-split (``x*cos + rotate_half(x)*sin``), interleaved pairs
(``unflatten(-1, (-1, 2)).unbind(-1)`` then stores into ``out[..., 0::2]`` /
``out[..., 1::2]``), complex (``view_as_complex(x) * freqs``), or by 2x2 rotation-matrix
tables ``[..., D/2, 2, 2]`` proven ``[[cos, -sin], [sin, cos]]`` (HiDream, PRX), on all or on
the first ``rope_dim`` channels of each head, with q and k of different head
counts (GQA).

Optimized form: ``torch.ops.diffopt.qk_norm_rope(q, k, q_weight, k_weight, cos,
sin, norm_over=..., rope_style=..., rope_dim=..., q_eps=..., k_eps=...)``: one
kernel reads q and k once and writes them once. On graphs that need gradients
the pass runs on the forward ATen graph before AOT autograd (``diffopt.training``),
and the backward graph gets the op's registered backward.

How it matches (around the math, not one model's source):

1. A norm is found from each ``rsqrt(mean(X^2, -1, keepdim) + eps)`` whose
   result multiplies X (casts aside), optionally followed by a weight of the
   normed size and by casts.
2. The rotation is the region of rotation-safe ops (products, sums, negation,
   slicing, concatenation, views, scatters into a fresh buffer, complex views)
   from the normed head tensor x to one exit node. It is evaluated on one head
   row in float64 with random values for x and for every table it reads, and
   compared with the kernel's rotation formula for each layout the tables'
   length admits. All ops allowed in the region are polynomial, so agreement
   at random points proves the identity (Schwartz-Zippel); two draws are used.
3. The heads are the lead dim the tables broadcast over: [B, S, H, D], or
   [B, H, S, D] after a transpose before or after the norm (the op runs on a
   permuted view, its outputs permuted back).
4. Joint attention: normed segments concatenated along the tokens, then
   rotated, are fused per segment (one call each, its rows of the tables),
   the outputs concatenated as stock concatenated the normed segments.
   Token slices: a norm over all tokens, then RoPE of one run of them put back by
   ``slice_scatter`` or ``cat`` (CogVideoX/CogView4's processors, HunyuanVideo's single block): the
   rotated rows are one fused call, the unrotated rows the stock norm's ops on their rows, concatenated in
   token order with the stock result's strides.
5. q and k sites that read the same tables the same way are paired and
   replaced by one call.

Preconditions (else no rewrite):

- The norm is over the last dim only, with a positive eps, and its size is the
  head dim (per head) or heads x head dim, the norm output then being split
  into heads by a view (across heads).
- No intermediate of the norm or the rotation is used outside it (the rewrite
  would not provide it), and the exit has the head tensor's shape.
- Ops in the rotation act on the head's channels only; tables broadcast over
  heads (size 1 at the head dim) and over the tokens; their length gives the
  rotated width (rope_dim or rope_dim / 2 entries).
- Token slices: the norm's output is used by the slice and the assembly only, the slice is along a
  token dim with step 1 and static bounds, the rows go back where they were taken from, and q and k
  rotate the same tokens.
- The q and k sites read the same table tensors and get the same layout, and
  the fused call can be placed before every consumer of both outputs.
- The stock result has the strides the op's (permuted) outputs get; the
  rotation's roundings are the op's (no float64 math, no rounding narrower
  than the result's dtype).
- The tensors live on a device with a fast kernel (option ``devices``, default
  CUDA only: on CPU Inductor's own fused code beats the op's reference).
"""
from __future__ import annotations

import dataclasses
import heapq
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from diffopt import compat
from diffopt.graph_pass import GraphPass, RewriteLog, Stage
from diffopt.kernels.reference import apply_rope

from .fx_utils import (
    RESHAPES as _VIEWS, concrete as _concrete, constant_key, erase_dead, fake_value, insert_call, is_pure,
)

aten = torch.ops.aten
prims = torch.ops.prims

_CASTS = (prims.convert_element_type.default, aten._to_copy.default, aten.clone.default, aten.alias.default)
_MAX_REGION = 48  # nodes; real rotations take 5-15


@dataclasses.dataclass
class _Norm:
    source: fx.Node  # the tensor normalized, before any upcast
    weight: fx.Node | None
    eps: float
    size: int
    nodes: list[fx.Node]  # pow ... last cast, in graph order
    out: fx.Node


@dataclasses.dataclass
class _Site:
    norm: _Norm
    norm_over: str  # "head" | "hidden"
    x: fx.Node  # the normed tensor as heads: lead dims (tokens and heads, in any order) + [D]
    path: list[fx.Node]  # the head split, transposes and token slice from the norm's output to x (in order)
    head_axes: list[int]  # which of x's lead dims can be the heads (tables broadcast there), best first
    exit: fx.Node
    region: list[fx.Node]
    cos: Any  # table node, or (complex table node, "real")
    sin: Any
    rope_style: str
    rope_dim: int
    # Joint attention: x is cat([norm outputs], cat_dim), a token dim; segments are those norms, in order.
    segments: list[_Norm] = dataclasses.field(default_factory=list)
    cat_dim: int | None = None
    # Token slice: only the tokens [start, end) of ``dim`` rotated (x is that slice of the norm's output), the
    # rows put back among the unrotated ones by ``assembly`` (slice_scatter or cat), the result replaced.
    token_slice: tuple[int, int, int] | None = None  # (dim, start, end), concrete
    assembly: fx.Node | None = None
    unrotated: list[fx.Node] = dataclasses.field(default_factory=list)  # the cat's slices of unrotated tokens

    @property
    def norms(self) -> list[_Norm]:
        return self.segments or [self.norm]


class QKNormRope(GraphPass):
    name = "qk_norm_rope"
    stage = Stage.POST_GRAD
    after = ("dedupe",)  # q and k normed from one tensor share one statistic once dedupe merged them
    differentiable = True  # the op has an autograd formula: training graphs are rewritten before autograd
    # Every norm it fuses has one (F.rms_norm / nn.RMSNorm, or a hand-written rsqrt); without them a
    # training graph is not traced before autograd for nothing.
    anchors = ("rsqrt", "rms_norm", "_fused_rms_norm")
    # Devices with a fast kernel. On CPU the op runs its plain-torch reference, which is slower
    # than Inductor's own fused C++ code; tests add "cpu" to exercise the rewrite there.
    # "training": also fuse in graphs that need gradients (the op's autograd formula, rewritten before
    # autograd: diffopt/training.py); False compiles them with the stock code.
    defaults = {"devices": ("cuda",), "training": True}

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        position = {node: index for index, node in enumerate(graph.nodes)}
        sites = []
        off_device = set()
        norms = []
        for node in graph.nodes:
            if node.op == "call_function" and node.target is aten.rsqrt.default:
                for norm in _match_norms(node):
                    device = fake_value(norm.source).device.type
                    if device not in self.config["devices"]:
                        off_device.add(device)
                    else:
                        norms.append(norm)
        norm_of = {norm.out: norm for norm in norms}
        for norm in norms:
            site = _match_site(norm, position, norm_of)
            if isinstance(site, str):
                log.decline(norm.out, site)
            elif site is not None:
                sites.append(site)
        for device in sorted(off_device):
            log.decline(next(iter(graph.nodes)), f"off on {device} (option devices: {list(self.config['devices'])})")
        used: set[int] = set()
        reasons: dict[int, str] = {}
        for i, q in enumerate(sites):
            if i in used:
                continue
            for j in range(i + 1, len(sites)):
                axis = None if j in used else _compatible(q, sites[j])
                if axis is None:
                    continue
                reason = _rewrite(graph, q, sites[j], axis, position, log)
                position = {node: index for index, node in enumerate(graph.nodes)}
                if reason is None:
                    used.update((i, j))
                    break
                reasons[i] = reasons[j] = reason
        for i, site in enumerate(sites):
            if i not in used:
                unpaired = "RMSNorm + RoPE with no q/k partner reading the same tables"
                if site.token_slice is not None:
                    unpaired += " and rotating the same tokens"
                log.decline(site.exit, reasons.get(i, unpaired))


# --- shapes (dims may be symbolic: batch and tokens often are) -------------------


def _concrete_shape(sizes: Any) -> tuple[int, ...]:
    shape = tuple(_concrete(size) for size in sizes)
    if None in shape:
        raise _NoMatch  # a head's channels must be known at compile time
    return shape


def _same(a: Any, b: Any) -> bool:
    return statically_known_true(a == b)


def _same_shape(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


# --- the norm ------------------------------------------------------------------


def _is_cast(node: Any) -> bool:
    """An op that changes at most the dtype of its input's values."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _CASTS:
        return False
    if node.target is not aten._to_copy.default:
        return True
    # ``x.to(dtype)`` as decompositions write it in ATen graphs before autograd: layout and device restated
    source = fake_value(node.args[0])
    return (
        set(node.kwargs) <= {"dtype", "layout", "device"}
        and node.kwargs.get("layout", torch.strided) == torch.strided
        and node.kwargs.get("device", source.device) == source.device
    )


def _strip_casts(node: Any) -> Any:
    while _is_cast(node):
        node = node.args[0]
    return node


def _scalar(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


_patterns = compat.pattern_matcher()


def _norm_anchor(square: Any) -> Any:
    """``rsqrt(mean(square, dims, keepdim=True) + eps)``; the eps add and ``square`` used once, the mean
    maybe by other norms' eps adds (post-grad graphs pass ``keepdim`` by position)."""
    return _patterns.CallFunction(
        aten.rsqrt.default,
        _patterns.CallFunction(
            [aten.add.Scalar, aten.add.Tensor],
            _patterns.CallFunction(aten.mean.dim, square, _patterns.KeywordArg("dims"), True, _users=_patterns.MULTIPLE),
            _patterns.KeywordArg("eps"),
        ),
    )


# The norm's statistic, X^2 written as pow(X, 2) or X * X (X maybe an upcast of the normed tensor).
_NORM_ANCHORS = (
    _norm_anchor(_patterns.CallFunction(aten.pow.Tensor_Scalar, _patterns.KeywordArg("upcast"), 2)),
    _norm_anchor(_patterns.CallFunction(aten.mul.Tensor, _patterns.KeywordArg("upcast"), _patterns.KeywordArg("upcast"))),
)


def _match_norms(rsqrt: fx.Node) -> list[_Norm]:
    """The norms of X whose statistic is this ``rsqrt``: one per weighted branch where several norms of
    the same tensor share it (q and k normed from one tensor, after ``dedupe`` merged their statistics)."""
    match = next((m for anchor in _NORM_ANCHORS if _patterns.is_match(m := anchor.match(rsqrt))), None)
    if match is None:
        return []
    add = rsqrt.args[0]
    mean, square = add.args[0], add.args[0].args[0]
    eps, dims, upcast = _scalar(match.kwargs["eps"]), match.kwargs["dims"], match.kwargs["upcast"]
    if eps is None or eps <= 0 or add.kwargs.get("alpha", 1) != 1:
        return []
    x_val = fake_value(square)
    if not isinstance(x_val, torch.Tensor) or [d % x_val.dim() for d in dims] != [x_val.dim() - 1]:
        return []
    source = _strip_casts(upcast)
    size = _concrete(x_val.shape[-1])
    # The statistics may feed other norms of the same tensor (their own eps), nothing else.
    if size is None or not all(_is_eps_add(user) for user in mean.users):
        return []
    prefix = [square, mean, add, rsqrt]
    if upcast is not source:
        prefix.insert(0, upcast)
    norms = []
    for scale in rsqrt.users:
        if scale.target is not aten.mul.Tensor or rsqrt not in scale.args:
            return []
        other = scale.args[0] if scale.args[1] is rsqrt else scale.args[1]
        if _strip_casts(other) is not source:
            return []
        norms += [
            _Norm(source, weight, eps, size, prefix + chain, chain[-1])
            for weight, chain in _norm_tails(scale, None, [scale], size)
        ]
    # The upcast X and the source may feed other consumers, the mean other norms' eps; the norms' own
    # intermediates only each other.
    family = {node for norm in norms for node in norm.nodes}
    for norm in norms:
        if any(user not in family for node in norm.nodes[:-1] if node not in (upcast, mean) for user in node.users):
            return []
    return norms


def _is_eps_add(node: fx.Node) -> bool:
    return node.target in (aten.add.Scalar, aten.add.Tensor) and _scalar(node.args[1]) is not None and all(
        user.target is aten.rsqrt.default for user in node.users
    )


def _norm_tails(out: fx.Node, weight: fx.Node | None, chain: list[fx.Node], size: int):
    """(weight, nodes) of each norm ending after ``out``: casts and at most one weight multiply; where every
    user of ``out`` is one of those, each user starts its own norm."""
    users = list(out.users)
    steps = []
    for user in users:
        if _is_cast(user):
            steps.append((weight, user))
        elif weight is None and user.target is aten.mul.Tensor and out in user.args:
            w = user.args[0] if user.args[1] is out else user.args[1]
            w_val = fake_value(w)
            if not isinstance(w_val, torch.Tensor) or _concrete(w_val.numel()) != size or _concrete(w_val.shape[-1]) != size:
                break
            steps.append((_strip_casts(w), user))
        else:
            break
    if not users or len(steps) != len(users):
        return [(weight, chain)]
    return [tail for w, user in steps for tail in _norm_tails(user, w, chain + [user], size)]


# --- the rotation ----------------------------------------------------------------


def _match_site(norm: _Norm, position: dict[fx.Node, int], norm_of: dict[fx.Node, _Norm]) -> _Site | str | None:
    """The rotation that follows ``norm``, trying the norm as across-heads first, then per head, from the
    latest exit back. A rotation whose roundings the op cannot reproduce gives the reason (a str).
    ``norm_of``: every norm found, by output (the segments of a joint-attention cat)."""
    kept = None
    out_val = fake_value(norm.out)
    users = list(norm.out.users)
    joint = _joint_cat(norm, norm_of)
    if isinstance(joint, str):
        return joint
    if joint is not None:
        return _match_joint(norm, joint, norm_of, position)
    sliced = _match_token_slice(norm, position)
    if sliced is not None:
        return sliced
    candidates = []  # (x, norm_over, path, head axis of x when the path fixes it)
    if len(users) == 1 and users[0].target in _VIEWS:
        # Across heads: a view splits the normed [..., H*D] into [..., H, D].
        view_val = fake_value(users[0])
        if (
            view_val.dim() == out_val.dim() + 1
            and _same_shape(view_val.shape[:-2], out_val.shape[:-1])
            and _same(view_val.shape[-2] * view_val.shape[-1], norm.size)
        ):
            candidates.append((users[0], "hidden", [users[0]], view_val.dim() - 2))
    candidates.append((norm.out, "head", [], None))
    for x, norm_over, path, head_axis in list(candidates):
        # The rotation in another layout ([B, H, S, D]): a transpose of the token and head dims after the norm.
        transposed = _lead_transpose(x)
        if transposed is not None:
            dims = transposed.args[1]
            axis = None if head_axis is None else [d % len(dims) for d in dims].index(head_axis)
            candidates.append((transposed, norm_over, path + [transposed], axis))
    for x, norm_over, path, head_axis in candidates:
        x_val = fake_value(x)
        if x_val.dim() not in (3, 4):
            continue
        lead_rank = x_val.dim() - 1  # lead = tokens + heads; the tail is one head's channels
        region, exits = _grow_region(x, position)
        for exit_node, exit_val in _exits_shaped_like(x, exits):
            members = [n for n in region if position[n] <= position[exit_node]]
            with compat.unset_fake_temporarily():  # rows are real tensors, whatever mode compiles the graph
                layout = _identify_rotation(x, exit_node, members, lead_rank, position, head_axis)
            if isinstance(layout, str):  # a rotation-matrix table not proven a rotation
                kept = layout
            elif layout is not None:
                kept = _rounding_kept(norm.nodes + members, exit_val.dtype)
                if kept is None:
                    *rotation, axes = layout
                    return _Site(norm, norm_over, x, path, axes, exit_node, members, *rotation)
    return kept


def _joint_cat(norm: _Norm, norm_of: dict[fx.Node, _Norm]) -> fx.Node | str | None:
    """The ``cat`` along a token dim that is the only user of ``norm`` and of the other norms it joins
    (joint attention: cat([text, image], seq) of normed heads), if there is one; the reason, where
    normed segments are joined along a dim that the rewrite cannot tell is the tokens'."""
    users = list(norm.out.users)
    if len(users) != 1 or users[0].target is not aten.cat.default:
        return None
    cat = users[0]
    rank = fake_value(cat).dim()
    dim = (cat.args[1] if len(cat.args) > 1 else 0) % rank
    parts = cat.args[0]
    if len(parts) < 2 or len(set(parts)) != len(parts):
        return None
    if not all(part in norm_of and len(part.users) == 1 for part in parts):
        return None
    if dim >= rank - 2:
        # [B, S, H, D]'s dim 2 holds heads, but [B, H, S, D]'s holds tokens, and so does [B, S, H*D]'s dim 1
        # (a norm across heads): which one it is, the cat does not say. Said once, at the first segment.
        if parts[0] is not norm.out:
            return None
        return (f"normed segments joined along dim {dim} of a {rank}-d tensor: joint attention is matched "
                "for a cat along a dim before the last two (the tokens of [B, S, H, D])")
    if any(_concrete(fake_value(part).shape[dim]) is None for part in parts):
        return None  # segment lengths slice the tables: known at compile time
    return cat


def _match_joint(norm: _Norm, cat: fx.Node, norm_of: dict[fx.Node, _Norm], position) -> _Site | str | None:
    """The rotation of cat([normed segments], seq): found once, from the cat's first segment."""
    if cat.args[0][0] is not norm.out:
        return None
    segments = [norm_of[part] for part in cat.args[0]]
    x_val = fake_value(cat)
    if x_val.dim() not in (3, 4):
        return None
    cat_dim = (cat.args[1] if len(cat.args) > 1 else 0) % x_val.dim()
    lead_rank = x_val.dim() - 1
    region, exits = _grow_region(cat, position)
    kept = None
    for exit_node, exit_val in _exits_shaped_like(cat, exits):
        found = _rotation_at(cat, exit_node, region, position, lead_rank, cat_dim)
        if not isinstance(found, tuple):
            kept = found or kept
            continue
        members, rotation, axes = found
        kept = _rounding_kept([n for seg in segments for n in seg.nodes] + members, exit_val.dtype)
        if kept is None:
            return _Site(norm, "head", cat, [], axes, exit_node, members, *rotation, segments=segments,
                         cat_dim=cat_dim)
    return kept


def _exits_shaped_like(source: fx.Node, exits: list[fx.Node]):
    """The region's exits with ``source``'s shape (where a rotation of it can end), the last first, with
    their values."""
    shape = fake_value(source).shape
    for exit_node in reversed(exits):
        exit_val = fake_value(exit_node)
        if isinstance(exit_val, torch.Tensor) and _same_shape(exit_val.shape, shape):
            yield exit_node, exit_val


def _rotation_at(source: fx.Node, exit_node: fx.Node, region, position, lead_rank: int, seq_dim: int):
    """The rotation from ``source`` to ``exit_node`` and the axes that may hold its heads (never the
    sequence dim ``seq_dim``): ``(members, rotation, axes)``; a decline reason; or None."""
    members = [n for n in region if position[n] <= position[exit_node]]
    with compat.unset_fake_temporarily():
        layout = _identify_rotation(source, exit_node, members, lead_rank, position, None)
    if layout is None or isinstance(layout, str):
        return layout
    *rotation, axes = layout
    axes = [axis for axis in axes if axis != seq_dim]
    return (members, rotation, axes) if axes else None


def _slice_bounds(node: fx.Node, rank: int, length_of: Callable[[int], int | None]):
    """(dim, start, end, step) of ``aten.slice.Tensor`` / ``slice_scatter``'s slice, start and end clamped
    into [0, length] as Python's slicing does; None where the length is not known at compile time."""
    offset = 2 if node.target is aten.slice_scatter.default else 1
    dim, start, end, step = (list(node.args[offset:]) + [0, None, None, 1][len(node.args) - offset:])[:4]
    dim = dim % rank
    length = length_of(dim)
    if length is None or not all(v is None or isinstance(v, int) for v in (start, end, step)):
        return None
    start, end, _ = slice(start, end).indices(length)
    return dim, start, max(start, end), step


def _match_token_slice(norm: _Norm, position: dict[fx.Node, int]) -> _Site | str | None:
    """RMSNorm over all tokens, then RoPE of one run of tokens only (CogVideoX, CogView4:
    ``q[:, :, text:] = rope(q[:, :, text:])``, post-grad ``slice_scatter(N, rope(N[:, :, text:]), 2, text)``;
    HunyuanVideo: ``cat([rope(N[:, :, :-text]), N[:, :, -text:]], 2)``). None where the norm's output is not
    used that way; the reason (a str) where it is but cannot be fused."""
    out = norm.out
    out_val = fake_value(out)
    rank = out_val.dim()
    # a slice only copied into is the destination of ``q[...] = ...`` (the slice_scatter says where it goes)
    users = [u for u in out.users if not (u.target is aten.slice.Tensor and u.users and all(
        c.target is aten.copy.default and c.args[0] is u for c in u.users))]
    slices = [u for u in users if u.target is aten.slice.Tensor and u.args[0] is out]
    scatters = [u for u in users if u.target is aten.slice_scatter.default and u.args[0] is out]
    if rank not in (3, 4) or len(users) != 2 or not (len(slices) == 2 or (len(slices), len(scatters)) == (1, 1)):
        return None
    bounds = {u: _slice_bounds(u, rank, lambda d: _concrete(out_val.shape[d])) for u in users}
    if any(b is None for b in bounds.values()):
        return "token slice: the token count is not known at compile time"
    if any(b[0] >= rank - 1 for b in bounds.values()):
        return None  # a slice of the channels: partial rotary, not a token slice
    if any(b[3] != 1 for b in bounds.values()):
        return "token slice: the rotated tokens are not one contiguous run (slice step != 1)"
    if scatters:
        (rotated,), (assembly,) = slices, scatters
        unrotated = []
        if bounds[rotated] != bounds[assembly]:
            return "token slice: the rotated rows are put back at other tokens than they were taken from"
    else:
        # the slice read only by the cat is the unrotated one; the other reaches it through the rotation
        direct = [s for s in slices if len(s.users) == 1 and next(iter(s.users)).target is aten.cat.default]
        if len(direct) != 1:
            return None
        (assembly,) = direct[0].users
        parts = assembly.args[0]
        if len(parts) != 2 or direct[0] not in parts:
            return None
        cat_dim = (assembly.args[1] if len(assembly.args) > 1 else 0) % rank
        unrotated = direct
        (rotated,) = [s for s in slices if s is not direct[0]]
        (d0, s0, e0, _), (d1, s1, e1, _) = (bounds[rotated], bounds[direct[0]])
        in_order = (s0, e0, s1, e1) if parts[1] is direct[0] else (s1, e1, s0, e0)
        length = _concrete(out_val.shape[d0])
        if not (d0 == d1 == cat_dim and in_order[0] == 0 and in_order[1] == in_order[2] and in_order[3] == length):
            return "token slice: the cat does not put the tokens back in their order"
    dim, start, end, _ = bounds[rotated]
    if start == end:
        return None
    region, exits = _grow_region(rotated, position)
    kept = None
    for exit_node, exit_val in _exits_shaped_like(rotated, exits):
        puts_back = assembly.args[1] is exit_node if scatters else set(parts) == {exit_node, *unrotated}
        if set(exit_node.users) != {assembly} or not puts_back:
            continue  # the rotated rows are not what the assembly puts back
        found = _rotation_at(rotated, exit_node, region, position, rank - 1, dim)
        if not isinstance(found, tuple):
            kept = found or kept
            continue
        members, rotation, axes = found
        kept = _rounding_kept(norm.nodes + members, exit_val.dtype)
        if kept is None:
            return _Site(norm, "head", rotated, [rotated], axes, exit_node, members, *rotation,
                         token_slice=(dim, start, end), assembly=assembly, unrotated=unrotated)
    return kept or "token slice: the rotated tokens' rows are not a RoPE of the norm's output"


def _lead_transpose(node: fx.Node) -> fx.Node | None:
    """The only user of ``node`` if it is a permute of its lead dims (channels stay last), else None."""
    users = list(node.users)
    if len(users) != 1 or users[0].target is not aten.permute.default:
        return None
    rank = fake_value(node).dim()
    dims = [d % rank for d in users[0].args[1]]
    return users[0] if dims[-1] == rank - 1 and dims != list(range(rank)) else None


_REGION_OPS = {
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar,
    aten.neg.default, prims.convert_element_type.default, aten._to_copy.default, aten.clone.default,
    aten.alias.default, aten.copy.default, *_VIEWS, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
    aten.permute.default, aten.slice.Tensor, aten.select.int, aten.unbind.int, aten.split.Tensor,
    aten.split_with_sizes.default, aten.cat.default, aten.stack.default, aten.slice_scatter.default,
    aten.select_scatter.default, aten.view_as_complex.default, aten.view_as_real.default, operator.getitem,
    aten.sum.dim_IntList,
}


def _grow_region(x: fx.Node, position: dict[fx.Node, int]) -> tuple[list[fx.Node], list[fx.Node]]:
    """Nodes reachable from x through rotation-safe ops, and those at which the region has one exit."""
    region = [x]
    members = {x}
    outside = {x: len(x.users)}  # users of each member not (yet) in the region
    live = {x} if x.users else set()
    exits = []
    heap = [(position[u], id(u), u) for u in x.users]
    heapq.heapify(heap)
    seen = set()
    while heap and len(region) < _MAX_REGION:
        _, _, node = heapq.heappop(heap)
        if node in seen:
            continue
        seen.add(node)
        if node.op != "call_function" or node.target not in _REGION_OPS:
            continue
        region.append(node)
        members.add(node)
        for arg in node.all_input_nodes:
            if arg in members:
                outside[arg] -= 1
                if outside[arg] == 0:
                    live.discard(arg)
        outside[node] = len(node.users)
        if node.users:
            live.add(node)
        if live == {node}:
            exits.append(node)
        for user in node.users:
            heapq.heappush(heap, (position[user], id(user), user))
    return region, exits


def _identify_rotation(x: fx.Node, exit_node: fx.Node, members: list[fx.Node], lead_rank: int, position,
                       head_axis: int | None):
    """(cos, sin, style, rope_dim, head axis) if the region from x to exit_node is a rotation, else None (or
    the reason, where it reads a 2x2 rotation-matrix table not proven a rotation).
    ``head_axis``: which lead dim of x is the heads, where the graph says so (the head split of an
    across-heads norm); else any lead dim that the tables broadcast over.

    Rotation-matrix tables (issue 12 class D): the region reads entries of a table M [..., L, 2, 2]. Where M is
    proven to be [[c, -s], [s, c]] (``_unproven_rotation``), its rows are drawn with that structure from random
    c and s, and the region must agree with the rotation by the tables M[..., 0, 0] and M[..., 1, 0]."""
    member_set = set(members)
    x_val = fake_value(x)
    head_dim = _concrete(x_val.shape[-1])
    leaves = {}
    for node in members:
        for arg in node.all_input_nodes:
            if arg not in member_set and not _derived_from(arg, x, position):
                leaves[arg] = None
            elif arg not in member_set:
                return None  # reads x through an op outside the region
    views = {leaf: view for leaf in leaves if (view := _matrix_view(leaf)) is not None}
    unproven = {matrix: _unproven_rotation(matrix) for matrix, _ in views.values()}
    rotations = {leaf: view for leaf, view in views.items() if unproven[view[0]] is None}
    generator = torch.Generator().manual_seed(0)
    try:
        relevant = [leaf for leaf in leaves
                    if _influences(leaf, x, exit_node, members, lead_rank, generator, rotations)]
    except _NoMatch:
        return None
    tables = []
    for leaf in relevant:
        val = fake_value(leaf)
        if not isinstance(val, torch.Tensor):
            return None
        tables.append(leaf)
    matrices = {views[leaf][0] for leaf in tables if leaf in views}
    if matrices:
        if len(matrices) != 1 or not all(leaf in views for leaf in tables):
            return None
        (matrix,) = matrices
        if unproven[matrix] is not None:
            return unproven[matrix]
        # the tables the op gets: M[..., 0, 0] (cos) and M[..., 1, 0] (sin), one entry per pair
        shape = fake_value(matrix).shape[:-2]
        common = _common_axes([_head_axes(shape, x_val, lead_rank)], head_axis)
        if not common:
            return None
        length = _concrete(shape[-1]) or 0
        candidates = [((matrix, (0, 0)), (matrix, (1, 0)), style, 2 * length) for style in ("interleaved", "neox")]
        candidates = [c for c in candidates if 0 < c[3] <= head_dim]
        for cos, sin, style, rope_dim in candidates:
            if all(_agrees(x, exit_node, members, lead_rank, cos, sin, style, rope_dim, seed, rotations)
                   for seed in (1, 2)):
                return cos, sin, style, rope_dim, common
        return None
    axes = [_head_axes(fake_value(t).shape, x_val, lead_rank) for t in tables]
    common = _common_axes(axes, head_axis)
    if not common:
        return None  # the tables vary along every lead dim: per head
    if len(tables) == 1 and fake_value(tables[0]).is_complex():
        length = _concrete(fake_value(tables[0]).shape[-1]) or 0
        candidates = [((tables[0], 0), (tables[0], 1), style, 2 * length) for style in ("interleaved", "neox")]
    elif len(tables) == 2 and not any(fake_value(t).is_complex() for t in tables):
        length = _concrete(fake_value(tables[0]).shape[-1]) or 0
        if _concrete(fake_value(tables[1]).shape[-1]) != length:
            return None
        candidates = []
        for cos, sin in ((tables[0], tables[1]), (tables[1], tables[0])):
            candidates += [
                (cos, sin, "neox", length),
                (cos, sin, "neox", 2 * length),
                (cos, sin, "interleaved", 2 * length),
                (cos, sin, "interleaved", length),  # per-channel tables (each pair's entry repeated)
            ]
    else:
        return None
    candidates = [c for c in candidates if 0 < c[3] <= head_dim and c[3] % 2 == 0]
    for cos, sin, style, rope_dim in candidates:
        if all(_agrees(x, exit_node, members, lead_rank, cos, sin, style, rope_dim, seed) for seed in (1, 2)):
            return cos, sin, style, rope_dim, common
    return None


# --- 2x2 rotation-matrix tables (issue 12 class D: HiDream, PRX) ----------------------------------
# ``freqs = stack([cos, -sin, sin, cos], -1).view(..., L, 2, 2)``, applied as
# ``freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]`` with ``x_ = x.reshape(..., L, 1, 2)``.

_NOT_A_ROTATION = "the 2x2 matrix table is not proven a rotation [[cos, -sin], [sin, cos]]"
_ROTATION_VIEWS = (aten.unsqueeze.default, aten.squeeze.dim, aten.select.int, aten.slice.Tensor, aten.expand.default,
                   aten.permute.default, *_VIEWS)


def _is_2x2(node: Any) -> bool:
    val = fake_value(node) if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() >= 3 and [_concrete(n) for n in val.shape[-2:]] == [2, 2]


def _matrix_view(leaf: fx.Node) -> tuple[fx.Node, list[tuple[int, int]]] | None:
    """(M, selects) where ``leaf`` is an entry view of a table M [..., L, 2, 2]: M itself, or selects along M's
    last two dims (``selects``: (dim counted from the end, index) in the order applied to M); else None."""
    chain = []  # (input, dim of the input, index), from the leaf back
    node = leaf
    while len(chain) < 3:
        if node.target is aten.select.int:
            source, dim, index = node.args[0], node.args[1], node.args[2]
        elif (node.target is operator.getitem and isinstance(node.args[0], fx.Node)
              and node.args[0].target is aten.unbind.int):
            source, index = node.args[0].args[0], node.args[1]
            dim = node.args[0].args[1] if len(node.args[0].args) > 1 else 0
        else:
            break
        rank = fake_value(source).dim()
        chain.append((source, dim % rank - rank, index))
        node = source
    if not _is_2x2(node) or len(chain) > 2:
        return None
    selects = [(dim, index) for _, dim, index in reversed(chain)]
    # the first select takes a row or a column of each matrix; a second one the entry (then the last dim)
    if not all(dim >= -2 for dim, _ in selects) or (len(selects) == 2 and selects[1][0] != -1):
        return None
    return node, selects


def _unproven_rotation(table: fx.Node) -> str | None:
    """Why the table M [..., L, 2, 2] is not proven to be [[c, -s], [s, c]] entry by entry; None if it is.

    Proven structurally, from the graph: M is ``stack([c, -s, s, c], -1)`` viewed as [..., 2, 2] (post-grad:
    a cat of the entries unsqueezed), then maybe cast (a rounding keeps the equal entries equal and the
    negated one negated), reshaped, concatenated along a lead dim with other such matrices (HiDream's
    per-axis tables), sliced, expanded or unsqueezed along lead dims. c and s are cos and sin of one angle,
    or tables that the graph reads (inputs, constants). A constant M (folded by fold_invariant) is checked
    on its values. A graph input M proves nothing: it declines."""
    node = _strip_casts(table)
    if node.op == "placeholder":
        return "the 2x2 rotation-matrix table is a graph input: it cannot be proven a rotation"
    if node.op == "get_attr":
        return _rotation_values(node)
    if node.op != "call_function":
        return _NOT_A_ROTATION
    rank = fake_value(node).dim()
    args = node.args
    if node.target is aten.cat.default:
        if (args[1] if len(args) > 1 else 0) % rank >= rank - 2:
            return _NOT_A_ROTATION
        return next((reason for part in args[0] if (reason := _unproven_rotation(part)) is not None), None)
    if node.target not in _ROTATION_VIEWS or not isinstance(args[0], fx.Node):
        return _NOT_A_ROTATION
    source = args[0]
    if node.target in _VIEWS and not _is_2x2(source):
        # [..., 4] -> [..., 2, 2] (row-major: flat order kept): the stack of the four entries
        return _unproven_stack(source) if _concrete(fake_value(source).shape[-1]) == 4 else _NOT_A_ROTATION
    if not _is_2x2(source) or not _keeps_matrices(node, rank):
        return _NOT_A_ROTATION
    return _unproven_rotation(source)


def _keeps_matrices(node: fx.Node, rank: int) -> bool:
    """Whether a view of a [..., 2, 2] tensor to a [..., 2, 2] one moves lead dims only."""
    args, in_rank = node.args, fake_value(node.args[0]).dim()
    if node.target in _VIEWS:
        return True  # row-major: each run of four elements stays one matrix, in order
    if node.target is aten.unsqueeze.default:
        return args[1] % rank < rank - 2
    if node.target in (aten.squeeze.dim, aten.select.int, aten.slice.Tensor):
        return (args[1] if len(args) > 1 else 0) % in_rank < in_rank - 2
    if node.target is aten.expand.default:
        return [_concrete(n) for n in list(args[1])[-2:]] in ([2, 2], [-1, -1], [2, -1], [-1, 2])
    return [d % rank for d in args[1]][-2:] == [rank - 2, rank - 1]  # permute


def _unproven_stack(node: fx.Node) -> str | None:
    """Why ``node`` [..., 4] is not proven to be stack([c, -s, s, c], -1); None if it is."""
    node = _strip_casts(node)
    rank = fake_value(node).dim()
    if node.target not in (aten.stack.default, aten.cat.default) or len(node.args[0]) != 4:
        return _NOT_A_ROTATION
    if (node.args[1] if len(node.args) > 1 else 0) % rank != rank - 1:
        return _NOT_A_ROTATION
    entries = list(node.args[0])
    if node.target is aten.cat.default:  # stack as decomposed: each entry unsqueezed at the end
        if not all(e.target is aten.unsqueeze.default and e.args[1] % rank == rank - 1 for e in entries):
            return _NOT_A_ROTATION
        entries = [e.args[0] for e in entries]
    c, minus_s, s, c_again = entries
    negated = minus_s.target is aten.neg.default or (
        minus_s.target in (aten.mul.Tensor, aten.mul.Scalar) and _scalar(minus_s.args[1]) == -1)
    if not (_same_value(c, c_again, 4) and negated and _same_value(minus_s.args[0], s, 4)):
        return _NOT_A_ROTATION + " (entries in the wrong places or with the wrong signs)"
    c, s = _strip_casts(c), _strip_casts(s)
    if c.target is aten.cos.default and s.target is aten.sin.default:
        if _same_value(c.args[0], s.args[0], 4):
            return None
        return _NOT_A_ROTATION + " (cos and sin of different angles)"
    if all(t.op in ("placeholder", "get_attr") for t in (c, s)):
        return None  # the graph's own cos/sin tables, placed as a rotation
    return _NOT_A_ROTATION + " (its entries are not cos and sin of one angle)"


def _rotation_values(node: fx.Node) -> str | None:
    """A constant M [..., 2, 2] checked on its values: M[..., 1, 1] == M[..., 0, 0], M[..., 0, 1] ==
    -M[..., 1, 0] exactly, and c^2 + s^2 = 1 within the rounding of its dtype (a rotation, not scaled)."""
    value: Any = node.graph.owning_module
    for part in node.target.split("."):
        value = getattr(value, part, None)
    if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter) or not value.is_floating_point():
        return "the 2x2 rotation-matrix table is a parameter: it cannot be proven a rotation"
    with compat.unset_fake_temporarily():
        m = value.detach()
        c, s = m[..., 0, 0], m[..., 1, 0]
        if not (torch.equal(m[..., 1, 1], c) and torch.equal(m[..., 0, 1], -s)):
            return _NOT_A_ROTATION + " (a constant with other entries)"
        norm_error = (c.double() ** 2 + s.double() ** 2 - 1).abs().max().item() if m.numel() else 0.0
    if norm_error > 4 * torch.finfo(m.dtype).eps:
        return _NOT_A_ROTATION + " (a constant whose cos^2 + sin^2 is not 1: scaled)"
    return None


def _common_axes(axes: list[list[int]], head_axis: int | None) -> list[int]:
    """The head axes every table admits (``head_axis``: the one the graph fixed, if any)."""
    common = [axis for axis in axes[0] if all(axis in a for a in axes)] if axes else []
    return [axis for axis in common if head_axis is None or axis == head_axis]


def _derived_from(node: fx.Node, x: fx.Node, position: dict[fx.Node, int]) -> bool:
    # Only nodes after x can depend on it: the search stays between x and the node.
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current is x:
            return True
        if current in seen or position[current] < position[x]:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return False


def _head_axes(table: Any, x: torch.Tensor, lead_rank: int) -> list[int]:
    """The lead dims of x that can be the heads for a table of shape ``table``: right-aligned with x's lead + [L], it has
    size 1 there and size 1 or x's size at the other (token) dims. Heads are where models put them: [..., S, H, D]
    first, then [B, H, S, D] or [H, S, D]; never the batch dim of [B, ...] (tables that vary along both other
    dims vary per head)."""
    lead = list(table[:-1])
    x_lead = list(x.shape[:lead_rank])
    if len(lead) > len(x_lead) or not all(_same(t, 1) or _same(t, s) for t, s in zip(lead[::-1], x_lead[::-1])):
        return []
    lead = [1] * (len(x_lead) - len(lead)) + lead
    order = [lead_rank - 1, lead_rank - 2]
    return [axis for axis in order if _same(lead[axis], 1)]


class _NoMatch(Exception):
    pass


def _influences(leaf, x, exit_node, members, lead_rank, generator, rotations) -> bool:
    """Whether the leaf's values reach the exit (a NaN planted in it shows up there)."""
    rows = _evaluate(x, exit_node, members, lead_rank, generator, rotations, poison=leaf)
    return bool(torch.isnan(torch.view_as_real(rows) if rows.is_complex() else rows).any())


def _agrees(x, exit_node, members, lead_rank, cos, sin, style, rope_dim, seed, rotations=None) -> bool:
    generator = torch.Generator().manual_seed(seed)
    leaf_rows: dict = {}
    got = _evaluate(x, exit_node, members, lead_rank, generator, rotations, leaf_rows=leaf_rows)
    x_row = leaf_rows[x]

    def table(spec):
        node, part = spec if isinstance(spec, tuple) else (spec, None)
        row = leaf_rows.get(node)
        if row is None:
            return None
        if isinstance(part, tuple):  # an entry of a rotation-matrix table
            return row[..., part[0], part[1]].reshape(-1)
        row = row.reshape(-1)
        return row if part is None else (row.real if part == 0 else row.imag)

    c, s = table(cos), table(sin)
    if c is None or s is None or got.is_complex():
        return False
    want = apply_rope(x_row.reshape(1, 1, 1, -1), c.reshape(1, 1, 1, -1), s.reshape(1, 1, 1, -1), style, rope_dim)
    return got.shape == x_row.shape and torch.allclose(got, want.reshape(got.shape), rtol=1e-9, atol=1e-9)


def _evaluate(x, exit_node, members, lead_rank, generator, rotations=None, poison=None, leaf_rows=None):
    """The exit's value on one head row, in float64, from random x and leaf rows. ``rotations``: leaves that
    are entries of a proven rotation-matrix table, {leaf: (table, selects)}; the table's row is drawn as
    [[c, -s], [s, c]] and the leaves' rows are its entries."""
    rotations = rotations or {}
    rows: dict[fx.Node, Any] = {}
    leaf_rows = {} if leaf_rows is None else leaf_rows
    x_val = fake_value(x)
    leaf_rows[x] = torch.randn(_concrete_shape(x_val.shape[lead_rank:]), generator=generator, dtype=torch.float64)
    rows[x] = leaf_rows[x]
    member_set = set(members)

    def value(arg, tail_rank):
        if isinstance(arg, fx.Node):
            if arg in rows:
                return rows[arg]
            if arg in member_set:
                raise _NoMatch
            val = fake_value(arg)
            if not isinstance(val, torch.Tensor):
                raise _NoMatch
            tail = _concrete_shape(val.shape[max(0, val.dim() - tail_rank):])
            if arg not in leaf_rows and arg in rotations:
                matrix, selects = rotations[arg]
                if matrix not in leaf_rows:
                    matrix_val = fake_value(matrix)
                    matrix_tail = _concrete_shape(matrix_val.shape[max(0, matrix_val.dim() - tail_rank - len(selects)):])
                    c, s = (torch.randn(matrix_tail[:-2], generator=generator, dtype=torch.float64) for _ in "cs")
                    leaf_rows[matrix] = torch.stack([c, -s, s, c], -1).reshape(matrix_tail)
                row = leaf_rows[matrix]
                for dim, index in selects:
                    row = row.select(dim, index)
                leaf_rows[arg] = torch.full_like(row, float("nan")) if arg is poison else row
            if arg not in leaf_rows:
                dtype = torch.complex128 if val.is_complex() else torch.float64
                leaf_rows[arg] = torch.randn(tail, generator=generator, dtype=dtype)
                if arg is poison:
                    leaf_rows[arg] = torch.full_like(leaf_rows[arg], float("nan"))
            return leaf_rows[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(value(a, tail_rank) for a in arg)
        return arg

    for node in members[1:]:
        out_val = fake_value(node)
        out_rank = (out_val[0] if isinstance(out_val, (tuple, list)) else out_val).dim()
        tail_rank = out_rank - lead_rank
        rows[node] = _row_op(node, lambda a: value(a, tail_rank), lead_rank)
        if node is exit_node:
            return rows[node]
    raise _NoMatch


def _row_op(node: fx.Node, value: Callable[[Any], Any], lead_rank: int) -> Any:
    """Apply ``node``'s op to row values: dims are shifted by the lead rank; lead dims must be untouched."""
    target, args, kwargs = node.target, node.args, node.kwargs
    in_val = fake_value(args[0]) if args and isinstance(args[0], fx.Node) else None
    in_rank = in_val.dim() if isinstance(in_val, torch.Tensor) else None

    def tail_dim(dim, rank=in_rank):
        dim = dim % rank
        if dim < lead_rank:
            raise _NoMatch
        return dim - lead_rank

    def out_tail():
        out = fake_value(node)
        if not _same_shape(out.shape[:lead_rank], in_val.shape[:lead_rank]):
            raise _NoMatch
        return _concrete_shape(out.shape[lead_rank:])

    if target is operator.getitem:
        return value(args[0])[args[1]]
    if target in (aten.mul.Tensor, aten.mul.Scalar):
        return value(args[0]) * value(args[1])
    if target in (aten.add.Tensor, aten.add.Scalar):
        return value(args[0]) + kwargs.get("alpha", 1) * value(args[1])
    if target in (aten.sub.Tensor, aten.sub.Scalar):
        return value(args[0]) - kwargs.get("alpha", 1) * value(args[1])
    if target is aten.neg.default:
        return -value(args[0])
    if target in (prims.convert_element_type.default, aten._to_copy.default, aten.clone.default, aten.alias.default):
        row = value(args[0])
        dtype = fake_value(node).dtype
        if dtype.is_complex != row.is_complex() or not (dtype.is_floating_point or dtype.is_complex):
            raise _NoMatch
        return row
    if target is aten.copy.default:
        base, src = value(args[0]), value(args[1])
        return src.expand(base.shape).clone()
    if target in _VIEWS:
        return value(args[0]).reshape(out_tail())
    if target is aten.expand.default:
        return value(args[0]).expand(out_tail())
    if target in (aten.unsqueeze.default, aten.squeeze.dim):
        return value(args[0]).reshape(out_tail())
    if target is aten.permute.default:
        dims = [d % in_rank for d in args[1]]
        if dims[:lead_rank] != list(range(lead_rank)):
            raise _NoMatch
        return value(args[0]).permute([d - lead_rank for d in dims[lead_rank:]])
    if target is aten.slice.Tensor:
        dim, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1 :])[:4]
        end = None if end is not None and end >= 2**62 else end
        return value(args[0])[(slice(None),) * tail_dim(dim) + (slice(start, end, step),)]
    if target is aten.select.int:
        return value(args[0]).select(tail_dim(args[1]), args[2])
    if target is aten.unbind.int:
        return value(args[0]).unbind(tail_dim(args[1] if len(args) > 1 else 0))
    if target is aten.split.Tensor:
        return value(args[0]).split(args[1], tail_dim(args[2] if len(args) > 2 else 0))
    if target is aten.split_with_sizes.default:
        return value(args[0]).split(list(args[1]), tail_dim(args[2] if len(args) > 2 else 0))
    if target is aten.cat.default:
        tensors = [value(a) for a in args[0]]
        rank = fake_value(args[0][0]).dim()
        return torch.cat(tensors, tail_dim(args[1] if len(args) > 1 else 0, rank))
    if target is aten.stack.default:
        rank = fake_value(node).dim()
        return torch.stack([value(a) for a in args[0]], tail_dim(args[1] if len(args) > 1 else 0, rank))
    if target is aten.slice_scatter.default:
        base, src = value(args[0]).clone(), value(args[1])
        dim, start, end, step = (list(args[2:]) + [0, None, None, 1][len(args) - 2 :])[:4]
        end = None if end is not None and end >= 2**62 else end
        base[(slice(None),) * tail_dim(dim) + (slice(start, end, step),)] = src
        return base
    if target is aten.select_scatter.default:
        base = value(args[0]).clone()
        base.select(tail_dim(args[2]), args[3]).copy_(value(args[1]))
        return base
    if target is aten.sum.dim_IntList:  # Kandinsky's (M * x_).sum(-1): a rotation matrix applied per pair
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if not dims or kwargs.get("dtype") is not None:
            raise _NoMatch
        return value(args[0]).sum([tail_dim(d) for d in dims], keepdim=keepdim)
    if target is aten.view_as_complex.default:
        return torch.view_as_complex(value(args[0]).contiguous())
    if target is aten.view_as_real.default:
        return torch.view_as_real(value(args[0]))
    raise _NoMatch


# --- pairing and the rewrite -----------------------------------------------------


def _same_table(a: Any, b: Any) -> bool:
    """The same table: the same node, or the same op on the same inputs (each q/k rotation often
    slices or unsqueezes the shared table itself)."""
    if isinstance(a, tuple) or isinstance(b, tuple):
        return isinstance(a, tuple) and isinstance(b, tuple) and a[1] == b[1] and _same_value(a[0], b[0], 4)
    return _same_value(a, b, 4)


def _same_value(a: Any, b: Any, depth: int) -> bool:
    if a is b:
        return True
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        return (
            depth > 0
            and a.op == b.op == "call_function"
            and a.target == b.target
            and is_pure(a)
            and _same_value(a.kwargs, b.kwargs, depth - 1)
            and len(a.args) == len(b.args)
            and all(_same_value(x, y, depth - 1) for x, y in zip(a.args, b.args))
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y, depth) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[key], b[key], depth) for key in a)
    return (
        not isinstance(a, fx.Node) and not isinstance(b, fx.Node)
        and type(a) is type(b) and constant_key(a) == constant_key(b)
    )


def _compatible(q: _Site, k: _Site) -> int | None:
    """The head axis (of both) with which q and k make one call, or None."""
    qv, kv = fake_value(q.x), fake_value(k.x)
    if not (
        q.norm_over == k.norm_over
        and q.rope_style == k.rope_style
        and q.rope_dim == k.rope_dim
        and _same_table(q.cos, k.cos)
        and _same_table(q.sin, k.sin)
        and qv.dim() == kv.dim()
        and _same(qv.shape[-1], kv.shape[-1])
        and fake_value(q.exit).dtype == fake_value(k.exit).dtype
        and fake_value(q.norm.source).dtype == fake_value(k.norm.source).dtype
        and q.cat_dim == k.cat_dim
        and q.token_slice == k.token_slice
        and [_segment_len(n, q.cat_dim) for n in q.norms] == [_segment_len(n, k.cat_dim) for n in k.norms]
    ):
        return None
    for axis in q.head_axes:
        order = _op_order(qv.dim(), axis)
        if axis in k.head_axes and _same_shape(qv.permute(order).shape[:-2], kv.permute(order).shape[:-2]):
            return axis
    return None


def _segment_len(norm: _Norm, dim: int | None) -> int | None:
    """A joint-attention segment's length along the cat (None: not a segment)."""
    return None if dim is None else _concrete(fake_value(norm.out).shape[dim])


def _rewrite(graph: fx.Graph, q: _Site, k: _Site, head_axis: int, position: dict[fx.Node, int],
             log: RewriteLog) -> str | None:
    """Replace the q and k sites by one fused call; the reason if they are left as they are."""
    out_dtype = fake_value(q.exit).dtype
    inputs = [n for site in (q, k) for norm in site.norms for n in (norm.source, norm.weight)]
    inputs += [spec[0] if isinstance(spec, tuple) else spec for spec in (q.cos, q.sin)]
    inputs = [n for n in inputs if n is not None]
    first_user = min((u for site in (q, k) for u in _result(site).users), key=position.__getitem__)
    if not _hoist_before(inputs, first_user, position, set(q.region + k.region)):
        return "an input of k is computed from q's rotated output (or the reverse)"
    anchor = max(inputs, key=position.__getitem__)
    x_val = fake_value(q.x)
    inserted: list[fx.Node] = []
    with graph.inserting_before(anchor.next):
        try:
            fused, outs = _insert_fused(graph, q, k, _op_order(x_val.dim(), head_axis), out_dtype, inserted)
        except ValueError as error:  # the op's own argument check: a precondition the match did not prove
            _erase(graph, inserted)
            return str(error)
    for site, out in zip((q, k), outs):
        want, got = fake_value(_result(site)), fake_value(out)
        # strides of size-1 dims address nothing
        if not all(_same(size, 1) or _same(a, b) for size, a, b in zip(want.shape, want.stride(), got.stride())):
            _erase(graph, inserted)
            return f"the stock result has strides {tuple(want.stride())}; the fused op would give {tuple(got.stride())}"
    for site, out in zip((q, k), outs):
        _result(site).replace_all_uses_with(out)
    for site in (q, k):
        assembly = [site.assembly, *site.unrotated] if site.assembly is not None else []
        erase_dead(graph, assembly + site.region + site.path + [n for norm in site.norms for n in norm.nodes])
    joint = f", per segment of a cat of {len(q.norms)}" if q.segments else ""
    if q.token_slice is not None:
        joint = f", tokens {q.token_slice[1]}:{q.token_slice[2]} of dim {q.token_slice[0]} only"
    log.add(
        q.exit,
        replaced=f"RMSNorm ({q.norm_over}) + {q.rope_style} RoPE (rope_dim {q.rope_dim}) on q and k{joint}",
        by="diffopt.qk_norm_rope",
    )
    return None


def _insert_fused(graph, q: _Site, k: _Site, order: list[int], out_dtype: torch.dtype, inserted: list[fx.Node]):
    """Insert the fused call and its outputs in the stock exits' shapes; every new node goes to ``inserted``.
    ``order``: the permutation of the heads tensors' dims into the op's [tokens, heads, channels]."""

    def call(target, args, origin, kwargs=None):
        inserted.append(insert_call(graph, target, args, origin, kwargs))
        return inserted[-1]

    rank = len(order)
    # One call per joint-attention segment (q's i-th with k's i-th, the tables' rows of that segment), the
    # outputs concatenated as the stock code concatenated the normed segments; else one call.
    per_segment = [[], []]
    start = 0
    for q_norm, k_norm in zip(q.norms, k.norms):
        rows = None
        if q.cat_dim is not None:
            length = fake_value(q_norm.out).shape[q.cat_dim]
            rows = (q.cat_dim, start, start + length)
            start = start + length
        q_in = _as_bsHD(q_norm, q, order, call)
        k_in = _as_bsHD(k_norm, k, order, call)
        cos = _table_as_bs1L(q.cos, order, rows, q.exit, call)
        sin = _table_as_bs1L(q.sin, order, rows, q.exit, call)
        fused = call(
            torch.ops.diffopt.qk_norm_rope.default,
            (q_in, k_in, _weight_1d(q_norm, q.exit, call), _weight_1d(k_norm, k.exit, call), cos, sin, None),
            q.exit,
            {
                "norm_over": q.norm_over,
                "rope_style": q.rope_style,
                "rope_dim": q.rope_dim,
                "q_eps": q_norm.eps,
                "k_eps": k_norm.eps,
                "out_dtype": out_dtype,
            },
        )
        for index, site in enumerate((q, k)):
            out = call(operator.getitem, (fused, index), site.exit)
            if rank == 3:
                out = call(aten.squeeze.dim, (out, 0), site.exit)
            if order != list(range(rank)):  # back to the stock layout ([B, H, S, D])
                out = call(aten.permute.default, (out, [order.index(d) for d in range(rank)]), site.exit)
            per_segment[index].append(out)
    if q.token_slice is not None:
        return fused, [_assemble_token_slice(site, outs[0], call) for outs, site in zip(per_segment, (q, k))]
    if q.cat_dim is None:
        return fused, [outs[0] for outs in per_segment]
    return fused, [call(aten.cat.default, (outs, q.cat_dim), site.exit) for outs, site in zip(per_segment, (q, k))]


def _result(site: _Site) -> fx.Node:
    """The node the rewrite replaces: the rotation's exit, or the assembly that puts a token slice back."""
    return site.exit if site.assembly is None else site.assembly


def _assemble_token_slice(site: _Site, rotated: fx.Node, call) -> fx.Node:
    """The stock result of a token-slice rotation: the fused rows of the rotated tokens, and a plain norm of
    each run of unrotated tokens (the stock norm's ops on those rows of its input: no rotated row is normed
    twice), concatenated in token order. The cat is built in the dims' order by the stock result's strides
    and permuted back, so it has the stock result's strides (checked by the caller). Identity tables (cos 1,
    sin 0) would not do for the unrotated rows: ``x * 1 + rot(x) * 0`` turns -0.0 into 0.0 and inf into nan."""
    dim, start, end = site.token_slice
    norm = site.norm
    length = _concrete(fake_value(norm.out).shape[dim])
    pieces = [_norm_rows(norm, (dim, 0, start), site.exit, call)] if start > 0 else []
    pieces.append(rotated)
    if end < length:
        pieces.append(_norm_rows(norm, (dim, end, length), site.exit, call))
    want = fake_value(site.assembly)
    rank = want.dim()
    order = sorted(range(rank), key=lambda d: -want.stride(d))
    if order != list(range(rank)):
        pieces = [call(aten.permute.default, (piece, order), site.exit) for piece in pieces]
    out = call(aten.cat.default, (pieces, order.index(dim)), site.exit)
    if order != list(range(rank)):
        out = call(aten.permute.default, (out, [order.index(d) for d in range(rank)]), site.exit)
    return out


def _norm_rows(norm: _Norm, rows: tuple[int, int, int], origin: fx.Node, call) -> fx.Node:
    """The stock norm's ops on ``rows`` (dim, start, end) of its input: the norm is per row, so this is
    exactly those rows of the stock norm's output."""
    mapped = {norm.source: call(aten.slice.Tensor, (norm.source, *rows), origin)}
    for node in norm.nodes:
        if node.target is aten.clone.default and node is norm.out:
            mapped[node] = mapped[node.args[0]]  # a layout copy: the cat lays its rows out
            continue
        args = fx.node.map_arg(node.args, lambda n: mapped.get(n, n))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: mapped.get(n, n))
        mapped[node] = call(node.target, args, origin, kwargs)
    return mapped[norm.out]


def _erase(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    for node in reversed(nodes):
        graph.erase_node(node)


def _holds(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Whether every value of ``narrow`` is exactly a value of ``wide`` (float dtypes)."""
    a, b = torch.finfo(wide), torch.finfo(narrow)
    return a.bits >= b.bits and a.eps <= b.eps and a.max >= b.max and a.smallest_normal <= b.smallest_normal


def _rounding_kept(nodes: list[fx.Node], out_dtype: torch.dtype) -> str | None:
    """Why the fused op (fp32 math from the inputs' values, one rounding to ``out_dtype``) would not compute
    what the stock ``nodes`` (a norm and its rotation) compute; None if it does.

    The stock code rounds every intermediate to its dtype. A rounding to a dtype that holds every value of
    the output dtype is finer than the one at the exit, so skipping it keeps the result within the output's
    rounding (and closer to the exact value). A rounding to a narrower dtype (``.to(bfloat16).float()`` in
    fp32 code) is part of what the program computes, and float64 math is more than the op's fp32 gives.
    """
    values = [fake_value(node) for node in nodes]
    dtypes = [v.dtype for vs in values for v in (vs if isinstance(vs, (list, tuple)) else [vs])
              if isinstance(v, torch.Tensor)]
    for dtype in dtypes:
        real = dtype.to_real() if dtype.is_complex else dtype
        if not real.is_floating_point:
            return f"the stock code computes in {dtype}"
    # float64 first: a float64 rotation of float32 values also "rounds to float32 before its float64 result"
    wide = next((dtype for dtype in dtypes if torch.finfo(dtype.to_real() if dtype.is_complex else dtype).bits > 32),
                None)
    if wide is not None:
        return (f"the stock code computes in {wide}; the fused op computes in float32 (float64 tables or q/k: "
                "issue 12 class E)")
    for dtype in dtypes:
        if not _holds(dtype.to_real() if dtype.is_complex else dtype, out_dtype):
            return f"the stock code rounds to {dtype} before its {out_dtype} result"
    return None


def _hoist_before(inputs: list[fx.Node], first_user: fx.Node, position: dict[fx.Node, int], region: set) -> bool:
    """Move the inputs computed after ``first_user`` (and what they need) to just before it.

    The fused call must follow all its inputs and precede every user of both outputs; graph
    schedulers (Inductor's locality reordering) may have put k's projection after q's consumers.
    Fails if a moved node would depend on the rotations being replaced.
    """
    limit = position[first_user]
    late, stack = set(), [n for n in inputs if position[n] >= limit]
    while stack:
        node = stack.pop()
        if node in late:
            continue
        if node is first_user or node in region or any(arg in region for arg in node.all_input_nodes):
            return False
        late.add(node)
        stack.extend(arg for arg in node.all_input_nodes if position[arg] >= limit)
    for node in sorted(late, key=position.__getitem__):
        first_user.prepend(node)
    for index, node in enumerate(first_user.graph.nodes):
        position[node] = index
    return True


def _op_order(rank: int, head_axis: int) -> list[int]:
    """The permutation of a heads tensor's dims into the op's order: tokens (in their order), heads, channels."""
    return [d for d in range(rank - 1) if d != head_axis] + [head_axis, rank - 1]


def _as_bsHD(norm: _Norm, site: _Site, order: list[int], call) -> fx.Node:
    """The norm's input as [B, S, H, D], read in its own dtype (the op computes in fp32 from it)."""
    source = norm.source
    for view in site.path:
        # [..., H*D] -> [..., H, D], and transposes, with the shapes the graph itself uses
        source = call(view.target, (source, *view.args[1:]), site.exit)
    if order != list(range(len(order))):
        source = call(aten.permute.default, (source, order), site.exit)
    if len(order) == 3:  # unbatched tokens [N, H, D] -> [1, N, H, D]
        source = call(aten.unsqueeze.default, (source, 0), site.exit)
    return source


def _weight_1d(norm: _Norm, origin: fx.Node, call) -> fx.Node | None:
    """The norm weight as the op takes it: [size] (stock code may hold it as [1, size] or [1, 1, 1, size])."""
    if norm.weight is None or fake_value(norm.weight).dim() == 1:
        return norm.weight
    return call(aten.reshape.default, (norm.weight, [norm.size]), origin)


def _table_as_bs1L(spec: Any, order: list[int], rows: tuple | None, origin: fx.Node, call) -> fx.Node:
    """The table as the op takes it; ``rows``: (dim, start, end) of the heads tensor, a joint-attention segment."""
    node, part = spec if isinstance(spec, tuple) else (spec, None)
    if isinstance(part, tuple):  # M[..., i, j] of a rotation-matrix table M [..., L, 2, 2]
        node = call(aten.select.int, (node, -2, part[0]), origin)
        node = call(aten.select.int, (node, -1, part[1]), origin)
    elif part is not None:
        node = call(aten.view_as_real.default, (node,), origin)
        node = call(aten.select.int, (node, -1, part), origin)
    # Right-aligned with the heads tensor's lead dims + [L], in the op's order; the kernel wants [B, S, 1, L].
    for _ in range(len(order) - fake_value(node).dim()):
        node = call(aten.unsqueeze.default, (node, 0), origin)
    if rows is not None and not _same(fake_value(node).shape[rows[0]], 1):
        node = call(aten.slice.Tensor, (node, *rows), origin)
    if order != list(range(len(order))):
        node = call(aten.permute.default, (node, order), origin)
    for _ in range(4 - len(order)):
        node = call(aten.unsqueeze.default, (node, 0), origin)
    return node
