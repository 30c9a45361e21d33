"""The ``diffopt`` torch.compile backend.

``torch.compile(model, backend="diffopt")`` reaches :func:`diffopt_backend`
through the ``torch_dynamo_backends`` entry point. For each graph Dynamo
captures it runs, where gradients are needed, the differentiable passes on its forward
ATen graph (``diffopt.training``), then hands the graph to Inductor with the post-grad passes
installed as Inductor's
``post_grad_custom_post_pass`` (whose ``uuid()`` keeps Inductor's FX graph cache
on). With ``options={"inductor": False}`` the graph is lowered to ATen with the
same decompositions Inductor uses, the post-grad passes run on it, and it runs
as it is.

Dynamo config: the backend traces with ``capture_scalar_outputs=True`` (so ``.item()`` reads
stay in the graph for ``hoist_item``), set around its own tracing only, and never at the cost
of a program Inductor compiles: :mod:`diffopt.scalar_capture`.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from . import compat, scalar_capture, training
from .fxpasses.fx_utils import has_collectives
from .graph_pass import Stage
from .options import Options
from .pipeline import Pipeline, PostGradPasses, registered_passes
from .report import record_cache_hit

_graph_ids = itertools.count()

# Inductor config for graphs with collectives. Inductor's peak-memory reordering (on by
# default) puts each wait right after its collective, which serializes the chunks that
# ``pipeline_heads`` made independent; Inductor's own comm passes, which run after it, then
# issue each collective as early and place each wait as late as the data allows. Measured on
# 2 and 4 H200s (docs/ulysses.md): layer time unchanged without the pipeline, peak memory
# lower on diffusers Wan. Options' ``inductor_config`` overrides these keys.
COMMUNICATION_CONFIG: dict[str, Any] = {
    "reorder_for_compute_comm_overlap": True,
    "reorder_for_compute_comm_overlap_passes": ["sink_waits", "raise_comms"],
}


def diffopt_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Callable[..., Any]:
    """Compile one Dynamo graph: rewrite it, then compile it with Inductor (or not)."""
    import diffopt.kernels  # noqa: F401  (registers torch.ops.diffopt.* before any pass inserts them)

    parsed = Options.parse(options, registered_passes())
    if mode and parsed.mode and mode != parsed.mode:
        raise ValueError(f"diffopt: mode={mode!r} and options['mode']={parsed.mode!r} disagree")
    mode = mode or parsed.mode
    pipeline = Pipeline(parsed)
    graph_name = f"graph {next(_graph_ids)}"

    scalar_capture.integer_reads(gm)
    scalar_capture.scaled_scalar_operands(gm)
    gm.recompile()
    gm = training.rewrite_before_autograd(gm, example_inputs, pipeline, graph_name)

    if not parsed.inductor:
        return _compile_without_inductor(gm, example_inputs, pipeline, graph_name)

    post_grad = PostGradPasses(pipeline, graph_name)
    config_patches = {
        **(compat.mode_options(mode) if mode and mode != "default" else {}),
        **(COMMUNICATION_CONFIG if has_collectives(gm.graph) else {}),
        **dict(parsed.inductor_config),
        "post_grad_custom_post_pass": post_grad,
    }
    compiled = compat.compile_fx(gm, example_inputs, config_patches=config_patches)
    if not post_grad.ran:  # Inductor's FX graph cache served the compiled graph: the passes did not run
        record_cache_hit(graph_name)
    return compiled


def _compile_without_inductor(
    gm: fx.GraphModule, example_inputs: Sequence[Any], pipeline: Pipeline, graph_name: str
) -> Callable[..., Any]:
    from functorch.compile import make_boxed_func

    def run_post_grad(aten_gm: fx.GraphModule, _inputs: Sequence[Any]) -> Callable[..., Any]:
        pipeline.run(Stage.POST_GRAD, aten_gm.graph, graph_name)
        aten_gm.recompile()
        return make_boxed_func(aten_gm.forward)

    return compat.aot_autograd(
        fw_compiler=run_post_grad, bw_compiler=run_post_grad, decompositions=compat.inductor_decompositions()
    )(gm, example_inputs)


diffopt_backend.backend_ctx_ctor = scalar_capture.dynamo_config  # type: ignore[attr-defined]


def _wrapped_diffopt(backend: Any) -> bool:
    """Whether ``backend`` is diffopt's, possibly inside ``_TorchCompileWrapper`` / ``functools.partial``."""
    for _ in range(8):
        if backend is diffopt_backend:
            return True
        backend = getattr(backend, "compiler_fn", None) or getattr(backend, "func", None)
    return False


def _check_options(requested: Any) -> None:
    """Parse the options ``torch.compile`` was given for a diffopt backend, so that a bad option fails at
    ``torch.compile(...)`` with diffopt's own error (``torch.compile`` keeps them as ``kwargs`` of its
    wrapper; a ``functools.partial`` carries them as ``keywords``)."""
    for _ in range(8):
        kwargs = getattr(requested, "kwargs", None) or getattr(requested, "keywords", None)
        if isinstance(kwargs, Mapping) and "options" in kwargs:
            Options.parse(kwargs["options"], registered_passes())
            return
        requested = getattr(requested, "compiler_fn", None) or getattr(requested, "func", None)
        if requested is None:
            return


scalar_capture.install(_wrapped_diffopt, _check_options)
