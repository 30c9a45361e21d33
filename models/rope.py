"""Rotary-embedding tables in the two layouts the reference models consume.

Wan: interleaved pairs. Channels (2i, 2i+1) share one frequency, so each table is a
per-pair angle table ``repeat_interleave(2)``-ed to full head width; the head dim is split
into time / height / width sections, each rotated by its own grid coordinate. fp32,
``[1, S, 1, D]``.

Qwen3 (Cosmos3): half-split. Channel i and channel i + D/2 share one frequency, so each
table is ``cat(freqs, freqs)``; built in fp32 and cast to the model dtype, ``[B, S, D]``.
"""

import torch


def wan_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """How Wan splits the head dim between the time, height and width axes (each even)."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def wan_rope_tables(
    head_dim: int,
    grid: tuple[int, int, int],
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(freqs_cos, freqs_sin)``, each fp32 ``[1, F*H*W, 1, head_dim]``, tokens in (f, h, w) order."""
    frames, height, width = grid
    # Each token's coordinate along each axis, token order f-major like the patchified latent.
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(frames, dtype=torch.float64),
            torch.arange(height, dtype=torch.float64),
            torch.arange(width, dtype=torch.float64),
            indexing="ij",
        ),
        dim=-1,
    ).reshape(-1, 3)
    angles = []
    for axis, axis_dim in enumerate(wan_axis_dims(head_dim)):
        # float64 like the reference implementation: fp32 angles lose precision at long grids.
        inv_freq = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
        angles.append(torch.outer(coords[:, axis], inv_freq))
    pair_angles = torch.cat(angles, dim=-1)
    freqs_cos = pair_angles.cos().repeat_interleave(2, dim=-1).float()
    freqs_sin = pair_angles.sin().repeat_interleave(2, dim=-1).float()
    seq_len = frames * height * width
    return (
        freqs_cos.reshape(1, seq_len, 1, head_dim).to(device),
        freqs_sin.reshape(1, seq_len, 1, head_dim).to(device),
    )


def increasing_positions(batch_size: int, seq_len: int, start: int = 0, seed: int = 0) -> torch.Tensor:
    """Strictly increasing int64 positions ``[B, S]`` from ``start`` with random gaps of 1..3.

    Real position ids are not always ``arange`` (mRoPE, packed sequences), and gaps make
    every frequency's angle differ from one token to the next; the seed keeps it reproducible.
    """
    generator = torch.Generator().manual_seed(seed)
    gaps = torch.randint(1, 4, (batch_size, seq_len), generator=generator)
    return start + torch.cumsum(gaps, dim=1) - gaps[:, :1]


def qwen3_rope_tables(
    positions: torch.Tensor,
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[B, S, head_dim]`` in ``dtype``, for int positions ``[B, S]``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
