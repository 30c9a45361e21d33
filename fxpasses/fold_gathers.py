"""Gather of a gather along one dim -> one gather with the composed index.

Stock form (e.g. VSA's ``untile``, ``x[:, non_pad_index][:, reverse_tile_partition_indices]``;
the rule is general and fires wherever the form occurs)::

    y = x[:, a]           # gather along dim d with a 1-D integer index a
    z = y[:, b]           # gather along the same dim d with an integer index b

which post-grad reads ``aten.index.Tensor(x, [None]*d + [a])`` (``x[..., a]`` and
``index_select`` both lower to it), ``aten.index_select(x, d, a)``, or
``aten.gather(x, d, a.view(1, .., n, .., 1).expand(...))`` (a gather whose index varies
along ``d`` only, which is the same thing), then the same for ``b``. Two full passes over
the data, and the intermediate ``y`` written and read back.

Optimized form: ``z = x[:, c]`` with ``c = a[b]``: one pass over the data. ``c`` is a
gather of a small integer tensor (``len(b)`` elements), written into the graph, and then:

- computed once, while compiling, and embedded in the graph as a constant, when ``a`` and
  ``b`` are step-invariant (e.g. ``arange``/slicing/``cat``/``argsort`` index tables that
  model code rebuilds on every call): the pass ends with the step-invariant folder
  (``step_invariant.fold``), which decides that as it does for ``fold_invariant``;
- otherwise computed inside the graph on every call (``a[b]``, microseconds), so the
  rewrite stays correct when an index changes between calls. Graph inputs are never
  treated as constant: that includes module buffers, which Dynamo lifts to inputs and
  which may be reassigned or updated in place between calls without a recompile.

Chains fold repeatedly: ``x[a][b][e]`` becomes ``x[a[b][e]]``.

Preconditions (checked on the graph's fake values, else no rewrite):

- Same dim: both gathers index the same dimension ``d`` of a tensor with the same number
  of dims, each with a single index tensor (no other advanced indices).
- ``a`` is 1-D; ``a`` and ``b`` are int64 or int32 (a bool/uint8 mask is not an index).
- Negative indices keep their meaning: ``index.Tensor`` wraps a negative index, and the
  composition uses the same op as the gather it replaces (``c = a[b]`` wraps ``b`` modulo
  ``len(a)`` exactly as ``y[:, b]`` did; ``x[:, c]`` wraps ``c`` modulo ``x.size(d)``
  exactly as ``x[:, a]`` did). ``index_select``/``gather``, which reject negative indices,
  are composed with ``gather``, which rejects them too. Only one behaviour changes: an
  out-of-range entry of ``a`` that ``b`` never selects no longer raises.
- ``y`` has no other user (otherwise ``y`` is computed anyway and nothing is saved).
- Nothing mutates memory between ``y`` and ``z`` (the folded gather reads ``x`` where
  ``z`` was, not where ``y`` was).
- The folded gather has ``z``'s dtype, sizes and strides.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from diffopt.graph_pass import GraphPass, RewriteLog, Stage

from .fx_utils import erase_dead, fake_value, insert_call, op_name, same_layout

from .step_invariant import computed_once, fold

aten = torch.ops.aten

INDEX_DTYPES = (torch.int64, torch.int32)


@dataclasses.dataclass
class Gather:
    """One gather along ``dim`` of ``source``: ``index`` (a node) or ``index_base`` (reshaped to 1-D)."""

    node: fx.Node
    source: fx.Node
    dim: int
    index: fx.Node | None
    wraps: bool  # negative indices wrap (index.Tensor) rather than raise (index_select, gather)
    index_base: fx.Node | None = None  # gather: a [1,..,n,..,1] tensor whose reshape(-1) is the index

    def index_1d(self, graph: fx.Graph) -> fx.Node:
        """The 1-D (or, for ``index.Tensor``, any-D) index node, inserting the reshape a gather needs."""
        if self.index is None:
            self.index = insert_call(graph, aten.reshape.default, (self.index_base, [-1]), self.node)
        return self.index


def match_gather(node: fx.Node) -> Gather | None:
    """``node`` as a gather along one dim with one integer index tensor, or ``None``."""
    if node.op != "call_function":
        return None
    x_val = fake_value(node.args[0]) if node.args else None
    if not isinstance(x_val, torch.Tensor):
        return None
    if node.target is aten.index.Tensor:
        x, indices = node.args
        present = [i for i, index in enumerate(indices) if index is not None]
        if len(present) != 1:
            return None
        index = indices[present[0]]
        if not _int_index(index):
            return None
        return Gather(node, x, present[0], index, wraps=True)
    if node.target is aten.index_select.default:
        x, dim, index = node.args
        if not _int_index(index) or fake_value(index).dim() != 1:
            return None
        return Gather(node, x, dim % x_val.dim(), index, wraps=False)
    if node.target is aten.gather.default:
        x, dim, index = node.args[:3]
        if node.args[3:] and node.args[3] or node.kwargs.get("sparse_grad"):
            return None
        index_val = fake_value(index)
        if not _int_index(index) or index_val.dim() != x_val.dim() or index_val.dim() == 0:
            return None
        dim = dim % x_val.dim()
        # The result must cover x on every other dim (gather allows a smaller index there).
        for k in range(x_val.dim()):
            if k != dim and not statically_known_true(index_val.shape[k] == x_val.shape[k]):
                return None
        base = index.args[0] if index.op == "call_function" and index.target is aten.expand.default else index
        base_val = fake_value(base)
        if not isinstance(base_val, torch.Tensor) or base_val.dim() != x_val.dim():
            return None
        if not all(statically_known_true(base_val.shape[k] == 1) for k in range(base_val.dim()) if k != dim):
            return None
        return Gather(node, x, dim, None, wraps=False, index_base=base)
    return None


def _int_index(index: Any) -> bool:
    value = fake_value(index)
    return isinstance(index, fx.Node) and isinstance(value, torch.Tensor) and value.dtype in INDEX_DTYPES


class FoldGathers(GraphPass):
    name = "fold_gathers"
    stage = Stage.POST_GRAD
    after = ("padded_buffer",)  # folds the gather of a gather that padded_buffer's rewrite leaves

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        stock = set(graph.nodes)
        composed: dict[tuple, fx.Node] = {}  # (a, b, wraps) -> a[b]
        position = {node: i for i, node in enumerate(graph.nodes)}
        mutating = [position[n] for n in graph.nodes if _mutates(n)]
        rewrites = []
        for node in list(graph.nodes):
            outer = match_gather(node)
            if outer is None or not isinstance(outer.source, fx.Node):
                continue
            inner = match_gather(outer.source)
            if inner is None or not self._foldable(inner, outer, position, mutating):
                continue
            folded, index = self._fold(graph, inner, outer, composed)
            if not same_layout(folded, node):  # a consumer may depend on the old strides
                erase_dead(graph, [folded])
                continue
            node.replace_all_uses_with(folded)
            erase_dead(graph, [node])
            position[folded] = position.get(node, 0)
            rewrites.append(
                (node, f"({op_name(inner.node.target)} -> {op_name(node.target)})", outer.dim, op_name(folded.target), index)
            )
        constants = fold(graph, within=set(graph.nodes) - stock)  # the index math inserted above
        for node, ops, dim, op, index in rewrites:
            where = "computed once (step-invariant)" if computed_once(index, constants) else "composed in the graph each call"
            log.add(node, replaced=f"gather of a gather along dim {dim} {ops}", by=f"one {op} with the composed index, {where}")

    @staticmethod
    def _foldable(inner: Gather, outer: Gather, position: dict, mutating: list[int]) -> bool:
        if inner.dim != outer.dim or len(inner.node.users) != 1:
            return False
        x_val, y_val = fake_value(inner.source), fake_value(inner.node)
        if x_val.dim() != y_val.dim():  # the inner index must be 1-D
            return False
        if inner.index is not None and fake_value(inner.index).dim() != 1:
            return False
        if not outer.wraps and outer.index is not None and fake_value(outer.index).dim() != 1:
            return False
        if not inner.wraps:  # rebuilt as gather(x, d, c.view(..).expand(sizes)): c 1-D, sizes static
            if outer.index is not None and fake_value(outer.index).dim() != 1:
                return False
            if not all(isinstance(size, int) for size in fake_value(outer.node).shape):
                return False
        lo, hi = position.get(inner.node), position.get(outer.node)
        if lo is None or hi is None:
            return False
        return not any(lo < p < hi for p in mutating)

    @staticmethod
    def _fold(graph: fx.Graph, inner: Gather, outer: Gather, memo: dict) -> tuple[fx.Node, fx.Node]:
        """Insert the one gather (and the composed index ``a[b]`` it reads); returns both."""
        node = outer.node
        with graph.inserting_before(node):
            a = inner.index_1d(graph)
            b = outer.index_1d(graph)
            key = (a, b, outer.wraps)
            if key in memo and not getattr(memo[key], "_erased", False) and _before(memo[key], node):
                composed = memo[key]
            elif outer.wraps:
                composed = insert_call(graph, aten.index.Tensor, (a, [b]), node)
            else:  # index_select / gather semantics (negative b raises): gather on 1-D
                composed = insert_call(graph, aten.gather.default, (_as_int64(graph, a, node), 0, _as_int64(graph, b, node)), node)
            memo[key] = composed
            if inner.wraps:
                folded = insert_call(graph, aten.index.Tensor, (inner.source, [None] * inner.dim + [composed]), node)
            else:
                out_val = fake_value(node)
                shape = [1] * out_val.dim()
                shape[inner.dim] = -1
                base = insert_call(graph, aten.reshape.default, (_as_int64(graph, composed, node), shape), node)
                expanded = insert_call(graph, aten.expand.default, (base, list(out_val.shape)), node)
                folded = insert_call(graph, aten.gather.default, (inner.source, inner.dim, expanded), node)
        return folded, composed


def _before(first: fx.Node, second: fx.Node) -> bool:
    """Whether ``first`` comes before ``second`` in the graph (so ``second`` may use it)."""
    node = first
    while node.op != "root":
        if node is second:
            return True
        node = node.next
    return False


def _as_int64(graph: fx.Graph, index: fx.Node, origin: fx.Node) -> fx.Node:
    if fake_value(index).dtype == torch.int64:
        return index
    return insert_call(graph, torch.ops.prims.convert_element_type.default, (index, torch.int64), origin)


def _mutates(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    return isinstance(target, torch._ops.HigherOrderOperator) and "functional" not in target.name()

