"""Adjacent independent all-to-alls -> one packed all-to-all.

Stock form (Ulysses attention; ``models/ulysses.py``, diffusers' ``TemplatedUlyssesAttention``,
yunchang/xDiT): q, k and v each go through their own collective and wait::

    q = wait(all_to_all_single(q_layout.contiguous(), [1] * P, [1] * P, group))   # [P, S/P, B, H/P, D]
    k = wait(all_to_all_single(k_layout.contiguous(), [1] * P, [1] * P, group))   # [P, S/P, B, Hkv/P, D]
    v = wait(all_to_all_single(v_layout.contiguous(), [1] * P, [1] * P, group))

three launches and three waits (and the same for any output-side all-to-alls that
happen together). Inductor buckets all-gather, reduce-scatter and all-reduce, never
all-to-all.

Optimized form: one collective and one wait. Each input is viewed as ``[P, m_i]`` (row
j = what goes to rank j; its dim-0 chunks are contiguous), the inputs are packed side by
side into ``[P, sum m_i]`` (one copy, which replaces each input's own ``.contiguous()``
copy when that copy feeds only the collective), the packed tensor goes through one
all-to-all (row j of the result came from rank j), and each result is the column slice
``recv[:, off_i:off_i + m_i]`` viewed back to its shape::

    packed = torch.cat([q_layout.reshape(P, -1), k_layout.reshape(P, -1), v_layout.reshape(P, -1)], 1)
    recv = wait(all_to_all_single(packed, [1] * P, [1] * P, group))
    q = recv[:, :mq].view(P, S/P, B, H/P, D)      # a strided view
    k = recv[:, mq:mq + mk].view(...)

Different head counts (GQA) just give different ``m_i``. A result is a view when its
dim 0 is exactly P (the Ulysses layout) and every consumer accepts the strided view
(computes the same sizes and strides from it, as Inductor's ``reshape`` does); otherwise
it is copied to the contiguous layout it had (one copy of that tensor).

Preconditions (else no rewrite):

- Each collective is ``_c10d_functional.all_to_all_single`` with equal splits, static
  sizes and its wait as its only user.
- The batched collectives use the same process group and the same dtype and device.
  Different dtypes are not batched (no byte packing: a dtype-punning view would hide
  the packing from Inductor's fusion, and mixed-dtype attention inputs are rare).
- They are adjacent: consecutive among that group's all-to-alls in graph order, and
  none depends on another's result (a collective whose input reads an earlier one's
  wait starts a new batch). The packed collective is placed after the last input;
  consumers of the results move after its wait.
- Packing loses no overlap: no matmul, attention or collective lies between the first
  member's collective and a later member's input (it would hold the first one back), and
  each member's first such consumer reads every member (else it would wait for data it
  does not need). The stock q/k/v all-to-alls pass (one projection before, one attention
  after); ``pipeline_heads``' chunks do not pack across chunks.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from diffopt import compat
from diffopt.graph_pass import GraphPass, RewriteLog, Stage

from .collectives import A2A, WAIT, AllToAll, all_to_alls, ancestors, is_long_running
from .fx_utils import RESHAPES, consumers_accept, erase_dead, fake_value, insert_call, is_copy, topological_sort

aten = torch.ops.aten


class BatchAllToAll(GraphPass):
    name = "batch_all_to_all"
    stage = Stage.POST_GRAD
    # the passes that match single all-to-alls see them before they are packed
    after = ("ulysses_prefix", "unflatten_all_to_all", "pipeline_heads")
    needs_collectives = True

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        batches = _batches(graph)
        for batch in batches:
            _pack(graph, batch, log)
        if batches:
            topological_sort(graph)


def _batches(graph: fx.Graph) -> list[list[AllToAll]]:
    position = {node: index for index, node in enumerate(graph.nodes)}
    open_batches: dict[tuple, list[AllToAll]] = {}
    done: list[list[AllToAll]] = []
    for collective in all_to_alls(graph):
        value = collective.value
        key = (collective.group_name, collective.world_size, value.dtype, value.device)
        batch = open_batches.get(key)
        if batch:
            depends_on = ancestors(collective.input, position[batch[0].node], position)
            independent = not any(member.wait in depends_on for member in batch)
            if independent and _keeps_overlap(batch, collective, depends_on, position):
                batch.append(collective)
                continue
            done.append(batch)
        open_batches[key] = [collective]
    done.extend(open_batches.values())
    return [batch for batch in done if len(batch) > 1]


def _keeps_overlap(batch: list[AllToAll], candidate: AllToAll, candidate_inputs: set[fx.Node], position) -> bool:
    """Whether packing ``candidate`` with ``batch`` holds no collective back behind long work.

    The packed collective starts when its last input is ready and its results arrive
    together. So packing must not (1) make an earlier member wait for long-running work
    (matmul, attention, collective) that only the candidate's input needs, nor (2) make a
    member's first long-running consumer wait for data it does not read. Either would turn
    overlap that the graph's order allows (``pipeline_heads``' chunks, say) into exposed time.
    """
    if any(is_long_running(node) for node in candidate_inputs):
        return False
    members = [*batch, candidate]
    start = position[batch[0].node]
    for member in members:
        consumer = _first_long_running_user(member.wait, position)
        if consumer is None:
            continue
        needs = ancestors(consumer, start, position)
        if any(other.wait not in needs for other in members):
            return False
    return True


def _first_long_running_user(node: fx.Node, position) -> fx.Node | None:
    """The earliest long-running node (graph order) that reads ``node``'s value, directly or not."""
    seen, stack, first = {node}, [node], None
    while stack:
        for user in stack.pop().users:
            if user in seen or (first is not None and position[user] >= position[first]):
                continue
            seen.add(user)
            if is_long_running(user):
                first = user
            else:
                stack.append(user)
    return first


