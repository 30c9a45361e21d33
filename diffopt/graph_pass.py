"""The base class of every rewrite, and the few FX helpers all rewrites share.

A pass lives in one file in ``fxpasses/``: a subclass of :class:`GraphPass` whose
docstring gives the stock form, the optimized form and the preconditions, and
whose :meth:`GraphPass.apply` matches and rewrites. It reports each rewrite to
the :class:`RewriteLog` it is given, and it never changes what the graph
computes: a precondition it cannot prove means it does not fire.
"""
from __future__ import annotations

import enum
import functools
import hashlib
import operator
import pathlib
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import compat


class Stage(enum.Enum):
    """Where a pass runs.

    PRE_GRAD: on the graph Dynamo captured (torch-level calls, before AOT
    autograd). POST_GRAD: on the functional ATen graph after Inductor's
    decompositions, installed as Inductor's ``post_grad_custom_post_pass``.
    """

    PRE_GRAD = "pre_grad"
    POST_GRAD = "post_grad"


class RewriteLog:
    """Collects what one pass rewrote in one graph."""

    def __init__(self) -> None:
        self.entries: list[dict[str, str]] = []
        self.declines: list[dict[str, str]] = []

    def add(self, anchor: fx.Node, replaced: str, by: str) -> None:
        """Record one rewrite; ``anchor`` is a node of the stock code it replaced."""
        self.entries.append(
            {"module": module_path(anchor), "source": source_line(anchor), "replaced": replaced, "by": by}
        )

    def decline(self, anchor: fx.Node, reason: str) -> None:
        """Record a stock form that was found but left as it is, and why (shown by ``explain``)."""
        self.declines.append({"module": module_path(anchor), "source": source_line(anchor), "reason": reason})

    def __len__(self) -> int:
        return len(self.entries)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of every Python file of the ``diffopt`` package and its ``fxpasses`` and ``kernels``."""
    import diffopt.fxpasses
    import diffopt.kernels

    digest = hashlib.sha256()
    for package in (sys.modules["diffopt"], diffopt.fxpasses, diffopt.kernels):
        for path in sorted(pathlib.Path(list(package.__path__)[0]).glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


class GraphPass:
    """A rewrite of one stock form into its optimized form.

    Subclasses set ``name`` and ``stage``, may declare ``defaults`` (the pass's
    options and their default values) and implement :meth:`apply`. A pass whose
    payoff depends on the machine (measured not to pay on every one we have) sets
    ``on_by_default = False``: it runs when named in the options.
    """

    name: ClassVar[str]
    stage: ClassVar[Stage]
    defaults: ClassVar[dict[str, Any]] = {}
    on_by_default: ClassVar[bool] = True
    # Rewrites of collectives: on a graph without any they cannot match, and the report says so.
    needs_collectives: ClassVar[bool] = False

    def __init__(self, **config: Any) -> None:
        unknown = sorted(set(config) - set(self.defaults))
        if unknown:
            raise ValueError(f"diffopt: pass {self.name!r} has no option(s) {unknown}; it has {sorted(self.defaults)}")
        self.config = {**self.defaults, **config}

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Changes when diffopt's code or the pass's options change (for Inductor's FX graph cache).

        The code is all of diffopt's, not the pass's module alone: a pass's result also depends on the
        shared helpers it calls and on the kernels it inserts (whose Triton source Inductor's cached
        artifact carries)."""
        return hashlib.sha256(f"{code_digest()}{type(self).__name__}{sorted(self.config.items())!r}".encode()).hexdigest()


# --- FX helpers -----------------------------------------------------------------


def has_collectives(graph: fx.Graph) -> bool:
    """Whether the graph calls functional collectives (``torch.ops._c10d_functional.*``)."""
    for node in graph.nodes:
        target = node.target
        # Dynamo's graphs call the packet (``torch.ops._c10d_functional.wait_tensor``), ATen graphs the overload
        if node.op == "call_function" and isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            if str(target).startswith("_c10d_functional."):
                return True
    return False


def is_pure(target: Any) -> bool:
    """Whether a call's result is a function of its arguments' values alone: ``getitem``, or an
    ATen/prims op that neither mutates, draws random numbers, nor has a data-dependent output
    (``.item()``, ``nonzero``: those define fresh unbacked symbols)."""
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in ("aten", "prims"):
        return False
    excluded = {torch.Tag.nondeterministic_seeded, torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape}
    return not target._schema.is_mutable and not excluded.intersection(target.tags)


