"""diffopt's Triton-backed ops -> their Triton launch, in the graph Inductor compiles.

Stock form (as earlier passes leave it): a call of a diffopt op whose CUDA kernel
is ours in Triton, e.g. ``torch.ops.diffopt.qk_norm_rope(q, k, ...)``. Inductor
sees an opaque call: the op allocates its outputs itself, so Inductor can neither
plan nor reuse those buffers, and every call pays the dispatcher's host time.

Optimized form: the op's own launch traced through ``torch.library.wrap_triton``
(``kernels.qk_norm_rope_triton.qk_norm_rope_traceable``): ``empty_strided``
output buffers plus Inductor's user-defined Triton kernel node
(``triton_kernel_wrapper_functional``). Inductor then allocates, reuses and frees
those buffers like its own and launches the kernel from its generated code. The
kernel, its arguments and its outputs' sizes, strides and dtypes are the op's, so
the graph computes exactly what it did.

An output whose only reader is a ``cat`` (through reshapes), as Cosmos3's rotated
generation K ahead of its attention (``cat([k_und, k_gen])``): the kernel writes it
straight into the cat's buffer, which is built with zeros in that block, so the
result is not first written to a buffer of its own and then copied; this is what
Inductor does with the stock rotation's elementwise code. The cat's value is the
same: every element of the block is written by the kernel. Only where the block is
one dense run of the cat's buffer laid out as the op's output (every dim before the
cat's is 1, all of it contiguous, one dtype) and where no other operand of the cat is
computed from the op (the buffer would need the launch that fills it); else the output
gets its own buffer.

A table that many launches read, computed in the graph and reaching each launch as
a view (Cosmos3's and Wan's RoPE tables, sliced per layer from one computation): it
is computed once, into a contiguous buffer all those launches read. Inductor realizes
each view argument of a user-defined kernel on its own, so every layer recomputed
its tables into buffers of its own, two layers' worth live at a time, with their
source kept live to the last layer. The values are the same (views of one pure
computation with the same view ops); only where each launch's argument is such a
view of a computed tensor (not of a graph input, which is a buffer already).

Preconditions (else the op call stays, with the reason in the report):

- the call runs on CUDA and Triton is installed (the op's CUDA implementation is
  then this kernel);
- every size and stride of its inputs is known at compile time (the launch grid
  and the kernel's integer arguments are computed from them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from diffopt import compat
from diffopt.graph_pass import GraphPass, RewriteLog, Stage

from .fx_utils import ORDER_KEEPING_VIEWS, fake_value, is_view, leaves, same_layout, topological_sort


@dataclasses.dataclass(frozen=True)
class _Launch:
    """An op's traceable Triton launch: which op arguments its outputs correspond to (and may overwrite
    in place), and the kernel parameters that are those outputs."""

    trace: Callable[..., Any]
    inputs_of_outputs: tuple[int, ...]  # op argument index of the input each output has the shape of
    output_params: tuple[str, ...]
    tables: tuple[int, ...]  # op argument indexes of read-only inputs that many launches may share


def _traceable_launches() -> dict[Any, _Launch]:
    try:
        from diffopt.kernels.qk_norm_rope_triton import OUTPUT_PARAMS, qk_norm_rope_traceable
    except Exception:  # no Triton: every op keeps its own dispatch
        return {}
    return {torch.ops.diffopt.qk_norm_rope.default: _Launch(qk_norm_rope_traceable, (0, 1), OUTPUT_PARAMS, (4, 5))}


class InlineTriton(GraphPass):
    name = "inline_triton"
    stage = Stage.POST_GRAD
    after = ("qk_norm_rope",)  # it inlines the op qk_norm_rope inserts

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        launches = _traceable_launches()
        inlinable = []
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in launches:
                continue
            reason = _not_inlinable(node)
            if reason:
                log.decline(node, reason)
                continue
            inlinable.append(node)
        shared: dict[fx.Node, int] = {}  # launch -> how many launches share a table it reads
        for table, readers in _shared_tables(inlinable, launches).items():
            _materialize_once(graph, table, readers)
            sharing = len({node for node, _ in readers})
            for node, _ in readers:
                shared[node] = max(shared.get(node, 0), sharing)
        reordered = False
        for node in inlinable:
            into = _inline(graph, node, launches[node.target])
            reordered |= into > 0
            by = "its Triton kernel, buffers planned by Inductor" + (", written into the cat that reads it" * (into > 0))
            if node in shared:
                by += f", its tables computed once for {shared[node]} launches"
            log.add(node, replaced=f"opaque call of {node.target.name()}", by=by)
        if reordered:  # a cat's other operands may be computed after the launch that now fills it
            topological_sort(graph)


def _view_step(node: fx.Node) -> bool:
    """A view op, or the pick of one view from an op that returns several (``split``, ``unbind``)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and is_view(node.args[0])
    return is_view(node)


