"""Replicated K/V prefix out of the Ulysses all-to-all.

Stock form (Ulysses attention over ``cat([K_prefix, K_suffix])``, the prefix replicated on
every rank, the suffix this rank's sequence shard; ``models/ulysses.py``)::

    k_all = torch.cat([k_prefix, k], dim=1)                          # [B, prefix + S/P, Hkv, D]
    x = k_all.reshape(B, L, P, Hkv // P, D).permute(2, 1, 0, 3, 4).contiguous()
    recv = wait(all_to_all_single(x, [1] * P, [1] * P, group))       # [P, L, B, Hkv/P, D]
    k_all = torch.cat([recv[0, :prefix], recv[:, prefix:].flatten(0, 1)])   # slice back

The prefix crosses the wire P - 1 times per rank (every rank sends every other rank
its copy of that rank's heads), and the full ``k_all``, its contiguous copy and the
received buffer are all prefix-sized larger than they need to be.

Optimized form: the all-to-all carries the suffix only; this rank's heads of the
prefix are sliced locally (a view, ``k_prefix[..., rank*Hkv/P:(rank+1)*Hkv/P, :]``
through the same reshape/permute), and the pieces are concatenated after::

    recv_suffix = wait(all_to_all_single(layout(k).contiguous(), ...))
    recv = cat([layout(k_prefix)[rank].expand(P, ...), recv_suffix], dim=1)  # what every rank sent

and the slice-back ops on ``recv`` are folded through that cat (``recv[0, :prefix]`` is
the local head slice, ``recv[:, prefix:]`` is ``recv_suffix``), so the only full-length
K/V is the one attention reads. In general: ``all_to_all(layout(cat(pieces)))`` becomes
``cat`` of ``all_to_all(layout(piece))`` for the non-replicated pieces and the local
chunk of ``layout(piece)`` repeated P times for the replicated ones; this is exact
because a replicated piece's chunk for this rank is the same on every sender.

``rank`` is this process's rank in the process group the collective names (resolved
from its ``group_name`` when the graph is compiled; the graph is compiled per process).
The pass mixes the process-group topology into its cache key, so Inductor's FX graph
cache never hands one rank's graph to another.

Preconditions (else no rewrite):

- The collective is ``_c10d_functional.all_to_all_single`` with equal splits, static
  sizes, its wait its only user, on a process group this process belongs to.
- Its input is ``cat`` (along dim c) followed only by layout ops (``view``/``reshape``,
  ``permute``, ``clone``, dtype casts, and the ``unsqueeze`` + ``expand`` of
  ``repeat_interleave``, which replicates K/V heads when there are fewer than ranks) that
  keep dim c whole (same size, same product of sizes before and after it; not broadcast),
  and dim c does not end up as dim 0 (the split dim).
- Some piece of the cat is *proven replicated* and the non-replicated pieces are
  contiguous in the cat (one all-to-all carries them). Replicated means equal on every
  rank of the group, by a dataflow analysis over the graph: a value is replicated when
  it is a source, or the output of an ATen/prims/diffopt op that is neither random nor
  bitwise-nondeterministic nor uninitialized memory (``empty*``), all of whose inputs
  are replicated. Sources: graph constants; parameters and buffers of the compiled
  modules (``replicated_params``, on by default: turn it off under tensor parallelism
  or with per-rank buffers); and the inputs named in ``replicated_inputs``. Nothing
  else is ever assumed replicated: collective outputs, unnamed inputs and symbolic
  sizes passed as inputs are not.

Options: ``{"passes": {"ulysses_prefix": {"replicated_inputs": ["k_prefix", "v_prefix"]}}}``.
A name is an argument name of the compiled function (the module's ``forward``) and
covers every tensor reachable from that argument (``"prefix_kv"`` covers
``prefix_kv[i][j]``); a full Dynamo source string (``"L['prefix_kv'][0][0]"``) names
one tensor. Names are resolved through Dynamo's graph arguments while the graph
compiles; where they cannot be (the graph was not captured by Dynamo, or AOT changed
the inputs), declared inputs are not sources and the pass does not fire on them.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from diffopt import compat
from diffopt.graph_pass import GraphPass, RewriteLog, Stage

from .collectives import A2A, WAIT, AllToAll, all_to_alls, group_rank, match_all_to_all, topology
from .fx_utils import RESHAPES, concrete, concrete_shape, erase_dead, fake_value, insert_call, is_pure, reshaped_dim

aten = torch.ops.aten
prims = torch.ops.prims

_SAME_SHAPE = (aten.clone.default, aten.alias.default, prims.convert_element_type.default)
# ``repeat_interleave(r, dim)`` of K/V heads (fewer kv heads than ranks), post-grad: a new dim
# ``unsqueeze``d after the heads, ``expand``ed to r, copied and merged into the heads.
_HEAD_REPEAT = (aten.unsqueeze.default, aten.expand.default)


class UlyssesPrefix(GraphPass):
    name = "ulysses_prefix"
    stage = Stage.POST_GRAD
    needs_collectives = True
    defaults = {"replicated_inputs": (), "replicated_params": True}

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        names = self.config["replicated_inputs"]
        if isinstance(names, str):
            names = (names,)
        if not all(isinstance(name, str) for name in names):
            raise TypeError(f"diffopt: ulysses_prefix replicated_inputs must be argument names, got {names!r}")
        self.config["replicated_inputs"] = tuple(names)
        self.config["replicated_params"] = bool(self.config["replicated_params"])

    def fingerprint(self) -> str:
        # The rewritten graph holds this process's rank: key the cache on it.
        return hashlib.sha256(f"{super().fingerprint()}|{topology()}".encode()).hexdigest()

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        collectives = all_to_alls(graph)
        if not collectives:
            return
        replicated = replicated_nodes(graph, self.config["replicated_inputs"], self.config["replicated_params"])
        for collective in collectives:
            rank = group_rank(collective.group_name, collective.world_size)
            site = _match(collective, replicated) if rank is not None else None
            if site:
                _rewrite(graph, collective, rank, *site, log)


# --- replication --------------------------------------------------------------------


def replicated_nodes(graph: fx.Graph, declared: Sequence[str], params: bool) -> set[fx.Node]:
    """The nodes of ``graph`` proven to hold the same value on every rank (see the module doc)."""
    sources = set(_source_placeholders(graph, declared, params))
    replicated: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            ok = node in sources
        elif node.op == "get_attr":
            ok = True
        elif node.op == "call_function":
            # the same bits on every rank; .item() of a replicated tensor is replicated
            rank_independent = is_pure(node, bitwise=True, data_dependent=True, scalars=True)
            ok = rank_independent and all(arg in replicated for arg in node.all_input_nodes)
        else:
            ok = False
        if ok:
            replicated.add(node)
    return replicated


def _source_placeholders(graph: fx.Graph, declared: Sequence[str], params: bool) -> list[fx.Node]:
    """Placeholders that are parameters/buffers (when ``params``) or declared replicated inputs."""
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if any(str(node.target).startswith("tangents") for node in placeholders):
        return []  # a backward graph: its inputs are saved activations and gradients
    context = compat.tracing_context()
    lifted = len(getattr(context, "params_flat", None) or []) if context is not None else 0
    sources = placeholders[:lifted] if params else []  # parameters AOT lifted itself
    graphargs = _dynamo_graphargs()
    if graphargs is None or len(graphargs) != len(placeholders) - lifted:
        return sources  # cannot name the inputs: nothing declared is trusted
    for node, (source_name, is_param) in zip(placeholders[lifted:], graphargs):
        if (params and is_param) or any(_names(source_name, name) for name in declared):
            sources.append(node)
    return sources


def _dynamo_graphargs() -> list[tuple[str, bool]] | None:
    """(source name, is a parameter/buffer) of each placeholder of the graph Dynamo is compiling."""
    graph = compat.dynamo_graph()
    if graph is None:
        return None
    out = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        if source is None:
            return None
        name = source.name() if callable(source.name) else source.name
        example = node.meta.get("example_value")
        is_param = isinstance(example, torch.nn.Parameter) or bool(re.search(r"\._(parameters|buffers)\[", name))
        out.append((name, is_param))
    return out


def _names(source_name: str, declared: str) -> bool:
    if source_name == declared:
        return True
    match = re.match(r"L\['([^']+)'\]", source_name)
    return match is not None and match.group(1) == declared


# --- matching ---------------------------------------------------------------------------


def _match(collective: AllToAll, replicated: set[fx.Node]) -> tuple[fx.Node, list[bool], list[fx.Node], int] | None:
    """(the cat, which pieces are replicated, the layout ops from it to the collective's input, the cat dim there)."""
    chain = []
    node = collective.input
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target is not aten.cat.default:
        if node.target not in RESHAPES + _SAME_SHAPE + _HEAD_REPEAT + (aten.permute.default,):
            return None
        if node.target is aten.clone.default and set(node.kwargs) - {"memory_format"}:
            return None
        chain.append(node)
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.target is not aten.cat.default:
        return None
    cat = node
    chain.reverse()
    cat_value = fake_value(cat)
    if not isinstance(cat_value, torch.Tensor):
        return None
    dim = (cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)) % cat_value.dim()
    for op in chain:
        dim = _track(op, dim)
        if dim is None:
            return None
    if dim == 0:
        return None
    pieces = list(cat.args[0])
    flags = [piece in replicated for piece in pieces]
    sizes = [concrete(fake_value(piece).shape[_cat_dim(cat)]) for piece in pieces]
    if None in sizes or not any(flags) or all(flags):
        return None
    sharded = [i for i, flag in enumerate(flags) if not flag]
    if sharded != list(range(sharded[0], sharded[-1] + 1)):
        return None  # more than one run of sharded pieces would need more collectives
    return cat, flags, chain, dim


