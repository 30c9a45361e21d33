"""``.item()`` timestep reads: one per step at most, early, and none where only tensor math uses it.

Stock form (a denoising step that turns its timestep tensor into a Python number)::

    t = int(timestep.flatten()[0].item())     # or timestep.item(), timestep.cpu().item()
    temb = self.timestep_table[t]             # indexing with the number
    ...
    t2 = int(timestep.flatten()[0].item())    # the same read again (CFG branch, next block)
    scale = torch.full((), t2) * x            # the number turned back into a tensor

Captured by Dynamo (the backend sets ``capture_scalar_outputs``), each read is
``aten._local_scalar_dense`` in the post-grad graph, fed by a chain of views
(``select``/``view``/``reshape``/``squeeze``/``slice``/``expand``/``permute``,
``unbind``/``split`` pieces, and device copies such as ``.cpu()``). Each read is
a device-to-host sync that drains the GPU queue and keeps the step out of CUDA
graphs.

Optimized form, in three rewrites:

- Deduplicate: reads of the same element of the same tensor (same producer node
  and the same element once the view chain is followed) become one read, whose
  value every former reader uses.
- On device: where every use of a read is tensor math, the read is replaced by
  on-device ops on the element itself, so no sync remains:
  ``full(size, t)`` / ``scalar_tensor(t)`` become ``element.to(dtype).expand(size)``
  (made contiguous), ``add``/``sub``/``mul`` with the number take the 0-d element
  tensor instead, and ``select(x, dim, t)`` (``table[t]``) becomes the gather
  ``index(x, [..., element])`` (option ``select_on_device``, on by default).
  A ``.cpu()`` copy on the way is skipped: the element is taken where it lives,
  and only where it is used (a CPU timestep feeding a GPU model keeps its read,
  which is no device sync; copying it over would be).
- Hoist: a read that stays (its number decides sizes, slices or other host
  logic) moves, with its view chain, to right after the last of its inputs: for
  a step input that is the top of the graph, before the step's kernels.

Preconditions (else the read is left as it is):

- Same value: two reads are merged only when they pick the same element of the
  same producer node through view ops with constant indices and static shapes,
  with the same dtype (a dtype cast ends the chain), or the same element rounded
  the same way and cast to the same integer type (``int(t.item())`` of a float
  ``t``, which ``diffopt.scalar_capture`` turns into the read of
  ``trunc(t).to(int64)``).
- No mutation: no mutating op in the graph touches the storage of the producer
  or of any view on the chain (otherwise moving or merging a read could change
  what it reads).
- Symbols: the unbacked symbols that an erased read or a replaced ``select``
  defined appear nowhere else in the graph's metadata, except in scalar
  arithmetic on a merged read and in views of a replaced ``select`` (their fake
  values are recomputed, and must keep their sizes and strides).
- Same device: every tensor use of the number is on the device the element
  lives on (after skipping device copies).
- Exact results: a number is replaced by a tensor only where the result is the
  same bit for bit: ``full``/``scalar_tensor`` of a dtype whose range holds the
  element's dtype (``full`` refuses values that overflow; a cast would wrap);
  ``add``/``sub``/``mul`` whose result dtype is float32, float64 or an integer
  type holding the element's dtype (with a number, bf16/fp16 math rounds the
  number differently); ``select`` only of an integer element, where the gather
  has the select's sizes and strides and its result does not reach the graph's
  outputs or a mutation through views (the select was a view, the gather is a
  copy). Every use of the read must qualify, or none is rewritten (one sync
  remains either way).
"""
from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

from diffopt import compat
from diffopt.graph_pass import GraphPass, RewriteLog, Stage

from .fx_utils import (
    concrete_shape, erase_dead, fake_value, insert_call, leaves, same_layout, storage_of, unbacked_symbols, views_of,
)

aten = torch.ops.aten
prims = torch.ops.prims

_READ = aten._local_scalar_dense.default

# Ops that keep the row-major order of elements (a numel-1 result picks the same element).
_SAME_ORDER = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.alias.default,
    aten.clone.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
}
_HEAD_OPS = ("placeholder", "get_attr")
_ARITH = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor}
_ROUNDINGS = {aten.trunc.default, aten.floor.default, aten.ceil.default, aten.round.default}


