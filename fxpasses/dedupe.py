"""Duplicate pure computations -> computed once.

Stock form: the same deterministic ATen op applied to the same inputs twice, e.g.
diffusers' Cosmos3 rotating one normed K twice (``k_und`` and its alias
``k_und_for_gen``) with the same tables::

    k_a = k * cos + rotate_half(k) * sin
    k_b = k * cos + rotate_half(k) * sin      # same values, computed again

Optimized form: the second computation is dropped and its users read the first.
Besides the saved work, later rewrites then see one value with one definition.
An elementwise op merged this way whose result is larger than its inputs (an upcast)
is computed in each consumer again after those rewrites (``recompute_upcasts``).

Preconditions: the op is an ATen/prims op that neither mutates, draws random
numbers, nor has a data-dependent output (``.item()``, ``nonzero``; a gather by
integer indices, ``table[positions]``, has none), and both nodes have the same
target, the same arguments (the same nodes or constants of the same type and bits:
``0.0`` and ``-0.0`` differ) and the same keyword arguments, and the op is not an
allocation (``empty``, ``empty_like``, ``empty_strided``: undefined contents, and one
shared buffer would live from the first use to the last), and not both the original
and the duplicate are outputs (or views of outputs): merged, they would be one tensor.
"""
from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx

from diffopt.graph_pass import GraphPass, RewriteLog, Stage

from .fx_utils import constant_key, is_pure, is_view, op_name


# node.meta key of a node that took over duplicates' consumers: the names of its own consumers, then of
# each duplicate's, as lists (``recompute_upcasts`` gives each duplicate's its own copy again). Names, not
# nodes: the pipeline's restore after a failed pass copies the graph, and the names stay.
MERGED = "diffopt_dedupe_merged"


class Dedupe(GraphPass):
    name = "dedupe"
    stage = Stage.POST_GRAD

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        first: dict[Any, fx.Node] = {}
        for node in list(graph.nodes):
            # never an allocation (is_pure): two are not one value, and one shared buffer would be kept
            # alive from its first use to its last (diffusers Wan's per-block empty_like for RoPE became
            # one 100 MB buffer across all 30 blocks)
            if not is_pure(node):
                continue
            key = _key(node)
            if key is None:
                continue
            original = first.setdefault(key, node)
            if original is node:
                continue
            if _reaches_output(original) and _reaches_output(node):
                # merged, the two outputs would be one tensor: writing into one would change the other
                log.decline(node, f"second {op_name(node.target)} of the same inputs kept: both are outputs")
                continue
            original.meta.setdefault(MERGED, [[user.name for user in original.users]]).append(
                [user.name for user in node.users]
            )
            node.replace_all_uses_with(original)
            graph.erase_node(node)
            if node.target is not operator.getitem:
                log.add(node, replaced=f"second {op_name(node.target)} of the same inputs", by="the first one's result")


def _reaches_output(node: fx.Node) -> bool:
    """Whether the graph returns ``node`` or a view of it."""
    work, seen = [node], set()
    while work:
        current = work.pop()
        for user in current.users:
            if user.op == "output":
                return True
            if user not in seen and (is_view(user) or user.target is operator.getitem):
                seen.add(user)
                work.append(user)
    return False


def _key(node: fx.Node) -> Any:
    try:
        key = (node.target, _freeze(node.args), _freeze(node.kwargs))
        hash(key)
    except TypeError:
        return None
    return key


def _freeze(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return ("node", id(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    return constant_key(value)

