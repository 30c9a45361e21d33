"""The pass manager: runs the enabled passes of one stage over a graph in ``fxpasses.PIPELINE`` order,
each isolated from the others' failures, then one cleanup.

Passes declare what must run before them (``GraphPass.after``); :func:`check_order` holds the
pipeline to it when the passes are looked up, so a reordering that breaks one is an error at once,
not a missed rewrite."""
from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import logging
import time
from collections.abc import Callable, Iterator

import torch
import torch.fx as fx

from . import compat, scalar_capture
from .fxpasses.fx_utils import check_links, eliminate_dead_code, fake_value, has_collectives, topological_sort
from .graph_pass import GraphPass, RewriteLog, Stage
from .options import Options
from .report import Decline, PassRun, Rewrite, record


def registered_passes() -> dict[str, type[GraphPass]]:
    """Every pass, by name, in pipeline order (``fxpasses.PIPELINE``), checked by :func:`check_order`."""
    from diffopt.fxpasses import PIPELINE

    check_order(PIPELINE)
    return {cls.name: cls for cls in PIPELINE}


def check_order(passes: list[type[GraphPass]]) -> None:
    """Raise unless every pass comes after the passes its ``after`` names (names that are in no
    pipeline are errors too: a renamed pass must not silently drop a constraint)."""
    from diffopt.fxpasses import PIPELINE

    known = {cls.name for cls in [*PIPELINE, *passes]}
    position = {cls.name: index for index, cls in enumerate(passes)}
    for index, cls in enumerate(passes):
        for name in cls.after:
            if name not in known:
                raise ValueError(f"diffopt: pass {cls.name!r} runs after {name!r}, which is no pass")
            if position.get(name, -1) > index:
                raise ValueError(f"diffopt: pass {cls.name!r} must run after {name!r}; the pipeline has it before")


class PassFailed(RuntimeError):
    """A pass raised under ``strict`` (a bug in diffopt); the pass's own error is the cause."""


