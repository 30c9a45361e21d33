"""Test helpers: compile through the real backend, run only the passes under test, keep each
pass's graph before and after, and compare against the same compile without those passes.

The harness follows vLLM's ``TestBackend``: :func:`check_passes` compiles a function with only
the named passes on, through Inductor's real ``compile_fx`` (the passes see the post-grad graph
as Inductor orders it) or, as a faster second mode, through the ATen-only path
(``{"inductor": False}``: Inductor's decompositions, no Inductor), with Inductor's FX graph and
AOT autograd caches off, so the passes always run. The same compile with none of the passes is
the reference its output must match.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from .backend import diffopt_backend
from .pipeline import observing, registered_passes
from .report import Report, collecting

# qk_norm_rope fires for CUDA tensors by default; the CPU tests turn it on for CPU too.
ON_CPU = {"passes": {"qk_norm_rope": {"devices": ["cpu", "cuda"]}}}


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


def only(*names: str, inductor: bool = True, **config: Any) -> dict[str, Any]:
    """Options that run only the passes ``names`` (every other pass off, opt-in ones too);
    ``config``: options of the one pass named (an error with several)."""
    if config and len(names) != 1:
        raise ValueError("pass options need exactly one pass named")
    passes: dict[str, Any] = {name: name in names for name in registered_passes()}
    if config:
        passes[names[0]] = config
    return {"inductor": inductor, "passes": passes}


@contextlib.contextmanager
def no_caches() -> Iterator[None]:
    """Inductor's FX graph cache and AOT autograd's cache off: every compile runs the passes."""
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(
        enable_autograd_cache=False
    ):
        yield


class Compiled:
    """``fn`` compiled with the diffopt backend (``strict`` on), for tests that call it several
    times; every call runs with caches off and records its pass runs in ``self.report``."""

    def __init__(self, fn: Any, options: Mapping[str, Any] | None = None, dynamic: bool | None = None) -> None:
        self.report = Report()
        backend = functools.partial(diffopt_backend, options={"strict": True, **(options or {})})
        self.fn = torch.compile(fn, backend=backend, dynamic=dynamic)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with collecting(self.report), no_caches():
            return self.fn(*args, **kwargs)


def trace(
    fn: Any, *args: Any, options: Mapping[str, Any] | None = None, dynamic: bool | None = None, **kwargs: Any
) -> Trace:
    """Compile ``fn`` with the diffopt backend (``strict`` on, caches off, Dynamo reset), call it once.

    ``options`` default to ``{"inductor": False}``: rewrites only, which is
    quick and keeps the graph runnable as it is. ``dynamic`` is torch.compile's.
    """
    options = {"inductor": False, "strict": True, **(options or {})}
    report = Report()
    graphs: list[tuple[str, str, fx.Graph, fx.Graph]] = []
    torch.compiler.reset()
    backend = functools.partial(diffopt_backend, options=options)
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)
    with observing(lambda *record: graphs.append(record)), collecting(report), no_caches():
        output = compiled(*args, **kwargs)
    return Trace(report, output, graphs)


def check_passes(
    fn: Any,
    *args: Any,
    passes: Sequence[str],
    inductor: bool = True,
    options: Mapping[str, Any] | None = None,
    dynamic: bool | None = None,
    rtol: float = 0.0,
    atol: float = 0.0,
    **kwargs: Any,
) -> Trace:
    """The trace of ``fn(*args, **kwargs)`` compiled with only ``passes`` on, after checking its
    output against the same compile with none of them (bit for bit unless ``rtol``/``atol``).

    ``options``: more backend options (``passes`` entries configure the passes named, e.g.
    ``{"passes": {"qk_norm_rope": {"devices": ["cpu"]}}}``; ``inductor_config``)."""
    options = dict(options or {})
    configured = dict(options.pop("passes", None) or {})
    with_passes = only(*passes, inductor=inductor)
    with_passes["passes"].update({name: configured[name] for name in passes if name in configured})
    result = trace(fn, *args, options={**options, **with_passes}, dynamic=dynamic, **kwargs)
    reference = trace(fn, *args, options={**options, **only(inductor=inductor)}, dynamic=dynamic, **kwargs)
    torch.testing.assert_close(result.output, reference.output, rtol=rtol, atol=atol)
    return result


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
