"""Ulysses attention pipelined over chunks of heads, so the all-to-alls run under attention.

Stock form (Ulysses attention; ``models/ulysses.py``, yunchang/xDiT): every step waits for
all of the previous one::

    q = wait(all_to_all(layout(q_shard).contiguous()))       # [P, S/P, B, H/P, D]
    k = ...; v = ...                                          # (k, v: maybe cat with a local prefix)
    o = sdpa(to_bhsd(q), to_bhsd(k), to_bhsd(v))[0]           # [B, H/P, S, D]
    o = wait(all_to_all(layout(o).contiguous()))              # [P, H/P, B, S/P, D], back to shards

so the input and the output all-to-alls are both exposed: nothing runs while they do.

Optimized form: attention is independent per head (query head j reads key/value head
``j // (H / Hkv)``), and an all-to-all, which moves dim-0 rows, commutes with slicing any
other dim. So the region from the sequence shards to the attention output, collectives
included, is computed in ``n`` chunks of heads (chunk c: query heads
``[c H/(Pn), (c+1) H/(Pn))`` and the key/value heads of the same GQA groups), emitted as a
software pipeline::

    send(0)                                       # chunk 0's layout copy + all-to-alls
    for c in range(n):
        send(c + 1)                               # issued before chunk c's attention: runs under it
        o_c = sdpa(wait(q_c), wait(k_c), wait(v_c))[0]
        out_c = all_to_all(layout(o_c).contiguous())   # runs under chunk c + 1's attention
    o = cat([wait(out_c) for c in range(n)], dim=heads)

Each chunk's copies read a slice of the tensor the stock code copied whole (same bytes in
total); a tensor that enters the region without a head dim of its own (a mask broadcast
over heads) is read whole by every chunk. Only chunk 0's inputs and the last chunk's
output are exposed: 1/n of the stock communication, if each chunk's attention outlasts
the next chunk's collectives. ``batch_all_to_all`` then packs each chunk's q/k/v (it never
batches across chunks: that would delay a chunk's attention behind the next chunk's data).

Region, found from the attention op backwards and forwards, tracking which dim holds the
heads: ``view``/``reshape`` that keep the head dim whole (same size, same product of
sizes before it), ``permute``, ``clone``, ``_to_copy``, ``slice``/``select``/``cat``/
``unsqueeze`` on other dims, ``expand`` that does not broadcast the head dim, and
functional ``all_to_all_single`` + ``wait_tensor`` with the head dim not dim 0. Backwards
it stops at a node another op outside the region also reads, or whose op is not one of
those (the stock ``reshape(B, S/P, P, H/P, D)`` that splits the heads over ranks): that
node is computed whole and each chunk reads a slice of it (a view). Forwards it keeps
only what leads to an all-to-all (the output collective and its layout) and the waits;
consumers after that read the concatenated chunks.

Preconditions (else no rewrite):

- The attention op is one of ATen's fused SDPA ops (flash, efficient, cuDNN, the CPU flash
  op) with no dropout; only its output 0 is read; its mask, if any, broadcasts over heads
  or has exactly the query heads.
- The region contains at least one all-to-all (there is communication to hide).
- ``n`` divides every region tensor's head dim: ``n`` is the largest number up to the
  option ``chunks`` (default 2) that divides the key/value heads per rank (and so every
  other head count in the region). With one key/value head per rank nothing is split.
- Static sizes.

Every chunk computes exactly the stock values of its heads (same ops, same order per
element), so the output is bitwise the stock output.

Split along the query rows (option ``split: "queries"``). Attention is also independent per
query row (every row reads all keys), so the chunks can be this rank's local query rows
instead, and their number no longer depends on the kv heads (with fewer kv heads than
ranks, ``models/ulysses.py`` replicates them and each rank holds one). Stock form as above;
optimized form: K/V go through their all-to-alls whole, first; chunk c is the local rows
``[c S/(Pn), (c+1) S/(Pn))`` of q::

    k = wait(all_to_all(layout(k))); v = ...                  # whole, as stock
    send(0)                                                   # q rows of chunk 0 to every rank
    for c in range(n):
        send(c + 1)                                           # issued before chunk c's attention
        o_c = sdpa(to_bhsd(wait(q_c)), k, v)[0]               # [B, H/P, S/n, D]: chunk c's rows of every rank
        out_c = all_to_all(layout(o_c).contiguous())          # [P, H/P, B, S/(Pn), D], under chunk c + 1
    o = cat([wait(out_c) for c in range(n)], dim=rows)        # the stock [P, H/P, B, S/P, D]

After the all-to-all a chunk's rows are ``P x S/(Pn)`` (chunk c of every rank), so the
region's row dim is tracked as ``outer x inner`` through reshapes (Ulysses' ``flatten(0, 1)``
merges the ranks in as ``outer``; the output's ``reshape(B, P, S/P, ...)`` splits them off
again), and chunk c holds the rows whose inner index is in the c-th nth of ``inner``.
Preconditions, besides the ones above (heads and their divisibility aside):

- Not causal (``is_causal``: a row's keys depend on its global position); the mask, if
  any, broadcasts over the query rows. Only q's rows are chunked: k, v and the mask are
  read whole by every chunk.
- Every reshape in the region keeps the row dim whole, merges it (its inner factor then
  grows by the dims merged after it) or splits it with its last factor a multiple of
  ``inner``; where the region is entered (the leaves) and left (the exits) the rows are
  whole (``inner`` is the dim's size: a chunk is a slice, the chunks concatenate), which
  needs the output all-to-all.
- ``n`` is the largest number up to ``chunks`` that divides every ``inner`` (the local
  rows S/P); at least 2.

Each chunk computes its rows' stock values with the same ops (SDPA's kernels tile query
rows independently; on CPU the output is bitwise the stock output, which the tests check;
on GPUs a kernel that picks its tiling by the query count could round differently: not
measured).

Opt-in: ``options={"passes": {"pipeline_heads": {"chunks": 2}}}`` (or ``True``), along the
query rows ``{"pipeline_heads": {"chunks": 4, "split": "queries"}}`` (unmeasured on GPUs). Measured on
2 and 4 H200s over NVLink (``docs/ulysses.md``), it moved NCCL time under attention but
did not make the layer faster (attention slows while sharing the SMs with NCCL, and the
extra copies cost what was hidden), so it is not on by default.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from diffopt.graph_pass import GraphPass, RewriteLog, Stage

from .collectives import A2A, ATTENTION_ARGS, WAIT
from .fx_utils import RESHAPES, call_arguments, concrete_shape, erase_dead, insert_call, reshape_groups, reshaped_dim

aten = torch.ops.aten
_SAME_SHAPE = (aten.clone.default, aten._to_copy.default, aten.alias.default, WAIT)
_SPLITS = ("heads", "queries")


class PipelineHeads(GraphPass):
    name = "pipeline_heads"
    stage = Stage.POST_GRAD
    # follows the heads through collectives on the buffer's own shape (unflatten_all_to_all's result)
    after = ("ulysses_prefix", "unflatten_all_to_all")
    needs_collectives = True
    defaults = {"chunks": 2, "split": "heads"}
    # On 2 and 4 H200s over NVLink it hid communication but did not make layers faster
    # (docs/ulysses.md); it is for links where the all-to-alls take a larger share.
    on_by_default = False

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        if self.config["split"] not in _SPLITS:
            raise ValueError(f"diffopt: pipeline_heads split must be one of {_SPLITS}, got {self.config['split']!r}")

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target in ATTENTION_ARGS:
                region = _find_region(node, self.config["chunks"], rows=self.config["split"] == "queries")
                if isinstance(region, str):
                    log.decline(node, region)
                else:
                    _emit(graph, node, region, log)


# --- which dim holds the heads, through one op --------------------------------------------


def _row_dim_backward(out: list[int], source: list[int], dim: int) -> int | None:
    """Query rows: the dim of a reshape's ``source`` that holds ``out``'s row dim ``dim`` when the
    reshape merges or splits it: the innermost factor of a merge (Ulysses' ``flatten(0, 1)`` of
    ``[P, S/P, ...]``: the local rows), the dim a split's last factor came from."""
    for source_dims, out_dims in reshape_groups(source, out) or []:
        if dim not in out_dims:
            continue
        sized = [d for d in source_dims if source[d] != 1]
        if len(out_dims) == 1 and sized:
            return sized[-1]
        if len(source_dims) == 1 and [d for d in out_dims if out[d] != 1][-1:] == [dim]:
            return source_dims[0]
    return None