class Pipeline:
    """The passes that ``options`` enable, instantiated with their options, in order."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.passes: list[GraphPass] = [
            cls(**options.pass_config(name))
            for name, cls in registered_passes().items()
            if options.pass_enabled(name, cls.on_by_default)
        ]

    def fingerprint(self) -> str:
        """The key of Inductor's FX graph cache: each pass's fingerprint (all of diffopt's code and the
        pass's options) and the options that change how passes run."""
        parts = [repr(self.options.strict)] + [f"{p.name}:{p.fingerprint()}" for p in self.passes]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def stage_passes(self, stage: Stage) -> list[GraphPass]:
        """The enabled passes that run at ``stage``, in order."""
        if stage is Stage.BEFORE_AUTOGRAD:
            return [p for p in self.passes if p.differentiable and p.config.get("training")]
        return [graph_pass for graph_pass in self.passes if graph_pass.stage is stage]

    def run(self, stage: Stage, graph: fx.Graph, graph_name: str) -> int:
        """Run the passes of ``stage`` over ``graph``, then the cleanup; how many rewrites they made."""
        rewrites = sum(self._run_one(graph_pass, stage, graph, graph_name) for graph_pass in self.stage_passes(stage))
        cleanup(graph)
        return rewrites

    def note(self, stage: Stage, graph_name: str, note: str) -> None:
        """Record that the passes of ``stage`` did not run on a graph, and why."""
        for graph_pass in self.stage_passes(stage):
            record(PassRun(graph_pass.name, stage.value, graph_name, 0, 0.0, note=note), [])

    def _run_one(self, graph_pass: GraphPass, stage: Stage, graph: fx.Graph, graph_name: str) -> int:
        note = not_applicable(graph_pass, graph)
        if note:
            record(PassRun(graph_pass.name, stage.value, graph_name, 0, 0.0, note=note), [])
            return 0
        log = RewriteLog()
        snapshot = _copy(graph)
        start = time.perf_counter()
        error = failure = None
        try:
            graph_pass.apply(graph, log)
        except Exception as exc:
            if self.options.strict:  # as diffopt's error, which nothing downstream takes for torch's
                raise PassFailed(f"diffopt: pass {graph_pass.name} raised {_describe(exc)}") from exc
            error, failure = _describe(exc), exc
        else:
            try:
                graph.lint()
                check_links(graph)
            except Exception as exc:
                if self.options.strict:
                    raise RuntimeError(f"diffopt: pass {graph_pass.name} left the graph inconsistent") from exc
                error, failure = f"left the graph inconsistent ({_describe(exc)})", exc
        if failure is not None:
            logging.getLogger("diffopt").debug("pass %s failed", graph_pass.name, exc_info=failure)
            _restore(graph, snapshot)
            log = RewriteLog()
        for observer in _observers.get():
            observer(graph_pass.name, graph_name, snapshot, _copy(graph))
        run = PassRun(graph_pass.name, stage.value, graph_name, len(log), time.perf_counter() - start, error)
        record(
            run,
            [Rewrite(graph_pass.name, graph_name, **entry) for entry in log.entries],
            [Decline(graph_pass.name, graph_name, **entry) for entry in log.declines],
        )
        return len(log)


def cleanup(graph: fx.Graph) -> None:
    """What every run ends with (as vLLM's ``PostCleanupPass``): nodes in an order that has every input
    first, and no unused pure node left over from a rewrite. Passes erase what they replace themselves
    (a later pass must not see stale users); this catches what slipped through."""
    topological_sort(graph)
    eliminate_dead_code(graph)


def not_applicable(graph_pass: GraphPass, graph: fx.Graph) -> str | None:
    """Why ``graph_pass`` cannot match anything in ``graph``: no collectives for a collective rewrite, none
    of its anchor ops, or no tensor on a device its ``devices`` option names."""
    if graph_pass.needs_collectives and not has_collectives(graph):
        return "not applicable (no collectives)"
    devices = graph_pass.config.get("devices")
    if devices:
        present = {value.device.type for node in graph.nodes if isinstance(value := fake_value(node), torch.Tensor)}
        if present and not present.intersection(devices):
            return f"off on {', '.join(sorted(present))} (option devices: {list(devices)})"
    if graph_pass.anchors and not any(_calls_one_of(node, graph_pass.anchors) for node in graph.nodes):
        return f"not applicable (none of {', '.join(graph_pass.anchors)} in the graph)"
    return None


def _calls_one_of(node: fx.Node, names: tuple[str, ...]) -> bool:
    """Whether the node calls an op of one of these names (``torch.rsqrt``, ``Tensor.rsqrt``,
    ``aten.rsqrt.default`` are all ``rsqrt``)."""
    if node.op == "call_method":
        return node.target in names
    if node.op != "call_function":
        return False
    target = node.target
    name = target._opname if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", "")
    return name in names


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (lint's messages go on to print the whole graph)."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


# (pass name, graph name, graph before the pass, graph after it)
Observer = Callable[[str, str, fx.Graph, fx.Graph], None]
_observers: contextvars.ContextVar[tuple[Observer, ...]] = contextvars.ContextVar("diffopt_observers", default=())


@contextlib.contextmanager
def observing(observer: Observer) -> Iterator[None]:
    """Call ``observer`` with a copy of the graph before and after every pass run in the block."""
    token = _observers.set(_observers.get() + (observer,))
    try:
        yield
    finally:
        _observers.reset(token)


def _copy(graph: fx.Graph) -> fx.Graph:
    """A new graph with copies of ``graph``'s nodes and their metadata."""
    duplicate = fx.Graph(owning_module=graph.owning_module)
    _copy_nodes(graph, duplicate)
    return duplicate


def _copy_nodes(source: fx.Graph, target: fx.Graph) -> None:
    copied = target.graph_copy(source, {}, return_output_node=True)
    if copied is not None:
        value, output = copied
        target.output(value, type_expr=output.type).meta = copy.copy(output.meta)


def _restore(graph: fx.Graph, snapshot: fx.Graph) -> None:
    """Make ``graph`` (the object Inductor holds) equal to ``snapshot`` again.

    The failed pass may have left any link broken (a node before its inputs, users that do
    not match arguments), so nothing here reads the graph's nodes: the node list is replaced
    as a whole, the graph's owner, tracer and codegen kept.
    """
    compat.clear_graph(graph)
    _copy_nodes(snapshot, graph)


class PostGradPasses(compat.CustomGraphPass):
    """The pipeline's post-grad stage as Inductor's ``post_grad_custom_post_pass``.

    ``uuid()`` is the pipeline's fingerprint, so Inductor's FX graph cache stays
    on and is invalidated when the passes, their options or their code change.
    """

    def __init__(self, pipeline: Pipeline, graph_name: str) -> None:
        self.pipeline = pipeline
        self.graph_name = graph_name
        self.ran = False  # stays False when Inductor's cache serves the compiled graph

    def __call__(self, graph: fx.Graph) -> None:
        self.ran = True
        self.pipeline.run(Stage.POST_GRAD, graph, self.graph_name)
        scalar_capture.fix_layouts_under_unbacked_views(graph)

    def uuid(self) -> str:
        return self.pipeline.fingerprint()
