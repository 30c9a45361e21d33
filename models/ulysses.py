"""Ulysses sequence parallelism for the reference Cosmos3 generation layer, in the stock form.

Each rank holds a sequence shard ``[B, S/P, ...]`` of the generation tokens (P ranks in
the group). Attention needs every token, so each of q, k and v goes through an
all-to-all that trades the sequence shard for a head shard ``[B, S, H/P, D]``; attention
runs on the rank's heads; an output all-to-all trades the heads back for the sequence
shard. Everything else in the layer (norms, projections, RoPE, MLP) runs on the shard.

The all-to-alls are written the way serving engines write them (yunchang/xDiT's
``SeqAllToAll4D``, diffusers' ``TemplatedUlyssesAttention``), per tensor::

    x = x.reshape(B, S_local, P, H // P, D).permute(2, 1, 0, 3, 4).contiguous()
    x = funcol.all_to_all_single(x, None, None, group)   # traced by Dynamo
    x = wait(x)                                           # [P, S_local, B, H/P, D], chunk j from rank j

through ``torch.distributed._functional_collectives`` so that Dynamo traces them into
the graph (``_c10d_functional.all_to_all_single`` + ``wait_tensor``). The 4-D layout is
yunchang's; diffusers additionally flattens the buffer to 1-D around the call.

The generation tokens attend over ``cat([K_prefix, K_gen])`` where the prefix (the cached
understanding K/V) is *replicated*: every rank holds all of it. The stock Ulysses code
builds the full cat on each rank, sends it through the all-to-all, and slices the prefix
back off the result (every rank sent the same prefix, so one copy, from rank 0's chunk,
is kept)::

    k_all = torch.cat([k_prefix, k], dim=1)              # [B, prefix + S/P, Hkv, D]
    recv = all_to_all(k_all)                             # [P, prefix + S/P, B, Hkv/P, D]
    k_all = torch.cat([recv[0, :prefix], recv[:, prefix:].flatten(0, 1)])  # slice back

so the prefix crosses the wire P - 1 times per rank and a full-size K/V temporary
exists on both sides of the collective. (Sending the cat and *not* slicing back would
attend over P copies of the prefix: wrong.) ``diffopt``'s ``ulysses_prefix`` pass turns
this into an all-to-all of the suffix alone plus a local head slice of the prefix;
``batch_all_to_all`` packs the q, k and v all-to-alls into one.

Padding. A sequence length the group size does not divide is padded at the end to the
next multiple (:func:`shard_sequence` pads with zeros); the padded tokens are masked out
of attention as keys (a boolean ``attn_mask``, built only when there is padding) and
dropped by :func:`gather_sequence`. Their own outputs are computed and discarded.

Heads. Each rank takes ``H/P`` query heads and ``Hkv/P`` K/V heads, so P must divide
``H`` (GQA grouping is then preserved per rank). With fewer K/V heads than ranks
(``Hkv < P``, e.g. Cosmos3's 8 kv heads over 16 ranks) each K/V head is replicated to the
``P/Hkv`` ranks whose query heads read it: before its all-to-all, K/V is
``repeat_interleave``'d to ``P`` heads along the head dim (head ``e`` is kv head
``e // (P/Hkv)``), so rank j receives kv head ``j // (P/Hkv)``, the one its query heads
``[j H/P, (j+1) H/P)`` read under GQA, and attends with ``H/P`` query heads over one kv
head. That sends ``P/Hkv`` copies of each K/V head (sglang replicates the same way).
:func:`ulysses_plan` and :class:`UlyssesCosmos3GenLayer` raise ``ValueError`` at setup when
P does not divide ``H``, or divides neither ``Hkv`` nor is a multiple of it.

Running it: under ``torchrun`` (NCCL on GPUs, gloo on CPU) or
``torch.multiprocessing.spawn``; see ``docs/ulysses.md`` and
``benchmarks/bench_ulysses.py``.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from .configs import Cosmos3Config
from .cosmos3 import Cosmos3GenLayer


@dataclasses.dataclass(frozen=True)
class UlyssesPlan:
    """How one sequence is spread over a process group."""

    group: dist.ProcessGroup
    world_size: int
    rank: int
    seq_len: int  # global, before padding

    @property
    def padded_len(self) -> int:
        return -(-self.seq_len // self.world_size) * self.world_size

    @property
    def shard_len(self) -> int:
        return self.padded_len // self.world_size

    @property
    def padding(self) -> int:
        return self.padded_len - self.seq_len


def check_heads(num_heads: int, num_kv_heads: int, world_size: int) -> None:
    """Raise ``ValueError`` unless ``world_size`` divides the query heads and either divides the
    key/value heads or is a multiple of them (then :func:`kv_repeats` replicates them)."""
    if num_heads % world_size:
        raise ValueError(
            f"Ulysses over {world_size} ranks needs the query head count to be a multiple of "
            f"{world_size}, got {num_heads}; use a group size that divides {num_heads}"
        )
    if num_kv_heads % world_size and world_size % num_kv_heads:
        raise ValueError(
            f"Ulysses over {world_size} ranks needs the key/value head count to be a multiple or a "
            f"divisor of {world_size}, got {num_kv_heads}; use a group size that {num_kv_heads} kv heads "
            f"divide or that divides them"
        )


def kv_repeats(num_kv_heads: int, world_size: int) -> int:
    """How many ranks each key/value head goes to: 1 when the ranks split the heads, ``P / Hkv``
    when there are fewer heads than ranks (each rank then holds one, replicated)."""
    return 1 if num_kv_heads % world_size == 0 else world_size // num_kv_heads


def ulysses_plan(
    seq_len: int, num_heads: int, num_kv_heads: int, group: dist.ProcessGroup | None = None
) -> UlyssesPlan:
    """The plan for ``seq_len`` tokens over ``group`` (default: the world); checks the heads."""
    group = group if group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    check_heads(num_heads, num_kv_heads, world_size)
    return UlyssesPlan(group, world_size, dist.get_rank(group), seq_len)


def shard_sequence(x: torch.Tensor, plan: UlyssesPlan, dim: int = 1) -> torch.Tensor:
    """This rank's shard of ``x`` along ``dim`` (size ``plan.seq_len``), zero-padded to ``padded_len`` first."""
    if x.shape[dim] != plan.seq_len:
        raise ValueError(f"expected {plan.seq_len} tokens along dim {dim}, got shape {tuple(x.shape)}")
    if plan.padding:
        pad_shape = list(x.shape)
        pad_shape[dim] = plan.padding
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    return x.narrow(dim, plan.rank * plan.shard_len, plan.shard_len).contiguous()


