"""Cosmos3 generation-branch decoder layer, in the stock form the compiler rewrites.

Cosmos3's backbone is a Qwen3-style mixture-of-transformers: understanding (text) tokens
and generation (video) tokens have separate weights. During denoising the understanding
K/V are fixed for a prompt, so serving engines cache them once and run only the generation
branch per step: the generation tokens attend over ``cat([K_prefix, K_gen])``. This module
is that per-step generation branch, written the way the stock code writes it (one fused
QKV projection split with ``.split`` + ``.contiguous().view``, per-head ``F.rms_norm``,
``rotate_half`` RoPE, a full-prefix ``torch.cat`` before SDPA).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import Cosmos3Config
from .rope import increasing_positions, qwen3_rope_tables


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _norm_weight(size: int) -> nn.Parameter:
    # Random around 1 rather than all ones so that a norm applied with the wrong weight
    # (q's weight on k, or none at all) changes the numbers.
    return nn.Parameter(1.0 + 0.1 * torch.randn(size))


class Cosmos3GenLayer(nn.Module):
    def __init__(self, config: Cosmos3Config):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.rms_norm_eps = config.eps
        self.q_norm_eps = config.eps
        self.k_norm_eps = config.eps

        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self.input_norm_weight = _norm_weight(config.hidden_size)
        self.to_qkv = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=False)
        self.q_norm_weight = _norm_weight(config.head_dim)
        self.k_norm_weight = _norm_weight(config.head_dim)
        self.to_out = nn.Linear(q_size, config.hidden_size, bias=False)

        self.post_attention_norm_weight = _norm_weight(config.hidden_size)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_prefix: torch.Tensor,
        v_prefix: torch.Tensor,
    ) -> torch.Tensor:
        """``hidden_states`` ``[B, S, hidden]``; ``cos``/``sin`` ``[B, S, D]``;
        ``k_prefix``/``v_prefix`` ``[B, P, Hkv, D]``, already normed and rotated."""
        residual = hidden_states
        q, k, v = self.rotated_qkv(hidden_states, cos, sin)
        k_all = torch.cat([k_prefix, k], dim=1)
        v_all = torch.cat([v_prefix, v], dim=1)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), enable_gqa=True
        )
        attn = attn.transpose(1, 2).flatten(2)
        return self.mlp_residual(residual + self.to_out(attn))

    def rotated_qkv(
        self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention front, in stock form: pre-norm, packed projection, split + contiguous
        views, per-head norm, half-split RoPE. Returns q ``[B, S, H, D]``, k and v ``[B, S, Hkv, D]``."""
        batch_size, seq_len, _ = hidden_states.shape
        head_dim = self.head_dim
        hidden_states = F.rms_norm(
            hidden_states, (hidden_states.shape[-1],), self.input_norm_weight, self.rms_norm_eps
        )

        qkv = self.to_qkv(hidden_states)
        q, k, v = qkv.split(
            [self.num_heads * head_dim, self.num_kv_heads * head_dim, self.num_kv_heads * head_dim], dim=-1
        )
        q = q.contiguous().view(batch_size, seq_len, self.num_heads, head_dim)
        k = k.contiguous().view(batch_size, seq_len, self.num_kv_heads, head_dim)
        v = v.contiguous().view(batch_size, seq_len, self.num_kv_heads, head_dim)

        q = F.rms_norm(q, (head_dim,), self.q_norm_weight, self.q_norm_eps)
        k = F.rms_norm(k, (head_dim,), self.k_norm_weight, self.k_norm_eps)

        cos = cos.unsqueeze(2)
        sin = sin.unsqueeze(2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def mlp_residual(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Post-attention norm and SwiGLU MLP, with the residual."""
        residual = hidden_states
        hidden_states = F.rms_norm(
            hidden_states, (hidden_states.shape[-1],), self.post_attention_norm_weight, self.rms_norm_eps
        )
        hidden_states = self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
        return residual + hidden_states


class Cosmos3GenStack(nn.Module):
    """``config.num_layers`` generation layers; layer i attends over ``prefix_kv[i]``."""

    def __init__(self, config: Cosmos3Config):
        super().__init__()
        self.layers = nn.ModuleList(Cosmos3GenLayer(config) for _ in range(config.num_layers))

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        if len(prefix_kv) != len(self.layers):
            raise ValueError(f"{len(self.layers)} layers need as many prefix K/V pairs, got {len(prefix_kv)}")
        for layer, (k_prefix, v_prefix) in zip(self.layers, prefix_kv):
            hidden_states = layer(hidden_states, cos, sin, k_prefix, v_prefix)
        return hidden_states


def build_prefix_kv(
    config: Cosmos3Config,
    batch_size: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cached understanding K/V, one ``(k_prefix, v_prefix)`` pair ``[B, P, Hkv, D]`` per layer.

    K is RMS-normed per head and rotated at positions ``0..P-1`` like the real cache, so its
    magnitudes and phases look like those of the generation K it is concatenated with.
    """
    shape = (batch_size, config.prefix_len, config.num_kv_heads, config.head_dim)
    positions = torch.arange(config.prefix_len).expand(batch_size, -1)
    cos, sin = qwen3_rope_tables(positions, config.head_dim, config.rope_theta, torch.float32)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    prefix_kv = []
    for _ in range(config.num_layers):
        k = F.rms_norm(torch.randn(shape, generator=generator), (config.head_dim,), eps=config.eps)
        k = k * cos + rotate_half(k) * sin
        v = torch.randn(shape, generator=generator)
        prefix_kv.append((k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)))
    return prefix_kv


def cosmos3_example_inputs(
    config: Cosmos3Config,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``(hidden_states, cos, sin, prefix_kv)`` for ``Cosmos3GenStack`` at ``config.gen_seq_len`` tokens.

    Layer inputs are ``hidden_states, cos, sin, *prefix_kv[0]``. Generation positions
    continue after the prefix. Built on the CPU from ``seed``, so identical on every device.
    """
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(batch_size, config.gen_seq_len, config.hidden_size, generator=generator)
    positions = increasing_positions(batch_size, config.gen_seq_len, start=config.prefix_len, seed=seed)
    cos, sin = qwen3_rope_tables(positions, config.head_dim, config.rope_theta, dtype)
    prefix_kv = build_prefix_kv(config, batch_size, generator, dtype, device)
    return hidden_states.to(device=device, dtype=dtype), cos.to(device), sin.to(device), prefix_kv
