"""All-to-all on a flattened buffer -> the same all-to-all on the buffer's own shape.

Stock form (diffusers' ``_all_to_all_single``, used by its ``TemplatedUlyssesAttention``):
the Ulysses buffer ``x`` (``[P, S/P, B, H/P, D]``, contiguous) is flattened to 1-D around
the collective and reshaped back after::

    flat = x.view(-1)                                         # [N]
    recv = wait(all_to_all_single(flat, [N/P] * P, [N/P] * P, group))
    y = recv.view(P, S/P, B, H/P, D)

Optimized form: the collective on ``x`` itself, split along dim 0::

    y = wait(all_to_all_single(x, [1] * P, [1] * P, group))

The same bytes go to the same ranks (chunk j of ``flat`` is row block j of ``x``), and
the result has the head dim as a dim of its own again, which is what ``pipeline_heads``
needs to follow the heads through the collective. Users of the 1-D result other than the
reshape back read a view of the new result.

Preconditions (else no rewrite):

- ``all_to_all_single`` with equal splits and static sizes, its wait its only user; its
  input is a view or reshape to 1-D of a contiguous tensor ``x``.
- ``x.shape[0]`` is a multiple of the group size, so that the 1-D chunks are whole
  dim-0 row blocks of ``x``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from diffopt.graph_pass import GraphPass, RewriteLog, Stage

from .collectives import A2A, WAIT, all_to_alls
from .fx_utils import RESHAPES, erase_dead, fake_value, insert_call

aten = torch.ops.aten


class UnflattenAllToAll(GraphPass):
    name = "unflatten_all_to_all"
    stage = Stage.POST_GRAD
    needs_collectives = True

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        for collective in all_to_alls(graph):
            node = collective.node
            if collective.value.dim() != 1:
                continue
            flatten = collective.input
            if flatten.target not in RESHAPES or not isinstance(flatten.args[0], fx.Node):
                continue
            source = flatten.args[0]
            value = fake_value(source)
            world = collective.world_size
            if not isinstance(value, torch.Tensor) or not value.is_contiguous() or value.dim() < 2:
                continue
            if not isinstance(value.shape[0], int) or value.shape[0] % world:
                continue
            rows = value.shape[0] // world
            args = (source, [rows] * world, [rows] * world, *node.args[3:])
            with graph.inserting_before(node):
                sent = insert_call(graph, A2A, args, node, dict(node.kwargs))
                received = insert_call(graph, WAIT, (sent,), collective.wait)
            shape = list(value.shape)
            for user in list(collective.wait.users):
                if user.target in RESHAPES and list(fake_value(user).shape) == shape:
                    user.replace_all_uses_with(received)
                    graph.erase_node(user)
            if collective.wait.users:
                with graph.inserting_after(received):
                    flat = insert_call(graph, aten.view.default, (received, [-1]), collective.wait)
                collective.wait.replace_all_uses_with(flat)
            erase_dead(graph, [collective.wait, node, flatten])
            log.add(
                node,
                replaced=f"all-to-all of {list(value.shape)} flattened to 1-D",
                by=f"the all-to-all on the {list(value.shape)} tensor, split along dim 0",
            )
