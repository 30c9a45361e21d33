"""The FX toolbox every pass uses: one definition of each small job (``docs/passes.md`` lists them).

The helpers work on the post-grad ATen graph and its fake tensors (``node.meta["val"]``); private
torch APIs are reached through :mod:`diffopt.compat` only.
"""
from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, is_concrete_int, statically_known_true
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from diffopt import compat

aten = torch.ops.aten
prims = torch.ops.prims

# Ops that give their input another shape without moving data where they can (post-grad, Inductor has
# turned ``view`` into ``reshape``).
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
# Views that keep a contiguous tensor's elements in memory order (their result is contiguous too).
ORDER_KEEPING_VIEWS = (*RESHAPES, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default)


# --- values and new nodes ----------------------------------------------------------------------------


def fake_value(node: Any) -> Any:
    """The fake tensor (or value) a node produces, if the graph recorded it; a non-node as it is."""
    if not isinstance(node, fx.Node):
        return node
    meta = node.meta
    return meta["val"] if "val" in meta else meta.get("example_value")


def storage_of(value: torch.Tensor) -> Any:
    """A hashable name for the storage ``value`` views (views of one tensor share it); None where the
    tensor has none to name."""
    try:
        return StorageWeakRef(value.untyped_storage())
    except Exception:
        return None


def elements_spanned(shape: Any, stride: Any) -> int:
    """Elements of storage from a view's first element to its last, both included (0 if empty)."""
    if any(size == 0 for size in shape):
        return 0
    return 1 + sum((size - 1) * step for size, step in zip(shape, stride))


def constant_key(value: Any) -> Any:
    """A key two scalar constants share exactly when they are the same value of the same type, bit
    for bit: ``0.0 == -0.0``, yet ``1 / (x * 0.0)`` and ``1 / (x * -0.0)`` differ in sign. A NaN
    never shares its key (it never equals itself). Lists and tuples: key each element."""
    if isinstance(value, float):
        return ("float", object() if value != value else value.hex())
    if isinstance(value, complex):
        return ("complex", constant_key(value.real), constant_key(value.imag))
    return (type(value).__name__, value)


def unbacked_symbols(value: Any) -> set:
    """The unbacked symbols (``.item()`` results and the like) that a value names, in any of its
    leaves: a higher-order op's value can be a dict (a Triton launch's: argument name -> tensor),
    which ``free_unbacked_symbols`` itself rejects."""
    return set().union(*(free_unbacked_symbols(leaf) for leaf in pytree.tree_leaves(value)))


def op_name(target: Any) -> str:
    """How reports name an op: ``aten.mul``, ``prims.convert_element_type`` (no overload)."""
    return f"{target.namespace}.{target._opname}" if isinstance(target, torch._ops.OpOverload) else str(target)


def concrete(size: Any) -> int | None:
    """``size`` as an int where it is static, else None."""
    return int(size) if is_concrete_int(size) else None


def concrete_shape(node_or_value: Any) -> list[int] | None:
    """The static sizes of a node's (or a fake tensor's) value; None if one is symbolic or it is no tensor."""
    value = fake_value(node_or_value)
    if not isinstance(value, torch.Tensor) or not all(is_concrete_int(s) for s in value.shape):
        return None
    return [int(s) for s in value.shape]