def _row_dim_forward(source: list[int], out: list[int], dim: int, inner: int) -> tuple[int, int] | None:
    """Query rows: where a reshape puts the row dim ``dim`` of ``source`` and its inner factor.

    A row dim is ``outer x inner`` rows, and chunk c holds the rows whose inner index lies in the
    c-th nth of ``inner`` (all outer ones). Kept whole or merged with dims before it (which
    become outer) it keeps ``inner``; merged with dims after it, ``inner`` takes them in; split,
    its last factor holds ``inner`` when that factor is a multiple of it. Anything else: None.
    """
    for source_dims, out_dims in reshape_groups(source, out) or []:
        if dim not in source_dims:
            continue
        if len(out_dims) == 1:
            after = source_dims[source_dims.index(dim) + 1:]
            return out_dims[0], inner * math.prod(source[d] for d in after)
        sized = [d for d in out_dims if out[d] != 1]
        if len(source_dims) == 1 and sized:
            return (sized[-1], inner) if out[sized[-1]] % inner == 0 else None
    return None


def _inputs_backward(node: fx.Node, dim: int, rows: bool) -> list[tuple[fx.Node, int | None]] | None:
    """For ``node``'s output chunked along ``dim``: each tensor input and the dim it is chunked
    along (None: read whole by every chunk), or None when ``node`` is not head-parallel (with
    ``rows``: query-row-parallel)."""
    target, args = node.target, node.args
    out = concrete_shape(node)
    if out is None or not args:
        return None
    rank = len(out)
    if target is aten.cat.default:
        cat_dim = (args[1] if len(args) > 1 else node.kwargs.get("dim", 0)) % rank
        pieces = list(args[0])
        if cat_dim == dim or any(concrete_shape(p) is None or len(concrete_shape(p)) != rank for p in pieces):
            return None
        return [(piece, dim) for piece in pieces]
    source = args[0]
    if not isinstance(source, fx.Node):
        return None
    if target in RESHAPES:
        shape = concrete_shape(source)
        found = None if shape is None else reshaped_dim(out, shape, dim)
        if found is None and rows and shape is not None:
            found = _row_dim_backward(out, shape, dim)
        return None if found is None else [(source, found)]
    if target is aten.permute.default:
        return [(source, list(args[1])[dim] % rank)]
    if target in _SAME_SHAPE:
        return [(source, dim)]
    if target is A2A:
        return [(source, dim)] if dim != 0 else None
    if target is aten.slice.Tensor:
        return [(source, dim)] if (args[1] if len(args) > 1 else 0) % rank != dim else None
    if target is aten.select.int:
        selected = args[1] % (rank + 1)
        return [(source, dim if dim < selected else dim + 1)]
    if target is aten.unsqueeze.default:
        inserted = args[1] % rank
        if inserted == dim:
            return None
        return [(source, dim if dim < inserted else dim - 1)]
    if target is aten.expand.default:
        shape = concrete_shape(source)
        if shape is None:
            return None
        own = dim - (rank - len(shape))
        if own < 0 or shape[own] == 1:
            return [(source, None)]  # broadcast along the heads: every chunk reads it whole
        return [(source, own)] if shape[own] == out[dim] else None
    return None