def _view_chain(value: Any) -> tuple | None:
    """``value``'s expression as views of a computed tensor (the key of equal values): None unless it is
    a view, through view steps with constant arguments only, of a call's result that nothing mutates,
    and no larger than it (an ``expand`` would become a copy B times the table). A view of a graph input
    or constant is a buffer already."""
    if not isinstance(value, fx.Node) or not _view_step(value):
        return None
    chain, node = [], value
    while _view_step(node):
        rest = (node.args[1:], node.kwargs)
        if not isinstance(node.args[0], fx.Node) or any(isinstance(a, fx.Node) for a in leaves(rest)):
            return None
        chain.append((node.target, repr(rest)))
        node = node.args[0]
    base, table = fake_value(node), fake_value(value)
    if node.op != "call_function" or _mutated(node) or not isinstance(base, torch.Tensor) or table.numel() > base.numel():
        return None
    return (node, *reversed(chain))


def _mutated(base: fx.Node) -> bool:
    """Whether an op that may mutate its inputs reads ``base`` or a view of it (an op with a mutable
    schema, or one without a schema, such as a higher-order op)."""
    todo, seen = [base], set()
    while todo:
        node = todo.pop()
        for user in node.users:
            if user.op != "call_function" or user in seen:
                continue
            if _view_step(user):
                seen.add(user)
                todo.append(user)
                continue
            schema = getattr(user.target, "_schema", None)
            if schema is None and user.target is not operator.getitem or schema is not None and schema.is_mutable:
                return True
    return False


def _shared_tables(nodes: list[fx.Node], launches: dict[Any, _Launch]) -> dict[fx.Node, list[tuple[fx.Node, int]]]:
    """The table arguments read by several launches as equal views of one computed tensor: the first
    such argument node (in graph order), with every (launch, argument index) that reads its value."""
    groups: dict[tuple, list[tuple[fx.Node, int]]] = {}
    for node in nodes:
        for index in launches[node.target].tables:
            key = _view_chain(node.args[index])
            if key is not None:
                groups.setdefault(key, []).append((node, index))
    return {readers[0][0].args[readers[0][1]]: readers for readers in groups.values() if len(readers) > 1}


def _materialize_once(graph: fx.Graph, table: fx.Node, readers: list[tuple[fx.Node, int]]) -> None:
    """One contiguous copy of ``table`` for all ``readers``: a clone with its strides forced.

    The clone alone is not enough: Inductor inlines it, and each launch (a user-defined kernel, which
    needs fixed strides) then realizes its own copy. Forcing the strides makes it one buffer that every
    launch reads; the clone under it is what Inductor copies into those strides, whatever the table is a
    view of (this form ran on the GPU). With symbolic strides (which the prim cannot take as graph
    arguments) it is the clone alone."""
    value = fake_value(table).clone(memory_format=torch.contiguous_format)
    strides = list(value.stride())
    with graph.inserting_after(table):
        buffer = graph.call_function(torch.ops.aten.clone.default, (table,), {"memory_format": torch.contiguous_format})
    inserted = [buffer]
    if all(isinstance(stride, int) for stride in strides):
        with graph.inserting_after(buffer):
            buffer = graph.call_function(compat.force_stride_order(), (buffer, strides))
        inserted.append(buffer)
    for node in inserted:
        node.meta["val"] = value
        for key in ("stack_trace", "nn_module_stack"):
            if key in table.meta:
                node.meta[key] = table.meta[key]
    for node, index in readers:
        node.update_arg(index, buffer)


