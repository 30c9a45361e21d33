"""Captured scalars: the Dynamo config diffopt traces under, and what keeps it from breaking programs.

diffopt traces with ``torch._dynamo.config`` patched with :data:`DYNAMO_CONFIG`, today
``capture_scalar_outputs=True``: ``t.item()`` (and ``int(t.flatten()[0].item())``,
``t.cpu().item()``) is captured into the graph as ``aten._local_scalar_dense`` instead of
breaking it, so the whole denoising step is one graph and the ``hoist_item`` pass can
deduplicate, move or remove the device-to-host read. The patch is :func:`dynamo_config`, the
backend's ``backend_ctx_ctor``, which Dynamo enters around tracing and running of every frame
it compiles with this backend (nothing is set process-wide). ``torch.compile`` wraps every
non-inductor backend in ``torch._TorchCompileWrapper``, which drops that attribute (torch 2.0
to 2.13); :func:`install` has Dynamo's backend lookup carry it over when the backend inside
the wrapper (by name, callable or ``functools.partial``) is diffopt's. Should torch have no
such lookup, the config is set process-wide instead.

Capturing must never turn a program that compiles with ``backend="inductor"`` into one that
does not, or into one that computes something else. Four things keep it so:

- Integer reads. ``int(t.item())`` (``math.trunc``, ``math.floor``, ``math.ceil``, ``round``)
  of a floating-point ``t`` is, captured, a symbol ``TruncToInt(zuf0)`` of a float symbol, and
  Inductor's generated Python prints that expression where it needs a plain symbol (the
  index of ``table[i]``, the start of a ``narrow``): ``NameError: name 'TruncToInt' is not
  defined`` at the first call (torch 2.11 to 2.13). :func:`integer_reads` rewrites it, in the
  Dynamo graph, into the read of an integer tensor, ``torch.trunc(t).to(torch.int64).item()``
  (``floor``/``ceil``/``round`` alike; ``round`` is half-to-even in both): Python's number
  wherever it fits int64. Beyond (NaN and infinities, where ``int()`` raises, and magnitudes
  from 2**63, no index or size of any tensor) the cast's result is the platform's. ``hoist_item``
  then treats it as any integer read: on the device where only tensor math uses it. Rounding
  any other float expression (``int(t.item() * 1000)``) has no such exact tensor form: the
  graph is refused with :class:`ScalarCaptureUnsupported`, and its frame is compiled again
  without capture, as below.
- Scaled scalar operands. ``x.add(t.item(), alpha=3)`` (``sub``, ``add_``, ``sub_``,
  ``torch.add``, ``torch.sub`` and ``torch.rsub`` alike) with a captured float computes
  ``x + t.item()``: torch's pass that turns symbolic floats into tensors
  (``_tensorify_python_scalars``) drops the ``alpha``, silently (torch 2.13 and before).
  :func:`scaled_scalar_operands` refuses such a graph, and its frame is compiled again without
  capture: the read breaks the graph and the float reaches the rest as a number, as under
  Inductor. No exact rewrite keeps it captured: ``x + s * alpha`` rounds ``s * alpha`` once where
  the kernel rounds ``alpha`` and ``s`` apart. (A float argument that torch makes dynamic, on a
  later call with another value, loses its alpha the same way with plain Inductor.)
- Views at captured offsets. ``(x * 2)[t]``, ``y[t:t + 2]``, ``y.narrow(0, t, n)`` of a computed
  tensor, ``t`` captured: Inductor lowers the view from the strides its input has while still
  being laid out, then may lay the input out in another order (a transposed input's), so the
  view reads other elements, silently (found with torch 2.13 on CPU). :func:`fix_layouts_under_unbacked_views`
  fixes such an input's layout to its eager strides first, in the post-grad graph Inductor
  lowers; with symbolic strides it refuses the graph, which is compiled again without capture.
- Frames that do not trace. Captured, ``prefix_len = int(mask.sum())`` is an unbacked symbol,
  and ``ids[:prefix_len].tolist()`` cannot be traced (``GuardOnDataDependentSymNode``: the
  list's length depends on data); uncaptured, the read breaks the graph and the rest traces
  with a real number. A frame that fails to compile with captured scalars (or whose graph was
  refused) is compiled again with the user's Dynamo config, the one Inductor would trace it
  with; where that works, the ``diffopt`` logger warns, naming the frame and the error, and
  where it fails too, Dynamo handles that failure as it would with Inductor. Other frames keep
  capturing. Compiling a captured graph can fail the same way: ``torch.lerp(x, y, t.item())``
  decomposes into a branch on the weight (``GuardOnDataDependentSymNode`` inside the backend), so
  that failure is retried too. Any other error while compiling a graph that was captured
  (``BackendCompilerFailed``: Inductor, or a diffopt pass under ``strict``, whose error is
  diffopt's ``PassFailed`` whatever the pass raised) is not. This needs
  ``torch.compile`` without ``fullgraph`` (with it, a graph break is an error).

Where the user sets ``capture_scalar_outputs=True`` themselves, their frames are captured as they
asked, and a failure is theirs as under Inductor, but for a graph diffopt refuses: Inductor
would compile that one and compute something else, so its frame is compiled without capturing
(a graph break at each read), with the same warning.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, free_unbacked_symbols

from . import compat
from .fxpasses.fx_utils import fake_value, is_view, unbacked_symbols
from .graph_pass import source_line

log = logging.getLogger("diffopt")

DYNAMO_CONFIG: dict[str, Any] = {"capture_scalar_outputs": True}

# The user's values of DYNAMO_CONFIG's keys while dynamo_config() replaces them (None otherwise).
_user_config: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("diffopt_user_config", default=None)


@contextlib.contextmanager
def dynamo_config() -> Iterator[None]:
    """Patches ``torch._dynamo.config`` with :data:`DYNAMO_CONFIG` (the backend's ``backend_ctx_ctor``).

    Dynamo enters it on every call of a compiled frame, so it does the least it can: nothing
    when the config already holds those values.
    """
    config = torch._dynamo.config
    previous = {key: getattr(config, key) for key in DYNAMO_CONFIG}
    if previous == DYNAMO_CONFIG:
        yield
        return
    for key, value in DYNAMO_CONFIG.items():
        setattr(config, key, value)
    token = _user_config.set(previous)
    try:
        yield
    finally:
        _user_config.reset(token)
        for key, value in previous.items():
            setattr(config, key, value)


class ScalarCaptureUnsupported(RuntimeError):
    """A captured graph Inductor is known to mishandle; its frame is compiled without capture."""


def compile_frame(code: Any, convert: Callable[[], Any]) -> Any:
    """Convert one frame Dynamo compiles with diffopt: with captured scalars, or else without.

    Where capturing is diffopt's setting, a frame that fails with it is compiled with the user's
    own config, as Inductor would compile it. Where it is the user's own setting, only a graph
    diffopt refuses (:class:`ScalarCaptureUnsupported`: torch would compile it wrong) is compiled
    without capturing, a graph break at each read; any other failure is the user's, as under
    Inductor."""
    user_config = _user_config.get()
    retried: tuple[type[Exception], ...] = (
        (ScalarCaptureUnsupported, GuardOnDataDependentSymNode) if user_config is not None else (ScalarCaptureUnsupported,)
    )
    try:
        return convert()
    except compat.BackendCompilerFailed as error:
        cause = getattr(error, "inner_exception", None) or error.__cause__
        if not isinstance(cause, retried):
            raise
        failure: Exception = cause
    except Exception as error:
        if user_config is None:
            raise
        failure = error
    fallback = user_config if user_config is not None else {key: False for key in DYNAMO_CONFIG}
    with torch._dynamo.config.patch(fallback):
        converted = convert()  # with the user's config, what this raises Inductor would have raised too
    log.warning(
        "diffopt: %s (%s:%d) does not compile with captured scalars (%s: %s); compiled %s, with %s",
        code.co_name,
        os.path.basename(code.co_filename),
        code.co_firstlineno,
        type(failure).__name__,
        (str(failure).strip().splitlines() or [""])[0],
        "as Inductor does" if user_config is not None else "without them (your capture_scalar_outputs=True set aside)",
        ", ".join(f"{key}={value}" for key, value in fallback.items()),
    )
    return converted


# --- scaled scalar operands --------------------------------------------------------------------

# ``x.add(other, alpha=...)`` and its kin, as a Dynamo graph names them (methods, torch functions,
# ATen ops called directly).
_ALPHA_METHODS = ("add", "add_", "sub", "sub_", "subtract", "subtract_")
_ALPHA_FUNCTIONS = {torch.add, torch.sub, torch.subtract, torch.rsub, *(getattr(torch.Tensor, name) for name in _ALPHA_METHODS)}
_ALPHA_OPS = {torch.ops.aten.add, torch.ops.aten.add_, torch.ops.aten.sub, torch.ops.aten.sub_, torch.ops.aten.rsub}


def scaled_scalar_operands(gm: fx.GraphModule) -> None:
    """Refuse the graph where a float computed from captured ``.item()`` reads is an operand of an
    add, sub or rsub with an ``alpha``: torch's compile would drop the alpha."""
    for node in gm.graph.nodes:
        if not _takes_alpha(node) or node.kwargs.get("alpha", 1) == 1:
            continue
        operands = [*node.args[:2], *(node.kwargs.get(name) for name in ("input", "self", "other"))]
        if any(isinstance(value := fake_value(operand), torch.SymFloat) and free_unbacked_symbols(value)
               for operand in operands):
            raise ScalarCaptureUnsupported(
                f"{source_line(node) or node.name}: adds a float computed from captured .item() reads "
                f"with alpha={node.kwargs['alpha']}, which torch's compile drops"
            )


def _takes_alpha(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _ALPHA_METHODS
    try:
        return node.op == "call_function" and (
            node.target in _ALPHA_FUNCTIONS or getattr(node.target, "overloadpacket", node.target) in _ALPHA_OPS
        )
    except TypeError:  # an unhashable target
        return False


# --- views at captured offsets -------------------------------------------------------------------


def fix_layouts_under_unbacked_views(graph: fx.Graph) -> int:
    """Give every computed tensor that a view at a captured offset reads (``table[t]``, ``x[t:t + 2]``,
    ``x.narrow(0, t, n)`` with ``t`` from ``.item()``) its eager strides as a fixed layout, in the
    post-grad graph Inductor lowers; the number of tensors fixed.

    Inductor lowers such a view from the strides its input has while it is still being laid out, and
    may then lay the input out in another order (in the order of a transposed input it is computed
    from), so the view reads other elements than eager's (found with torch 2.13 on CPU, where
    ``(x * 2)[t]`` of a transposed ``x`` was off by the values' own magnitude; the GPU's lowering of
    views is the same code). ``prims.inductor_force_stride_order``
    with the eager strides fixes the layout first; it lowers to the tensor itself, laid out so. A tensor
    whose strides are symbolic cannot be fixed this way: the graph is refused
    (:class:`ScalarCaptureUnsupported`), and its frame is compiled without capture.
    """
    fixed: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        if not is_view(node) or not unbacked_symbols(fx.node.map_arg((node.args[1:], node.kwargs), fake_value)):
            continue
        below, base = node, node.args[0]
        while isinstance(base, fx.Node) and is_view(base):
            below, base = base, base.args[0]
        if not isinstance(base, fx.Node) or base.op != "call_function" or base.target is compat.force_stride_order():
            continue  # a graph input or constant: its layout is fixed already
        if base not in fixed:
            strides = tuple(fake_value(base).stride())
            if not all(isinstance(stride, int) for stride in strides):
                raise ScalarCaptureUnsupported(
                    f"{source_line(node) or node.name}: a view at an offset computed from captured .item() reads, "
                    f"of a tensor with symbolic strides {strides}, which Inductor may lay out otherwise"
                )
            with graph.inserting_after(base):
                fixed[base] = graph.call_function(compat.force_stride_order(), (base, strides))
            fixed[base].meta.update({key: base.meta[key] for key in ("val", "stack_trace") if key in base.meta})
        below.replace_input_with(base, fixed[base])
    return len(fixed)


# --- integer reads ------------------------------------------------------------------------------

# Python's rounding of a float -> the same rounding on a tensor (``round`` is half-to-even in both).
_ROUNDINGS: dict[Any, Callable[..., torch.Tensor]] = {
    torch.sym_int: torch.trunc,
    int: torch.trunc,
    math.trunc: torch.trunc,
    math.floor: torch.floor,
    math.ceil: torch.ceil,
    round: torch.round,
}


def integer_reads(gm: fx.GraphModule) -> None:
    """Rewrite ``int(t.item())`` of a float ``t`` into ``torch.trunc(t).to(torch.int64).item()``
    in a Dynamo graph (and the other roundings alike); refuse the graph where another rounding
    of a captured float remains."""
    graph = gm.graph
    for node in list(graph.nodes):
        rounding = _rounding(node)
        read = node.args[0] if rounding is not None else None
        if not _float_read(read):
            continue
        tensor = read.args[0]
        with graph.inserting_before(node):
            rounded = graph.call_function(rounding, (tensor,))
            integer = graph.call_method("to", (rounded, torch.int64))
            integer_read = graph.call_method("item", (integer,))
        origin = {key: node.meta[key] for key in ("stack_trace", "nn_module_stack", "source_fn_stack") if key in node.meta}
        for new in (rounded, integer, integer_read):
            new.meta.update(origin)
        mode = getattr(fake_value(tensor), "fake_mode", None)  # the mode of Dynamo's example values
        if mode is not None:
            with mode:
                rounded.meta["example_value"] = rounding(fake_value(tensor))
                integer.meta["example_value"] = rounded.meta["example_value"].to(torch.int64)
        if "example_value" in node.meta:
            integer_read.meta["example_value"] = node.meta["example_value"]
        node.replace_all_uses_with(integer_read)
        graph.erase_node(node)
        if not read.users:
            graph.erase_node(read)
    for node in graph.nodes:
        value = fake_value(node.args[0]) if _rounding(node) is not None else None
        if isinstance(value, torch.SymFloat) and free_unbacked_symbols(value):
            raise ScalarCaptureUnsupported(
                f"{source_line(node) or node.name}: rounds a float computed from captured .item() reads "
                f"({value}) to an integer, an expression Inductor's generated code cannot evaluate"
            )


def _rounding(node: fx.Node) -> Callable[..., torch.Tensor] | None:
    """The tensor rounding that equals ``node``'s rounding of one Python float to an int, or None."""
    if len(node.args) != 1 or node.kwargs:
        return None
    if node.op == "call_method" and node.target == "__round__":
        return torch.round
    if node.op != "call_function":
        return None
    try:
        return _ROUNDINGS.get(node.target)
    except TypeError:  # an unhashable target
        return None


def _float_read(node: Any) -> bool:
    """Whether ``node`` is ``t.item()`` of a floating-point tensor."""
    if not isinstance(node, fx.Node) or node.op != "call_method" or node.target != "item" or len(node.args) != 1:
        return False
    value = fake_value(node.args[0])
    return isinstance(value, torch.Tensor) and value.is_floating_point()


# --- installation ---------------------------------------------------------------------------------


def install(is_diffopt: Callable[[Any], bool], on_compile: Callable[[Any], None] = lambda requested: None) -> None:
    """Give diffopt's backends :func:`dynamo_config` and :func:`compile_frame` (see the module docstring).
    ``on_compile(requested)`` runs when ``torch.compile`` is given a diffopt backend (before any tracing)."""

    def carry(requested: Any, backend: Any) -> None:
        if not is_diffopt(requested):
            return
        on_compile(requested)
        if getattr(backend, "backend_ctx_ctor", None) is None:
            backend.backend_ctx_ctor = dynamo_config

    if not compat.wrap_backend_lookup(carry):
        log.info("diffopt: setting torch._dynamo.config %s process-wide", DYNAMO_CONFIG)
        for key, value in DYNAMO_CONFIG.items():
            setattr(torch._dynamo.config, key, value)
        return
    compat.intercept_frame_conversion(lambda backend: getattr(backend, "backend_ctx_ctor", None) is dynamo_config, compile_frame)