def insert_call(graph: fx.Graph, target: Callable[..., Any], args: tuple, origin: fx.Node, kwargs: dict | None = None) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` at the graph's insertion point.

    The new node gets a fake value computed from its inputs' fake values (so later passes and
    Inductor see correct shapes and strides), and the stack trace and module stack of ``origin`` (so
    reports point at the user's code). If the call raises on the fake values (an op's argument
    check), no node is left behind.
    """
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = fx.node.map_aggregate((args, kwargs), fake_value)
    mode = compat.detect_fake_mode(tensor_leaves((fake_args, fake_kwargs)))
    if mode is not None:
        try:
            with mode:
                node.meta["val"] = target(*fake_args, **fake_kwargs)
        except Exception:
            graph.erase_node(node)
            raise
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "seq_nr"):
        if key in origin.meta:
            node.meta[key] = origin.meta[key]
    return node


def leaves(tree: Any) -> list[Any]:
    """Every leaf of nested args/kwargs (nodes and constants)."""
    found: list[Any] = []
    fx.node.map_aggregate(tree, found.append)
    return found


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [v for v in leaves(tree) if isinstance(v, torch.Tensor)]


def call_arguments(node: fx.Node) -> dict[str, Any]:
    """An OpOverload call's arguments by their schema names, defaults filled in."""
    values: dict[str, Any] = {}
    for index, argument in enumerate(node.target._schema.arguments):
        if index < len(node.args):
            values[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            values[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            values[argument.name] = argument.default_value
    return values


# --- purity --------------------------------------------------------------------------------------------

# Inductor's own random ops are not tagged as seeded (their seeds come from the tagged inductor_seeds).
_INDUCTOR_RANDOM = tuple(
    getattr(prims, name).default
    for name in ("inductor_random", "inductor_randint", "inductor_seeds", "inductor_lookup_seed")
    if hasattr(prims, name)
)
_ALLOCATIONS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted")
_DATA_DEPENDENT = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
_SCALAR_MATH = (math.ceil, math.floor, math.trunc)


def _is_random(target: torch._ops.OpOverload) -> bool:
    if torch.Tag.nondeterministic_seeded in target.tags or target in _INDUCTOR_RANDOM:
        return True
    return any("Generator" in str(argument.type) for argument in target._schema.arguments)


def is_allocation(node: fx.Node) -> bool:
    """A fresh buffer with undefined contents (``empty``, ``empty_like`` ...): no side effect, but not a
    value either (two of them are not one value; stock code fills it, or reads garbage)."""
    target = node.target
    return (
        node.op == "call_function"
        and isinstance(target, torch._ops.OpOverload)
        and target.namespace == "aten"
        and target._opname in _ALLOCATIONS
    )


def is_pure(node: fx.Node, *, bitwise: bool = False, data_dependent: bool = False, scalars: bool = False) -> bool:
    """Whether the call's result is a function of its arguments' values alone, and it does nothing else.

    True for ``getitem`` and for ATen/prims/diffopt ops that neither mutate, draw random numbers
    (a seeded tag, a ``Generator`` argument, Inductor's own random prims), allocate uninitialized
    memory (:func:`is_allocation`) nor have a data-dependent output; a gather by integer index tensors
    (``aten.index.Tensor`` without a boolean mask: its output shape is the indices') is pure.

    The policies that differ between callers:

    - ``bitwise``: also require the same bits on every run and every rank (no
      ``nondeterministic_bitwise`` op such as ``index_put(accumulate=True)`` on CUDA). Needed where
      "equal" must hold across processes (``ulysses_prefix``'s replication proof).
    - ``data_dependent``: ops whose output defines fresh unbacked symbols (``.item()``, ``nonzero``,
      a boolean-mask index) count too. Their values are functions of their inputs, but merging,
      moving or deleting them breaks the symbols they define, so only value reasoning may allow them.
    - ``scalars``: host arithmetic on sizes (``operator.mul(s0, 2)``, ``math.ceil``) counts too.
    """
    if node.op != "call_function":
        return False
    target = node.target
    if target is operator.getitem:
        return True
    if scalars and (getattr(target, "__module__", None) in ("operator", "_operator") or target in _SCALAR_MATH):
        return True
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in ("aten", "prims", "diffopt"):
        return False
    if node.is_impure():  # FX's side-effectful ops: runtime asserts (_assert_async, _assert_scalar), prints
        return False
    if target._schema.is_mutable or _is_random(target) or is_allocation(node):
        return False
    if bitwise and torch.Tag.nondeterministic_bitwise in target.tags:
        return False
    if not data_dependent and any(tag in target.tags for tag in _DATA_DEPENDENT):
        return target is aten.index.Tensor and _integer_indices(node)
    return True


def _integer_indices(node: fx.Node) -> bool:
    values = [fake_value(index) for index in node.args[1] if index is not None]
    return all(isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dtype != torch.bool for v in values)


def removable(node: fx.Node) -> bool:
    """Whether an unused call may be deleted: it is pure, or an allocation."""
    return is_pure(node) or is_allocation(node)


# --- layout ----------------------------------------------------------------------------------------------


def same_layout(a: Any, b: Any) -> bool:
    """Whether two values (fake tensors, or tuples of them) have the same dtype, device, sizes and strides.

    Every stride counts, size-1 dims' too: consumers and Inductor may read them all. Non-tensor values
    (a ``sym_size``'s int) match each other.
    """
    a, b = fake_value(a), fake_value(b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_layout(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.device != b.device or a.dim() != b.dim():
            return False
        pairs = list(zip(a.shape, b.shape)) + list(zip(a.stride(), b.stride()))
        return all(statically_known_true(x == y) for x, y in pairs)
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor)


def is_contiguous_copy(node: Any) -> bool:
    """``x.contiguous()`` as post-grad graphs record it: ``clone(x, memory_format=torch.contiguous_format)``."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target is aten.clone.default
        and node.kwargs.get("memory_format") == torch.contiguous_format
    )


def is_copy(node: Any) -> bool:
    """A ``clone`` in any memory format: the same values as its input (maybe in another layout)."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target is aten.clone.default
        and set(node.kwargs) <= {"memory_format"}
    )


# --- aliasing ------------------------------------------------------------------------------------------------


def is_view(node: fx.Node) -> bool:
    """Whether the call returns a view of (aliases) one of its inputs, per the op's schema."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    return any(r.alias_info is not None for r in node.target._schema.returns)


# Ops that read their input's storage at the offsets and strides they are given, not through its own
# strides: the same sizes in another layout are other values to them.
READS_MEMORY_ORDER = (aten.as_strided.default, aten.as_strided_copy.default, aten.as_strided_scatter.default)


def views_of(node: fx.Node) -> list[fx.Node] | None:
    """The views of ``node`` (transitively), in graph order; None if one reaches the output, a mutation,
    ``as_strided`` (which reads the storage offset) or a non-ATen call (any of which may depend on the
    memory being ``node``'s own)."""
    found: list[fx.Node] = []
    todo = [node]
    while todo:
        for user in todo.pop().users:
            if user.op != "call_function" or not isinstance(user.target, torch._ops.OpOverload):
                return None
            if user.target._schema.is_mutable or user.target in READS_MEMORY_ORDER:
                return None
            if is_view(user) and user not in found:
                found.append(user)
                todo.append(user)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(found, key=order.__getitem__)


# --- consumers of another layout ------------------------------------------------------------------------------


def _fixed_stride_tags() -> set[Any]:
    return {getattr(torch.Tag, tag) for tag in ("needs_fixed_stride_order", "needs_exact_strides") if hasattr(torch.Tag, tag)}


def _reads_through_strides(target: Any) -> bool:
    """A functional ATen op whose values do not depend on its inputs' memory layout: it does not mutate,
    has no fixed-stride contract and does not read memory order (``as_strided``)."""
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in ("aten", "prims"):
        return False
    if target._schema.is_mutable or target in READS_MEMORY_ORDER:
        return False
    return not _fixed_stride_tags().intersection(target.tags)


def consumers_accept(
    node: fx.Node, new_value: Any, updates: dict[fx.Node, Any] | None = None, depth: int = 0, *, copying_reshapes: bool = False
) -> bool:
    """Whether the graph computes the same results if ``node`` produced ``new_value`` instead.

    ``new_value`` has ``node``'s sizes and dtype but maybe other strides. Each consumer is recomputed
    on fake tensors. One that then has its old sizes and strides is fine; one whose layout changes too
    is followed to its own consumers, ``depth`` levels deep, and its new fake value goes to ``updates``
    (the caller writes them once it rewrites). A view the strided layout does not allow, or a reshape
    that would copy fails, unless ``copying_reshapes`` (a caller whose alternative is a copy anyway;
    for one that removes a copy, the copy would only move); so do graph outputs and the ops
    :func:`_reads_through_strides` rejects.
    """
    updates = {} if updates is None else updates
    mode = compat.detect_fake_mode(tensor_leaves(new_value))
    with mode or contextlib.nullcontext():
        return _accept(node, new_value, updates, depth, copying_reshapes)


def _accept(node: fx.Node, new_value: Any, updates: dict[fx.Node, Any], depth: int, copying_reshapes: bool) -> bool:
    for user in node.users:
        if user.op != "call_function" or not _reads_through_strides(user.target):
            return False
        args, kwargs = fx.node.map_aggregate((user.args, user.kwargs), lambda a: new_value if a is node else fake_value(a))
        try:
            user_value = user.target(*args, **kwargs)
        except Exception:  # the op rejects the layout (an impossible view, say)
            return False
        if user.target in RESHAPES and not viewable(new_value, fake_value(user)):
            if user.target is not aten.reshape.default or not copying_reshapes:
                return False  # a view eager rejects, or a reshape that would copy
        if same_layout(user_value, fake_value(user)):
            continue
        updates[user] = user_value
        if depth == 0 or not _accept(user, user_value, updates, depth - 1, copying_reshapes):
            return False
    return True


def viewable(value: torch.Tensor, result: torch.Tensor) -> bool:
    """Whether ``value`` (strided) can be viewed with ``result``'s sizes without a copy.

    Decided with ATen's own rule (``computeStride``), written out here: fake tensors and the Python
    reference of ``view`` accept some views that eager rejects (a size-1 dim between strides that do
    not chain). Symbolic sizes are not decided: no.
    """
    sizes = [concrete(x) for x in value.shape]
    strides = [concrete(x) for x in value.stride()]
    target = [concrete(x) for x in result.shape]
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


# --- shapes ---------------------------------------------------------------------------------------------------


def reshaped_dim(before: list[int], after: list[int], dim: int) -> int | None:
    """The dim of ``after`` that is ``before``'s ``dim`` kept whole by a reshape (same size, same product
    of the sizes before it), or None when the reshape splits or merges it."""
    outer = math.prod(before[:dim])
    for index, size in enumerate(after):
        if size == before[dim] and math.prod(after[:index]) == outer:
            return index
    return None


def reshape_groups(before: list[int], after: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """A reshape from ``before`` to ``after`` as its smallest runs of dims with equal products: each
    ``(dims of before, dims of after)`` is kept whole (one and one), merged (many into one), split
    (one into many) or regrouped (many into many). None when the element counts differ."""
    if math.prod(before) != math.prod(after):
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(before) or j < len(after):
        dims_before, dims_after = [], []
        size_before = size_after = 1
        while True:
            if size_before <= size_after and i < len(before) and (not dims_before or size_before != size_after):
                size_before *= before[i]
                dims_before.append(i)
                i += 1
            elif j < len(after) and (not dims_after or size_before != size_after):
                size_after *= after[j]
                dims_after.append(j)
                j += 1
            else:
                break
            if dims_before and dims_after and size_before == size_after:
                break
        if size_before != size_after:
            return None
        groups.append((dims_before, dims_after))
    return groups


# --- graph hygiene ----------------------------------------------------------------------------------------------


def erase_dead(graph: fx.Graph, nodes: Iterable[Any]) -> None:
    """Erase ``nodes`` where nothing uses them any more, and then, transitively, their inputs that this
    left unused and that are :func:`removable` or constants' reads (``get_attr``).

    ``nodes`` are what the caller replaced: they go whatever they are (a collective and its wait
    included). Their inputs go only when deleting them changes nothing (an unused random op still
    advances the generator; an unused collective is still a message other ranks wait for).
    """
    # (a node erased by an earlier call may be named again: FX marks it ``_erased``)
    replaced = {n for n in nodes if isinstance(n, fx.Node) and not getattr(n, "_erased", False)}
    work = list(replaced)
    while work:
        node = work.pop()
        if getattr(node, "_erased", False) or node.users or node.op not in ("call_function", "get_attr"):
            continue
        if node.op == "call_function" and node not in replaced and not removable(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        work.extend(inputs)


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Every unused :func:`removable` call and ``get_attr`` erased (``Graph.eliminate_dead_code``,
    deciding with :func:`removable` rather than FX's defaults)."""
    compat.eliminate_dead_code(graph, lambda node: not _unused_may_go(node))


def _unused_may_go(node: fx.Node) -> bool:
    """Whether an unused node may be erased: a removable call, or a read of a constant (``get_attr``)."""
    return node.op == "get_attr" or (node.op == "call_function" and removable(node))


def topological_sort(graph: fx.Graph) -> None:
    """Every node after its inputs, moving as few as possible (Inductor's ``stable_topological_sort``)."""
    compat.stable_topological_sort(graph)


def check_links(graph: fx.Graph) -> None:
    """Raise where a node's ``users`` disagree with the arguments that name it: a half-made rewrite
    ``graph.lint()`` does not see (it checks order and ownership), and that makes later
    ``replace_all_uses_with`` / ``erase_node`` calls or dead-code elimination go wrong."""
    in_graph = set(graph.nodes)
    inputs: dict[fx.Node, set[fx.Node]] = {}
    for node in in_graph:
        inputs[node] = set()
        fx.node.map_arg((node.args, node.kwargs), inputs[node].add)
    for node, used in inputs.items():
        for arg in used:
            if node not in arg.users:
                raise RuntimeError(f"{node.name} uses {arg.name}, whose users do not include it")
        for user in node.users:
            if user not in in_graph:
                raise RuntimeError(f"{node.name} lists {user.name} as a user, which is not in the graph")
            if node not in inputs[user]:
                raise RuntimeError(f"{node.name} lists {user.name} as a user, which does not use it")


def has_collectives(graph: fx.Graph) -> bool:
    """Whether the graph calls functional collectives (``torch.ops._c10d_functional.*``)."""
    for node in graph.nodes:
        target = node.target
        # Dynamo's graphs call the packet (``torch.ops._c10d_functional.wait_tensor``), ATen graphs the overload
        if node.op == "call_function" and isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            if str(target).startswith("_c10d_functional."):
                return True
    return False
