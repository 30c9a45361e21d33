"""Every private torch API diffopt uses, in one place, each looked up behind a feature check.

diffopt runs on torch 2.11 (the GPU machines) and 2.13 (CPU), and private APIs move between
releases: 2.13 no longer has ``torch._prims_common.is_non_overlapping_and_dense``, which a
pass once called directly (it then raised, and was skipped, on every graph that reached the
call). Code outside this module uses public torch and the names below, nothing else. Each entry finds the private API where
the supported releases keep it and, where a release lacks it, falls back to an equivalent in
public torch or reports that it cannot (``False`` / ``None``, which the callers handle, or a
``RuntimeError`` where no caller can do without it). ``tests/test_compat.py`` checks that every entry resolves on the installed torch and
gives correct results.

Not gathered here, because torch documents them as the way to reach what they name and they
are unchanged from 2.0 to 2.13: ``torch._ops.OpOverload`` / ``OpOverloadPacket`` /
``HigherOrderOperator`` and an overload's ``_schema`` / ``_opname`` (the types of
``torch.ops.*``), and the config modules ``torch._dynamo.config``, ``torch._inductor.config``
and ``torch._functorch.config`` (``torch.compile``'s settings).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx


# Every private name used below: entry -> where each supported release keeps it (first found wins).
PRIVATE: dict[str, tuple[tuple[str, str], ...]] = {
    "compile_fx": (("torch._inductor.compile_fx", "compile_fx"),),
    "list_mode_options": (("torch._inductor", "list_mode_options"),),
    "select_decomp_table": (("torch._inductor.decomposition", "select_decomp_table"),),
    "aot_autograd": (("torch._dynamo.backends.common", "aot_autograd"),),
    "CustomGraphPass": (("torch._inductor.custom_graph_pass", "CustomGraphPass"),),
    "ConstantFolder": (("torch._inductor.constant_folding", "ConstantFolder"),),
    "detect_fake_mode": (("torch._guards", "detect_fake_mode"),),
    "unset_fake_temporarily": (("torch._subclasses.fake_tensor", "unset_fake_temporarily"),),
    "disable_current_modes": (("torch.utils._python_dispatch", "_disable_current_modes"),),
    "autocast_disabled": (("torch._C", "_DisableAutocast"),),
    "is_non_overlapping_and_dense": (
        ("torch._prims_common", "is_non_overlapping_and_dense_or_false"),  # torch 2.13
        ("torch._prims_common", "is_non_overlapping_and_dense"),  # torch 2.11, 2.12
    ),
    "BackendCompilerFailed": (("torch._dynamo.exc", "BackendCompilerFailed"),),
    "tracing_context": (("torch._guards", "TracingContext"),),
    "dynamo_graph": (("torch._dynamo.symbolic_convert", "tls"),),
    "wrap_backend_lookup": (("torch._dynamo.eval_frame", "get_compiler_fn"),),
    "intercept_frame_conversion": (("torch._dynamo.convert_frame", "convert_frame"),),
    "inductor_cache_dir": (("torch._inductor.runtime.cache_dir_utils", "cache_dir"),),
    "triton_kernel_functional": (("torch._higher_order_ops.triton_kernel_wrap", "triton_kernel_wrapper_functional"),),
    "triton_kernel_mutation": (("torch._higher_order_ops.triton_kernel_wrap", "triton_kernel_wrapper_mutation"),),
    "force_stride_order": (("torch._inductor.inductor_prims", "force_stride_order"),),
    "FunctionalTensor": (("torch._subclasses.functional_tensor", "FunctionalTensor"),),
    "FunctionalTensorMode": (("torch._subclasses.functional_tensor", "FunctionalTensorMode"),),
    "set_grad_enabled": (("torch._C", "_set_grad_enabled"),),
    "enter_inference_mode": (("torch.autograd.grad_mode", "_enter_inference_mode"),),
    "exit_inference_mode": (("torch.autograd.grad_mode", "_exit_inference_mode"),),
    "resolve_process_group": (("torch.distributed.distributed_c10d", "_resolve_process_group"),),
    "process_groups": (("torch.distributed.distributed_c10d", "_world"),),
    "stable_topological_sort": (("torch._inductor.pattern_matcher", "stable_topological_sort"),),
    "pattern_matcher": (("torch._inductor.pattern_matcher", "PatternMatcherPass"),),
}


def _lookup(entry: str) -> Any:
    """The private object ``entry`` stands for, or None where this torch has none."""
    for module, name in PRIVATE[entry]:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if found is not None:
            return found
    return None


def missing() -> list[str]:
    """The entries whose private API this torch lacks (those use their fallback, or report that they cannot)."""
    return [entry for entry in PRIVATE if _lookup(entry) is None]


# --- Inductor and AOT autograd: what the backend compiles with --------------------------------


def compile_fx(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable[..., Any]:
    """Inductor's entry point for a Dynamo graph (``torch._inductor.compile_fx.compile_fx``)."""
    return _required("compile_fx")(gm, example_inputs, **kwargs)


