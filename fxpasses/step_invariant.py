"""The step-invariant folder: values that depend on no graph input, computed once while compiling.

One folder serves every pass that makes constants: ``fold_invariant`` (the tables model code
rebuilds each call) and the VSA index passes (``padded_buffer``, ``fold_gathers``), which write
their index math as ordinary graph ops and hand the graph to :func:`fold` afterwards.

Which values are step-invariant is decided by Inductor's own ``ConstantFolder`` (reached
through ``compat.ConstantFolder``): an ``fx.Interpreter`` that runs the graph with every
``placeholder`` unknown, so a node whose inputs are all known is computed from them on real
tensors, and unknown values propagate. diffopt's :class:`_Evaluator` tells it what it may run:

- Inputs: every ``placeholder`` is a runtime value. That includes the model's parameters and
  buffers, which AOT autograd lifts to inputs: weights change between calls (an in-place
  ``copy_``, a LoRA swap, a reassigned buffer), so nothing computed from them is ever cached.
  ``get_attr`` tensors (the graph's own constants, e.g. a lifted ``torch.tensor([...])``) are
  known, except parameters and Inductor's frozen parameters (``freezing``), which stand for weights.
- Ops: pure calls (``fx_utils.is_pure``: no mutation, no random draw, no data-dependent
  output; integer gathers included) that moreover do not allocate uninitialized memory
  (``empty*``: the value would be the compile-time allocation's), take a ``Generator``, draw
  Inductor's seeds or are tagged ``nondeterministic_bitwise``. These are checked before a node
  is run (``ConstantFolder.is_impure`` is asked only after, too late for a random draw).
- Static and small: the value's shape is static (a symbolic size stays in the graph) and its
  bytes are at most ``max_bytes``; larger values are not even evaluated.
- An op that raises while compiling (an index out of range, a device not present) is unknown:
  it runs, and fails, as written.

Evaluation runs in ``compat.real_mode()``: the compile's fake and functional modes off, no
autograd, and autocast off, because the graph already holds autocast's casts as ops (running
them under autocast again would round differently). Values are computed on the device and in
the dtype the graph names, so a constant is bit-identical to what the nodes compute.

Which step-invariant values become constants (one policy for every caller):

- Roots: a step-invariant value that something runtime-dependent (or the output) reads.
- Views stay in the graph: a view (``expand``, ``view``/``reshape``, ``permute``, ``slice``,
  ``select``, ``unsqueeze``, ``split`` pieces ...) of a folded value is not stored, its base is,
  and the view is taken on every call (free). An expanded broadcast is never materialized.
- Materialized broadcasts: where a value is a cheap copy (``clone``, ``repeat``, a dtype cast,
  views) of something at least ``broadcast_ratio`` times smaller, the small tensor is folded and
  the copy stays (Inductor computes it from the small tensor inside its consumers).
- Size: the constants of one graph take at most ``max_total_bytes`` together; past that,
  values stay in the graph.
- Index tables: a value computed only from index-like ops (``iota``/``arange``, ``full``,
  views, casts, copies, ``cat``, basic arithmetic, comparisons and ``where``: index tables and
  masks such as ``arange(n) < m``) stays in the graph. Inductor generates it inside its
  consumers from the element index for free, where a constant would be a memory read. A value
  that needs anything else (a gather or scatter, a sort, transcendental math, a reduction, a
  matmul, a device copy) is folded. One policy serves both callers: the VSA passes' composed
  index ``a[b]`` is a gather and their inverse map a scatter, so those are constants; the
  reshape or int64 cast of an ``arange`` they insert around them is not, as for any other table.
- Not aliased out: neither the constant nor a view of it is a graph output or written by a
  mutating op (the caller or the graph could change the stored value); a copy of it may be.
- Same layout: the constant has the sizes, strides, dtype and device the graph recorded for
  the node (a dense value with other strides is copied into the recorded strides; otherwise
  no fold).

A constant is embedded as Inductor's freezing embeds one (``replace_node_with_constant``): a
non-persistent buffer ``_diffopt_folded_<n>`` registered on the graph's ``GraphModule``, read by
a ``get_attr`` node that takes over the folded node's metadata (its fake value included). Like
freezing, the compile's fake mode is set to accept real tensors (``allow_non_fake_inputs``),
because Inductor hands a constant itself to the fake-tensor run of a fallback kernel that
reads it (SDPA's ``attn_mask``, a custom op). Inductor's FX graph cache stores the constants
with the compiled graph, so a cache hit gets them too. Dynamo's guards (static shapes, dtype,
device) decide which graph runs, so a constant is never stale: a new shape compiles a new
graph with its own constants.
"""
from __future__ import annotations

import collections
import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_symbols

from diffopt import compat
from diffopt.graph_pass import RewriteLog

