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


# --- tiny stock models for compiled-model tests ----------------------------------------------------
# Each builder takes a dtype and returns (model, args, kwargs) at a tiny named config with one layer.


def tiny_wan(dtype: torch.dtype):
    """Our Wan reference (``diffopt.models.WanStack``)."""
    from diffopt.models import WanStack, get_config, wan_example_inputs

    config = get_config("wan-tiny", num_layers=1)
    return WanStack(config), wan_example_inputs(config, dtype=dtype), {}


def tiny_cosmos3(dtype: torch.dtype):
    """Our Cosmos3 generation reference (``diffopt.models.Cosmos3GenStack``)."""
    from diffopt.models import Cosmos3GenStack, cosmos3_example_inputs, get_config

    config = get_config("cosmos3-tiny", num_layers=1)
    return Cosmos3GenStack(config), cosmos3_example_inputs(config, dtype=dtype), {}


def tiny_diffusers_wan(dtype: torch.dtype):
    """diffusers' ``WanTransformer3DModel`` (skips the test where diffusers is not installed)."""
    import pytest

    pytest.importorskip("diffusers")
    from diffopt.models import get_config
    from diffopt.models.diffusers_models import build_diffusers_wan, diffusers_wan_inputs

    config = get_config("wan-tiny", num_layers=1)
    return build_diffusers_wan(config), (), {**diffusers_wan_inputs(config, dtype=dtype), "return_dict": False}


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` (tensors, possibly nested in lists, tuples and dicts) with floating tensors cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {key: cast_floats(v, dtype) for key, v in value.items()}
    return value