def mode_options(mode: str) -> dict[str, Any]:
    """The Inductor config a ``torch.compile`` mode (``"max-autotune"`` ...) stands for."""
    return dict(_required("list_mode_options")(mode))


def inductor_decompositions() -> dict[Any, Callable[..., Any]]:
    """The decompositions Inductor lowers a graph with (``select_decomp_table``)."""
    return _required("select_decomp_table")()


def aot_autograd(**kwargs: Any) -> Callable[..., Any]:
    """Dynamo's AOT autograd backend factory (``torch._dynamo.backends.common.aot_autograd``)."""
    return _required("aot_autograd")(**kwargs)


CustomGraphPass: type = _lookup("CustomGraphPass")  # the base class of an Inductor post-grad pass
# Inductor's constant folder (an ``fx.Interpreter``; the same constructor and hooks in 2.11 and 2.13):
# the base of ``fxpasses.step_invariant``'s evaluator.
ConstantFolder: type = _lookup("ConstantFolder")


def inductor_cache_dir() -> str:
    """Inductor's cache folder (``TORCHINDUCTOR_CACHE_DIR`` or its default)."""
    return _required("inductor_cache_dir")()


def triton_kernel_nodes() -> tuple[Any, Any]:
    """(functional, mutating) higher-order ops of a user-defined Triton kernel launch in a graph
    (what ``torch.library.wrap_triton`` traces to; Inductor lowers them as its own kernels)."""
    return _required("triton_kernel_functional"), _required("triton_kernel_mutation")


def force_stride_order() -> Any:
    """Inductor's ``prims.inductor_force_stride_order(x, stride)``: the value of ``x`` (in eager, a copy with
    those strides; ``stride`` must be concrete ints). Inductor lowers it to ``x`` in that stride *order*: a
    buffer ``x`` already is, when its order matches, else one realized copy, which every consumer then
    reads, where a consumer that needs fixed strides (a user-defined Triton kernel) makes its own copy
    of an input that is not a buffer yet (one per consumer)."""
    return _required("force_stride_order")


def autograd_state_switches() -> set[Any]:
    """The calls in a Dynamo graph that switch grad mode or inference mode."""
    return {_required(name) for name in ("set_grad_enabled", "enter_inference_mode", "exit_inference_mode")}


# --- fake tensors and dispatch modes -------------------------------------------------------------