from .fx_utils import elements_spanned, erase_dead, fake_value, is_pure

PREFIX = "_diffopt_folded_"

# Ops Inductor computes from the element index inside its kernels (no memory read): values made
# only of these (and views) are not worth a constant.
_CHEAP = {
    # sources
    "iota", "arange", "full", "full_like", "zeros", "zeros_like", "ones", "ones_like", "scalar_tensor",
    "new_full", "new_zeros", "new_ones", "lift_fresh_copy",
    # copies
    "clone", "convert_element_type", "_to_copy", "cat", "repeat",
    # arithmetic, rounding, comparisons, selection (masks and index tables)
    "add", "sub", "rsub", "mul", "div", "neg", "abs", "remainder", "fmod", "floor_divide", "floor", "ceil",
    "round", "trunc", "minimum", "maximum", "clamp", "clamp_min", "clamp_max", "where", "lt", "le", "gt", "ge",
    "eq", "ne", "logical_and", "logical_or", "logical_not", "logical_xor", "bitwise_and", "bitwise_or",
    "bitwise_not", "bitwise_xor",
}
# Same-device copies (and replication) that may stay in the graph on top of a folded smaller tensor.
_COPIES = {"clone", "convert_element_type", "_to_copy", "repeat"}


@dataclasses.dataclass(frozen=True)
class FoldConfig:
    """The folder's limits (``fold_invariant``'s pass options; the VSA passes use the defaults)."""

    max_bytes: int = 64 << 20  # no single value larger than this is evaluated or stored
    max_total_bytes: int = 512 << 20  # all constants of one graph together
    broadcast_ratio: int = 4  # fold the small tensor under a copy at least this many times larger


def fold(
    graph: fx.Graph,
    config: FoldConfig = FoldConfig(),
    log: RewriteLog | None = None,
    within: set[fx.Node] | None = None,
) -> dict[fx.Node, fx.Node]:
    """Replace the graph's step-invariant values by constants (module docstring); returns
    ``{folded node: its get_attr}``. Each fold goes to ``log`` if one is given. The step-invariant
    nodes the constants made unused are erased (a node that is folded too).

    ``within``: only values that these nodes read from a step-invariant chain are folded (a pass
    folding the index math it inserted, and nothing else, e.g. with ``fold_invariant`` off)."""
    owner = graph.owning_module
    if owner is None or within is not None and not within:
        return {}
    evaluator = _Evaluator(owner, config.max_bytes)
    with compat.real_mode():
        evaluator.run()
    values = evaluator.values
    invariant = set(values)
    work = [
        n for n in graph.nodes
        if n in invariant and any(u not in invariant for u in n.users) and (within is None or n in within)
    ]
    folded: dict[fx.Node, fx.Node] = {}
    tried: set[fx.Node] = set()
    total = _constant_bytes(graph)
    while work:
        root = work.pop(0)
        if root in tried:
            continue
        tried.add(root)
        chain, top = _candidates(root, invariant, config.broadcast_ratio)
        if not chain or any(node in folded for node in chain):
            continue
        if not _worth_folding(chain[0], invariant):
            continue
        for node in chain:
            if _aliased_out(node) or total + _bytes(node) > config.max_total_bytes:
                continue
            value = values.get(node)
            if not isinstance(value, torch.Tensor):
                continue
            if (value := _with_recorded_layout(value, fake_value(node))) is None:
                continue
            description = _describe(node, invariant)
            folded[node] = _replace_with_constant(graph, owner, node, value)
            total += _nbytes(value)
            if log is not None:
                log.add(
                    node,
                    replaced=f"step-invariant {description} recomputed every call",
                    by=f"constant {folded[node].target} ({_size(value)}), computed once while compiling",
                )
            break
        else:
            # Nothing on the chain may hold the value (e.g. it is a graph output): its
            # step-invariant inputs may (the op on top stays, computing from constants).
            work.extend(a for a in top.all_input_nodes if a in invariant and a.op == "call_function")
    if folded:
        erase_dead(graph, invariant)  # a constant's buffer (a get_attr) stays: a restored snapshot may read it
        _allow_real_constants(list(folded.values()))
    return folded


def computed_once(node: fx.Node, folded: dict[fx.Node, fx.Node]) -> bool:
    """Whether :func:`fold` turned ``node`` (a value a pass inserted) into a constant, or folded
    what reads it and so made it unused."""
    return node in folded or getattr(node, "_erased", False)


# --- which nodes are step-invariant: Inductor's ConstantFolder, told what it may run -----------