class HoistItem(GraphPass):
    name = "hoist_item"
    stage = Stage.POST_GRAD
    defaults = {"select_on_device": True}

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        reads = [n for n in graph.nodes if n.op == "call_function" and n.target is _READ]
        if not reads:
            return
        mutated = _mutated_storages(graph)
        elements: dict[fx.Node, _Element] = {}
        for read in reads:
            element = _element_of(read.args[0])
            if element is not None and not element.touches(mutated):
                elements[read] = element

        # Deduplicate: one read per element.
        first: dict[tuple[Any, ...], fx.Node] = {}
        for read in reads:
            element = elements.get(read)
            if element is None:
                continue
            kept = first.setdefault(element.key, read)
            if kept is read or not _merge(graph, read, kept):
                continue
            log.add(read, replaced=f"second .item() read of {element.describe()}", by="the first read's value")
            elements.pop(read)

        for read, element in list(elements.items()):
            # On device: no read where only tensor math uses the number.
            if _to_device(graph, read, element, self.config["select_on_device"]):
                log.add(
                    read,
                    replaced=f".item() read of {element.describe()} feeding tensor math",
                    by="on-device tensor ops (no sync)",
                )
                continue
            # Hoist: the read that stays comes first.
            passed = _hoist(graph, read, element)
            if passed:
                log.add(read, replaced=f".item() read of {element.describe()} after {passed} op(s)", by="the same read, hoisted")


# --- which element a read picks ---------------------------------------------------


class _Element:
    """The element a numel-1 tensor holds: ``root``'s element ``index`` (row-major), via ``chain``,
    ``rounding`` (op and integer dtype) applied on the way where the read is of a rounded float."""

    def __init__(self, root: fx.Node, index: int, chain: list[fx.Node], rounding: tuple[Any, Any] | None) -> None:
        self.root = root
        self.index = index
        self.chain = chain  # from the node after root to the read's input, in graph order
        self.rounding = rounding

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.root, self.index, self.rounding)

    def describe(self) -> str:
        value = fake_value(self.root)
        shape = list(value.shape) if isinstance(value, torch.Tensor) else "?"
        rounded = f" ({self.rounding[0]._opname}, to {self.rounding[1]})" if self.rounding else ""
        return f"{self.root.name}{shape}[{self.index}]{rounded}"

    @property
    def device(self) -> torch.device:
        """Where the element lives once device copies on the chain are skipped."""
        copied = any(_is_device_copy(step) for step in self.chain)
        node = self.root if copied or not self.chain else self.chain[-1]
        return fake_value(node).device

    def touches(self, mutated: set) -> bool:
        for node in [self.root, *self.chain]:
            value = fake_value(node)
            if not isinstance(value, torch.Tensor) or storage_of(value) in mutated:
                return True
        return False


def _element_of(node: Any) -> _Element | None:
    value = fake_value(node)
    if not isinstance(node, fx.Node) or not isinstance(value, torch.Tensor) or concrete_shape(value) is None:
        return None
    if value.numel() != 1:
        return None
    index, chain, rounding = 0, [], None
    rounded = _rounded_integer(node)
    if rounded is not None:
        chain = [node, rounded]
        rounding = (rounded.target, value.dtype)
        node = rounded.args[0]
    while True:
        back = _step_back(node, index)
        if back is None:
            break
        chain.append(node)
        node, index = back
    return _Element(node, index, chain[::-1], rounding)