def _output_forward(node: fx.Node, source_dim: int, rows: bool) -> int | None:
    """The dim ``node``'s output is chunked along when its (only) tensor input is chunked along
    ``source_dim``, or None when ``node`` is not a head-parallel (``rows``: row-parallel) unary op."""
    target, args = node.target, node.args
    if node.op != "call_function" or not args or not isinstance(args[0], fx.Node):
        return None
    if any(isinstance(a, fx.Node) for a in list(args[1:]) + list(node.kwargs.values())):
        return None
    out, shape = concrete_shape(node), concrete_shape(args[0])
    if out is None or shape is None:
        return None
    if target in RESHAPES:
        found = reshaped_dim(shape, out, source_dim)
        if found is None and rows:
            moved = _row_dim_forward(shape, out, source_dim, 1)
            found = None if moved is None else moved[0]
        return found
    if target is aten.permute.default:
        perm = [p % len(shape) for p in args[1]]
        return perm.index(source_dim)
    if target in _SAME_SHAPE:
        return source_dim
    if target is A2A:
        return source_dim if source_dim != 0 else None
    if target is aten.unsqueeze.default:
        inserted = args[1] % len(out)
        return source_dim if source_dim < inserted else source_dim + 1
    return None


# --- the region -----------------------------------------------------------------------------