class _Evaluator(compat.ConstantFolder):
    """Inductor's ``ConstantFolder`` restricted to what the module docstring allows; ``values``
    holds the real value of every step-invariant node (tensors, and tuples of them)."""

    def __init__(self, owner: fx.GraphModule, max_bytes: int) -> None:
        super().__init__(owner, skip_constructors=False)  # tables start at arange / full
        # Keep every value: which node to fold is chosen after the run, among all of them.
        self.user_to_last_uses = {}
        self.max_bytes = max_bytes
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, node: fx.Node) -> Any:
        if node.op == "get_attr" and not _constant_attr(self.module, node.target):
            return self.unknown_value
        if node.op == "call_function" and not self._may_run(node):
            return self.unknown_value
        try:
            value = super().run_node(node)
        except Exception:  # e.g. an index out of range: leave it to run (and fail) as written
            return self.unknown_value
        if node.op in ("get_attr", "call_function") and value is not self.unknown_value:
            self.values[node] = value
        return value

    def _may_run(self, node: fx.Node) -> bool:
        if any(self.env.get(arg) is self.unknown_value for arg in node.all_input_nodes):
            return False
        return _may_fold(node) and _static_and_small(fake_value(node), self.max_bytes)


def _may_fold(node: fx.Node) -> bool:
    if not is_pure(node):
        return False
    target = node.target
    if target is operator.getitem:
        return True
    name = target._opname
    if "empty" in name or "rand" in name or "seed" in name or torch.Tag.nondeterministic_bitwise in target.tags:
        return False
    return not any("Generator" in str(arg.type) for arg in target._schema.arguments)


def _constant_attr(owner: torch.nn.Module, target: str) -> bool:
    value: Any = owner
    for part in target.split("."):
        value = getattr(value, part, None)
    if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter) or value.requires_grad:
        return False
    # Inductor's freezing turns parameters into get_attr constants: they still stand for weights.
    return not target.rsplit(".", 1)[-1].startswith("_frozen_param") and not getattr(value, "_is_frozen_param", False)


def _static_and_small(value: Any, max_bytes: int) -> bool:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        return False
    return not any(free_symbols(v) for v in values) and sum(_nbytes(v) for v in values) <= max_bytes


def _nbytes(value: torch.Tensor) -> int:
    return value.numel() * value.element_size()


# --- which node to fold for a root ------------------------------------------------------