def detect_fake_mode(inputs: Any = None) -> Any:
    """The fake mode of ``inputs`` (or of the compile in progress), or None."""
    detect = _lookup("detect_fake_mode")
    if detect is not None:
        return detect(inputs)
    for value in inputs or ():
        mode = getattr(value, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def unset_fake_temporarily() -> contextlib.AbstractContextManager[Any]:
    """A block where the active fake mode (if any) is off: tensors made there are real."""
    return _required("unset_fake_temporarily")()


def disable_current_modes() -> contextlib.AbstractContextManager[Any]:
    """A block where no Python dispatch mode (fake, functionalization, proxy) is active."""
    return _required("disable_current_modes")()


def _required(entry: str) -> Any:
    """``entry``'s private API; where this torch lacks it, a RuntimeError (a pass that needs it
    then raises, is skipped with a warning, and diffopt needs updating for this torch)."""
    found = _lookup(entry)
    if found is None:
        raise RuntimeError(f"diffopt.compat: torch {torch.__version__} has none of {PRIVATE[entry]}")
    return found


@contextlib.contextmanager
def autocast_disabled() -> Iterator[None]:
    """A block where autocast is off on every device type."""
    disable = _lookup("autocast_disabled")
    if disable is not None:
        with disable():
            yield
        return
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


@contextlib.contextmanager
def real_mode() -> Iterator[None]:
    """Real tensor computation inside a compiler pass, which runs under fake and other modes:
    the graph's own ops evaluated as they are (no autograd, no autocast)."""
    with disable_current_modes(), unset_fake_temporarily(), torch.no_grad(), autocast_disabled():
        yield


# --- tensor layout --------------------------------------------------------------------------------


def is_non_overlapping_and_dense(tensor: torch.Tensor) -> bool:
    """Whether some order of ``tensor``'s dimensions makes it contiguous (its elements fill a
    dense block of memory, each once). False where symbolic sizes leave it undecided."""
    check = _lookup("is_non_overlapping_and_dense")
    if check is not None:
        return bool(check(tensor))
    sizes, strides = tuple(tensor.shape), tuple(tensor.stride())
    if not all(isinstance(v, int) for v in sizes + strides):
        return False
    if tensor.numel() < 2:
        return True
    expected = 1
    for size, stride in sorted((p for p in zip(sizes, strides) if p[0] != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


# --- fx.Graph -------------------------------------------------------------------------------------

# A Graph's attributes: what it holds besides its nodes (clear_graph keeps these), and its node
# list (clear_graph makes it anew). tests/test_compat.py fails on a torch whose Graph has one
# that is in neither.
GRAPH_SETTINGS = ("_owning_module", "_tracer_cls", "_tracer_extras", "_codegen", "_co_fields")
GRAPH_NODE_LIST = ("_root", "_used_names", "_insert", "_len", "_graph_namespace", "_find_nodes_lookup_table")


def clear_graph(graph: fx.Graph) -> None:
    """Remove every node from ``graph`` without visiting them, keeping its owner, tracer and codegen.

    ``erase_node`` updates the users of each node's inputs, and fails (``SystemError`` from
    ``_update_args_kwargs``) where a broken rewrite left those links inconsistent; restoring a
    graph must not depend on them. Re-running ``Graph.__init__`` on the object gives it a new,
    empty node list; the old nodes are dropped unvisited.
    """
    settings = {key: value for key, value in vars(graph).items() if key in GRAPH_SETTINGS}
    fx.Graph.__init__(graph)
    vars(graph).update(settings)


def stable_topological_sort(graph: fx.Graph) -> None:
    """Reorder ``graph`` so every node follows its inputs, moving as few nodes as possible (Inductor's
    ``stable_topological_sort``: a node that waits for an input goes right after it)."""
    _required("stable_topological_sort")(graph)


def eliminate_dead_code(graph: fx.Graph, is_impure: Callable[[fx.Node], bool]) -> None:
    """``Graph.eliminate_dead_code`` with ``is_impure`` deciding what must stay although unused."""
    graph.eliminate_dead_code(is_impure_node=is_impure)


def pattern_matcher() -> Any:
    """Inductor's pattern matcher module (``CallFunction``, ``KeywordArg``, ``PatternMatcherPass``,
    ``register_graph_pattern`` ...): patterns are declared with its classes, matched by its passes."""
    return importlib.import_module(_required("pattern_matcher").__module__)


# --- Dynamo ---------------------------------------------------------------------------------------

# What Dynamo raises when a backend fails on a graph it captured (a class nothing raises if absent).
BackendCompilerFailed: type[Exception] = _lookup("BackendCompilerFailed") or type("BackendCompilerFailed", (Exception,), {})


def tracing_context() -> Any:
    """The ``TracingContext`` of the compile in progress (parameters AOT lifted, fake mode), or None."""
    context = _lookup("tracing_context")
    try_get = getattr(context, "try_get", None)
    return try_get() if try_get is not None else None


def fake_inputs(example_inputs: Sequence[Any]) -> tuple[Any, list[Any]]:
    """(fake mode, inputs) for tracing a Dynamo graph as AOT autograd does: the compile's fake mode and its
    fake copies of the example inputs (symbolic sizes as Dynamo made them; SymInts stay as they are)."""
    mode = detect_fake_mode(example_inputs)
    if mode is None:
        return None, list(example_inputs)
    context = tracing_context()
    symbolic = getattr(context, "tensor_to_context", {})
    fakes = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and getattr(x, "fake_mode", None) is not mode:
            info = symbolic.get(x) if not hasattr(x, "fake_mode") else None
            x = mode.from_tensor(x, symbolic_context=info, source=getattr(info, "tensor_source", None))
        fakes.append(x)
    return mode, fakes


def functional_call(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, list[int]]:
    """``fn(*args)`` functionalized as AOT autograd functionalizes (``FunctionalTensorMode``: mutations of
    intermediates become out-of-place ops, also inside kernels below the Functionalize key): its outputs,
    and the positions of the arguments it mutates (whose mutation the outputs do not carry)."""
    functional_tensor, functional_mode = _required("FunctionalTensor"), _required("FunctionalTensorMode")
    with functional_mode():
        wrapped = [functional_tensor.to_functional(a) if isinstance(a, torch.Tensor) else a for a in args]
        outputs = fn(*wrapped)
    mutated = [
        index
        for index, a in enumerate(wrapped)
        if isinstance(a, functional_tensor)
        and (torch._functionalize_has_data_mutation(a.elem) or torch._functionalize_has_metadata_mutation(a.elem))
    ]
    unwrapped = torch.utils._pytree.tree_map_only(functional_tensor, lambda t: t.from_functional(), outputs)
    return unwrapped, mutated


def dynamo_graph() -> fx.Graph | None:
    """The graph Dynamo is tracing or compiling on this thread (its placeholders carry their
    sources as ``meta["grapharg"]``), or None."""
    tls = _lookup("dynamo_graph")
    tx = getattr(tls, "current_tx", None)
    output = getattr(tx, "output", None)
    graph = getattr(output, "graph", None)
    return graph if isinstance(graph, fx.Graph) else None


def wrap_backend_lookup(wrap: Callable[[Any, Any], None]) -> bool:
    """Call ``wrap(requested, backend)`` on each backend Dynamo resolves for ``torch.compile``.

    ``requested`` is what ``torch.compile`` was given (a name, a callable, a wrapper around
    one) and ``backend`` what Dynamo will call; ``wrap`` may set attributes on ``backend``
    (``backend_ctx_ctor``, which ``torch.compile``'s wrapper hides). Wraps
    ``torch._dynamo.eval_frame.get_compiler_fn``; False where this torch has none.
    """
    original = _lookup("wrap_backend_lookup")
    if original is None:
        return False
    eval_frame = importlib.import_module(original.__module__)
    original = getattr(original, "_diffopt_original", original)

    @functools.wraps(original)
    def get_compiler_fn(compiler_fn: Any) -> Any:
        backend = original(compiler_fn)
        wrap(compiler_fn, backend)
        return backend

    get_compiler_fn._diffopt_original = original  # type: ignore[attr-defined]
    eval_frame.get_compiler_fn = get_compiler_fn
    return True


FrameConversion = Callable[[Any, Callable[[], Any]], Any]


def intercept_frame_conversion(owns: Callable[[Any], bool], intercept: FrameConversion) -> bool:
    """Route the conversion of every frame compiled with a backend that ``owns`` accepts through
    ``intercept(code, convert)``.

    ``convert()`` traces and compiles the frame and returns what Dynamo expects; it may be
    called again (under other Dynamo config). What it raises is a failure to compile the frame,
    which Dynamo handles as it always does once ``intercept`` lets it through (a frame it cannot
    trace runs eagerly, any other error is raised). Applies to ``torch.compile`` without
    ``fullgraph`` (with it a graph break is an error, and Dynamo converts frames without this
    layer). Wraps the frame converter ``torch._dynamo.convert_frame.convert_frame`` builds;
    False where this torch builds none.
    """
    factory = _lookup("intercept_frame_conversion")
    if factory is None:
        return False
    module = importlib.import_module(factory.__module__)
    factory = getattr(factory, "_diffopt_original", factory)

    @functools.wraps(factory)
    def convert_frame(compiler_fn: Any, *args: Any, **kwargs: Any) -> Any:
        converter = factory(compiler_fn, *args, **kwargs)
        inner = getattr(converter, "_inner_convert", None)
        if inner is not None and owns(compiler_fn):
            converter._inner_convert = _InterceptedConversion(inner, intercept)
        return converter

    convert_frame._diffopt_original = factory  # type: ignore[attr-defined]
    module.convert_frame = convert_frame
    return True


class _InterceptedConversion:
    """Dynamo's inner frame converter, called through an interceptor (other attributes pass through)."""

    def __init__(self, inner: Callable[..., Any], intercept: FrameConversion) -> None:
        self._inner = inner
        self._intercept = intercept

    def __call__(self, frame: Any, *args: Any, **kwargs: Any) -> Any:
        return self._intercept(frame.f_code, lambda: self._inner(frame, *args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        if name in ("_inner", "_intercept"):  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self._inner, name)


# --- torch.distributed ---------------------------------------------------------------------------


def resolve_process_group(group_name: str) -> Any:
    """The process group a functional collective names by ``group_name``, or None."""
    resolve = _lookup("resolve_process_group")
    if resolve is None:
        return None
    try:
        return resolve(group_name)
    except Exception:
        return None


def process_groups() -> list[tuple[Any, str, list[int]]]:
    """Every process group of this process: (group, name, global ranks), [] where unknown."""
    world = _lookup("process_groups")
    names = getattr(world, "pg_names", None)
    ranks = getattr(world, "pg_group_ranks", None) or {}
    if names is None:
        return []
    return [(group, name, sorted(ranks.get(group, {}))) for group, name in list(names.items())]
