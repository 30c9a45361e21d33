"""A merged upcast with several consumers -> computed again in each consumer.

Stock form (as ``dedupe`` leaves it): an elementwise op whose result is larger than each tensor it is
computed from, typically an upcast, that ``dedupe`` merged from duplicates, so that one node now feeds
consumers the stock code gave one copy each. diffusers' Wan block upcasts the same bf16 hidden states
for the FFN's norm and again for the residual after the FFN::

    h = x + attn_output                                            # bf16
    n = norm3(h.float()) ...                                       # upcast 1
    out = (h.float() + ffn(n).float() * gate).type_as(h)           # upcast 2, merged with 1 by dedupe

Inductor fuses an elementwise op into each of its consumers; a node with several consumers is one it
may store instead. Stock, Inductor kept ``h`` (bf16) across the FFN and upcast it in each kernel;
merged, it kept the float32 upcast: 2 bytes more per element (201 MB more at Wan 1.3B 480p batch 2,
+11% of the peak).

Optimized form: each duplicate's consumers read their own copy again, as in the stock code, and
Inductor fuses each copy into its consumers. ``dedupe`` merges first so that the rewrites between
the two see one value; this pass runs after them. A copy goes right after the original, so it reads
its inputs where the original does, before any write the graph makes into them.

Preconditions: ``dedupe`` merged the node and recorded which consumers each duplicate had (the pass
copies only that: an upcast the stock code shares stays shared, as Inductor has it, and a consumer
a later pass created stays with the original); it is elementwise (a pointwise op or a dtype
``_to_copy``); and its result has more bytes than each of its sources, the nearest tensors above it
that are not views or elementwise ops (what Inductor reads to compute it inside a consumer; sizes
are not sources, so symbolic shapes qualify).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from diffopt.graph_pass import GraphPass, RewriteLog, Stage

from .dedupe import MERGED
from .fx_utils import fake_value, is_view, op_name

aten = torch.ops.aten


class RecomputeUpcasts(GraphPass):
    name = "recompute_upcasts"
    stage = Stage.POST_GRAD
    # last: the passes in between match on the merged graph
    after = ("dedupe", "fold_invariant", "qk_norm_rope", "inline_triton", "attention")

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        sources: dict[fx.Node, frozenset[fx.Node]] = {}
        widening, merged = [], {}
        for node in graph.nodes:
            if MERGED in node.meta:
                merged[node] = node.meta.pop(MERGED)
            if _elementwise(node) or is_view(node):
                sources[node] = _sources(node, sources)
                if node in merged and _elementwise(node) and _larger_than_each(node, sources[node]):
                    widening.append(node)
        # downstream first: a copy of a later op is a consumer the earlier op did not have when merged
        made: set[fx.Node] = set()
        for node in reversed(widening):
            recorded = [[user for user in node.users if user.name in names] for names in merged[node]]
            # each consumer once, in the first group it is in (a consumer may have read both duplicates);
            # one the records do not name stays with the original, unless it is a copy made here
            seen: set[fx.Node] = set()
            groups = []
            for group in recorded + [[user] for user in node.users if user in made]:
                group = [user for user in group if user not in seen]
                seen.update(group)
                groups.append(group)
            groups[0] += [user for user in node.users if user not in seen]
            groups = [group for group in groups if group]  # empty: consumers merged or rewritten away
            for group in groups[1:]:
                # right after the original: it reads its inputs where the original does, before any
                # write the graph makes into them (an updated buffer or input)
                with graph.inserting_after(node):
                    copy = graph.node_copy(node)
                made.add(copy)
                for user in group:
                    user.replace_input_with(node, copy)
            if len(groups) > 1:
                log.add(node, replaced=f"one {op_name(node.target)} for {len(groups)} computations of it",
                        by="one in each (its result is larger than what it is computed from)")


def _elementwise(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        torch.Tag.pointwise in getattr(node.target, "tags", ()) or node.target is aten._to_copy.default
    )


def _sources(node: fx.Node, memo: dict[fx.Node, frozenset[fx.Node]]) -> frozenset[fx.Node]:
    """The nearest tensors above ``node`` that are not views or elementwise ops (``memo`` holds them for
    every such op before ``node``: the graph is visited in order)."""
    found: set[fx.Node] = set()
    for arg in node.all_input_nodes:
        if arg in memo:
            found |= memo[arg]
        elif isinstance(fake_value(arg), torch.Tensor):  # not a size (a reshape's symbolic size)
            found.add(arg)
    return frozenset(found)


def _larger_than_each(node: fx.Node, sources: frozenset[fx.Node]) -> bool:
    result = _nbytes(node)
    return result is not None and all(
        (size := _nbytes(source)) is not None and statically_known_true(result > size) for source in sources
    )


def _nbytes(node: fx.Node):
    value = fake_value(node)
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else None

