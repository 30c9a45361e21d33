"""split + contiguous -> view slicing.

Stock form (a packed projection split into q/k/v, each made contiguous to view it
as heads)::

    qkv = to_qkv(x)                                   # [B, S, (H + 2*Hkv) * D]
    q, k, v = qkv.split([H*D, Hkv*D, Hkv*D], dim=-1)
    q = q.contiguous().view(B, S, H, D)               # a copy of q, and of k and v

which post-grad reads ``split_with_sizes -> getitem -> clone(contiguous_format)
-> view``. Optimized form: no copy; ``q`` is the strided view
``qkv.view(B, S, H + 2*Hkv, D)[:, :, :H]`` (likewise k and v), which is what the
graph computes once the ``clone`` is dropped. More generally, any
``.contiguous()`` copy is dropped when everything downstream accepts the strided
tensor.

Preconditions (all proven on the graph's fake tensors, else no rewrite):

- Layout: every consumer of the copy, followed through views and through ops
  whose output layout changes with it, computes from the strided tensor exactly
  what it computed from the copy: each recomputed consumer either produces the
  same sizes and strides as before, or is a functional ATen op whose own
  consumers satisfy this. A ``view`` that the strided layout does not allow
  (merging dims the split made non-adjacent, say) fails this, and so does a
  ``reshape`` that would copy the strided tensor (the copy would only move).
  Views are decided with ATen's own viewability rule on the exact sizes and
  strides (fake tensors accept some views eager rejects), so they need static sizes.
- Consumers: no graph output, mutating op, op with a fixed-stride contract, op that
  reads memory order (``as_strided``), or
  non-ATen call is reached through a changed layout (those need the memory as
  it was).
- Alignment: the strided tensor starts 16-byte aligned within its storage, so
  kernels keep their aligned fast paths. For a packed qkv this means q, k and v
  start on whole heads.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int, statically_known_true

from diffopt import compat
from diffopt.graph_pass import GraphPass, RewriteLog, Stage, fake_value

aten = torch.ops.aten

# How many layout-changing consumers deep the proof looks (view -> pow -> ...).
_MAX_DEPTH = 4


class SplitContiguous(GraphPass):
    name = "split_contiguous"
    stage = Stage.POST_GRAD

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        for copy in list(graph.nodes):
            if not _is_contiguous_copy(copy):
                continue
            source = copy.args[0]
            source_val = fake_value(source)
            if not isinstance(source_val, torch.Tensor) or not _aligned(source_val):
                continue
            mode = compat.detect_fake_mode([source_val])
            updates: dict[fx.Node, object] = {}
            with mode:
                accepted = _consumers_accept(copy, source_val, updates, _MAX_DEPTH)
            if not accepted:
                continue
            copy.replace_all_uses_with(source)
            graph.erase_node(copy)
            for node, value in updates.items():
                node.meta["val"] = value
            what = "split piece" if _is_split_piece(source) else "tensor"
            log.add(copy, replaced=f"contiguous() copy of {what} {list(source_val.shape)}", by="strided view")


def _is_contiguous_copy(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target is aten.clone.default
        and node.kwargs.get("memory_format") == torch.contiguous_format
    )


def _is_split_piece(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target is operator.getitem
        and isinstance(node.args[0], fx.Node)
        and node.args[0].target in (aten.split_with_sizes.default, aten.split.Tensor)
    )


def _aligned(value: torch.Tensor) -> bool:
    return statically_known_true(value.storage_offset() * value.element_size() % 16 == 0)


def _same_layout(a: object, b: object) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_layout(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.dim() == b.dim()
            and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))
            and all(statically_known_true(x == y) for x, y in zip(a.stride(), b.stride()))
        )
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor)


_VIEW_OR_RESHAPE = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _viewable(value: torch.Tensor, result: torch.Tensor) -> bool:
    """Whether ``value`` (strided) can be viewed with ``result``'s sizes without a copy.

    Decided with ATen's own rule (``computeStride``), written out here: fake tensors and
    the Python reference of ``view`` accept some views that eager rejects (a size-1 dim
    between strides that do not chain). Symbolic sizes are not decided: no.
    """
    sizes = [_static(x) for x in value.shape]
    strides = [_static(x) for x in value.stride()]
    target = [_static(x) for x in result.shape]
    if None in sizes or None in strides or None in target:
        return False
    if 0 in sizes:
        return True
    view_d = len(target) - 1
    chunk_base_stride = strides[-1] if strides else 1
    tensor_numel = view_numel = 1
    for tensor_d in range(len(sizes) - 1, -1, -1):
        tensor_numel *= sizes[tensor_d]
        # A chunk ends where the next-outer dim is not contiguous with this one.
        if tensor_d == 0 or (sizes[tensor_d - 1] != 1 and strides[tensor_d - 1] != tensor_numel * chunk_base_stride):
            while view_d >= 0 and (view_numel < tensor_numel or target[view_d] == 1):
                view_numel *= target[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return False
            if tensor_d > 0:
                chunk_base_stride = strides[tensor_d - 1]
                tensor_numel = view_numel = 1
    return view_d == -1


def _static(size: object) -> int | None:
    return int(size) if is_concrete_int(size) else None


# Ops that read their input's storage at the offsets and strides they are given, not through its own
# strides: the same sizes in another layout are other values to them.
_READS_MEMORY_ORDER = (
    torch.ops.aten.as_strided.default,
    torch.ops.aten.as_strided_copy.default,
    torch.ops.aten.as_strided_scatter.default,
)


def _functional_aten(target: object) -> bool:
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in ("aten", "prims"):
        return False
    if target._schema.is_mutable:
        return False
    fixed = {getattr(torch.Tag, tag) for tag in ("needs_fixed_stride_order", "needs_exact_strides") if hasattr(torch.Tag, tag)}
    return not fixed.intersection(target.tags)


def _consumers_accept(node: fx.Node, new_value: object, updates: dict, depth: int) -> bool:
    """Whether the graph computes the same results if ``node`` produced ``new_value`` instead.

    ``new_value`` has ``node``'s sizes and dtype but maybe other strides. Each
    consumer is recomputed on fake tensors; where its layout changes too, its
    own consumers are checked in turn. ``updates`` collects the new fake
    values of the consumers whose layout changes.
    """
    for user in node.users:
        if user.op == "output" or user.target in _READS_MEMORY_ORDER:
            return False
        if user.target is not operator.getitem and not _functional_aten(user.target):
            return False
        args, kwargs = fx.node.map_aggregate(
            (user.args, user.kwargs), lambda a: new_value if a is node else fake_value(a)
        )
        try:
            user_value = user.target(*args, **kwargs)
        except Exception:  # the op rejects the layout (an impossible view, say)
            return False
        if user.target in _VIEW_OR_RESHAPE and not _viewable(new_value, fake_value(user)):
            return False  # a view eager rejects, or a reshape that would copy (the copy only moves)
        if _same_layout(user_value, fake_value(user)):
            continue
        updates[user] = user_value
        if depth == 0 or not _consumers_accept(user, user_value, updates, depth - 1):
            return False
    return True