def gather_sequence(x: torch.Tensor, plan: UlyssesPlan, dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's shard along ``dim``, padding dropped (eager, outside the model)."""
    shards = [torch.empty_like(x) for _ in range(plan.world_size)]
    dist.all_gather(shards, x.contiguous(), group=plan.group)
    return torch.cat(shards, dim=dim).narrow(dim, 0, plan.seq_len)


# --- the all-to-alls, stock form -------------------------------------------------


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    x = funcol.all_to_all_single(x, None, None, group)
    # Eager: an AsyncCollectiveTensor, waited here. Traced: funcol already inserted wait_tensor.
    if isinstance(x, funcol.AsyncCollectiveTensor):
        x = x.wait()
    return x


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup, world_size: int) -> torch.Tensor:
    """``[B, L, H, D]`` sequence shard -> received ``[P, L, B, H/P, D]`` (chunk j from rank j).

    Fewer heads than ranks (``H < P``, K/V under GQA): each head is first repeated to the
    ``P/H`` ranks that read it (:func:`kv_repeats`), so every rank receives one head.
    """
    if x.shape[2] < world_size:
        x = x.repeat_interleave(kv_repeats(x.shape[2], world_size), dim=2)
    batch, length, heads, head_dim = x.shape
    x = x.reshape(batch, length, world_size, heads // world_size, head_dim).permute(2, 1, 0, 3, 4).contiguous()
    return _all_to_all(x, group)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup, world_size: int) -> torch.Tensor:
    """``[B, S, H/P, D]`` head shard -> ``[B, S/P, H, D]`` sequence shard."""
    batch, seq, local_heads, head_dim = x.shape
    x = x.reshape(batch, world_size, seq // world_size, local_heads, head_dim).permute(1, 3, 0, 2, 4).contiguous()
    x = _all_to_all(x, group)  # [P, H/P, B, S/P, D], chunk j: rank j's heads
    return x.flatten(0, 1).permute(1, 2, 0, 3)


def merge_sequence(recv: torch.Tensor) -> torch.Tensor:
    """Received ``[P, L, B, h, D]`` -> ``[B, P*L, h, D]`` (rank-major = global token order)."""
    return recv.flatten(0, 1).permute(1, 0, 2, 3)


def merge_prefixed_sequence(recv: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Received ``cat([prefix, shard])`` from every rank -> ``[B, prefix + P*L, h, D]``.

    Every rank sent the same (replicated) prefix: keep one copy (rank 0's chunk), then
    the shards in rank order. This is the stock "slice back".
    """
    prefix = recv[0, :prefix_len]
    suffix = recv[:, prefix_len:].flatten(0, 1)
    return torch.cat([prefix, suffix], dim=0).permute(1, 0, 2, 3)


# --- the layer ---------------------------------------------------------------------


class UlyssesCosmos3GenLayer(Cosmos3GenLayer):
    """:class:`Cosmos3GenLayer` on a sequence shard, attention over the group by Ulysses.

    Same parameters (``load_state_dict`` of a ``Cosmos3GenLayer`` works). Inputs are this
    rank's shards from :func:`shard_sequence` (``hidden_states`` ``[B, S/P, hidden]``,
    ``cos``/``sin`` ``[B, S/P, D]``) and the replicated prefix ``[B, prefix, Hkv, D]``.
    """

    def __init__(self, config: Cosmos3Config, plan: UlyssesPlan):
        check_heads(config.num_heads, config.num_kv_heads, plan.world_size)
        super().__init__(config)
        self.plan = plan

    @classmethod
    def from_layer(cls, layer: Cosmos3GenLayer, config: Cosmos3Config, plan: UlyssesPlan) -> UlyssesCosmos3GenLayer:
        reference = next(layer.parameters())
        sp_layer = cls(config, plan).to(device=reference.device, dtype=reference.dtype)
        sp_layer.load_state_dict(layer.state_dict())
        return sp_layer

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_prefix: torch.Tensor,
        v_prefix: torch.Tensor,
    ) -> torch.Tensor:
        group, world_size = self.plan.group, self.plan.world_size
        residual = hidden_states
        q, k, v = self.rotated_qkv(hidden_states, cos, sin)

        # Ulysses: full cat with the replicated prefix, all-to-all, slice the prefix back.
        prefix_len = k_prefix.shape[1]
        k_all = torch.cat([k_prefix, k], dim=1)
        v_all = torch.cat([v_prefix, v], dim=1)
        q = merge_sequence(seq_to_heads(q, group, world_size))
        k_all = merge_prefixed_sequence(seq_to_heads(k_all, group, world_size), prefix_len)
        v_all = merge_prefixed_sequence(seq_to_heads(v_all, group, world_size), prefix_len)

        mask = None
        if self.plan.padding:  # padded tokens sit at the end of the gathered sequence
            keys = prefix_len + self.plan.padded_len
            mask = (torch.arange(keys, device=q.device) < prefix_len + self.plan.seq_len).view(1, keys)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), attn_mask=mask, enable_gqa=True
        )
        attn = heads_to_seq(attn.transpose(1, 2), group, world_size).flatten(2)
        return self.mlp_residual(residual + self.to_out(attn))
