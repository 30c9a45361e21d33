"""The ``diffopt`` torch.compile backend.

``torch.compile(model, backend="diffopt")`` reaches :func:`diffopt_backend`
through the ``torch_dynamo_backends`` entry point. For each graph Dynamo
captures it runs the pre-grad passes on the Dynamo graph, then hands the graph
to Inductor with the post-grad passes installed as Inductor's
``post_grad_custom_post_pass`` (whose ``uuid()`` keeps Inductor's FX graph cache
on). With ``options={"inductor": False}`` the graph is lowered to ATen with the
same decompositions Inductor uses, the post-grad passes run on it, and it runs
as it is.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from .graph_pass import Stage
from .options import Options
from .pipeline import Pipeline, PostGradPasses, registered_passes

_graph_ids = itertools.count()


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
    pipeline = Pipeline(parsed)
    graph_name = f"graph {next(_graph_ids)}"

    pipeline.run(Stage.PRE_GRAD, gm.graph, graph_name)
    gm.recompile()

    if not parsed.inductor:
        return _compile_without_inductor(gm, example_inputs, pipeline, graph_name)

    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    config_patches = {
        **(list_mode_options(mode) if mode else {}),
        **dict(parsed.inductor_config),
        "post_grad_custom_post_pass": PostGradPasses(pipeline, graph_name),
    }
    return compile_fx(gm, example_inputs, config_patches=config_patches)


def _compile_without_inductor(
    gm: fx.GraphModule, example_inputs: Sequence[Any], pipeline: Pipeline, graph_name: str
) -> Callable[..., Any]:
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    def run_post_grad(aten_gm: fx.GraphModule, _inputs: Sequence[Any]) -> Callable[..., Any]:
        pipeline.run(Stage.POST_GRAD, aten_gm.graph, graph_name)
        aten_gm.recompile()
        return make_boxed_func(aten_gm.forward)

    return aot_autograd(fw_compiler=run_post_grad, bw_compiler=run_post_grad, decompositions=select_decomp_table())(
        gm, example_inputs
    )
