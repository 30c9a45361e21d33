"""Runs the enabled passes of one stage over a graph, each isolated from the others' failures."""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import time
from collections.abc import Callable, Iterator

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import __version__
from .graph_pass import GraphPass, RewriteLog, Stage
from .options import Options
from .report import Decline, PassRun, Rewrite, record


def registered_passes() -> dict[str, type[GraphPass]]:
    """Every pass, by name, in pipeline order (``fxpasses.PIPELINE``)."""
    from diffopt.fxpasses import PIPELINE

    return {cls.name: cls for cls in PIPELINE}


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
        parts = [__version__, repr(self.options.strict)] + [f"{p.name}:{p.fingerprint()}" for p in self.passes]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def run(self, stage: Stage, graph: fx.Graph, graph_name: str) -> None:
        for graph_pass in self.passes:
            if graph_pass.stage is stage:
                self._run_one(graph_pass, graph, graph_name)

    def _run_one(self, graph_pass: GraphPass, graph: fx.Graph, graph_name: str) -> None:
        log = RewriteLog()
        snapshot = _copy(graph)
        start = time.perf_counter()
        error = None
        try:
            graph_pass.apply(graph, log)
            graph.lint()
        except Exception as exc:
            if self.options.strict:
                raise
            error = f"{type(exc).__name__}: {exc}"
            logging.getLogger("diffopt").debug("pass %s raised", graph_pass.name, exc_info=True)
            _restore(graph, snapshot)
            log = RewriteLog()
        for observer in _observers.get():
            observer(graph_pass.name, graph_name, snapshot, _copy(graph))
        run = PassRun(graph_pass.name, graph_pass.stage.value, graph_name, len(log), time.perf_counter() - start, error)
        record(
            run,
            [Rewrite(graph_pass.name, graph_name, **entry) for entry in log.entries],
            [Decline(graph_pass.name, graph_name, **entry) for entry in log.declines],
        )


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
    copy = fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    output = copy.graph_copy(graph, {})
    copy.output(output)
    return copy


def _restore(graph: fx.Graph, snapshot: fx.Graph) -> None:
    """Make ``graph`` (the object Inductor holds) equal to ``snapshot`` again."""
    for node in reversed(graph.nodes):
        node.users.clear()  # the pass may have left half-linked nodes; erase regardless
        graph.erase_node(node)
    graph.output(graph.graph_copy(snapshot, {}))


class PostGradPasses(CustomGraphPass):
    """The pipeline's post-grad stage as Inductor's ``post_grad_custom_post_pass``.

    ``uuid()`` is the pipeline's fingerprint, so Inductor's FX graph cache stays
    on and is invalidated when the passes, their options or their code change.
    """

    def __init__(self, pipeline: Pipeline, graph_name: str) -> None:
        self.pipeline = pipeline
        self.graph_name = graph_name

    def __call__(self, graph: fx.Graph) -> None:
        self.pipeline.run(Stage.POST_GRAD, graph, self.graph_name)

    def uuid(self) -> str:
        return self.pipeline.fingerprint()