def _tensor_args(node: fx.Node) -> list[torch.Tensor]:
    return [fake_value(a) for a in node.all_input_nodes if isinstance(fake_value(a), torch.Tensor)]


def _not_inlinable(node: fx.Node) -> str | None:
    tensors = _tensor_args(node)
    if not tensors or any(t.device.type != "cuda" for t in tensors):
        return "inputs are not on CUDA"
    outputs = fake_value(node)
    for t in [*tensors, *outputs]:
        if not all(is_concrete_int(v) for v in (*t.shape, *t.stride(), t.storage_offset())):
            return "symbolic sizes or strides (the launch is computed from them)"
    return None


@dataclasses.dataclass(frozen=True)
class _CatExit:
    """An output read only by ``cat`` (through ``chain``, the getitem and reshapes), as one dense block of it."""

    cat: fx.Node
    chain: tuple[fx.Node, ...]  # getitem, then the reshapes, in order
    offset: int  # element offset of the block in the cat's buffer


def _cat_exit(node: fx.Node, index: int, out: torch.Tensor) -> _CatExit | None:
    getitems = [u for u in node.users if u.target is operator.getitem and u.args[1] == index]
    if len(getitems) != 1:
        return None
    chain = [getitems[0]]
    while len(chain[-1].users) == 1 and next(iter(chain[-1].users)).target in ORDER_KEEPING_VIEWS:
        chain.append(next(iter(chain[-1].users)))
    end = chain[-1]
    if len(end.users) != 1:
        return None
    cat = next(iter(end.users))
    if cat.target is not torch.ops.aten.cat.default or [a for a in cat.args[0] if a is end] != [end]:
        return None
    operands, result = [fake_value(a) for a in cat.args[0]], fake_value(cat)
    dim = (cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)) % result.dim()
    if not (
        all(isinstance(v, torch.Tensor) and v.dim() == result.dim() and v.dtype == out.dtype for v in [*operands, result])
        and all(v.is_contiguous() for v in (out, fake_value(end), result))
        and all(size == 1 for size in result.shape[:dim])
    ):
        return None
    if any(_depends_on(a, node) for a in cat.args[0] if a is not end):  # the buffer would need the launch
        return None
    before = sum(v.shape[dim] for v in operands[: cat.args[0].index(end)])
    return _CatExit(cat, tuple(chain), before * result.stride(dim))


def _depends_on(value: Any, node: fx.Node) -> bool:
    """Whether ``value`` is computed from ``node``."""
    todo, seen = [value], set()
    while todo:
        current = todo.pop()
        if current is node:
            return True
        if isinstance(current, fx.Node) and current not in seen:
            seen.add(current)
            todo.extend(current.all_input_nodes)
    return False


def _zeros_in_place_of(graph: fx.Graph, exit: _CatExit) -> fx.Node:
    """The cat with zeros where the output goes (Inductor writes the zeros into the cat's own buffer)."""
    end = exit.chain[-1]
    value = fake_value(end)
    with graph.inserting_before(exit.cat):
        zeros = graph.call_function(
            torch.ops.aten.full.default, (list(value.shape), 0),
            {"dtype": value.dtype, "layout": torch.strided, "device": value.device, "pin_memory": False},
        )
        zeros.meta["val"] = torch.zeros_like(value)
        operands = [zeros if a is end else a for a in exit.cat.args[0]]
        buffer = graph.call_function(torch.ops.aten.cat.default, (operands, *exit.cat.args[1:]), dict(exit.cat.kwargs))
        buffer.meta.update({k: v for k, v in exit.cat.meta.items() if k in ("val", "stack_trace", "nn_module_stack")})
    return buffer


