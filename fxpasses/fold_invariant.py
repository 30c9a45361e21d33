"""Step-invariant subgraphs -> constants computed once, while compiling.

Stock form: values that depend on no runtime tensor at all, only on literals and static
shapes, rebuilt on every call. A denoising step that builds its RoPE tables from the
config (``models/loop.py``, ``DenoiseStep``)::

    coords = torch.stack(torch.meshgrid(torch.arange(F), torch.arange(H), torch.arange(W)), -1)
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.cat([torch.outer(coords[:, i], inv_freq_i) for i in range(3)], -1)
    cos = angles.cos().repeat_interleave(2, -1).float()     # the same table every step
    sin = angles.sin().repeat_interleave(2, -1).float()

and the like: ``cat(cos, sin)`` caches, sinusoidal frequency tables
``exp(-log(10000) * arange(half) / half)``, lifted ``torch.tensor([...])`` literals pushed
through math. Post-grad these are ``iota``/``full``/``pow``/``cos``/``cat``/``clone`` ... nodes
whose inputs are all such nodes (or ``get_attr`` constants of the graph).

Optimized form: each such value is evaluated once, at compile time, by running the
graph's own nodes (the same ATen ops with the same arguments, on real tensors, on the
device and in the dtype the graph names, autocast off), so the constant is bit-identical
to what the nodes compute. It is embedded the way Inductor's freezing embeds constants
(``constant_folding.replace_node_with_constant``): a buffer registered on the graph's
``GraphModule`` (``_diffopt_folded_<n>``, non-persistent) read by a ``get_attr`` node that
takes over the folded node's metadata; like freezing, the compile's fake mode is set to
accept real inputs (``allow_non_fake_inputs``), because Inductor hands a constant itself to
the fake-tensor run of a fallback kernel that reads it (SDPA's ``attn_mask``, a custom op).
Inductor's FX graph cache stores such constants with the compiled graph, so a cache hit
gets them too.

What is folded is chosen to keep memory in check:

- Views stay in the graph: a view (``expand``, ``view``/``reshape``, ``permute``, ``slice``,
  ``select``, ``unsqueeze``, ``split`` pieces ...) of a folded value is not stored, its base
  is, and the view is taken on every call (free). An expanded broadcast is never
  materialized.
- Materialized broadcasts: where a value is a cheap copy (``clone``, ``repeat``, a dtype
  cast, views) of something at least ``broadcast_ratio`` (4) times smaller, the small tensor is folded and
  the copy stays (Inductor computes it from the small tensor inside its consumers).
- Size: no value over ``max_bytes`` (64 MB) is folded or even evaluated; the step-invariant
  inputs of such a value are folded instead, where they qualify. The constants of one graph
  take at most ``max_total_bytes`` (512 MB) together; past that, values stay in the graph.
- Worthwhile: a value computed only from index-like ops (``iota``/``arange``, ``full``,
  views, casts, copies, ``cat``, basic arithmetic, comparisons and ``where``: index tables
  and masks such as ``arange(n) < m``) is left as it is: Inductor generates it
  inside its consumers from the index for free, a constant would have to be read from
  memory. A value that needs transcendental math (``cos``/``sin``/``exp``/``pow``...),
  reductions, matmuls or a device copy is folded.

Each fold is reported (what was cached, its shape and size), so ``diffopt.explain`` lists it.

Preconditions (else the value stays in the graph):

- Runtime-independent: the value depends on no graph input. Every ``placeholder`` is a
  runtime value, and that includes the model's parameters and buffers, which AOT autograd
  lifts to inputs: weights can change between calls (an in-place ``copy_``, a LoRA swap,
  a reassigned buffer) and nothing computed from them is ever cached (plain tensor
  attributes and globals are graph inputs too). ``get_attr`` constants (tensors the graph
  itself made from literals, ``torch.tensor([...])``) count as constants, except parameters
  and Inductor's frozen parameters (``freezing``), which stand for weights.
- Static: the value's shape is static (no symbolic sizes) and every argument is a literal
  or a step-invariant node. The values are therefore a function of the graph alone, and
  Dynamo's guards (static shapes, dtype, device) decide which graph runs: a new shape or
  device compiles a new graph with its own constants, so a constant is never stale.
- Pure: every op on the way is an ATen/prims op that does not mutate, draw random numbers
  (``nondeterministic_seeded``, a ``Generator`` argument, Inductor's seeds), allocate
  uninitialized memory (``empty*``: its value would be whatever the compile-time allocation
  held) or have a data-dependent output (``.item()``, ``nonzero``).
- Not aliased out: neither the constant nor any view of it is a graph output or written by
  a mutating op (the caller or the graph could change the stored value); a copy of it may be.
- Same layout: the evaluated value has the sizes, strides, dtype and device the graph
  recorded for the node (a dense value with other strides is copied into the recorded
  strides; otherwise no fold).
- The graph has a ``GraphModule`` to hold the constants.
"""
from __future__ import annotations

import collections
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_symbols

from diffopt import compat
from diffopt.graph_pass import GraphPass, RewriteLog, Stage, fake_value

aten = torch.ops.aten
prims = torch.ops.prims

_EXCLUDED_TAGS = {
    torch.Tag.nondeterministic_seeded,
    torch.Tag.data_dependent_output,
    torch.Tag.dynamic_output_shape,
    torch.Tag.nondeterministic_bitwise,
}

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


