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
- Aliasing: no view of the copy, at any layout, reaches a graph output, a
  mutating op, ``as_strided`` or a non-ATen call. Without the copy its views
  are the source's memory: returned, one would alias an input or another
  output (and show an input's later in-place update, ``x.t().contiguous().t()``
  then ``x.add_(1)``); written, it would write the source.
- Alignment: the strided tensor starts 16-byte aligned within its storage, so
  kernels keep their aligned fast paths. For a packed qkv this means q, k and v
  start on whole heads.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from diffopt.graph_pass import GraphPass, RewriteLog, Stage

from .fx_utils import consumers_accept, fake_value, is_contiguous_copy, views_of

aten = torch.ops.aten

# How many layout-changing consumers deep the proof looks (view -> pow -> ...).
_MAX_DEPTH = 4


class SplitContiguous(GraphPass):
    name = "split_contiguous"
    stage = Stage.POST_GRAD

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        for copy in list(graph.nodes):
            if not is_contiguous_copy(copy):
                continue
            source = copy.args[0]
            source_val = fake_value(source)
            if not isinstance(source_val, torch.Tensor) or not _aligned(source_val):
                continue
            if views_of(copy) is None:  # a view of the copy escapes or is written: it needs memory of its own
                continue
            updates: dict[fx.Node, object] = {}
            if not consumers_accept(copy, source_val, updates, _MAX_DEPTH):
                continue
            copy.replace_all_uses_with(source)
            graph.erase_node(copy)
            for node, value in updates.items():
                node.meta["val"] = value
            what = "split piece" if _is_split_piece(source) else "tensor"
            log.add(copy, replaced=f"contiguous() copy of {what} {list(source_val.shape)}", by="strided view")


def _is_split_piece(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target is operator.getitem
        and isinstance(node.args[0], fx.Node)
        and node.args[0].target in (aten.split_with_sizes.default, aten.split.Tensor)
    )


def _aligned(value: torch.Tensor) -> bool:
    return statically_known_true(value.storage_offset() * value.element_size() % 16 == 0)
