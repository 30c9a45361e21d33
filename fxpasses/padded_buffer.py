"""Zero-filled buffer filled by a scatter -> one gather, pad positions selected as zero.

Stock form (e.g. VSA's ``tile``)::

    buf = torch.zeros(B, P, heads, D)            # a full zero-fill pass over the buffer
    buf[:, non_pad_index] = x[:, tile_partition_indices]     # then scatter n rows into it

which post-grad reads ``aten.full(size, 0)`` then
``aten.index_put(full, [None]*d + [idx], values)`` (``index_copy`` lowers to the same).
Every call writes the whole buffer twice (zeros, then the scattered rows).

Optimized form: one gather through the *inverse* index ``src`` (``src[idx[j]] = j``,
``-1`` at positions nothing is scattered to)::

    out = torch.where(src >= 0, values[:, src.clamp(min=0)], 0)    # [B, P, heads, D]

Every output row is written once, pad rows as zero, in one kernel after Inductor fuses
the gather and the select. When ``values`` is itself a gather (``x[:, tile_partition_indices]``),
``fold_gathers`` (which runs after this pass) folds the two gathers into one:
``x[:, tile_partition_indices[src.clamp(min=0)]]``.

``src`` is written into the graph (``full`` + ``index_put`` of ``P`` integers). When ``idx`` is
step-invariant (built from literals and static shapes inside the graph) the pass's closing
call of the step-invariant folder (``step_invariant.fold``) computes ``src >= 0`` and
``src.clamp(min=0)`` once while compiling and embeds them as constants; otherwise they are
computed in the graph each call, so the rewrite stays correct when ``idx`` is a graph input
that changes between calls.

Why this form and not a persistent buffer (pad rows zeroed once, real rows refilled in
place each call): the buffer form must hold state across calls and mutate it, which a
functional graph cannot express without a mutating custom op and an allocation keyed on
shape, dtype and device that the compiled graph would have to invalidate itself (and
under CUDA graphs or concurrent calls two live results would share one storage). The
gather form has the same memory traffic as the buffer form (each output row written
once, each input row read once), holds no state, and is correct under any change of
shape, dtype, device or index by construction. Only the allocation of the output is not
saved; on CUDA the caching allocator hands back the same block each step.

Preconditions (else no rewrite):

- The buffer is ``full(size, 0)`` (or ``zeros``/``zeros_like``/``new_zeros``/``full_like(.., 0)``)
  of positive zero, possibly seen through a whole-dim slice ``buf[:]`` (under dynamic shapes
  setitem records ``slice_scatter(buf, index_put(buf[:], ..), ..)``; the whole-buffer
  ``slice_scatter`` then goes too). Other users of the same buffer do not matter (``index_put`` is
  functional: it never changes ``buf``); the fill is dropped once no scatter uses it.
- The scatter is ``index_put`` with ``accumulate=False`` and a single 1-D int64/int32
  index tensor at one dim ``d``.
- ``values`` has the indexed shape (``buf.shape`` with ``P`` replaced by ``len(idx)``),
  possibly without leading size-1 dims (what ``buf[:, idx] = v`` records); no other
  broadcasting. Same dtype and device as the buffer.
- ``P`` and ``len(idx)`` are static and ``len(idx) >= 1``.
- The result has the buffer's dtype, sizes and strides.

Semantics kept: a negative ``idx`` entry wraps modulo ``P`` in the inverse map exactly as
in the scatter (the same ``index_put`` on a dim of the same size); an out-of-range entry
raises in both. With duplicate entries the stock result is whichever write lands last,
which ``index_put`` leaves unspecified; the inverse map is built by the same ``index_put``
so the same position wins on the CPU, and some valid winner elsewhere.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from diffopt.graph_pass import GraphPass, RewriteLog, Stage

from .fx_utils import erase_dead, fake_value, insert_call, same_layout

from .fold_gathers import INDEX_DTYPES
from .step_invariant import computed_once, fold

aten = torch.ops.aten
prims = torch.ops.prims

_ZEROS = {
    aten.full.default: 1,
    aten.full_like.default: 1,
    aten.zeros.default: None,
    aten.zeros_like.default: None,
    aten.new_zeros.default: None,
}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dim, aten.squeeze.default,
          aten.squeeze.dims, aten.unsqueeze.default}


class PaddedBuffer(GraphPass):
    name = "padded_buffer"
    stage = Stage.POST_GRAD

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        stock = set(graph.nodes)
        inverse_maps: dict[tuple[fx.Node, int], tuple[fx.Node, fx.Node]] = {}
        rewrites = []
        for node in list(graph.nodes):
            match = _match(node)
            if match is None:
                continue
            buf, dim, idx, source = match
            buf_val, idx_val = fake_value(buf), fake_value(idx)
            padded, n = buf_val.shape[dim], idx_val.shape[0]
            key = (idx, padded)
            with graph.inserting_before(node):
                if key not in inverse_maps or any(getattr(n, "_erased", False) for n in inverse_maps[key]):
                    inverse_maps[key] = _inverse_map(graph, idx, padded, n, buf_val.dim() - dim - 1, node)
                safe, valid = inverse_maps[key]
                gathered = insert_call(graph, aten.index.Tensor, (source, [None] * dim + [safe]), node)
                zero = insert_call(
                    graph, aten.scalar_tensor.default, (0,), node, {"dtype": buf_val.dtype, "device": buf_val.device}
                )
                out = insert_call(graph, aten.where.self, (valid, gathered, zero), node)
            if not same_layout(out, node):  # a consumer may depend on the buffer's strides
                erase_dead(graph, [out])
                continue
            node.replace_all_uses_with(out)
            for user in list(out.users):  # writing the whole buffer back into the zeros is a no-op too
                if _whole_slice_scatter(user, out) and same_layout(out, user):
                    user.replace_all_uses_with(out)
                    erase_dead(graph, [user])
            erase_dead(graph, [node])
            rewrites.append((node, f"zeros {list(buf_val.shape)} + scatter of {n} rows along dim {dim}", safe))
        constants = fold(graph, within=set(graph.nodes) - stock)  # the index math inserted above
        for node, replaced, safe in rewrites:
            once = computed_once(safe, constants)
            where = "index computed once (step-invariant)" if once else "index computed in the graph each call"
            log.add(node, replaced=replaced, by=f"one gather with pad rows selected as zero, {where}")


def _match(node: fx.Node) -> tuple[fx.Node, int, fx.Node, fx.Node] | None:
    """``(buffer, dim, index, values with the indexed shape)`` of a scatter into zeros, or ``None``."""
    if node.op != "call_function" or node.target is not aten.index_put.default:
        return None
    buf, indices, values = node.args[:3]
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    while _whole_slice(buf):  # buf[:] (what a setitem records under dynamic shapes)
        buf = buf.args[0]
    if accumulate or not _is_zeros(buf):
        return None
    present = [i for i, index in enumerate(indices) if index is not None]
    if len(present) != 1:
        return None
    dim, idx = present[0], indices[present[0]]
    buf_val, idx_val, values_val = fake_value(buf), fake_value(idx), fake_value(values)
    if not all(isinstance(v, torch.Tensor) for v in (buf_val, idx_val, values_val)):
        return None
    if idx_val.dtype not in INDEX_DTYPES or idx_val.dim() != 1:
        return None
    if values_val.dtype != buf_val.dtype or values_val.device != buf_val.device:
        return None
    padded, n = buf_val.shape[dim], idx_val.shape[0]
    if not isinstance(padded, int) or not isinstance(n, int) or n < 1:
        return None
    indexed = list(buf_val.shape)
    indexed[dim] = n
    source = _with_shape(values, indexed)
    if source is None:
        return None
    return buf, dim, idx, source


def _is_zeros(node: object) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _ZEROS:
        return False
    position = _ZEROS[node.target]
    if position is None:
        return True
    fill = node.args[position] if len(node.args) > position else node.kwargs.get("fill_value")
    if isinstance(fill, bool) or not isinstance(fill, (int, float)) or fill != 0:
        return False
    return math.copysign(1.0, fill) > 0  # -0.0 would be a different buffer


def _whole_slice(node: object) -> bool:
    """``x[start:end:step]`` along a dim that covers all of it (the identity)."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target is not aten.slice.Tensor:
        return False
    return _covers(fake_value(node.args[0]), *(list(node.args[1:]) + [0, 0, None, None, 1][len(node.args) :]))