class FoldInvariant(GraphPass):
    name = "fold_invariant"
    stage = Stage.POST_GRAD
    defaults = {"max_bytes": 64 << 20, "max_total_bytes": 512 << 20, "broadcast_ratio": 4}

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        owner = graph.owning_module
        if owner is None:
            return
        invariant = _invariant_nodes(graph, self.config["max_bytes"])
        if not invariant:
            return
        # Roots: invariant values that something runtime-dependent (or the output) reads.
        work = [n for n in graph.nodes if n in invariant and any(u not in invariant for u in n.users)]
        values = _Evaluator(owner)
        folded: dict[fx.Node, fx.Node] = {}
        tried: set[fx.Node] = set()
        total = 0
        while work:
            root = work.pop(0)
            if root in tried:
                continue
            tried.add(root)
            chain, top = _candidates(root, invariant, self.config["broadcast_ratio"])
            if not chain or any(node in folded for node in chain):
                continue
            if not _worth_folding(chain[0], invariant):
                continue
            for node in chain:
                if _aliased_out(node) or total + _bytes(node) > self.config["max_total_bytes"]:
                    continue
                value = values.get(node)
                if value is None or (value := _with_recorded_layout(value, fake_value(node))) is None:
                    continue
                folded[node] = _replace_with_constant(graph, owner, node, value)
                total += _nbytes(value)
                log.add(
                    node,
                    replaced=f"step-invariant {_describe(node, invariant)} recomputed every call",
                    by=f"constant {folded[node].target} ({_size(value)}), computed once while compiling",
                )
                break
            else:
                # Nothing on the chain may hold the value (e.g. it is a graph output): its
                # step-invariant inputs may (the op on top stays, computing from constants).
                work.extend(a for a in top.all_input_nodes if a in invariant and a.op == "call_function")
        if folded:
            _erase_dead(graph, invariant)
            _allow_real_constants(list(folded.values()))


# --- which nodes are step-invariant -----------------------------------------------------


def _invariant_nodes(graph: fx.Graph, max_bytes: int) -> set[fx.Node]:
    """Nodes whose value depends on no graph input (literals, static shapes, ``get_attr`` constants)."""
    invariant: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            if _constant_attr(graph.owning_module, node.target):
                invariant.add(node)
        elif node.op == "call_function" and _pure(node) and _static_and_small(fake_value(node), max_bytes):
            if all(arg in invariant for arg in node.all_input_nodes):
                invariant.add(node)
    return invariant


def _constant_attr(owner: torch.nn.Module | None, target: str) -> bool:
    value: Any = owner
    for part in target.split("."):
        value = getattr(value, part, None)
    if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter) or value.requires_grad:
        return False
    # Inductor's freezing turns parameters into get_attr constants: they still stand for weights.
    return not target.rsplit(".", 1)[-1].startswith("_frozen_param") and not getattr(value, "_is_frozen_param", False)


def _pure(node: fx.Node) -> bool:
    target = node.target
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in ("aten", "prims"):
        return False
    schema = target._schema
    if schema.is_mutable or _EXCLUDED_TAGS.intersection(target.tags):
        return False
    name = target._opname
    if "empty" in name or "rand" in name or "seed" in name:
        return False
    return not any("Generator" in str(arg.type) for arg in schema.arguments)


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


# --- evaluation ----------------------------------------------------------------------------


class _Evaluator:
    """Real values of step-invariant nodes: the graph's own ops run on real tensors (memoized)."""

    def __init__(self, owner: torch.nn.Module) -> None:
        self.owner = owner
        self.values: dict[fx.Node, Any] = {}

    def get(self, node: fx.Node) -> torch.Tensor | None:
        try:
            with compat.real_mode():
                value = self._value(node)
        except Exception:  # e.g. a device not present while compiling: leave the node as it is
            return None
        return value if isinstance(value, torch.Tensor) else None

    def _value(self, node: fx.Node) -> Any:
        if node in self.values:
            return self.values[node]
        # Inputs first, in graph order, without recursion (long chains).
        pending = [n for n in _subgraph(node, _Everything()) if n not in self.values]
        order = {n: i for i, n in enumerate(node.graph.nodes)}
        for current in sorted(pending, key=order.__getitem__):
            self.values[current] = self._run(current)
        return self.values[node]

    def _run(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            value: Any = self.owner
            for part in node.target.split("."):
                value = getattr(value, part)
            return value
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self._input(n))
        return node.target(*args, **kwargs)

    def _input(self, node: fx.Node) -> Any:
        if node not in self.values:
            self.values[node] = self._run(node)
        return self.values[node]


class _Everything:
    """Treat every input node as part of the subgraph (for :func:`_subgraph` during evaluation)."""

    def __contains__(self, node: object) -> bool:
        return True


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
    if value.numel() == 0:
        return 0
    span = 1 + sum((size - 1) * stride for size, stride in zip(value.shape, value.stride()))
    return span * value.element_size()


# --- rewrite ----------------------------------------------------------------------------


def _replace_with_constant(graph: fx.Graph, owner: torch.nn.Module, node: fx.Node, value: torch.Tensor) -> fx.Node:
    """``node`` becomes a ``get_attr`` of a new buffer of ``owner`` holding ``value``."""
    index = 0
    while hasattr(owner, f"_diffopt_folded_{index}"):
        index += 1
    name = f"_diffopt_folded_{index}"
    owner.register_buffer(name, value, persistent=False)
    with graph.inserting_before(node):
        constant = graph.get_attr(name)
    constant.meta.update(node.meta)
    node.replace_all_uses_with(constant)
    return constant


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


def _erase_dead(graph: fx.Graph, invariant: set[fx.Node]) -> None:
    """Erase what the constants made unused (a ``get_attr`` node too; its attribute stays)."""
    for node in reversed(graph.nodes):
        if node in invariant and not node.users:
            graph.erase_node(node)


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