def _view_source(node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` is a view of (through a ``split``/``unbind`` piece too), else ``None``."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        parent = node.args[0]
        return _view_source(parent) if isinstance(parent, fx.Node) else None
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    returns = target._schema.returns
    return node.args[0] if returns and all(r.alias_info is not None for r in returns) else None


def _same_device_copy(node: fx.Node) -> fx.Node | None:
    """The input of a ``clone``/dtype cast/``repeat`` that keeps the device, else ``None``."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if node.target._opname not in _COPIES or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source, value = fake_value(node.args[0]), fake_value(node)
    if not isinstance(source, torch.Tensor) or not isinstance(value, torch.Tensor) or source.device != value.device:
        return None
    return node.args[0]


def _candidates(root: fx.Node, invariant: set[fx.Node], ratio: int) -> tuple[list[fx.Node], fx.Node | None]:
    """Nodes that could hold ``root``'s value, best first, and the top of the chain.

    Up from ``root`` through views and same-device copies; views are never stored. The
    first copy-or-compute node up the chain comes first, unless a node further up is at
    least ``ratio`` times smaller (a materialized broadcast); the others follow as
    fall-backs (if the preferred one may not be folded, e.g. it is aliased out).
    """
    chain: list[fx.Node] = []
    node: fx.Node | None = root
    while node is not None and node in invariant and node.op == "call_function":
        source = _view_source(node)
        if source is None:
            chain.append(node)
            source = _same_device_copy(node)
        node = source
    if not chain:
        return [], None
    first = chain[0]
    smaller = [n for n in chain[1:] if _bytes(n) * ratio <= _bytes(first)]
    preferred = min(smaller, key=_bytes) if smaller else first
    return [preferred] + [n for n in chain if n is not preferred], chain[-1]


def _bytes(node: fx.Node) -> int:
    value = fake_value(node)
    return _nbytes(value) if isinstance(value, torch.Tensor) else 0


def _subgraph(node: fx.Node, invariant: set[fx.Node]) -> list[fx.Node]:
    """The step-invariant call_function nodes ``node`` is computed from, itself included."""
    seen, work = {node}, [node]
    while work:
        for arg in work.pop().all_input_nodes:
            if arg in invariant and arg.op == "call_function" and arg not in seen:
                seen.add(arg)
                work.append(arg)
    return list(seen)


def _op(node: fx.Node) -> str:
    target = node.target
    return target._opname if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def _worth_folding(node: fx.Node, invariant: set[fx.Node]) -> bool:
    if not isinstance(fake_value(node), torch.Tensor):
        return False
    for op in _subgraph(node, invariant):
        if op.target is operator.getitem or _view_source(op) is not None:
            continue
        if _op(op) == "_to_copy" and _same_device_copy(op) is None:
            return True  # a host-to-device (or device-to-host) copy every call
        if _op(op) not in _CHEAP:
            return True
    return False


def _aliased_out(node: fx.Node) -> bool:
    """Whether the value, or a view of it, reaches the graph's output, a mutation or a non-ATen call."""
    work = [node]
    while work:
        current = work.pop()
        for user in current.users:
            if user.op != "call_function":
                return True
            if user.target is operator.getitem or _view_source(user) is current:
                work.append(user)
                continue
            if not isinstance(user.target, torch._ops.OpOverload):
                return True
            if _writes(user, current):
                return True
    return False


def _writes(user: fx.Node, value: fx.Node) -> bool:
    schema = user.target._schema
    if not schema.is_mutable:
        return False
    for index, argument in enumerate(schema.arguments):
        passed = user.args[index] if index < len(user.args) else user.kwargs.get(argument.name)
        if argument.alias_info is not None and argument.alias_info.is_write and value in _leaves(passed):
            return True
    return False


def _leaves(value: Any) -> list[Any]:
    leaves: list[Any] = []
    fx.node.map_aggregate(value, leaves.append)
    return leaves


def _with_recorded_layout(value: torch.Tensor, fake: Any) -> torch.Tensor | None:
    """``value`` with the sizes, strides, dtype and device the graph recorded, or ``None``."""
    if not isinstance(fake, torch.Tensor):
        return None
    if value.dtype != fake.dtype or value.device != fake.device or tuple(value.shape) != tuple(fake.shape):
        return None
    if tuple(value.stride()) == tuple(fake.stride()) and value.storage_offset() == 0:
        if value.untyped_storage().nbytes() == _storage_bytes(value):
            return value
    if not compat.is_non_overlapping_and_dense(fake):
        return None
    with compat.real_mode():
        out = torch.empty_strided(tuple(fake.shape), tuple(fake.stride()), dtype=value.dtype, device=value.device)
        out.copy_(value)
    return out


def _storage_bytes(value: torch.Tensor) -> int:
    return elements_spanned(value.shape, value.stride()) * value.element_size()


# --- rewrite ----------------------------------------------------------------------------


def _replace_with_constant(graph: fx.Graph, owner: torch.nn.Module, node: fx.Node, value: torch.Tensor) -> fx.Node:
    """``node`` becomes a ``get_attr`` of a new buffer of ``owner`` holding ``value``."""
    index = 0
    while hasattr(owner, f"{PREFIX}{index}"):
        index += 1
    name = f"{PREFIX}{index}"
    owner.register_buffer(name, value, persistent=False)
    with graph.inserting_before(node):
        constant = graph.get_attr(name)
    constant.meta.update(node.meta)
    node.replace_all_uses_with(constant)
    return constant


def _constant_bytes(graph: fx.Graph) -> int:
    """Bytes of the constants earlier folds put in this graph (they count against ``max_total_bytes``)."""
    owner = graph.owning_module
    names = {n.target for n in graph.nodes if n.op == "get_attr" and n.target.startswith(PREFIX)}
    return sum(_nbytes(getattr(owner, name)) for name in names if isinstance(getattr(owner, name, None), torch.Tensor))


def _allow_real_constants(constants: list[fx.Node]) -> None:
    """Let the compile's fake mode meet the real constants, as Inductor's freezing does.

    Inductor passes a constant, not a fake tensor, to the fake-tensor run of a fallback kernel
    that reads it directly (``FallbackKernel.process_kernel``: SDPA's ``attn_mask``, a custom
    op); freezing compiles with ``allow_non_fake_inputs`` for that reason. The fake mode
    belongs to this compile only.
    """
    modes = {id(m): m for m in (compat.detect_fake_mode([fake_value(n) for n in constants]), compat.detect_fake_mode()) if m}
    for mode in modes.values():
        mode.allow_non_fake_inputs = True


# --- report ---------------------------------------------------------------------------------


def _describe(node: fx.Node, invariant: set[fx.Node]) -> str:
    ops = collections.Counter(
        _op(n) for n in _subgraph(node, invariant) if n.target is not operator.getitem and _view_source(n) is None
    )
    names = sorted(ops, key=lambda name: (name in _CHEAP, -ops[name], name))  # the costly ops first
    shown = ", ".join(names[:5]) + (f", +{len(names) - 5} more" if len(names) > 5 else "")
    value = fake_value(node)
    return f"table {_shape(value)} ({sum(ops.values())} ops: {shown})"


def _shape(value: torch.Tensor) -> str:
    return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"


def _size(value: torch.Tensor) -> str:
    size = float(_nbytes(value))
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""