def _whole_slice_scatter(node: fx.Node, src: fx.Node) -> bool:
    """``slice_scatter(base, src, ...)`` whose slice is all of ``base`` (so the result is ``src``)."""
    if node.op != "call_function" or node.target is not aten.slice_scatter.default or node.args[1] is not src:
        return False
    base = fake_value(node.args[0])
    rest = list(node.args[2:]) + [0, None, None, 1][len(node.args) - 2 :]
    return _covers(base, *rest) and _same_shape(base, list(fake_value(src).shape))


def _covers(value: object, dim: int, start: object, end: object, step: object) -> bool:
    if not isinstance(value, torch.Tensor) or not isinstance(dim, int):
        return False
    size = value.shape[dim]
    return (
        start in (None, 0)
        and step == 1
        and (end is None or (isinstance(end, int) and (end >= sys.maxsize or statically_known_true(end >= size))))
    )


def _same_shape(value: torch.Tensor, shape: list) -> bool:
    return value.dim() == len(shape) and all(statically_known_true(a == b) for a, b in zip(value.shape, shape))


def _with_shape(values: fx.Node, indexed: list) -> fx.Node | None:
    """A node whose value, with shape ``indexed``, is what ``index_put`` broadcasts ``values`` to."""
    value = fake_value(values)
    if _same_shape(value, indexed):
        return values
    # buf[:, idx] = v records v without its leading size-1 dims: the same elements in the same order.
    k = len(indexed) - value.dim()
    if k <= 0 or not all(statically_known_true(s == 1) for s in indexed[:k]) or not _same_shape(value, indexed[k:]):
        return None
    node = values
    while node.op == "call_function" and node.target in _VIEWS:  # view chains keep row-major order
        node = node.args[0]
        if _same_shape(fake_value(node), indexed):
            return node
    with values.graph.inserting_after(values):
        return insert_call(values.graph, aten.reshape.default, (values, indexed), values)


def _inverse_map(graph: fx.Graph, idx: fx.Node, padded: int, n: int, trailing: int, origin: fx.Node) -> tuple[fx.Node, fx.Node]:
    """``(src.clamp(min=0), (src >= 0).view(P, 1, ..))`` with ``src[idx[j]] = j``, else -1."""
    device = fake_value(idx).device
    full = insert_call(graph, aten.full.default, ([padded], -1), origin, {"dtype": torch.int64, "device": device})
    positions = insert_call(
        graph, prims.iota.default, (n,), origin,
        {"start": 0, "step": 1, "dtype": torch.int64, "device": device, "requires_grad": False},
    )
    src = insert_call(graph, aten.index_put.default, (full, [idx], positions), origin)
    safe = insert_call(graph, aten.clamp_min.default, (src, 0), origin)
    valid = insert_call(graph, aten.ge.Scalar, (src, 0), origin)
    valid = insert_call(graph, aten.view.default, (valid, [padded] + [1] * trailing), origin)
    return safe, valid