class _Region:
    def __init__(self, attention: fx.Node, output: fx.Node, chunks: int, rows: bool):
        self.attention = attention
        self.rows = rows  # chunked along the query rows, not the heads
        self.output = output  # getitem 0
        self.chunks = chunks
        self.dims: dict[fx.Node, int] = {}  # region node -> its head dim
        self.leaves: dict[fx.Node, int] = {}  # computed whole, each chunk reads a slice along this dim
        self.exits: list[fx.Node] = []  # region nodes read outside the region: consumers get the cat

    def head_sizes(self) -> list[int] | None:
        """The head-dim size of every tensor in or entering the region; None if one is not static."""
        sizes = []
        for node, dim in list(self.dims.items()) + list(self.leaves.items()):
            if node is self.attention:
                continue  # a tuple; its output 0 is in the region
            shape = concrete_shape(node)
            if shape is None:
                return None
            sizes.append(shape[dim])
        return sizes


def _attention_inputs(node: fx.Node) -> dict[str, Any] | None:
    q, k, v, mask, dropout = ATTENTION_ARGS[node.target]

    def arg(position: int | str | None) -> Any:
        if position is None:
            return None
        if isinstance(position, str):
            return node.kwargs.get(position)
        return node.args[position] if position < len(node.args) else None

    if arg(dropout) not in (None, 0, 0.0):
        return None
    return {"q": arg(q), "k": arg(k), "v": arg(v), "mask": arg(mask)}