def _cat_dim(cat: fx.Node) -> int:
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    return dim % fake_value(cat).dim()


def _track(op: fx.Node, dim: int) -> int | None:
    """Where dim ``dim`` of ``op``'s input is in its output, if ``op`` keeps it whole."""
    if op.target in _SAME_SHAPE:
        return dim
    if op.target is aten.permute.default:
        order = [d % len(op.args[1]) for d in op.args[1]]
        return order.index(dim)
    before, after = concrete_shape(op.args[0]), concrete_shape(op)
    if before is None or after is None:
        return None
    if op.target is aten.unsqueeze.default:
        inserted = op.args[1] % len(after)
        return dim if dim < inserted else dim + 1
    if op.target is aten.expand.default:
        own = dim + len(after) - len(before)  # expand prepends dims
        return own if before[dim] == after[own] else None  # the cat dim is not broadcast
    return reshaped_dim(before, after, dim)


# --- rewriting ---------------------------------------------------------------------------


def _rewrite(
    graph: fx.Graph,
    collective: AllToAll,
    rank: int,
    cat: fx.Node,
    replicated_flags: list[bool],
    chain: list[fx.Node],
    dim: int,
    log: RewriteLog,
) -> None:
    cat_dim = _cat_dim(cat)
    pieces = list(cat.args[0])
    world, rows = collective.world_size, collective.rows
    parts: list[fx.Node] = []
    prefix_shapes, suffix_shapes = [], []
    existing = set(graph.nodes)
    with graph.inserting_before(collective.node):
        sharded = [piece for piece, flag in zip(pieces, replicated_flags) if not flag]
        if len(sharded) == 1:
            sharded_input = sharded[0]
        else:
            sharded_input = insert_call(graph, aten.cat.default, (sharded, cat_dim), cat)
        received = None
        for piece, flag in zip(pieces, replicated_flags):
            if flag:
                prefix_shapes.append(list(fake_value(piece).shape))
                laid_out = _replay(graph, chain, piece, cat_dim, keep_copies=False)
                chunk = (laid_out, 0, rank * rows, (rank + 1) * rows)  # this rank's chunk: what every sender sends
                local = insert_call(graph, aten.slice.Tensor, chunk, collective.node)
                shape = [world * rows] + list(fake_value(local).shape[1:])
                if rows == 1:
                    parts.append(insert_call(graph, aten.expand.default, (local, shape), collective.node))
                else:
                    repeats = [world] + [1] * (len(shape) - 1)
                    parts.append(insert_call(graph, aten.repeat.default, (local, repeats), collective.node))
            elif received is None:
                suffix_shapes.append(list(fake_value(sharded_input).shape))
                laid_out = _replay(graph, chain, sharded_input, cat_dim, keep_copies=True)
                a2a = collective.node
                sent = insert_call(graph, A2A, (laid_out, *a2a.args[1:]), a2a, dict(a2a.kwargs))
                received = insert_call(graph, WAIT, (sent,), collective.wait)
                parts.append(received)
        result = insert_call(graph, aten.cat.default, (parts, dim), collective.wait)
    collective.wait.replace_all_uses_with(result)
    _fold_slices(graph, result)
    erase_dead(graph, [collective.wait, collective.node, *chain, cat])
    erase_dead(graph, [node for node in graph.nodes if node not in existing])  # folded-away leftovers
    sent_before = collective.bytes
    sent_after = match_all_to_all(sent).bytes
    log.add(
        cat,
        replaced=f"all-to-all of cat(replicated {prefix_shapes}, sharded {suffix_shapes}) ({sent_before} B sent)",
        by=f"all-to-all of the sharded part ({sent_after} B sent) "
        f"+ rank {rank}'s heads of the replicated part sliced locally",
    )


