"""A denoising loop in the stock form: a host-side timestep read inside every step.

Pipelines commonly turn the step's timestep tensor into a Python int
(``int(timestep.flatten()[0].item())``) to index per-step tables. That is a device-to-host
sync each step and, under default Dynamo settings, a graph break. ``DenoiseStep`` does
exactly that to look up its sinusoidal time embedding, and also rebuilds its RoPE tables on
every call, as stock models do; ``denoise`` runs the flow-matching Euler loop around it.
"""

import math

import torch
import torch.nn as nn

from .configs import WanConfig
from .rope import wan_rope_tables
from .wan import FP32LayerNorm, WanStack


def sinusoidal_timestep_table(num_train_timesteps: int, freq_dim: int) -> torch.Tensor:
    """``[num_train_timesteps, freq_dim]`` fp32: row t is ``cat(cos(t * f), sin(t * f))``."""
    half = freq_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = torch.arange(num_train_timesteps, dtype=torch.float32)[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class DenoiseStep(nn.Module):
    """Velocity prediction of a small Wan-like model on token latents ``[B, S, in_channels]``."""

    def __init__(self, config: WanConfig, num_train_timesteps: int = 1000):
        super().__init__()
        self.config = config
        dim = config.dim
        self.register_buffer(
            "timestep_table", sinusoidal_timestep_table(num_train_timesteps, config.freq_dim), persistent=False
        )
        self.time_embedder = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.proj_in = nn.Linear(config.in_channels, dim)
        self.blocks = WanStack(config)
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        # The velocity lives in latent space, so the head maps back to in_channels.
        self.proj_out = nn.Linear(dim, config.in_channels)

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """``latents`` ``[B, config.seq_len, in_channels]``, ``timestep`` int ``[B]`` (all equal),
        ``encoder_hidden_states`` ``[B, L, dim]``; returns the velocity, shaped like ``latents``."""
        # Host read of the step index: the sync the compiler is meant to hoist.
        t = int(timestep.flatten()[0].item())
        temb = self.time_embedder(self.timestep_table[t].to(latents.dtype)).unsqueeze(0)
        modulation = self.time_proj(temb).unflatten(1, (6, -1))

        # Rebuilt every step although it depends only on the shape: step-invariant work.
        rotary_emb = wan_rope_tables(
            self.config.head_dim, self.config.rope_grid, self.config.rope_theta, device=latents.device
        )
        hidden_states = self.proj_in(latents)
        hidden_states = self.blocks(hidden_states, encoder_hidden_states, modulation, rotary_emb)

        shift, scale = (self.scale_shift_table + temb.float().unsqueeze(1)).chunk(2, dim=1)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        return self.proj_out(hidden_states)


def make_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``num_steps`` int64 timesteps, evenly spaced from ``num_train_timesteps - 1`` down to 0."""
    return torch.linspace(num_train_timesteps - 1, 0, num_steps).round().long()


def denoise(
    step_module: nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Flow-matching Euler loop: ``x <- x + (sigma_next - sigma) * v(x, t)`` over ``timesteps``,
    with ``sigma = t / num_train_timesteps`` and a final sigma of 0."""
    sigmas = torch.cat([timesteps.float() / num_train_timesteps, timesteps.new_zeros(1, dtype=torch.float32)])
    sigmas = sigmas.to(latents.device)
    for i in range(len(timesteps)):
        timestep = timesteps[i].expand(latents.shape[0]).to(latents.device)
        velocity = step_module(latents, timestep, encoder_hidden_states)
        latents = (latents.float() + (sigmas[i + 1] - sigmas[i]) * velocity.float()).to(latents.dtype)
    return latents


def loop_example_inputs(
    config: WanConfig,
    num_steps: int = 4,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(latents, timesteps, encoder_hidden_states)`` for ``denoise(DenoiseStep(config), ...)``."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch_size, config.seq_len, config.in_channels, generator=generator)
    encoder_hidden_states = torch.randn(batch_size, config.text_len, config.dim, generator=generator)
    return (
        latents.to(device=device, dtype=dtype),
        make_timesteps(num_steps).to(device),
        encoder_hidden_states.to(device=device, dtype=dtype),
    )