def _find_region(attention: fx.Node, max_chunks: int, rows: bool) -> _Region | str:
    """The region to pipeline around ``attention``, chunked along the heads (``rows``: the query
    rows), or the reason there is none."""
    inputs = _attention_inputs(attention)
    if inputs is None:
        return "attention with dropout (chunks would draw other random numbers)"
    users = list(attention.users)
    outputs = [u for u in users if u.target is operator.getitem and u.args[1] == 0]
    if len(outputs) != 1 or any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in users):
        return "an attention output other than the values is read"
    q_shape, k_shape = concrete_shape(inputs["q"]), concrete_shape(inputs["k"])
    if q_shape is None or k_shape is None or len(q_shape) != 4 or q_shape[1] % k_shape[1]:
        return "symbolic sizes, or query heads that are not whole groups of key/value heads"
    if rows:
        if call_arguments(attention).get("is_causal"):
            return "causal attention: a query row's keys depend on its position"
        chunks = max_chunks  # decided by the rows' inner factors, below
    else:
        chunks = max((n for n in range(1, max_chunks + 1) if k_shape[1] % n == 0), default=1)
        if chunks < 2:
            return f"{k_shape[1]} key/value head(s) per rank: no {max_chunks} or fewer chunks of whole kv heads"
    region = _Region(attention, outputs[0], chunks, rows)
    region.dims[attention] = 1
    region.dims[outputs[0]] = 2 if rows else 1

    # Backwards from the attention's inputs, latest node first, so that a node's users have
    # all been placed (in the region or not) before the node itself is.
    wanted: dict[fx.Node, set[int | None]] = {}

    def want(node: Any, dim: int | None) -> None:
        if isinstance(node, fx.Node):
            wanted.setdefault(node, set()).add(dim)

    if rows:
        want(inputs["q"], 2)  # every chunk reads all keys and values
    else:
        for name in ("q", "k", "v"):
            want(inputs[name], 1)
    mask = inputs["mask"]
    if mask is not None:
        mask_shape = concrete_shape(mask)
        if mask_shape is None:
            return "a mask with symbolic sizes"
        if rows:
            if len(mask_shape) >= 2 and mask_shape[-2] != 1:
                return "the mask differs between query rows"
            want(mask, None)
        elif len(mask_shape) >= 3 and mask_shape[-3] != 1:
            if mask_shape[-3] != q_shape[1]:
                return "the mask's head dim is neither 1 nor the query heads"
            want(mask, len(mask_shape) - 3)
        else:
            want(mask, None)
    position = {node: index for index, node in enumerate(attention.graph.nodes)}
    while wanted:
        node = max(wanted, key=position.__getitem__)
        dims = wanted.pop(node)
        if len(dims) > 1:
            return "a tensor is read along two dims, or whole and in chunks"
        if dims == {None}:
            continue  # read whole by every chunk
        [dim] = dims
        inner = None
        if node.op == "call_function" and all(user in region.dims for user in node.users):
            inner = _inputs_backward(node, dim, rows)
        if inner is None:
            region.leaves[node] = dim
            continue
        region.dims[node] = dim
        for source, source_dim in inner:
            want(source, source_dim)

    # Forwards from the output, through unary head-parallel ops; keep what leads to a collective.
    forward: list[fx.Node] = []
    frontier = [region.output]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            dim = _output_forward(user, region.dims[node], rows)
            if dim is not None and user not in region.dims:
                region.dims[user] = dim
                forward.append(user)
                frontier.append(user)
    keep = {node for node in forward if node.target is A2A}
    keep |= {user for node in keep for user in node.users if user.target is WAIT}
    changed = True
    while changed:
        changed = False
        for node in forward:
            if node not in keep and any(user in keep and user.target is not WAIT for user in node.users):
                keep.add(node)
                changed = True
    for node in forward:
        if node not in keep:
            del region.dims[node]
    if not any(node.target is A2A for node in region.dims):
        return "no all-to-all in the attention's region: no communication to hide"
    region.exits = [node for node in region.dims if any(user not in region.dims for user in node.users)]
    if rows:
        return _chunk_rows(region, inputs["q"], max_chunks)
    sizes = region.head_sizes()
    if sizes is None or any(size % chunks for size in sizes):
        return f"a head count in the region that {chunks} chunks do not divide"
    return region


def _chunk_rows(region: _Region, query: fx.Node, max_chunks: int) -> _Region | str:
    """Check that chunking the query rows is exact, and choose the chunk count.

    Each region tensor's row dim is ``outer x inner`` (:func:`_row_dim_forward`); a leaf's and an
    exit's rows must be whole (``inner`` = the dim: a chunk is a slice, the chunks concatenate),
    and the count must divide every ``inner``.
    """
    inners: dict[fx.Node, int] = {}
    for leaf, dim in region.leaves.items():
        inners[leaf] = concrete_shape(leaf)[dim]
    position = {node: index for index, node in enumerate(region.attention.graph.nodes)}
    for node in sorted(region.dims, key=position.__getitem__):
        if node is region.attention:
            continue
        if node is region.output:
            inners[node] = inners[query]
            continue
        sources = [arg for arg in node.all_input_nodes if arg in inners]
        found = {inners[arg] for arg in sources}
        if len(found) != 1:
            return "query rows merged from tensors chunked differently"
        [inner] = found
        if node.target in RESHAPES:
            source_dim = region.dims.get(sources[0], region.leaves.get(sources[0]))
            moved = _row_dim_forward(concrete_shape(sources[0]), concrete_shape(node), source_dim, inner)
            if moved is None or moved[0] != region.dims[node]:
                return f"a reshape that mixes the query rows with other dims ({node.format_node()})"
            inner = moved[1]
        inners[node] = inner
    for exit_node in region.exits:
        if inners[exit_node] != concrete_shape(exit_node)[region.dims[exit_node]]:
            return "the region's result does not hold the query rows as whole chunks (no output all-to-all)"
    local_rows = inners[query]
    chunks = max((n for n in range(1, max_chunks + 1) if all(inner % n == 0 for inner in inners.values())), default=1)
    if chunks < 2:
        return f"{local_rows} query rows per rank: no 2 to {max_chunks} equal chunks"
    region.chunks = chunks
    return region


