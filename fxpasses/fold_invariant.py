"""Step-invariant subgraphs -> constants computed once, while compiling.

Stock form: values that depend on no runtime tensor at all, only on literals and static
shapes, rebuilt on every call. A denoising step that builds its RoPE tables from the
config (``models/loop.py``, ``DenoiseStep``)::

    coords = torch.stack(torch.meshgrid(torch.arange(F), torch.arange(H), torch.arange(W)), -1)
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.cat([torch.outer(coords[:, i], inv_freq_i) for i in range(3)], -1)
    cos = angles.cos().repeat_interleave(2, -1).float()     # the same table every step
    sin = angles.sin().repeat_interleave(2, -1).float()

and the like: ``cat(cos, sin)`` caches, sinusoidal frequency tables
``exp(-log(10000) * arange(half) / half)``, lifted ``torch.tensor([...])`` literals pushed
through math. Post-grad these are ``iota``/``full``/``pow``/``cos``/``cat``/``clone`` ... nodes
whose inputs are all such nodes (or ``get_attr`` constants of the graph).

Optimized form: each such value is evaluated once, at compile time, by running the graph's
own nodes on real tensors (bit-identical to what the nodes compute), and read as a
``get_attr`` constant (``_diffopt_folded_<n>``). Views of it stay ops; a materialized
broadcast keeps its small source as the constant; index-only tables (``arange`` arithmetic,
masks) stay in the graph, where Inductor computes them from the index for free. Each fold is
reported (what was cached, its shape and size), so ``diffopt.explain`` lists it. The pass is
:func:`fxpasses.step_invariant.fold` over the whole graph: what is folded, and why, is that
module's docstring. Options: ``max_bytes`` (64 MB, one value), ``max_total_bytes`` (512 MB,
all constants of one graph), ``broadcast_ratio`` (4).

Preconditions (else the value stays in the graph):

- Runtime-independent: the value depends on no graph input, and so on no parameter or
  buffer (AOT autograd lifts them to inputs: weights may change between calls); nothing
  computed from them is cached. ``get_attr`` constants the graph made from literals count
  as constants; parameters and Inductor's frozen parameters do not.
- Static: a static shape, every argument a literal or a step-invariant node, so a new shape
  or device compiles a new graph with its own constants (a constant is never stale).
- Pure: no mutation, random draw, uninitialized memory (``empty*``) or data-dependent output
  on the way.
- Not aliased out: neither the constant nor a view of it is a graph output or written by a
  mutating op.
- Same layout: the constant has the sizes, strides, dtype and device the graph recorded.
- The graph has a ``GraphModule`` to hold the constants.
"""
from __future__ import annotations

import dataclasses

import torch.fx as fx

from diffopt.graph_pass import GraphPass, RewriteLog, Stage

from .step_invariant import FoldConfig, fold


class FoldInvariant(GraphPass):
    name = "fold_invariant"
    stage = Stage.POST_GRAD
    defaults = {field.name: field.default for field in dataclasses.fields(FoldConfig)}

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        fold(graph, FoldConfig(**self.config), log)
