"""Step-invariant values of a post-grad graph, evaluated once at compile time.

A node is *step-invariant* here when its value is a function of nothing the caller
passes: it is computed only from literals, shapes that are static integers, and
``get_attr`` constants of the graph module (e.g. a lifted ``torch.tensor([...])``), through
ATen/prims ops that neither mutate nor draw random numbers. Such a node has the same
value on every call of the compiled graph, so it can be computed once, while compiling,
and embedded as a constant. Graph inputs (``placeholder``: activations, but also module
buffers, which Dynamo lifts to inputs and which a user may reassign or update in place
between calls) are never step-invariant: work on them stays in the graph.

Used by the index passes (``fold_gathers``, ``padded_buffer``) through :func:`emit`:
insert an op, or its value as a constant when all its inputs are step-invariant.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_symbols, statically_known_true

from diffopt import compat
from diffopt.graph_pass import fake_value, insert_call

# Larger step-invariant tensors are left in the graph (not materialized while compiling).
MAX_CONSTANT_NUMEL = 1 << 24

_NOT_CONSTANT = object()

# Names of the constants this module creates (``constant_node``); only these are deleted when unused.
_OWN_STEMS = ("index", "scatter_source", "scatter_valid")
_OWN_PREFIXES = tuple(f"_diffopt_{stem}_" for stem in _OWN_STEMS)


class Constants:
    """Memoized compile-time values of the step-invariant nodes of one graph."""

    def __init__(self, graph: fx.Graph, max_numel: int = MAX_CONSTANT_NUMEL) -> None:
        self.graph = graph
        self.max_numel = max_numel
        self._values: dict[fx.Node, Any] = {}
        self._count = 0

    def value(self, node: Any) -> Any:
        """The real value of ``node`` (a tensor, or a literal), or ``None`` if it is not step-invariant."""
        result = self._value(node)
        return None if result is _NOT_CONSTANT else result

    def is_constant(self, node: Any) -> bool:
        return self._value(node) is not _NOT_CONSTANT

    def _value(self, node: Any) -> Any:
        if not isinstance(node, fx.Node):
            return _literal(node, self)
        # Inputs before users, with an explicit stack (long chains must not hit the recursion limit).
        stack = [(node, False)]
        while stack:
            current, inputs_done = stack.pop()
            if current in self._values:
                continue
            if inputs_done or not self._candidate(current):
                self._values[current] = self._evaluate(current) if self._candidate(current) else _NOT_CONSTANT
                continue
            stack.append((current, True))
            stack.extend((i, False) for i in current.all_input_nodes if i not in self._values)
        return self._values[node]

    def _candidate(self, node: fx.Node) -> bool:
        """Whether ``node`` may be step-invariant at all (before looking at its inputs)."""
        if node.op == "get_attr":
            return True
        return node.op == "call_function" and _pure(node.target) and _small_static(fake_value(node), self.max_numel)

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            owner = self.graph.owning_module
            value = _get_attr(owner, node.target) if owner is not None else None
            # Parameters (also Inductor's frozen ones) stand for weights: never constants.
            if isinstance(value, torch.nn.Parameter) or node.target.startswith("_frozen_param"):
                return _NOT_CONSTANT
            return value if isinstance(value, torch.Tensor) and not value.requires_grad else _NOT_CONSTANT
        args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), self._value)
        leaves: list[Any] = []
        fx.node.map_aggregate((args, kwargs), leaves.append)
        if any(leaf is _NOT_CONSTANT for leaf in leaves):
            return _NOT_CONSTANT
        try:
            return _run(node.target, args, kwargs)
        except Exception:  # e.g. an index out of range: leave it to run (and fail) as written
            return _NOT_CONSTANT

    def remember(self, node: fx.Node, value: torch.Tensor) -> None:
        self._values[node] = value

    def new_name(self, stem: str) -> str:
        owner = self.graph.owning_module
        while True:
            name = f"_diffopt_{stem}_{self._count}"
            self._count += 1
            if owner is None or not hasattr(owner, name):
                return name


def emit(
    graph: fx.Graph,
    consts: Constants,
    target: Any,
    args: tuple,
    origin: fx.Node,
    kwargs: dict | None = None,
    stem: str = "index",
) -> tuple[fx.Node, bool]:
    """Insert ``target(*args, **kwargs)`` at the insertion point; returns ``(node, is_constant)``.

    When every input is step-invariant (see the module docstring) and the graph has a
    module to hold it, the value is computed now and inserted as a ``get_attr`` constant
    instead of the op: computed once, not on every call.
    """
    kwargs = kwargs or {}
    real_args, real_kwargs = fx.node.map_aggregate((args, kwargs), consts._value)
    leaves: list[Any] = []
    fx.node.map_aggregate((real_args, real_kwargs), leaves.append)
    mode = compat.detect_fake_mode([fake_value(origin)])
    if graph.owning_module is not None and mode is not None and all(leaf is not _NOT_CONSTANT for leaf in leaves):
        try:
            value = _run(target, real_args, real_kwargs)
        except Exception:
            value = None
        if isinstance(value, torch.Tensor) and value.numel() <= consts.max_numel:
            return constant_node(graph, consts, value, origin, stem), True
    return insert_call(graph, target, args, origin, kwargs), False


def constant_node(graph: fx.Graph, consts: Constants, value: torch.Tensor, origin: fx.Node, stem: str) -> fx.Node:
    """A ``get_attr`` node holding ``value`` (a new attribute of the graph's module)."""
    name = consts.new_name(stem)
    graph.owning_module.register_buffer(name, value.contiguous(), persistent=False)
    node = graph.get_attr(name)
    mode = compat.detect_fake_mode([fake_value(origin)])
    node.meta["val"] = mode.from_tensor(value.contiguous(), static_shapes=True)
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in origin.meta:
            node.meta[key] = origin.meta[key]
    consts.remember(node, value.contiguous())
    return node


def _literal(value: Any, consts: Constants) -> Any:
    if isinstance(value, (list, tuple)):
        items = [consts._value(v) for v in value]
        if any(item is _NOT_CONSTANT for item in items):
            return _NOT_CONSTANT
        return type(value)(items)
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        return _NOT_CONSTANT
    return value


def _pure(target: Any) -> bool:
    """Deterministic, non-mutating ATen/prims ops whose result is defined (not ``empty``'s memory)."""
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in ("aten", "prims"):
        return False
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    if any(arg.type.kind() == "GeneratorType" or "Generator" in str(arg.type) for arg in target._schema.arguments):
        return False
    # Inductor's random ops (inductor_random/randint/lookup_seed) are not tagged as seeded.
    return "empty" not in target._opname and not target._opname.startswith("inductor_")


def _run(target: Any, args: Any, kwargs: Any) -> Any:
    """``target(*args, **kwargs)`` on real tensors, whatever fake/functional modes are active."""
    with compat.real_mode():
        return target(*args, **kwargs)


def _small_static(fake: Any, max_numel: int) -> bool:
    values = fake if isinstance(fake, (list, tuple)) else [fake]
    for value in values:
        if isinstance(value, torch.Tensor):
            if free_symbols(value) or value.numel() > max_numel:
                return False
        elif isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
            return False
    return True


def _get_attr(module: torch.nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def erase_dead(graph: fx.Graph, roots: list[Any]) -> None:
    """Erase ``roots`` and their inputs, transitively, where nothing uses them any more.

    Only deterministic, non-mutating ops and ``get_attr`` nodes are erased (an unused
    random op still advances the generator, so it stays).
    """
    work = [r for r in roots if isinstance(r, fx.Node)]
    while work:
        node = work.pop()
        if getattr(node, "_erased", False) or node.users or node.op not in ("call_function", "get_attr"):
            continue
        if node.op == "call_function" and not _pure(node.target):
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        work.extend(inputs)
        owner = graph.owning_module
        if node.op == "get_attr" and node.target.startswith(_OWN_PREFIXES) and owner is not None:
            if not any(n.op == "get_attr" and n.target == node.target for n in graph.nodes):
                delattr(owner, node.target)  # a constant this pass made and no longer uses


def same_layout(new: fx.Node, old: fx.Node) -> bool:
    """Whether ``new``'s fake value has ``old``'s dtype, sizes and strides (consumers may rely on them)."""
    a, b = fake_value(new), fake_value(old)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    if a.dtype != b.dtype or a.device != b.device or a.dim() != b.dim():
        return False
    pairs = list(zip(a.shape, b.shape)) + [(x, y) for x, y, n in zip(a.stride(), b.stride(), b.shape) if n != 1]
    return all(statically_known_true(x == y) for x, y in pairs)