def is_pure_call(node: fx.Node) -> bool:
    """:func:`is_pure` for one call: also a gather by integer index tensors (``aten.index.Tensor`` with no
    boolean mask), whose output shape is the indices' and whose values are a function of its arguments."""
    if node.op != "call_function":
        return False
    if node.target is torch.ops.aten.index.Tensor:
        indices = node.args[1]
        values = [fake_value(index) for index in indices if index is not None]
        return all(isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dtype != torch.bool for v in values)
    return is_pure(node.target)


def fake_value(node: Any) -> Any:
    """The fake tensor (or value) a node produces, if the graph recorded it."""
    if not isinstance(node, fx.Node):
        return node
    meta = node.meta
    return meta["val"] if "val" in meta else meta.get("example_value")


def insert_call(graph: fx.Graph, target: Callable[..., Any], args: tuple, origin: fx.Node, kwargs: dict | None = None) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` at the graph's insertion point.

    The new node gets a fake value computed from its inputs' fake values (so
    later passes and Inductor see correct shapes and strides), and the stack
    trace and module stack of ``origin`` (so reports point at the user's code).
    If the call raises on the fake values (an op's argument check), no node is
    left behind.
    """
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = fx.node.map_aggregate((args, kwargs), fake_value)
    mode = compat.detect_fake_mode(_leaves(fake_args, fake_kwargs))
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


def _leaves(*trees: Any) -> list[Any]:
    leaves: list[Any] = []
    fx.node.map_aggregate(trees, lambda v: leaves.append(v))
    return [v for v in leaves if isinstance(v, torch.Tensor)]


def erase_unused(graph: fx.Graph, nodes: Iterable[fx.Node]) -> None:
    """Erase those of ``nodes`` that nothing uses any more, users before producers."""
    candidates = set(nodes)
    for node in reversed(graph.nodes):
        if node in candidates and not node.users:
            graph.erase_node(node)


def erase_dead(graph: fx.Graph, roots: Iterable[Any]) -> None:
    """Erase ``roots`` and then their inputs, transitively, where nothing uses them any more.

    Only pure calls (:func:`is_pure_call`) and ``get_attr`` nodes are erased: an unused random
    draw still advances the generator, so it stays."""
    work = [r for r in roots if isinstance(r, fx.Node)]
    while work:
        node = work.pop()
        if getattr(node, "_erased", False) or node.users or node.op not in ("call_function", "get_attr"):
            continue
        if node.op == "call_function" and not is_pure_call(node):
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        work.extend(inputs)


def same_layout(new: fx.Node, old: fx.Node) -> bool:
    """Whether ``new``'s fake value has ``old``'s dtype, device, sizes and strides (consumers may rely on them)."""
    a, b = fake_value(new), fake_value(old)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    if a.dtype != b.dtype or a.device != b.device or a.dim() != b.dim():
        return False
    pairs = list(zip(a.shape, b.shape)) + [(x, y) for x, y, n in zip(a.stride(), b.stride(), b.shape) if n != 1]
    return all(statically_known_true(x == y) for x, y in pairs)


def check_links(graph: fx.Graph) -> None:
    """Raise where a node's ``users`` disagree with the arguments that name it: a half-made
    rewrite ``graph.lint()`` does not see (it checks order and ownership), and that makes later
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


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def source_line(node: fx.Node) -> str:
    """``file.py:123 code`` of the innermost user frame that produced the node."""
    trace = node.meta.get("stack_trace") or ""
    lines = trace.rstrip().splitlines()
    for index in range(len(lines) - 1, -1, -1):
        match = _FRAME.search(lines[index])
        if match:
            code = lines[index + 1].strip() if index + 1 < len(lines) else ""
            filename = match.group(1).rsplit("/", 1)[-1]
            return f"{filename}:{match.group(2)} {code}".strip()
    return ""


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost ``nn.Module`` the node came from (``""`` at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # Dynamo spells paths as L['self'].layers[0].attn or L__self___layers_0_attn.
    path = re.sub(r"^L\['self'\]\.?", "", str(path))
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = re.sub(r"(__dict__\.)?_modules\.", "", path)  # L['self'].__dict__['_modules']['blocks']
    return path.lstrip(".")


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