def _inline(graph: fx.Graph, node: fx.Node, launch: _Launch) -> int:
    """Replace ``node`` by the graph of ``launch`` traced on the node's fake inputs; returns how many of
    its outputs it writes into the cat that reads them."""
    arg_nodes = [a for a in node.args if isinstance(a, fx.Node)]
    results = fake_value(node)
    # (two outputs read by one cat: each is the other's operand that depends on the launch, so neither exits)
    exits = [_cat_exit(node, i, out) for i, out in enumerate(results)]
    buffers = [None if exit is None else _zeros_in_place_of(graph, exit) for exit in exits]
    in_place = tuple(
        exit is None and _owned_like(node.args[i], out) for i, out, exit in zip(launch.inputs_of_outputs, results, exits)
    )
    into = tuple(None if exit is None else (buffer, exit.offset) for exit, buffer in zip(exits, buffers))
    traced = _trace(launch, node, arg_nodes, in_place, into)
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    inputs = [*arg_nodes, *(buffer for buffer in buffers if buffer is not None)]
    with graph.inserting_before(node):
        outputs = graph.graph_copy(traced.graph, dict(zip(placeholders, inputs)))
    for new in outputs:
        for key in ("stack_trace", "nn_module_stack"):
            if key in node.meta:
                new.meta.setdefault(key, node.meta[key])
    for exit, output in zip(exits, outputs):
        if exit is not None:  # the cat's value is now the filled buffer
            exit.cat.replace_all_uses_with(output)
            for dead in (exit.cat, *reversed(exit.chain)):
                graph.erase_node(dead)
    for user in list(node.users):  # getitem(node, i) of the outputs with buffers of their own
        user.replace_all_uses_with(outputs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)
    return sum(exit is not None for exit in exits)


def _owned_like(arg: Any, out: torch.Tensor) -> bool:
    """Whether the output may overwrite ``arg``: an intermediate buffer (not a graph input, parameter or
    view of one) that only this call reads, with the output's sizes, strides and dtype. Inductor's
    reinplacing makes the final call (a copy would be kept if it found another reader)."""
    node = arg
    while isinstance(node, fx.Node):
        if node.op != "call_function" or len(node.users) != 1:
            return False
        if not is_view(node):  # the buffer itself: a computed intermediate
            break
        node = node.args[0]  # a view (a reshape, a permute...): its base must be owned too
    return isinstance(node, fx.Node) and same_layout(arg, out) and fake_value(arg).storage_offset() == 0


def _like(value: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)


def _trace(launch: _Launch, node: fx.Node, arg_nodes: list[fx.Node], in_place: tuple[bool, ...],
           into: tuple[tuple[fx.Node, int] | None, ...]) -> fx.GraphModule:
    """The launch traced with make_fx (decomposed as Inductor's post-grad graphs are), its kernel call made
    functional: the kernel writes only its outputs, so those are the tensors to clone, and Inductor's
    reinplacing drops each clone whose buffer nothing else reads (a fresh buffer, an input owned here, or
    a cat's buffer it fills). Placeholders: the node's tensor arguments, then the ``into`` buffers."""
    from torch.fx.experimental.proxy_tensor import make_fx

    triton_kernel_wrapper_functional, triton_kernel_wrapper_mutation = compat.triton_kernel_nodes()

    layout = [isinstance(a, fx.Node) for a in node.args]
    constants = [a for a in node.args if not isinstance(a, fx.Node)]

    def call(*tensors):
        it, consts = iter(tensors), iter(constants)
        args = [next(it) if is_node else next(consts) for is_node in layout]
        targets = tuple(None if dst is None else (next(it), dst[1]) for dst in into)
        return launch.trace(*args, **node.kwargs, in_place=in_place, into=targets)

    fakes = [fake_value(a) for a in [*arg_nodes, *(dst[0] for dst in into if dst is not None)]]
    with compat.detect_fake_mode(fakes) or contextlib.nullcontext():
        traced = make_fx(call, compat.inductor_decompositions())(*fakes)
        graph = traced.graph
        (launch_node,) = [n for n in graph.nodes if n.target is triton_kernel_wrapper_mutation]
        params = launch_node.kwargs["kwargs"]
        # the functional node's results are new tensors with the clobbered buffers' metadata
        values = {name: _like(fake_value(params[name])) for name in launch.output_params}
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_after(launch_node):
        functional = graph.call_function(
            triton_kernel_wrapper_functional, (), {**launch_node.kwargs, "tensors_to_clone": list(launch.output_params)}
        )
        functional.meta["val"] = values
        with graph.inserting_after(functional):
            results = []
            for name in launch.output_params:
                results.append(graph.call_function(operator.getitem, (functional, name)))
                results[-1].meta["val"] = values[name]
    output.args = (tuple(results),)
    graph.erase_node(launch_node)
    graph.eliminate_dead_code()
    graph.lint()
    return traced