def _rounded_integer(node: fx.Node) -> fx.Node | None:
    """The rounding ``r`` where ``node`` is ``r(x)`` (trunc/floor/ceil/round of a float) cast to an
    integer type, else None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    is_cast = node.target is prims.convert_element_type.default or (
        node.target is aten._to_copy.default and set(node.kwargs) == {"dtype"}
    )
    value, rounded = fake_value(node), node.args[0]
    if not is_cast or not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype is torch.bool:
        return None
    source = fake_value(rounded)
    if rounded.op != "call_function" or rounded.target not in _ROUNDINGS or len(rounded.args) != 1 or rounded.kwargs:
        return None
    if not isinstance(source, torch.Tensor) or not source.is_floating_point() or not isinstance(rounded.args[0], fx.Node):
        return None
    return rounded


def _unravel(index: int, shape: tuple[int, ...]) -> list[int]:
    multi = []
    for size in reversed(shape):
        multi.append(index % size if size else 0)
        index = index // size if size else 0
    return multi[::-1]


def _ravel(multi: list[int], shape: tuple[int, ...]) -> int:
    index = 0
    for i, size in zip(multi, shape):
        index = index * size + i
    return index


def _step_back(node: fx.Node, index: int) -> tuple[fx.Node, int] | None:
    """The input of ``node`` and the index there of ``node``'s element ``index``, for element-picking ops."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    target, source = node.target, node.args[0]
    out_value, in_value = fake_value(node), fake_value(source)
    if not isinstance(out_value, torch.Tensor) or not isinstance(in_value, torch.Tensor):
        return None
    out_shape, in_shape = concrete_shape(out_value), concrete_shape(in_value)
    if out_shape is None or in_shape is None or out_value.dtype != in_value.dtype:
        return None
    if target in _SAME_ORDER or _is_device_copy(node):
        return source, index
    multi = _unravel(index, out_shape)
    rank = len(in_shape)
    if target is operator.getitem and source.op == "call_function":
        piece = node.args[1]
        if source.target is aten.unbind.int and isinstance(piece, int):
            dim = source.args[1] if len(source.args) > 1 else 0
            return _select_back(source, multi, dim, piece)
        if source.target in (aten.split_with_sizes.default, aten.split.Tensor) and isinstance(piece, int):
            return _split_back(source, multi, piece)
        return None
    if target is aten.select.int and isinstance(node.args[2], int):
        return _select_back(source, multi, node.args[1], node.args[2])
    if target is aten.slice.Tensor:
        dim, start, step = _arg(node, 1, 0), _arg(node, 2, None), _arg(node, 4, 1)
        if not isinstance(start, (int, type(None))) or not isinstance(step, int):
            return None
        dim %= rank
        start = 0 if start is None else (start + in_shape[dim] if start < 0 else start)
        multi[dim] = max(0, start) + multi[dim] * step
        return source, _ravel(multi, in_shape)
    if target is aten.expand.default:
        offset = len(out_shape) - rank
        return source, _ravel([0 if in_shape[j] == 1 else multi[offset + j] for j in range(rank)], in_shape)
    if target is aten.permute.default:
        in_multi = [0] * rank
        for j, d in enumerate(node.args[1]):
            in_multi[d % rank] = multi[j]
        return source, _ravel(in_multi, in_shape)
    return None


def _arg(node: fx.Node, position: int, default: Any) -> Any:
    return node.args[position] if len(node.args) > position else default


def _select_back(source: fx.Node, multi: list[int], dim: int, index: int) -> tuple[fx.Node, int] | None:
    in_shape = concrete_shape(source)
    if in_shape is None:
        return None
    dim %= len(in_shape)
    multi.insert(dim, index + in_shape[dim] if index < 0 else index)
    return source, _ravel(multi, in_shape)


def _split_back(split: fx.Node, multi: list[int], piece: int) -> tuple[fx.Node, int] | None:
    source = split.args[0]
    in_shape = concrete_shape(source)
    if in_shape is None or len(split.args) < 2:
        return None
    dim = (split.args[2] if len(split.args) > 2 else 0) % len(in_shape)
    sizes = split.args[1]
    if split.target is aten.split.Tensor:
        if not isinstance(sizes, int) or sizes <= 0:
            return None
        start = piece * sizes
    else:
        if not all(isinstance(s, int) for s in sizes):
            return None
        start = sum(sizes[:piece])
    multi[dim] += start
    return source, _ravel(multi, in_shape)


def _is_device_copy(node: fx.Node) -> bool:
    """``x.cpu()`` / ``x.to(device)`` and nothing else (same dtype, checked by the caller)."""
    if node.target is prims.device_put.default:
        return True
    if node.target is aten._to_copy.default:
        return set(node.kwargs) <= {"dtype", "device", "layout", "non_blocking", "memory_format", "pin_memory"} and (
            node.kwargs.get("layout") in (None, torch.strided)
        )
    return False


# --- graph facts -------------------------------------------------------------------


def _mutated_storages(graph: fx.Graph) -> set:
    mutated = set()
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if not node.target._schema.is_mutable:
            continue
        for leaf in leaves((node.args, node.kwargs)):
            value = fake_value(leaf)
            if isinstance(value, torch.Tensor):
                mutated.add(storage_of(value))
    return mutated


def _symbols(node: fx.Node) -> set:
    symbols = unbacked_symbols(fake_value(node))
    symbols.update((node.meta.get("unbacked_bindings") or {}).keys())
    return symbols


def _is_sym(value: Any) -> bool:
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _scalar_users(read: fx.Node) -> list[fx.Node]:
    """Users of ``read`` (transitively) that compute host scalars from it (``operator.mul(u0, 2)``)."""
    found, todo = [], [read]
    while todo:
        for user in todo.pop().users:
            if user.op == "call_function" and not isinstance(user.target, torch._ops.OpOverload) and _is_sym(fake_value(user)):
                if user not in found:
                    found.append(user)
                    todo.append(user)
    return found


