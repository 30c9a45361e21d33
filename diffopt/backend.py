"""The ``diffopt`` torch.compile backend.

``torch.compile(model, backend="diffopt")`` reaches :func:`diffopt_backend`
through the ``torch_dynamo_backends`` entry point. For each graph Dynamo
captures it runs the pre-grad passes on the Dynamo graph, then hands the graph
to Inductor with the post-grad passes installed as Inductor's
``post_grad_custom_post_pass`` (whose ``uuid()`` keeps Inductor's FX graph cache
on). With ``options={"inductor": False}`` the graph is lowered to ATen with the
same decompositions Inductor uses, the post-grad passes run on it, and it runs
as it is.

Dynamo config. The backend traces under ``torch._dynamo.config`` patched with
:data:`DYNAMO_CONFIG`, today ``capture_scalar_outputs=True``: ``t.item()`` (and
``int(t.flatten()[0].item())``, ``t.cpu().item()``) is captured into the graph
as ``aten._local_scalar_dense`` instead of breaking it, so the whole denoising
step is one graph and the ``hoist_item`` pass can deduplicate, move or remove
the device-to-host read. The patch is :func:`dynamo_config`, set as
``diffopt_backend.backend_ctx_ctor``, which Dynamo enters around tracing and
running of every frame it compiles with this backend (nothing is set
process-wide). ``torch.compile`` wraps every non-inductor backend in
``torch._TorchCompileWrapper``, which drops that attribute (torch 2.0 to 2.13),
so importing this module wraps ``torch._dynamo.eval_frame.get_compiler_fn`` to
carry it over when the backend inside the wrapper (by name, callable or
``functools.partial``) is this one; other backends are untouched. Should that
function ever be missing, the config is set process-wide at import instead.
The entry point imports this module inside ``torch.compile(...)``, before
Dynamo reads the attribute, so ``backend="diffopt"`` gets it on its first use.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from .graph_pass import Stage
from .options import Options
from .pipeline import Pipeline, PostGradPasses, registered_passes

_graph_ids = itertools.count()

# Dynamo config every diffopt compile traces under (see the module docstring).
DYNAMO_CONFIG: dict[str, Any] = {"capture_scalar_outputs": True}

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
        **(COMMUNICATION_CONFIG if _has_collectives(gm) else {}),
        **dict(parsed.inductor_config),
        "post_grad_custom_post_pass": PostGradPasses(pipeline, graph_name),
    }
    return compile_fx(gm, example_inputs, config_patches=config_patches)


def _has_collectives(gm: fx.GraphModule) -> bool:
    """Whether the Dynamo graph calls functional collectives (``torch.ops._c10d_functional.*``)."""
    for node in gm.graph.nodes:
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            target = target.overloadpacket
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverloadPacket):
            if target._qualified_op_name.startswith("_c10d_functional::"):
                return True
    return False


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
    try:
        yield
    finally:
        for key, value in previous.items():
            setattr(config, key, value)


diffopt_backend.backend_ctx_ctor = dynamo_config  # type: ignore[attr-defined]


def _wrapped_diffopt(backend: Any) -> bool:
    """Whether ``backend`` is diffopt's, possibly inside ``_TorchCompileWrapper`` / ``functools.partial``."""
    for _ in range(8):
        if backend is diffopt_backend:
            return True
        backend = getattr(backend, "compiler_fn", None) or getattr(backend, "func", None)
    return False


def _carry_backend_ctx() -> bool:
    """Make Dynamo see ``backend_ctx_ctor`` through the wrapper ``torch.compile`` puts around a backend."""
    from torch._dynamo import eval_frame

    original = getattr(eval_frame, "get_compiler_fn", None)
    if original is None:
        return False
    if getattr(original, "_diffopt_carries_ctx", False):
        return True

    @functools.wraps(original)
    def get_compiler_fn(compiler_fn: Any) -> Any:
        backend = original(compiler_fn)
        if getattr(backend, "backend_ctx_ctor", None) is None and _wrapped_diffopt(compiler_fn):
            backend.backend_ctx_ctor = dynamo_config
        return backend

    get_compiler_fn._diffopt_carries_ctx = True  # type: ignore[attr-defined]
    eval_frame.get_compiler_fn = get_compiler_fn
    return True


if not _carry_backend_ctx():
    logging.getLogger("diffopt").info("diffopt: setting torch._dynamo.config %s process-wide", DYNAMO_CONFIG)
    for _key, _value in DYNAMO_CONFIG.items():
        setattr(torch._dynamo.config, _key, _value)
