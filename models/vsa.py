"""Video sparse attention (VSA) in the stock form the compiler rewrites, and a Wan block using it.

The tokens of a ``(T, H, W)`` latent grid are grouped into ``4x4x4`` tiles (the trailing
tiles of an axis the tile does not divide are partial). Attention is block-sparse over the
tiles: every query tile attends to the ``topk`` key tiles with the highest pooled (mean
over the tile) attention score.

The tile/untile code is written as FastVideo and sglang write it::

    def tile(x):                               # x [B, S, heads, D], tokens in (t, h, w) order
        buf = torch.zeros(B, P, heads, D)      # P = number of tiles * 64: a fresh zero fill
        buf[:, non_pad_index] = x[:, tile_partition_indices]      # gather, then scatter
        return buf

    def untile(x):                             # x [B, P, heads, D]
        return x[:, non_pad_index][:, reverse_tile_partition_indices]   # two gathers

Tile ``i`` occupies rows ``[64 i, 64 i + 64)`` of the padded buffer; its real tokens come
first and the rest are pad rows, which stay zero (the pooled means rely on that).

The index tensors depend only on the grid. Stock code obtains them in one of two ways,
both supported here (``index_form``):

- ``"buffers"``: built once for the grid and kept as non-persistent module buffers (as
  sglang/FastVideo's ``lru_cache``-d metadata does). Under ``torch.compile`` they reach the
  graph as inputs.
- ``"per_call"``: rebuilt inside ``forward`` on every call from the grid (Python ints) with
  ``arange``/slicing/``cat``/``argsort``, as naive model code does. Under ``torch.compile``
  they are ops in the graph that depend on no input: step-invariant by construction.

``non_pad_index`` is built from Python tile sizes (a ``cat`` of ``arange`` pieces), not
with FastVideo's boolean mask (``index_pad[mask]``), whose data-dependent size would break
the graph.

The attention itself is plain torch (gather the selected K/V tiles, one SDPA call with a
key-padding mask); it is correct everywhere and fast nowhere. It is there so the block is
a realistic graph around the tile/untile index work, not as a VSA kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .configs import WanConfig
from .wan import WanAttention, WanBlock, apply_interleaved_rope

VSA_TILE_SIZE = (4, 4, 4)


# --- index tensors ---------------------------------------------------------------


def num_tiles(grid: tuple[int, int, int], tile_size: tuple[int, int, int] = VSA_TILE_SIZE) -> tuple[int, int, int]:
    return tuple(math.ceil(g / t) for g, t in zip(grid, tile_size))


def tile_sizes(grid: tuple[int, int, int], tile_size: tuple[int, int, int] = VSA_TILE_SIZE) -> list[int]:
    """Real (non-pad) tokens in each tile, tiles in (t, h, w) order, as Python ints."""
    per_axis = [
        [min(t, g - start) for start in range(0, g, t)] for g, t in zip(grid, tile_size)
    ]
    return [a * b * c for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]


def padded_len(grid: tuple[int, int, int], tile_size: tuple[int, int, int] = VSA_TILE_SIZE) -> int:
    return math.prod(num_tiles(grid, tile_size)) * math.prod(tile_size)


def tile_partition_indices(
    grid: tuple[int, int, int], tile_size: tuple[int, int, int] = VSA_TILE_SIZE, device=None
) -> torch.Tensor:
    """Token (in (t, h, w) order) at each position of the tiled order, int64 ``[S]``."""
    T, H, W = grid
    ts, hs, ws = tile_size
    indices = torch.arange(T * H * W, device=device, dtype=torch.long).reshape(T, H, W)
    pieces = [
        indices[t : t + ts, h : h + hs, w : w + ws].flatten()
        for t in range(0, T, ts)
        for h in range(0, H, hs)
        for w in range(0, W, ws)
    ]
    return torch.cat(pieces)


def reverse_tile_partition_indices(
    grid: tuple[int, int, int], tile_size: tuple[int, int, int] = VSA_TILE_SIZE, device=None
) -> torch.Tensor:
    """The inverse permutation: position in the tiled order of each token, int64 ``[S]``."""
    return torch.argsort(tile_partition_indices(grid, tile_size, device))


def variable_block_sizes(
    grid: tuple[int, int, int], tile_size: tuple[int, int, int] = VSA_TILE_SIZE, device=None
) -> torch.Tensor:
    """Real tokens per tile, int64 ``[num tiles]`` (sglang's ``arange``/``clamp`` form)."""
    counts = []
    for g, t, n in zip(grid, tile_size, num_tiles(grid, tile_size)):
        counts.append((g - torch.arange(n, device=device) * t).clamp(max=t))
    sizes = counts[0].view(-1, 1, 1) * counts[1].view(1, -1, 1) * counts[2].view(1, 1, -1)
    return sizes.reshape(-1).to(torch.long)


def non_pad_index(
    grid: tuple[int, int, int], tile_size: tuple[int, int, int] = VSA_TILE_SIZE, device=None
) -> torch.Tensor:
    """Row of the padded buffer that each token of the tiled order goes to, int64 ``[S]``."""
    block = math.prod(tile_size)
    return torch.cat(
        [torch.arange(i * block, i * block + size, device=device) for i, size in enumerate(tile_sizes(grid, tile_size))]
    )


def vsa_indices(
    grid: tuple[int, int, int], tile_size: tuple[int, int, int] = VSA_TILE_SIZE, device=None
) -> dict[str, torch.Tensor]:
    return {
        "tile_partition_indices": tile_partition_indices(grid, tile_size, device),
        "reverse_tile_partition_indices": reverse_tile_partition_indices(grid, tile_size, device),
        "non_pad_index": non_pad_index(grid, tile_size, device),
        "variable_block_sizes": variable_block_sizes(grid, tile_size, device),
    }


# --- tile / untile (the stock forms) ----------------------------------------------


def tile(x: torch.Tensor, tile_partition_indices: torch.Tensor, non_pad_index: torch.Tensor, padded_len: int) -> torch.Tensor:
    """``[B, S, heads, D]`` in (t, h, w) order -> ``[B, P, heads, D]`` tiled, pad rows zero."""
    x_padded = torch.zeros(
        (x.shape[0], padded_len, x.shape[-2], x.shape[-1]), device=x.device, dtype=x.dtype
    )
    x_padded[:, non_pad_index] = x[:, tile_partition_indices]
    return x_padded


def untile(x: torch.Tensor, reverse_tile_partition_indices: torch.Tensor, non_pad_index: torch.Tensor) -> torch.Tensor:
    """``[B, P, heads, D]`` tiled -> ``[B, S, heads, D]`` in (t, h, w) order."""
    return x[:, non_pad_index][:, reverse_tile_partition_indices]


# --- block-sparse attention over tiles --------------------------------------------


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_sizes: torch.Tensor,
    topk: int,
    block: int = 64,
) -> torch.Tensor:
    """Tiled ``q``/``k``/``v`` ``[B, P, heads, D]`` (pad rows zero) -> ``[B, P, heads, D]``.

    Each query tile attends to the ``topk`` key tiles whose pooled keys score highest
    against its pooled query (mean over the tile's real tokens, fp32), pad keys masked.
    Rows of pad queries are computed but meaningless (``untile`` drops them).
    """
    B, P, heads, D = q.shape
    nb = P // block
    topk = min(topk, nb)

    def per_tile(t):  # [B, P, heads, D] -> [B, heads, nb, block, D]
        return t.view(B, nb, block, heads, D).permute(0, 3, 1, 2, 4)

    qt, kt, vt = per_tile(q), per_tile(k), per_tile(v)
    sizes = block_sizes.to(torch.float32).view(nb, 1)
    q_pool = qt.float().sum(dim=3) / sizes  # [B, heads, nb, D]; pad rows are zero
    k_pool = kt.float().sum(dim=3) / sizes
    scores = q_pool @ k_pool.transpose(-1, -2)  # [B, heads, nb, nb]
    selected = scores.topk(topk, dim=-1).indices  # [B, heads, nb, topk]

    # Flat tile number of each selected key tile in [B * heads * nb].
    base = (torch.arange(B * heads, device=q.device) * nb).view(B, heads, 1, 1)
    flat = (selected + base).reshape(-1)
    k_sel = kt.reshape(B * heads * nb, block, D)[flat].view(B, heads * nb, topk * block, D)
    v_sel = vt.reshape(B * heads * nb, block, D)[flat].view(B, heads * nb, topk * block, D)
    key_valid = torch.arange(block, device=q.device).view(1, block) < block_sizes.view(nb, 1)  # [nb, block]
    mask = key_valid[selected].view(B, heads * nb, 1, topk * block)

    out = F.scaled_dot_product_attention(qt.reshape(B, heads * nb, block, D), k_sel, v_sel, attn_mask=mask)
    return out.view(B, heads, nb, block, D).permute(0, 2, 3, 1, 4).reshape(B, P, heads, D)