def _replay(graph: fx.Graph, chain: list[fx.Node], tensor: fx.Node, cat_dim: int, keep_copies: bool) -> fx.Node:
    """The layout ops of ``chain`` applied to a piece of the cat (its size along the cat dim differs)."""
    dim = cat_dim
    size = concrete(fake_value(tensor).shape[cat_dim])
    for op in chain:
        out_dim = _track(op, dim)
        if op.target in RESHAPES or op.target is aten.expand.default:
            shape = [concrete(s) for s in fake_value(op).shape]
            shape[out_dim] = size
            target = aten.expand.default if op.target is aten.expand.default else aten.reshape.default
            tensor = insert_call(graph, target, (tensor, shape), op)
        elif op.target is aten.permute.default:
            tensor = insert_call(graph, aten.permute.default, (tensor, op.args[1]), op)
        elif op.target is aten.clone.default and not keep_copies:
            pass  # a view of the replicated piece is all the local slice needs
        else:
            tensor = insert_call(graph, op.target, (tensor, *op.args[1:]), op, dict(op.kwargs))
        dim = out_dim
    return tensor


def _fold_slices(graph: fx.Graph, cat: fx.Node) -> None:
    """Push ``slice``/``select`` users of ``cat`` into its pieces, so the cat is not materialized.

    Along the cat dim a slice inside one piece becomes a slice of that piece; along
    another dim it becomes a (smaller) cat of the pieces' slices, folded in turn.
    """
    pieces = list(cat.args[0])
    cat_dim = _cat_dim(cat)
    offsets = [0]
    for piece in pieces:
        offsets.append(offsets[-1] + concrete(fake_value(piece).shape[cat_dim]))
    for user in list(cat.users):
        if user.target is aten.slice.Tensor:
            args = list(user.args) + [None] * (5 - len(user.args))
            _, dim, start, end, step = args[:5]
            dim = (0 if dim is None else dim) % fake_value(cat).dim()
            size = concrete(fake_value(cat).shape[dim])
            if size is None:
                continue
            start, end = _clamp(0 if start is None else start, size), _clamp(size if end is None else end, size)
            if (1 if step is None else step) != 1 or start is None or end is None:
                continue
            if dim == cat_dim:
                index = _piece_containing(offsets, start, end)
                if index is None:
                    continue
                piece, offset = pieces[index], offsets[index]
                with graph.inserting_before(user):
                    if (start, end) == (offset, offsets[index + 1]):
                        replacement = piece
                    else:
                        within = (piece, dim, start - offset, end - offset)
                        replacement = insert_call(graph, aten.slice.Tensor, within, user)
            else:
                with graph.inserting_before(user):
                    sliced = [insert_call(graph, aten.slice.Tensor, (p, dim, start, end), user) for p in pieces]
                    replacement = insert_call(graph, aten.cat.default, (sliced, cat_dim), user)
            user.replace_all_uses_with(replacement)
            graph.erase_node(user)
            if dim != cat_dim:
                _fold_slices(graph, replacement)
        elif user.target is aten.select.int:
            dim, index = user.args[1] % fake_value(cat).dim(), concrete(user.args[2])
            size = concrete(fake_value(cat).shape[dim])
            if index is None or size is None:
                continue
            index = index + size if index < 0 else index
            with graph.inserting_before(user):
                if dim == cat_dim:
                    which = _piece_containing(offsets, index, index + 1)
                    within = (pieces[which], dim, index - offsets[which])
                    replacement = insert_call(graph, aten.select.int, within, user)
                else:
                    selected = [insert_call(graph, aten.select.int, (p, dim, index), user) for p in pieces]
                    new_dim = cat_dim - 1 if dim < cat_dim else cat_dim
                    replacement = insert_call(graph, aten.cat.default, (selected, new_dim), user)
            user.replace_all_uses_with(replacement)
            graph.erase_node(user)
            if dim != cat_dim:
                _fold_slices(graph, replacement)
    erase_dead(graph, [cat])


def _clamp(value: Any, size: int) -> int | None:
    value = concrete(value)
    if value is None:
        return None
    if value < 0:
        value += size
    return max(0, min(value, size))


def _piece_containing(offsets: list[int], start: int, end: int) -> int | None:
    for index in range(len(offsets) - 1):
        if offsets[index] <= start and end <= offsets[index + 1] and start < end:
            return index
    return None