def _symbols_escape(graph: fx.Graph, removed: set[fx.Node], recomputed: Iterable[fx.Node] = ()) -> bool:
    """Whether symbols that ``removed`` nodes define are still named by other nodes' metadata."""
    symbols: set = set()
    for node in removed:
        symbols |= _symbols(node)
    if not symbols:
        return False
    skip = removed | set(recomputed)
    return any(node not in skip and unbacked_symbols(fake_value(node)) & symbols for node in graph.nodes)


# --- deduplicate -------------------------------------------------------------------------


def _merge(graph: fx.Graph, read: fx.Node, kept: fx.Node) -> bool:
    scalar_users = _scalar_users(read)
    if _symbols_escape(graph, {read}, scalar_users):
        return False
    chain_start = read.args[0]
    read.replace_all_uses_with(kept)
    graph.erase_node(read)
    for user in scalar_users:  # graph order: inputs are recomputed first
        args, kwargs = fx.node.map_aggregate((user.args, user.kwargs), fake_value)
        user.meta["val"] = user.target(*args, **kwargs)
    erase_dead(graph, [chain_start])
    return True


# --- on device ----------------------------------------------------------------------


def _fits(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every value of ``source`` converts to ``target`` without overflow."""
    if source is torch.bool:
        return True
    if target is torch.bool or source.is_complex or target.is_complex:
        return False
    low, high = _range(source)
    target_low, target_high = _range(target)
    if not target.is_floating_point and source.is_floating_point:
        return False
    return target_low <= low and high <= target_high


def _range(dtype: torch.dtype) -> tuple[float, float]:
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    return float(info.min), float(info.max)


def _plan(
    read: fx.Node, source: torch.dtype, device: torch.device, select_on_device: bool
) -> list[tuple[fx.Node, str]] | None:
    """How each user of ``read`` takes the element (``source`` dtype, on ``device``) as a tensor,
    or None if one cannot."""
    plan = []
    for user in read.users:
        value = fake_value(user)
        if user.op != "call_function" or not isinstance(value, torch.Tensor):
            return None
        target = user.target
        if target is aten.full.default and user.args[1] is read and read not in leaves(user.args[0]):
            kind = "fill"
        elif target is aten.scalar_tensor.default and user.args[0] is read:
            kind = "fill"
        elif (
            target in _ARITH
            and len(user.args) == 2
            and user.args[1] is read
            and isinstance(user.args[0], fx.Node)
            and user.args[0] is not read
        ):
            if value.dtype not in (torch.float32, torch.float64) and value.dtype.is_floating_point:
                return None
            kind = "arith"
        elif (
            select_on_device
            and target is aten.select.int
            and user.args[2] is read
            and user.args[0] is not read
            and not source.is_floating_point
            and source is not torch.bool
        ):
            kind = "select"
        else:
            return None
        if kind != "select" and (value.dtype is torch.bool or not _fits(source, value.dtype)):
            return None
        # The element must already be where it is used: a copy between devices (a CPU timestep
        # for a GPU model, say) would sync where the host read of a CPU tensor does not.
        if fake_value(user.args[0] if kind == "select" else user).device != device:
            return None
        plan.append((user, kind))
    return plan


def _recompute(views: list[fx.Node], changed: dict[fx.Node, Any]) -> dict[fx.Node, Any] | None:
    """New fake values of ``views`` once the nodes in ``changed`` produce their new values; None
    if one no longer has its old sizes and strides."""
    mode = compat.detect_fake_mode(list(changed.values()))
    values = dict(changed)
    with mode:
        for view in views:
            args, kwargs = fx.node.map_aggregate(
                (view.args, view.kwargs), lambda a: values[a] if isinstance(a, fx.Node) and a in values else fake_value(a)
            )
            try:
                values[view] = view.target(*args, **kwargs)
            except Exception:
                return None
            old = fake_value(view)
            if isinstance(old, torch.Tensor) and not (isinstance(values[view], torch.Tensor) and same_layout(values[view], old)):
                return None
    return {view: values[view] for view in views}


def _to_device(graph: fx.Graph, read: fx.Node, element: _Element, select_on_device: bool) -> bool:
    source = fake_value(read.args[0]).dtype
    plan = _plan(read, source, element.device, select_on_device)
    if not plan:
        return False
    views: dict[fx.Node, list[fx.Node]] = {}
    for user, kind in plan:
        if kind == "select":
            closure = views_of(user)
            if closure is None:
                return False
            views[user] = closure
    removed = {read} | {user for user, kind in plan}
    if _symbols_escape(graph, removed, [v for closure in views.values() for v in closure]):
        return False
    symbols = set().union(*(_symbols(node) for node in removed))

    created: list[fx.Node] = []

    def call(target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        node = insert_call(graph, target, args, read, kwargs)
        created.append(node)
        return node

    replacements: dict[fx.Node, fx.Node] = {}
    updates: dict[fx.Node, Any] = {}
    with graph.inserting_before(read):
        element_node = _element_tensor(element, call)
    for user, kind in plan:
        value = fake_value(user)
        with graph.inserting_before(user):
            if kind == "fill":
                new = _cast(call, element_node, value.dtype, value.device)
                size = user.args[0] if user.target is aten.full.default else []
                if list(size):
                    new = call(aten.expand.default, (new, size))
                # a fresh contiguous tensor, as full() made
                new = call(aten.clone.default, (new,), {"memory_format": torch.contiguous_format})
            elif kind == "arith":
                operand = _cast(call, element_node, value.dtype, value.device)
                new = call(user.target, (user.args[0], operand), dict(user.kwargs))
            else:
                table = user.args[0]
                dim = user.args[1] % fake_value(table).dim()
                index = _cast(call, element_node, torch.int64, fake_value(table).device)
                new = call(aten.index.Tensor, (table, [None] * dim + [index]))
        ok = same_layout(new, value)
        if ok and kind == "select":
            recomputed = _recompute(views[user], {user: fake_value(new)})
            ok = recomputed is not None and not any(unbacked_symbols(v) & symbols for v in recomputed.values())
            updates.update(recomputed or {})
        if not ok:
            for node in reversed(created):  # only used by each other: erase users first
                graph.erase_node(node)
            return False
        replacements[user] = new
    for user, new in replacements.items():
        user.replace_all_uses_with(new)
        graph.erase_node(user)
    for view, value in updates.items():
        view.meta["val"] = value
    chain_start = read.args[0]
    graph.erase_node(read)
    erase_dead(graph, [chain_start])
    return True


def _cast(call: Any, node: fx.Node, dtype: torch.dtype, device: torch.device) -> fx.Node:
    """``node`` in ``dtype`` on ``device``, with the ops Inductor's decompositions leave (not ``_to_copy``)."""
    value = fake_value(node)
    if value.device != device:
        node = call(prims.device_put.default, (node, device))
    if value.dtype != dtype:
        node = call(prims.convert_element_type.default, (node, dtype))
    return node


def _element_tensor(element: _Element, call: Any) -> fx.Node:
    """A 0-d tensor node holding the element, on the root's device (device copies skipped)."""
    if not any(_is_device_copy(step) for step in element.chain):
        node = element.chain[-1] if element.chain else element.root
        return call(aten.reshape.default, (node, [])) if fake_value(node).dim() else node
    node = element.root
    for step in element.chain:
        if _is_device_copy(step):
            continue
        if step.target is operator.getitem:
            source = step.args[0]
            node = call(source.target, (node, *source.args[1:]), dict(source.kwargs))
            node = call(operator.getitem, (node, step.args[1]))
        else:
            node = call(step.target, (node, *step.args[1:]), dict(step.kwargs))
    if fake_value(node).dim():
        node = call(aten.reshape.default, (node, []))
    return node


# --- hoist ----------------------------------------------------------------------------


def _hoist(graph: fx.Graph, read: fx.Node, element: _Element) -> int:
    """Move ``read`` and its chain right after their last input; returns how many ops it moved past."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    moving = [n for n in element.chain if n.op == "call_function"] + [read]
    moving_set = set(moving)
    last_head = max((order[n] for n in graph.nodes if n.op in _HEAD_OPS), default=-1)
    inputs = [a for n in moving for a in n.all_input_nodes if a not in moving_set]
    anchor_index = max([last_head] + [order[a] for a in inputs])
    if anchor_index < 0:  # nothing to come after (no inputs at all): leave it
        return 0
    nodes = list(graph.nodes)
    passed = sum(
        1
        for n in nodes[anchor_index + 1 : order[read]]
        if n.op == "call_function" and n not in moving_set and not _is_sym(fake_value(n))
    )
    if not passed:
        return 0
    anchor = nodes[anchor_index]
    for node in moving:
        anchor.append(node)
        anchor = node
    return passed
