"""Test helpers: compile through the real backend and keep each pass's graph before and after."""
from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from .backend import diffopt_backend
from .pipeline import observing
from .report import Report, collecting


@dataclasses.dataclass
class Trace:
    """What one compiled call did: the report, the output, and every pass's graphs."""

    report: Report
    output: Any
    graphs: list[tuple[str, str, fx.Graph, fx.Graph]]  # (pass, graph name, before, after)

    def before(self, pass_name: str, index: int = 0) -> fx.Graph:
        return [g for g in self.graphs if g[0] == pass_name][index][2]

    def after(self, pass_name: str, index: int = 0) -> fx.Graph:
        return [g for g in self.graphs if g[0] == pass_name][index][3]


def trace(
    fn: Any, *args: Any, options: Mapping[str, Any] | None = None, dynamic: bool | None = None, **kwargs: Any
) -> Trace:
    """Compile ``fn`` with the diffopt backend (``strict`` on, caches off), call it once.

    ``options`` default to ``{"inductor": False}``: rewrites only, which is
    quick and keeps the graph runnable as it is. ``dynamic`` is torch.compile's.
    """
    options = {"inductor": False, "strict": True, **(options or {})}
    report = Report()
    graphs: list[tuple[str, str, fx.Graph, fx.Graph]] = []
    torch.compiler.reset()
    backend = functools.partial(diffopt_backend, options=options)
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)
    with observing(lambda *record: graphs.append(record)), collecting(report), torch._inductor.config.patch(
        fx_graph_cache=False
    ), torch._functorch.config.patch(enable_autograd_cache=False):
        output = compiled(*args, **kwargs)
    return Trace(report, output, graphs)


def count_ops(graph: fx.Graph) -> collections.Counter:
    """How many call_function nodes of each target (by name, e.g. ``"aten.clone.default"``)."""
    return collections.Counter(
        _op_name(node.target) for node in graph.nodes if node.op == "call_function"
    )


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return getattr(target, "__name__", str(target))