def topk_for_sparsity(grid: tuple[int, int, int], sparsity: float, tile_size: tuple[int, int, int] = VSA_TILE_SIZE) -> int:
    """Key tiles per query tile at ``sparsity`` (FastVideo: ``ceil((1 - sparsity) * tiles)``)."""
    return max(1, math.ceil((1.0 - sparsity) * math.prod(num_tiles(grid, tile_size))))


# --- a Wan-style block using it ----------------------------------------------------


class VSAWanAttention(WanAttention):
    """Wan self-attention (q/k RMSNorm across heads, interleaved RoPE) with VSA over a fixed grid."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        eps: float,
        grid: tuple[int, int, int],
        topk: int,
        index_form: str = "buffers",
        tile_size: tuple[int, int, int] = VSA_TILE_SIZE,
    ):
        super().__init__(dim, num_heads, eps)
        if index_form not in ("buffers", "per_call"):
            raise ValueError(f"index_form must be 'buffers' or 'per_call', got {index_form!r}")
        self.grid = tuple(grid)
        self.tile_size = tuple(tile_size)
        self.topk = topk
        self.index_form = index_form
        self.padded_len = padded_len(self.grid, self.tile_size)
        if index_form == "buffers":
            for name, value in vsa_indices(self.grid, self.tile_size).items():
                self.register_buffer(name, value, persistent=False)

    def indices(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self.index_form == "per_call":
            return vsa_indices(self.grid, self.tile_size, device)
        return {
            "tile_partition_indices": self.tile_partition_indices,
            "reverse_tile_partition_indices": self.reverse_tile_partition_indices,
            "non_pad_index": self.non_pad_index,
            "variable_block_sizes": self.variable_block_sizes,
        }

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if context is not None:
            raise ValueError("VSA is self-attention only")
        query = self.norm_q(self.to_q(hidden_states)).unflatten(2, (self.num_heads, -1))
        key = self.norm_k(self.to_k(hidden_states)).unflatten(2, (self.num_heads, -1))
        value = self.to_v(hidden_states).unflatten(2, (self.num_heads, -1))
        if rotary_emb is not None:
            query = apply_interleaved_rope(query, *rotary_emb)
            key = apply_interleaved_rope(key, *rotary_emb)

        idx = self.indices(hidden_states.device)
        tidx, npi = idx["tile_partition_indices"], idx["non_pad_index"]
        q, k, v = (tile(t, tidx, npi, self.padded_len) for t in (query, key, value))
        out = block_sparse_attention(q, k, v, idx["variable_block_sizes"], self.topk, math.prod(self.tile_size))
        out = untile(out, idx["reverse_tile_partition_indices"], npi)
        return self.to_out(out.flatten(2, 3).type_as(query))


class VSAWanBlock(WanBlock):
    """``WanBlock`` whose self-attention is :class:`VSAWanAttention` over ``grid`` (default: the config's)."""

    def __init__(
        self,
        config: WanConfig,
        grid: tuple[int, int, int] | None = None,
        sparsity: float = 0.9,
        topk: int | None = None,
        index_form: str = "buffers",
    ):
        super().__init__(config)
        grid = tuple(grid or config.rope_grid)
        if topk is None:
            topk = topk_for_sparsity(grid, sparsity)
        self.attn1 = VSAWanAttention(config.dim, config.num_heads, config.eps, grid, topk, index_form)


def vsa_config(base: WanConfig, grid: tuple[int, int, int]) -> WanConfig:
    """``base`` with its latent grid set so that the token grid (after patchifying) is ``grid``."""
    import dataclasses

    latent = [g * p for g, p in zip(grid, base.patch_size)]
    return dataclasses.replace(base, latent_frames=latent[0], latent_height=latent[1], latent_width=latent[2])