def _pack(graph: fx.Graph, batch: list[AllToAll], log: RewriteLog) -> None:
    position = {node: index for index, node in enumerate(graph.nodes)}
    world = batch[0].world_size
    last_input = max((member.input for member in batch), key=position.__getitem__)
    first = batch[0].node
    existing = set(graph.nodes)
    copies = 0
    with graph.inserting_before(last_input.next):
        columns, bypassed = [], []
        for member in batch:
            source = member.input
            if is_copy(source) and len(source.users) == 1:
                bypassed.append(source)
                source = source.args[0]  # the pack copies anyway
            width = member.value.numel() // world
            columns.append(insert_call(graph, aten.reshape.default, (source, [world, width]), first))
        packed = insert_call(graph, aten.cat.default, (columns, 1), first)
        args = list(first.args)
        args[0] = packed
        args[1] = args[2] = [1] * world
        sent = insert_call(graph, A2A, tuple(args), first, dict(first.kwargs))
    # The wait goes where the first member's wait was, when that is after the packed collective:
    # work the graph placed between collective and wait stays there, under the collective.
    first_wait = min((member.wait for member in batch), key=position.__getitem__)
    wait_at = first_wait if position[first_wait] > position[last_input] else sent.next
    with graph.inserting_before(wait_at):
        received = insert_call(graph, WAIT, (sent,), batch[0].wait)
        offset = 0
        for member in batch:
            width = member.value.numel() // world
            column = insert_call(graph, aten.slice.Tensor, (received, 1, offset, offset + width), member.wait)
            offset += width
            copies += not _unpack(graph, member, column)
    for member in batch:
        erase_dead(graph, [member.wait, member.node, member.input, *bypassed])
    erase_dead(graph, [node for node in graph.nodes if node not in existing])
    shapes = [list(member.value.shape) for member in batch]
    unpack = "views" if copies == 0 else f"{len(batch) - copies} views + {copies} contiguous copies"
    log.add(
        batch[0].input,
        replaced=f"{len(batch)} all-to-alls + {len(batch)} waits on {shapes}",
        by=f"one packed all-to-all [{world}, {offset}] + one wait, unpacked as {unpack}",
    )


def _unpack(graph: fx.Graph, member: AllToAll, column: fx.Node) -> bool:
    """Make ``member``'s consumers read its part ``column`` (``[P, m]``, strided) of the packed result.

    Returns whether that took no copy: the result is a view when its dim 0 is P and its
    consumers accept the strided layout, or when every consumer reshapes it to a shape
    that is a view of ``column`` (diffusers' 1-D buffers: ``x.reshape(P, S/P, B, H/P, D)``).
    Otherwise the consumers get a contiguous copy, the layout the result had.
    """
    wait = member.wait
    shape = list(member.value.shape)
    if member.rows == 1:
        view = insert_call(graph, aten.view.default, (column, shape), wait)
        if consumers_accept(wait, fake_value(view), copying_reshapes=True):
            wait.replace_all_uses_with(view)
            return True
        copy = insert_call(graph, aten.clone.default, (view,), wait, {"memory_format": torch.contiguous_format})
    else:
        if _reshape_users_to_views(graph, wait, column):
            return True
        copy = insert_call(graph, aten.reshape.default, (column, shape), wait)  # copies: rows of ranks interleave
    wait.replace_all_uses_with(copy)
    return False


def _reshape_users_to_views(graph: fx.Graph, wait: fx.Node, column: fx.Node) -> bool:
    users = list(wait.users)
    if not users or any(user.target not in RESHAPES for user in users):
        return False
    column_value = fake_value(column)
    mode = compat.detect_fake_mode([column_value])
    for user in users:
        try:
            with mode:
                value = aten.view.default(column_value, list(fake_value(user).shape))
        except Exception:
            return False
        if not consumers_accept(user, value, copying_reshapes=True):
            return False
    for user in users:
        with graph.inserting_before(user):
            view = insert_call(graph, aten.view.default, (column, list(fake_value(user).shape)), user)
        user.replace_all_uses_with(view)
        graph.erase_node(user)
    return True