# --- the rewrite ------------------------------------------------------------------------------


def _emit(graph: fx.Graph, attention: fx.Node, region: _Region, log: RewriteLog) -> None:
    split_dim = 2 if region.rows else 1
    total = concrete_shape(region.output)[split_dim]
    position = {node: index for index, node in enumerate(graph.nodes)}
    nodes = sorted(region.dims, key=position.__getitem__)
    collectives = [node for node in nodes if node.target is A2A]
    sends = _ancestors_within([c for c in collectives if position[c] < position[attention]], region)
    waits = [node for node in nodes if node.target is WAIT and position[node] > position[attention]]
    middle = [node for node in nodes if node not in sends and node not in waits]
    sends = [node for node in nodes if node in sends]

    copies: dict[fx.Node, list[fx.Node]] = {node: [None] * region.chunks for node in nodes}
    slices: dict[fx.Node, list[fx.Node | None]] = {leaf: [None] * region.chunks for leaf in region.leaves}

    def chunk_of(arg: Any, c: int) -> Any:
        if not isinstance(arg, fx.Node):
            return arg
        if arg in copies:
            return copies[arg][c]
        if arg in region.leaves:
            if slices[arg][c] is None:
                dim = region.leaves[arg]
                width = concrete_shape(arg)[dim] // region.chunks
                slices[arg][c] = insert_call(graph, aten.slice.Tensor, (arg, dim, c * width, (c + 1) * width), arg)
            return slices[arg][c]
        return arg

    def emit(node: fx.Node, c: int) -> None:
        args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), lambda a: chunk_of(a, c))
        target = node.target
        expected = concrete_shape(node)  # None for the attention's tuple
        if expected is not None:
            expected[region.dims[node]] //= region.chunks
        if target in RESHAPES:
            target, args = aten.reshape.default, (args[0], expected)
        elif target is aten.expand.default:
            args = (args[0], expected, *args[2:])
        copy = insert_call(graph, target, tuple(args), node, kwargs)
        if expected is not None and concrete_shape(copy) != expected:
            raise RuntimeError(f"pipeline_heads: chunk of {node.format_node()} has shape {concrete_shape(copy)}, expected {expected}")
        copies[node][c] = copy

    with graph.inserting_before(attention):
        for node in sends:
            emit(node, 0)
        for c in range(region.chunks):
            if c + 1 < region.chunks:
                for node in sends:
                    emit(node, c + 1)
            for node in middle:
                emit(node, c)
        for c in range(region.chunks):
            for node in waits:
                emit(node, c)
        for node in region.exits:
            joined = insert_call(graph, aten.cat.default, (copies[node], region.dims[node]), node)
            for user in list(node.users):
                if user not in region.dims:
                    user.replace_input_with(node, joined)
    what = "query rows" if region.rows else "head(s)"
    log.add(
        attention,
        replaced=f"attention over {total} {what} between {len(collectives)} exposed all-to-alls",
        by=f"{region.chunks} chunks of {total // region.chunks} {what}, pipelined: each chunk's "
        f"all-to-alls run under the neighbouring chunk's attention",
    )
    unread_outputs = [user for user in attention.users if user is not region.output]
    erase_dead(graph, unread_outputs + nodes)


def _ancestors_within(roots: list[fx.Node], region: _Region) -> set[fx.Node]:
    seen = set(roots)
    stack = list(roots)
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg in region.dims and arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return seen
