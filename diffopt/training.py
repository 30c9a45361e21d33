"""Graphs that need gradients: the forward ATen graph that differentiable rewrites act on.

Where gradients are needed, AOT autograd differentiates the graph Dynamo captured and partitions
the result into a forward and a backward graph before any post-grad pass runs. In that forward
graph the stock code's intermediates (a norm's ``rsqrt``, say) are outputs saved for the backward
graph, and the backward graph is derived from the stock code, so a rewrite there cannot remove
them. A pass whose optimized form has an autograd formula (``GraphPass.differentiable``) runs
before that instead: on the Dynamo graph traced to functional ATen ops, before AOT autograd.
AOT autograd then differentiates the rewritten graph, and the inserted op's backward is its
registered formula.

The trace (``make_fx`` with AOT autograd's functionalization) applies no decompositions beyond
the ops' own CompositeImplicitAutograd ones and two of Inductor's (``_DECOMPOSED``, so that the
stock forms look as they do post-grad): every op in it keeps its autograd formula (Inductor's
full decompositions produce ``prims`` ops, which have none). When no pass rewrites anything, the Dynamo graph is compiled as
it is.

Not traced (the passes do not run before autograd, with the reason in the report):

- graphs that switch grad mode or inference mode inside (the trace would lose the switch and
  autograd would differentiate through a region the program excludes), or that call
  higher-order ops (an ``autograd.Function``'s own backward, activation checkpointing: the trace
  would inline their forward and lose what they do to the backward);
- graphs that hold tensors as attributes rather than inputs (they would be traced as constants);
- compiles under an autocast context (the traced casts would meet autocast a second time in AOT
  autograd's trace). Autocast regions inside the graph are traced into their explicit casts.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from . import compat
from .graph_pass import Stage
from .pipeline import Pipeline, not_applicable

aten = torch.ops.aten
log = logging.getLogger("diffopt")

# Switches of global autograd state that a functional ATen trace does not record.
_STATE_SWITCHES = compat.autograd_state_switches()


def needs_autograd(example_inputs: Sequence[Any]) -> bool:
    """Whether AOT autograd will differentiate a graph with these inputs (its own test)."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def rewrite_before_autograd(
    gm: fx.GraphModule, example_inputs: Sequence[Any], pipeline: Pipeline, graph_name: str
) -> fx.GraphModule:
    """``gm``, or, where it needs gradients and a differentiable pass rewrote its forward ATen graph,
    that graph (to be differentiated by AOT autograd in its place)."""
    passes = pipeline.stage_passes(Stage.BEFORE_AUTOGRAD)
    if not passes or not needs_autograd(example_inputs):
        return gm
    if all(not_applicable(graph_pass, gm.graph) for graph_pass in passes):
        pipeline.run(Stage.BEFORE_AUTOGRAD, gm.graph, graph_name)  # records why (e.g. off on this device)
        return gm
    reason = not_traceable(gm)
    if reason:
        pipeline.note(Stage.BEFORE_AUTOGRAD, graph_name, f"not run: {reason}")
        return gm
    try:
        forward = forward_aten_graph(gm, example_inputs)
    except Exception as error:  # a bug in diffopt's trace, not in the program: compile the graph as it is
        if pipeline.options.strict:
            raise
        log.warning("diffopt: %s: tracing the forward graph for the before-autograd passes raised (%s: %s); "
                    "compiled without them", graph_name, type(error).__name__, error)
        forward = f"the trace raised {type(error).__name__} (a bug in diffopt)"
    if isinstance(forward, str):
        pipeline.note(Stage.BEFORE_AUTOGRAD, graph_name, f"not run: {forward}")
        return gm
    if not pipeline.run(Stage.BEFORE_AUTOGRAD, forward.graph, graph_name):
        return gm
    forward.recompile()
    return forward


def not_traceable(gm: fx.GraphModule) -> str | None:
    """Why ``gm`` cannot be traced to an ATen forward graph that differentiates as it does, or None."""
    for device in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device):
            return f"compiled under {device} autocast"
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            return f"the graph holds {node.target!r} as an attribute (not an input)"
        if node.op != "call_function":
            continue
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            return f"the graph calls the higher-order op {node.target.name()}"
        if node.target in _STATE_SWITCHES:
            return f"the graph switches autograd state ({node.target.__name__})"
    return None


# Inductor's decompositions of these, so that the stock forms look as they do post-grad: norms as
# pow/mean/rsqrt, ``empty_like(x)`` as an allocation that does not read x. Their results keep their
# autograd formulas (ATen ops, no prims).
_DECOMPOSED = ("_fused_rms_norm", "empty_like")


def _decompositions() -> dict[Any, Any]:
    table = compat.inductor_decompositions()
    ops = [getattr(aten, name).default for name in _DECOMPOSED if hasattr(aten, name)]
    return {op: table[op] for op in ops if op in table}


def forward_aten_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule | str:
    """``gm`` traced on fake copies of its example inputs to functional ATen ops, node metadata (stack traces,
    module stacks) kept, as AOT autograd traces it; or why it is not (a str)."""
    from torch.fx import traceback as fx_traceback
    from torch.fx.experimental.proxy_tensor import make_fx

    mutated: list[int] = []

    def run(*args: Any) -> Any:
        outputs, mutated[:] = compat.functional_call(fx.Interpreter(gm).run, args)
        return outputs

    fake_mode, fakes = compat.fake_inputs(example_inputs)
    with fake_mode or contextlib.nullcontext(), fx_traceback.preserve_node_meta():
        forward = make_fx(run, _decompositions(), record_module_stack=True)(*fakes)
    if mutated:
        name = list(gm.graph.find_nodes(op="placeholder"))[mutated[0]].target
        return f"the graph mutates its input {name} (the trace would drop the mutation)"
    forward.graph.eliminate_dead_code()  # the trace records what autograd saved (detach nodes), unused here
    forward.meta.update(gm.meta)
    return forward
